// The real vhost-user back-ends live in the testkit (testkit/backends.ts: the hotplug harness starts them
// too); the benchmarks and the tests import them from here as before.
export * from '../testkit/backends.js';
