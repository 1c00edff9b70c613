// A subscriber's view of an I/O address space (feature IOAS, docs/ioas.md), beside its region view
// (view.ts): the IOVA mappings it has established, and the one mechanism that changes them, as for
// regions: compute what to drop and what to establish, and hand that to the client kind's IoasApplier.
//
// A mapping is identified by its IOVA (mappings of one IOAS never overlap) and established as a whole:
// the broker's unmaps name whole mappings. Two mappings with the same iova, size, gpa and access are the
// same establishment (a re-sync keeps it).
import { rangesOverlap, type IoasTxnOp, type IovaMapping } from '../protocol/index.js';

/**
 * What an IOAS applier must do, in this order: drop `unmapped` (mappings it established), then establish
 * `mapped`. `cause`: 'sync' an attach, re-attach or detach (an empty target); 'txn' a vote (maps only),
 * 'commit' the rest of a transaction once committed (its unmaps, and maps at IOVAs they free), 'final' a
 * committed transaction that only unmaps; 'rollback' undoing a vote; 'unplug' mappings into guest memory
 * that a re-sync of the map removed.
 */
export interface IoasChange {
  ioas: string;
  generation: number;
  cause: 'sync' | 'txn' | 'commit' | 'final' | 'rollback' | 'unplug';
  unmapped: IovaMapping[];
  mapped: IovaMapping[];
}

/** Makes IOVA mappings real for one client kind (host IOMMU mappings, a translation table). */
export interface IoasApplier {
  /**
   * Establishes `change`. An unmap is done only when nothing of this client (no host IOMMU, no device,
   * no table) can reach the mapping any more. On failure it must throw and leave everything as it was:
   * the subscriber then nacks (a refusal in a vote; the broker evicts a client that fails an unmap).
   */
  applyIoas(change: IoasChange): void | Promise<void>;
}

export const sameMapping = (a: IovaMapping, b: IovaMapping): boolean => a.iova === b.iova && a.size === b.size && a.gpa === b.gpa && a.readonly === b.readonly;

/** The change that makes `established` (by IOVA) equal `target`: what differs is dropped and made again. */
export function diffMappings(established: ReadonlyMap<number, IovaMapping>, target: readonly IovaMapping[], ioas: string, generation: number): IoasChange {
  const change: IoasChange = { ioas, generation, cause: 'sync', unmapped: [], mapped: [] };
  const keep = new Set<number>();
  for (const t of target) {
    const e = established.get(t.iova);
    if (e && sameMapping(e, t)) keep.add(t.iova);
    else change.mapped.push(t);
  }
  for (const [iova, e] of established) if (!keep.has(iova)) change.unmapped.push(e);
  return change;
}

/**
 * A transaction's ops as the change it makes to what is established (`established`, by IOVA), split into
 * its two phases: the vote maps only what overlaps nothing being unmapped; the commit unmaps, then maps
 * what needed the room. A final transaction (only unmaps) is all commit.
 */
export function splitTxn(
  ops: readonly IoasTxnOp[],
  established: ReadonlyMap<number, IovaMapping>,
  ioas: string,
  generation: number,
): { vote: IoasChange; commit: IoasChange } {
  const vote: IoasChange = { ioas, generation, cause: 'txn', unmapped: [], mapped: [] };
  const commit: IoasChange = { ioas, generation, cause: 'commit', unmapped: [], mapped: [] };
  for (const op of ops) {
    if (op.op !== 'unmap') continue;
    const e = established.get(op.iova);
    // Not established here (a stale view, or a mapping this client failed to make): nothing to drop.
    if (e) commit.unmapped.push(e);
  }
  for (const op of ops) {
    if (op.op !== 'map') continue;
    const m: IovaMapping = { iova: op.iova, gpa: op.gpa, size: op.size, readonly: op.readonly };
    (commit.unmapped.length > 0 && commit.unmapped.some((u) => rangesOverlap(u.iova, u.size, m.iova, m.size)) ? commit.mapped : vote.mapped).push(m);
  }
  return { vote, commit };
}

export function isEmptyIoasChange(c: IoasChange): boolean {
  return c.unmapped.length === 0 && c.mapped.length === 0;
}

/** The inverse of a change (for undoing a vote). */
export function inverseIoas(c: IoasChange): IoasChange {
  return { ioas: c.ioas, generation: c.generation, cause: 'rollback', unmapped: c.mapped, mapped: c.unmapped };
}

/** Applies a change to a table of established mappings, by IOVA. */
export function recordIoas(table: Map<number, IovaMapping>, c: IoasChange): void {
  for (const m of c.unmapped) table.delete(m.iova);
  for (const m of c.mapped) table.set(m.iova, m);
}

/** Applies a transaction's ops to the committed mappings, by IOVA. */
export function applyIoasOps(table: Map<number, IovaMapping>, ops: readonly IoasTxnOp[]): void {
  for (const op of ops) if (op.op === 'unmap') table.delete(op.iova);
  for (const op of ops) if (op.op === 'map') table.set(op.iova, { iova: op.iova, gpa: op.gpa, size: op.size, readonly: op.readonly });
}
