// The kernel's view of a process, the harness's judge: what it maps (/proc/PID/maps), what it holds open
// (/proc/PID/fd) and what it has locked (VmLck). Nothing here asks the broker or a client.
import fs from 'node:fs';
import { vmLckKiB } from '../cli/procfs.js';

export { memfdMappings, type FileMapping } from '../cli/procfs.js';

/** Every memfd the harness creates is named with this prefix, so its mappings and fds can be told apart. */
export const MEMFD_PREFIX = 'mmh-';
/** The broker's dirty bitmaps are memfds named `dirty:<region>` (broker/dirty.ts). */
export const BITMAP_PREFIX = 'dirty:';

export interface FdCensus {
  /** Harness memfds held open, by name (a name counts once per fd). */
  memfds: Map<string, number>;
  /** Dirty bitmaps (broker-made memfds) held open. */
  bitmaps: number;
  sockets: number;
  /** Pidfds (the broker keeps one per socket connection: SO_PEERPIDFD). */
  pidfds: number;
  /** Everything else: files, pipes, eventfds, epoll, /dev/kvm, ... */
  other: number;
  total: number;
}

/** Classifies the process's open descriptors by what /proc/PID/fd links to. */
export function fdCensus(pid: number): FdCensus {
  const census: FdCensus = { memfds: new Map(), bitmaps: 0, sockets: 0, pidfds: 0, other: 0, total: 0 };
  for (const fd of fs.readdirSync(`/proc/${pid}/fd`)) {
    let target: string;
    try {
      target = fs.readlinkSync(`/proc/${pid}/fd/${fd}`);
    } catch {
      continue; // closed while we looked (readdir's own fd, for one)
    }
    census.total++;
    const memfd = /^\/memfd:(.*?)(?: \(deleted\))?$/.exec(target)?.[1];
    if (memfd?.startsWith(MEMFD_PREFIX)) census.memfds.set(memfd, (census.memfds.get(memfd) ?? 0) + 1);
    else if (memfd?.startsWith(BITMAP_PREFIX)) census.bitmaps++;
    else if (target.startsWith('socket:')) census.sockets++;
    else if (target === 'anon_inode:[pidfd]') census.pidfds++;
    else census.other++;
  }
  return census;
}

/** Bytes the process has locked (mlock), per /proc/PID/status. */
export function lockedBytes(pid: number): number {
  return vmLckKiB(pid) * 1024;
}
