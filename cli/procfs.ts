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

/** Start addresses (hex, as in /proc/PID/maps) of the mappings of memfd `name`. */
export function memfdStarts(pid: number | 'self', name: string): string[] {
  return memfdMaps(pid, name).map((l) => l.split('-')[0] as string);
}

/** Bytes of memfd `name` that the process maps. */
export function memfdMappedBytes(pid: number | 'self', name: string): number {
  return memfdMaps(pid, name)
    .map((l) => (l.split(' ')[0] as string).split('-').map((h) => parseInt(h, 16)) as [number, number])
    .reduce((n, [lo, hi]) => n + hi - lo, 0);
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
