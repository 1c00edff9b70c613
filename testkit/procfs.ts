// The kernel's own view of a process, read from /proc: what it maps, what it has locked, what it holds
// open, what state it is in. The judge of every claim the tests, the harness, the fuzzer, the benchmarks
// and the demo check: nothing here asks the broker or a client.
import fs from 'node:fs';
import { VHOST_LOG_NAME } from '../clients/vhost-user/log.js';

export interface FileMapping {
  /** The memfd's name (without "/memfd:" and " (deleted)"). */
  memfd: string;
  start: number;
  end: number;
  /** Offset in the file of `start`. */
  offset: number;
  writable: boolean;
  /** The permissions as the kernel prints them: `rw-s`, `r--s`, ... */
  perms: string;
}

const MAPS_LINE = /^([0-9a-f]+)-([0-9a-f]+) (\S{4}) ([0-9a-f]+) \S+ \d+\s+\/memfd:(.*?)(?: \(deleted\))?$/;
const MEMFD_LINK = /^\/memfd:(.*?)(?: \(deleted\))?$/;

/** The process's mappings of memfds, parsed (all of them; filter by name). */
export function memfdMappings(pid: number | 'self'): FileMapping[] {
  const out: FileMapping[] = [];
  for (const line of fs.readFileSync(`/proc/${pid}/maps`, 'utf8').split('\n')) {
    const m = MAPS_LINE.exec(line);
    if (!m) continue;
    out.push({
      memfd: m[5] as string,
      start: parseInt(m[1] as string, 16),
      end: parseInt(m[2] as string, 16),
      offset: parseInt(m[4] as string, 16),
      writable: (m[3] as string)[1] === 'w',
      perms: m[3] as string,
    });
  }
  return out;
}

/** The lines of /proc/PID/maps, as the kernel wrote them. */
export function mapsLines(pid: number | 'self'): string[] {
  return fs.readFileSync(`/proc/${pid}/maps`, 'utf8').split('\n').filter(Boolean);
}

/** Lines of /proc/PID/maps whose range holds `address` (the kernel may merge a mapping with a neighbour, so the line need not start there). */
export function mapsAt(pid: number | 'self', address: number): string[] {
  return mapsLines(pid).filter((l) => {
    const m = /^([0-9a-f]+)-([0-9a-f]+) /.exec(l);
    return m !== null && parseInt(m[1] as string, 16) <= address && address < parseInt(m[2] as string, 16);
  });
}

/** Lines of /proc/PID/maps that map the memfd called `name`, as the kernel wrote them. */
export function memfdMaps(pid: number | 'self', name: string): string[] {
  return mapsLines(pid).filter((l) => MAPS_LINE.exec(l)?.[5] === name);
}

/** Start addresses (hex, as in /proc/PID/maps) of the mappings of memfd `name`. */
export function memfdStarts(pid: number | 'self', name: string): string[] {
  return memfdMaps(pid, name).map((l) => l.split('-')[0] as string);
}

/** Bytes of memfd `name` that the process maps. */
export function memfdMappedBytes(pid: number | 'self', name: string): number {
  return memfdMappings(pid)
    .filter((m) => m.memfd === name)
    .reduce((n, m) => n + m.end - m.start, 0);
}

/** Descriptors the process holds open. */
export function fdCount(pid: number | 'self' = 'self'): number {
  return fs.readdirSync(`/proc/${pid}/fd`).length;
}

/** The process's open descriptors, by number, with what /proc/PID/fd links them to. */
export function fdTargets(pid: number | 'self' = 'self'): Map<string, string> {
  const out = new Map<string, string>();
  for (const fd of fs.readdirSync(`/proc/${pid}/fd`)) {
    try {
      out.set(fd, fs.readlinkSync(`/proc/${pid}/fd/${fd}`));
    } catch {
      // closed while we looked (readdir's own fd, for one)
    }
  }
  return out;
}

/** Whether the process holds a descriptor of the memfd called `name`. */
export function holdsMemfd(pid: number | 'self', name: string): boolean {
  return [...fdTargets(pid).values()].some((t) => MEMFD_LINK.exec(t)?.[1] === name);
}

/** The open flags of descriptor `fd` (O_ACCMODE, O_NONBLOCK, O_CLOEXEC, ...), from /proc/PID/fdinfo. */
export function fdFlags(pid: number | 'self', fd: number): number {
  const m = /^flags:\s*([0-7]+)$/m.exec(fs.readFileSync(`/proc/${pid}/fdinfo/${fd}`, 'utf8'));
  if (!m) throw new Error(`no flags line for fd ${fd} of ${pid}`);
  return parseInt(m[1] as string, 8);
}

/** VmLck of the process, in KiB: what it has locked (mlock). */
export function vmLckKiB(pid: number | 'self' = 'self'): number {
  const m = /^VmLck:\s+(\d+) kB$/m.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  return Number(m?.[1] ?? NaN);
}

/** Bytes the process has locked (mlock), per /proc/PID/status. */
export function lockedBytes(pid: number | 'self'): number {
  return vmLckKiB(pid) * 1024;
}

/** The broker's dirty bitmaps are memfds named `dirty:<region>` (broker/dirty.ts). */
export const BITMAP_PREFIX = 'dirty:';

export interface FdCensus {
  /** memfds named with the census's prefix held open, by name (a name counts once per fd). */
  memfds: Map<string, number>;
  /** Dirty bitmaps (broker-made memfds) held open. */
  bitmaps: number;
  /** vhost-user dirty logs (a bridge's memfd shared with its back-end) held open. */
  vhostLogs: number;
  sockets: number;
  /** pidfds (a broker holds one per socket connection, and those of clients it is fencing). */
  pidfds: number;
  /** Everything else: files, pipes, eventfds, epoll, /dev/kvm, other memfds, ... */
  other: number;
  total: number;
}

/** A census of nothing: what a process that is gone holds. */
export const emptyCensus = (): FdCensus => ({ memfds: new Map(), bitmaps: 0, vhostLogs: 0, sockets: 0, pidfds: 0, other: 0, total: 0 });

/** Classifies the process's open descriptors by what /proc/PID/fd links to; memfds named `memfdPrefix`... by name. */
export function fdCensus(pid: number | 'self', memfdPrefix: string): FdCensus {
  const census = emptyCensus();
  for (const target of fdTargets(pid).values()) {
    census.total++;
    const memfd = MEMFD_LINK.exec(target)?.[1];
    if (memfd?.startsWith(BITMAP_PREFIX)) census.bitmaps++;
    else if (memfd === VHOST_LOG_NAME) census.vhostLogs++;
    else if (memfd?.startsWith(memfdPrefix)) census.memfds.set(memfd, (census.memfds.get(memfd) ?? 0) + 1);
    else if (target.startsWith('socket:')) census.sockets++;
    else if (target === 'anon_inode:[pidfd]' || target.startsWith('pidfd:')) census.pidfds++;
    else census.other++;
  }
  return census;
}

/** What the kernel shows of a process at one moment: a process that is gone (or a zombie) maps, pins and holds nothing. */
export interface ProcessView {
  /** False once the process exited (reaped or not): then everything below is empty. */
  alive: boolean;
  maps: FileMapping[];
  lockedBytes: number;
  census: FdCensus;
}

const isGone = (err: unknown) => ['ENOENT', 'ESRCH'].includes((err as { code?: string }).code ?? '');
const exited = (status: string) => /^State:\s+[ZX]/m.test(status);

/**
 * The process's memfd mappings, locked bytes and descriptors (memfds named `memfdPrefix`... by name), read
 * so that its death at any moment is an answer, not an error: a process that exited before or while it was
 * read is reported `alive: false` with nothing mapped, locked or open (the kernel tore all of it down).
 * Only for a pid that cannot have been reused meanwhile (a child not yet reaped, or checked with
 * `startTime`).
 */
export function processView(pid: number, memfdPrefix: string): ProcessView {
  const dead: ProcessView = { alive: false, maps: [], lockedBytes: 0, census: emptyCensus() };
  try {
    const status = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
    if (exited(status)) return dead;
    const maps = memfdMappings(pid);
    const census = fdCensus(pid, memfdPrefix);
    const after = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
    // It died while we read: what we read may be half torn down; dead is the true answer now.
    if (exited(after)) return dead;
    const locked = Number(/^VmLck:\s+(\d+) kB$/m.exec(after)?.[1] ?? 0) * 1024;
    return { alive: true, maps, lockedBytes: locked, census };
  } catch (err) {
    // A read that failed because the process died under it (a zombie's fd table is not readable).
    if (isGone(err) || !alive(pid)) return dead;
    throw err;
  }
}

function alive(pid: number): boolean {
  try {
    return !exited(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  } catch {
    return false;
  }
}

/**
 * When the process started (clock ticks after boot, /proc/PID/stat field 22), or undefined once it is
 * gone: with the pid, it names one process (a pid alone may be reused by another once the first is reaped).
 */
export function startTime(pid: number): string | undefined {
  let stat: string;
  try {
    stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch {
    return undefined;
  }
  return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19];
}

/** The process's state letter from /proc/PID/stat (R, S, D, T stopped, Z, ...), or undefined once it is gone. */
export function processState(pid: number): string | undefined {
  let stat: string;
  try {
    stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch {
    return undefined;
  }
  // The command name (in parentheses) may itself contain spaces or parentheses: the state follows the last ')'.
  return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[0];
}

/**
 * Nanoseconds of CPU that process `pid` (all its threads) has used so far, from /proc/PID/task/TID/schedstat
 * (its first field: time spent on a CPU). 0 for a process that is gone.
 */
export function cpuNs(pid: number | 'self'): number {
  let total = 0;
  let tasks: string[];
  try {
    tasks = fs.readdirSync(`/proc/${pid}/task`);
  } catch {
    return 0;
  }
  for (const t of tasks) {
    try {
      total += Number(fs.readFileSync(`/proc/${pid}/task/${t}/schedstat`, 'utf8').split(' ')[0]);
    } catch {
      // The thread ended meanwhile.
    }
  }
  return total;
}
