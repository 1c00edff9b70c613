// The kernel's own view of a process, read from /proc: what it maps, what it has locked, what it holds
// open. The demo and the tests check claims with these rather than with the broker's counters.
import fs from 'node:fs';

/** Lines of /proc/PID/maps that map the memfd called `name`. */
export function memfdMaps(pid: number | 'self', name: string): string[] {
  return fs
    .readFileSync(`/proc/${pid}/maps`, 'utf8')
    .split('\n')
    .filter((l) => / \/memfd:(.*?)(?: \(deleted\))?$/.exec(l)?.[1] === name);
}

export interface FileMapping {
  /** The memfd's name (without "/memfd:" and " (deleted)"). */
  memfd: string;
  start: number;
  end: number;
  /** Offset in the file of `start`. */
  offset: number;
  writable: boolean;
}

const MAPS_LINE = /^([0-9a-f]+)-([0-9a-f]+) (\S{4}) ([0-9a-f]+) \S+ \d+\s+\/memfd:(.*?)(?: \(deleted\))?$/;

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
    });
  }
  return out;
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

/** VmLck of the process, in KiB: what it has locked (mlock). */
export function vmLckKiB(pid: number | 'self' = 'self'): number {
  const m = /^VmLck:\s+(\d+) kB$/m.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  return Number(m?.[1] ?? NaN);
}
