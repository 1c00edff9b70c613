// Sizes and addresses as people write them, in QEMU's syntax (4096, 128m, 1.5G, 2MiB, 0x100000000, 4G),
// and one style for printing them (IEC: 4 KiB, 128 MiB, 1.5 GiB; addresses in 0x hex). The command line,
// the examples and an embedding VMM parse and print with these.
import { GPA_LIMIT } from './constants.js';
import { InvalidArgError } from './errors.js';

const UNITS: Record<string, number> = { '': 1, B: 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40 };

/**
 * A byte count in QEMU's size syntax, plus IEC units: a whole or fractional number with an optional
 * suffix k, m, g or t (either case, powers of 1024; b for bytes), optionally followed by iB or B:
 * "4096", "128m", "128M", "1.5G", "2MiB", "64KiB", "1t". A fraction must come to a whole byte count.
 */
export function parseSize(text: string, what = 'size'): number {
  const m = /^(\d+(?:\.\d+)?)\s*(?:([kmgtb])(?:i?b)?)?$/i.exec(text.trim().replace(/_/g, ''));
  const example = '(examples: 4096, 128m, 1.5G, 2MiB)';
  if (!m) throw new InvalidArgError(`${what} ${JSON.stringify(text)} is not a size ${example}`);
  const scale = UNITS[(m[2] ?? '').toUpperCase()] as number;
  if (m[1]?.includes('.') && scale === 1) throw new InvalidArgError(`${what} ${JSON.stringify(text)}: a fraction needs a unit ${example}`);
  const n = Number(m[1]) * scale;
  if (!Number.isInteger(n)) throw new InvalidArgError(`${what} ${JSON.stringify(text)} is not a whole number of bytes (${n})`);
  if (!Number.isSafeInteger(n) || n > GPA_LIMIT) throw new InvalidArgError(`${what} ${JSON.stringify(text)} is too large (at most 4096T, 2^52 bytes)`);
  return n;
}

/** A guest-physical address: 0x hex, or decimal with an optional size suffix ("4G" is 0x100000000). */
export function parseAddress(text: string, what = 'address'): number {
  const t = text.trim().replace(/_/g, '');
  let n = NaN;
  if (/^0x[0-9a-f]+$/i.test(t)) n = Number.parseInt(t.slice(2), 16);
  else if (/^\d/.test(t)) {
    try {
      n = parseSize(t, what);
    } catch {
      n = NaN;
    }
  }
  if (!Number.isSafeInteger(n) || n >= GPA_LIMIT)
    throw new InvalidArgError(`${what} ${JSON.stringify(text)} is not an address below 2^52 (0x100000000, 4294967296 or 4G)`);
  return n;
}

/** An exact size in the largest IEC unit it is a whole multiple of: "128 MiB", "2 GiB", "12 KiB", "812 B". */
export function formatSize(bytes: number): string {
  for (const [unit, scale] of [
    ['TiB', 2 ** 40],
    ['GiB', 2 ** 30],
    ['MiB', 2 ** 20],
    ['KiB', 2 ** 10],
  ] as const) {
    if (bytes >= scale && bytes % scale === 0) return `${bytes / scale} ${unit}`;
  }
  return bytes >= 2 ** 10 ? formatBytes(bytes) : `${bytes} B`;
}

/** Any byte count, rounded for people: 812 B, 213.7 KiB, 12.5 MiB. */
export function formatBytes(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = bytes;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return u === 0 ? `${Math.round(v)} B` : `${v.toFixed(v >= 100 ? 0 : 1)} ${units[u]}`;
}

/** The one way addresses, sizes and flag words are printed: 0x and lower-case hex digits, no padding. */
export const hex = (n: number | bigint): string => `0x${n.toString(16)}`;
