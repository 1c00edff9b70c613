// What REPORT.dma (feature DMA_RULES) means: how many DMA mappings a region takes in a client's IOMMU,
// and whether all of them are aligned as the IOMMU needs. The broker (broker/policy.ts) predicts with
// these functions and the vfio-like client (clients/vfio/) counts with them, so the two cannot disagree.
import { GPA_LIMIT } from './constants.js';
import { InvalidArgError } from './errors.js';
import type { DmaRules } from './messages.js';
import { hex } from './units.js';

const PAGE = 4096;
const isPowerOfTwo = (n: number) => Number.isSafeInteger(n) && n >= 1 && 2 ** Math.round(Math.log2(n)) === n;

/** Refuses rules a client cannot mean (MMB_ERR_INVALID_ARG): sizes not page multiples, a bad alignment. */
export function checkDmaRules(rules: DmaRules): void {
  for (const key of ['chunkBytes', 'pieceBytes'] as const) {
    const v = rules[key];
    if (v === undefined) continue;
    if (v < PAGE || v % PAGE !== 0 || v > GPA_LIMIT)
      throw new InvalidArgError(`REPORT.dma.${key} ${hex(v)} must be a positive multiple of 4 KiB, at most 2^52`);
  }
  const a = rules.align;
  if (a === undefined) return;
  if (!isPowerOfTwo(a) || a > GPA_LIMIT) throw new InvalidArgError(`REPORT.dma.align ${hex(a)} must be a power of two, at most 2^52`);
  for (const key of ['chunkBytes', 'pieceBytes'] as const) {
    const v = rules[key];
    // Else some mapping inside a region would start off the alignment whatever the region's own.
    if (v !== undefined && v % a !== 0) throw new InvalidArgError(`REPORT.dma.${key} ${hex(v)} must be a multiple of align ${hex(a)}`);
  }
}

/**
 * DMA mappings a region of `size` bytes takes: chunks of `chunkBytes` from its start, each cut into
 * pieces of `pieceBytes` (the last of each shorter); one per region without rules.
 */
export function dmaMappingCount(size: number, rules: DmaRules | undefined): number {
  if (!rules || (rules.chunkBytes === undefined && rules.pieceBytes === undefined)) return 1;
  const chunk = Math.min(rules.chunkBytes ?? size, size);
  const piece = Math.min(rules.pieceBytes ?? chunk, chunk);
  const full = Math.floor(size / chunk);
  const rest = size - full * chunk;
  return full * Math.ceil(chunk / piece) + Math.ceil(rest / piece);
}

/**
 * Why a region at `gpa` of `size` bytes (IOVA = GPA) breaks the rules' alignment, or undefined if every
 * one of its DMA mappings starts and ends on it. With chunk and piece sizes multiples of `align`
 * (checkDmaRules), that is exactly: the region's start and size are multiples of it.
 */
export function dmaMisalignment(gpa: number, size: number, rules: DmaRules | undefined): string | undefined {
  const a = rules?.align;
  if (a === undefined || a <= 1) return undefined;
  if (gpa % a !== 0) return `its first DMA mapping would start at IOVA ${hex(gpa)}, not a multiple of ${hex(a)}`;
  if (size % a !== 0) return `its last DMA mapping would end at IOVA ${hex(gpa + size)}, not a multiple of ${hex(a)}`;
  return undefined;
}
