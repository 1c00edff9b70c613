// Hugetlb pages for tests: the testkit's (testkit/hugepages.ts), which the hotplug harness uses too.
export * from '../../testkit/hugepages.js';
