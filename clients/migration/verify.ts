// Checking a copy against the paused source, byte for byte, without reading holes through a mapping (a
// read of a memfd's hole through a shared mapping allocates it: 256 MiB read = 256 MiB of new shmem).
// Both sides are read with pread(2), which returns zeros for holes and allocates nothing; only the union
// of both sides' data extents is compared, since outside it both read zero. A remote copy is compared by
// digests of 1 MiB blocks instead (the receiver computes its own, docs/migration.md "VERIFY").
import crypto from 'node:crypto';
import fs from 'node:fs';
import { hex } from '../../protocol/index.js';
import type { StreamRegion } from './stream.js';
import { unionExtents } from './extents.js';

/** Bytes per digest block, region-relative. */
export const VERIFY_BLOCK = 1 << 20;

/** Guest memory as a verifier reads it: per region, where it holds data and its bytes. */
export interface MemoryImage {
  /** Region-relative [from, to) extents where the region holds data; elsewhere it reads zero. */
  extents(r: StreamRegion): [number, number][];
  /** Fills `into` with the region's bytes at region-relative `offset` (holes read as zero). */
  read(r: StreamRegion, offset: number, into: Buffer): void;
}

export interface VerifyResult {
  identical: boolean;
  /** Guest bytes compared (or digested on this side). */
  checkedBytes: number;
  /** The first difference found, if any: the map, or a region's bytes. */
  difference?: string;
}

/** pread of `into.length` bytes at `position` of `fd`, short reads (end of file) left zero. */
export function preadFull(fd: number, into: Uint8Array, position: number): void {
  let done = 0;
  while (done < into.length) {
    const n = fs.readSync(fd, into, done, into.length - done, position + done);
    if (n === 0) {
      into.fill(0, done);
      return;
    }
    done += n;
  }
}

const key = (r: StreamRegion) => `${r.name}@${hex(r.gpa)}+${hex(r.size)}${r.readonly ? ' ro' : ''}`;

/** Where two maps differ (by name, gpa, size and access; ids are the source's and may differ), or undefined. */
export function mapDifference(source: readonly StreamRegion[], copy: readonly StreamRegion[]): string | undefined {
  const a = source.map(key).sort();
  const b = copy.map(key).sort();
  const missing = a.filter((x) => !b.includes(x));
  const extra = b.filter((x) => !a.includes(x));
  if (missing.length === 0 && extra.length === 0) return undefined;
  return `the maps differ: the source has ${missing.join(', ') || 'nothing more'}, the copy has ${extra.join(', ') || 'nothing more'}`;
}

/** Compares `copy` with `source` over `regions` (the same regions on both sides). */
export function compareImages(source: MemoryImage, copy: MemoryImage, regions: readonly StreamRegion[], chunk = VERIFY_BLOCK): VerifyResult {
  const a = Buffer.alloc(chunk);
  const b = Buffer.alloc(chunk);
  let checked = 0;
  for (const r of regions) {
    for (const [from, to] of unionExtents(source.extents(r), copy.extents(r))) {
      for (let at = from; at < to; at += chunk) {
        const n = Math.min(chunk, to - at);
        const x = a.subarray(0, n);
        const y = b.subarray(0, n);
        source.read(r, at, x);
        copy.read(r, at, y);
        if (x.compare(y) !== 0) {
          let i = 0;
          while (x[i] === y[i]) i++;
          return { identical: false, checkedBytes: checked + i, difference: `region ${r.name}: byte ${hex(at + i)} (GPA ${hex(r.gpa + at + i)}) differs` };
        }
        checked += n;
      }
    }
  }
  return { identical: true, checkedBytes: checked };
}

/** Block indices (of `block` bytes, region-relative) that a region's data extents touch. */
export function blocksOf(extents: readonly [number, number][], block = VERIFY_BLOCK): number[] {
  const out = new Set<number>();
  for (const [from, to] of extents) for (let i = Math.floor(from / block); i * block < to; i++) out.add(i);
  return [...out].sort((x, y) => x - y);
}

/** SHA-1 of block `index` of region `r` (the last block may be short). */
export function blockDigest(image: MemoryImage, r: StreamRegion, index: number, buf: Buffer, block = VERIFY_BLOCK): string {
  const n = Math.min(block, r.size - index * block);
  const view = buf.subarray(0, n);
  image.read(r, index * block, view);
  return crypto.createHash('sha1').update(view).digest('hex');
}

const zeroDigests = new Map<number, string>();
/** SHA-1 of `n` zero bytes (a block with no data on one side). */
export function zeroDigest(n: number): string {
  let d = zeroDigests.get(n);
  if (!d) {
    d = crypto.createHash('sha1').update(Buffer.alloc(n)).digest('hex');
    zeroDigests.set(n, d);
  }
  return d;
}

/** Digests of every block where `image` holds data, per region: what a receiver answers to VERIFY. */
export function imageDigests(image: MemoryImage, regions: readonly StreamRegion[], block = VERIFY_BLOCK): { id: number; blocks: [number, string][] }[] {
  const buf = Buffer.alloc(block);
  return regions.map((r) => ({
    id: r.id,
    blocks: blocksOf(image.extents(r), block).map((i) => [i, blockDigest(image, r, i, buf, block)] as [number, string]),
  }));
}

/**
 * Compares the source with a remote copy's digests: every block where either side holds data is digested
 * here and compared with the copy's (a block the copy did not list is all zero there).
 */
export function compareDigests(
  source: MemoryImage,
  regions: readonly StreamRegion[],
  remote: readonly { id: number; blocks: readonly [number, string][] }[],
  block = VERIFY_BLOCK,
): VerifyResult {
  const buf = Buffer.alloc(block);
  let checked = 0;
  for (const r of regions) {
    const theirs = new Map(remote.find((d) => d.id === r.id)?.blocks ?? []);
    const indices = new Set([...blocksOf(source.extents(r), block), ...theirs.keys()]);
    for (const i of [...indices].sort((x, y) => x - y)) {
      const n = Math.min(block, r.size - i * block);
      const mine = blockDigest(source, r, i, buf, block);
      if (mine !== (theirs.get(i) ?? zeroDigest(n))) {
        return {
          identical: false,
          checkedBytes: checked,
          difference: `region ${r.name}: the 1 MiB block at ${hex(i * block)} (GPA ${hex(r.gpa + i * block)}) differs`,
        };
      }
      checked += n;
    }
  }
  return { identical: true, checkedBytes: checked };
}
