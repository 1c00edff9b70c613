import { native } from '../../native/index.js';

/** The data extents of `fd` within [start, end), as half-open [from, to) pairs (holes left out). */
export function dataExtents(fd: number, start: number, end: number): [number, number][] {
  const out: [number, number][] = [];
  let pos = start;
  while (pos < end) {
    const data = native.seekData(fd, pos, false);
    if (data < 0 || data >= end) break;
    const hole = native.seekData(fd, data, true);
    const to = Math.min(hole < 0 ? end : hole, end);
    out.push([data, to]);
    pos = to;
  }
  return out;
}

/** Merges two sorted lists of [from, to) extents into their sorted union. */
export function unionExtents(a: readonly [number, number][], b: readonly [number, number][]): [number, number][] {
  const all = [...a, ...b].sort((x, y) => x[0] - y[0]);
  const out: [number, number][] = [];
  for (const [from, to] of all) {
    const last = out[out.length - 1];
    if (last && from <= last[1]) last[1] = Math.max(last[1], to);
    else out.push([from, to]);
  }
  return out;
}
