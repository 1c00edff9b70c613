// The kernel's view of a process, the harness's judge: testkit/procfs.ts reads /proc/PID/maps,
// /proc/PID/fd and VmLck. What is the harness's own is how it names its memfds.
import { fdCensus as census, type FdCensus } from '../testkit/procfs.js';

export { lockedBytes, memfdMappings, type FdCensus, type FileMapping } from '../testkit/procfs.js';

/** Every memfd the harness creates is named with this prefix, so its mappings and fds can be told apart. */
export const MEMFD_PREFIX = 'mmh-';

/** The process's descriptors, the harness's memfds by name. */
export const fdCensus = (pid: number): FdCensus => census(pid, MEMFD_PREFIX);
