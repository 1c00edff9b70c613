// The kernel's view of a process, the harness's judge: testkit/procfs.ts reads /proc/PID/maps,
// /proc/PID/fd and VmLck. What is the harness's own is how it names its memfds.
import { fdCensus as census, processView, type FdCensus, type ProcessView } from '../testkit/procfs.js';

export { emptyCensus, lockedBytes, memfdMappings, startTime, type FdCensus, type FileMapping, type ProcessView } from '../testkit/procfs.js';

/** Every memfd the harness creates is named with this prefix, so its mappings and fds can be told apart. */
export const MEMFD_PREFIX = 'mmh-';

/** The process's descriptors, the harness's memfds by name. */
export const fdCensus = (pid: number): FdCensus => census(pid, MEMFD_PREFIX);

/** The process's mappings, locked bytes and descriptors now; a process that is gone maps nothing (alive: false). */
export const viewOf = (pid: number): ProcessView => processView(pid, MEMFD_PREFIX);
