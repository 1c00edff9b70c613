// The committed mappings of one I/O address space (IOAS), and the planning of a transaction against them.
// Pure data, like map.ts: no fds, no I/O. A plan is computed (and fully validated) against the committed
// mappings and the committed guest-physical map; the mappings change only when the transaction is
// committed (commit()).
//
// An IOVA mapping sends [iova, iova + size) to guest-physical [gpa, gpa + size), read-only or not. The
// rules are those of the host IOMMU uAPIs the mappings end up in (VFIO type1, iommufd):
//   - page aligned (iova, gpa, size), not empty, below the 52-bit limit;
//   - no overlap with another mapping (EEXIST in the kernel);
//   - an unmap removes whole mappings: one that would cut a mapping is refused (type1v2 and iommufd refuse
//     to split a mapping too); an unmap that covers nothing changes nothing;
//   - and, the broker's own rule: a mapping points at RAM of the map, inside one region (a device cannot
//     DMA into a hole), read-only unless the region is writable.
// Order inside a transaction: every unmap, then every map, so a guest's "invalidate and map again at the
// same IOVA" is one transaction.
import { PAGE_SIZE } from '../native/index.js';
import {
  GPA_LIMIT,
  IovaOverlapError,
  IovaPartialError,
  NotRamError,
  OutOfRangeError,
  UnalignedError,
  type IoasOp,
  type IoasTxnOp,
  type IovaMapping,
  type Region,
  asGpa,
  asIova,
  hex,
  rangeContains,
  rangeEnd,
  rangeHas,
  rangeText as span,
  rangesOverlap,
} from '../protocol/index.js';

/** A validated IOAS transaction, ready to fan out. */
export interface IovaPlan {
  /** Committed mappings it removes, sorted by IOVA. */
  unmaps: IovaMapping[];
  /** New mappings, sorted by IOVA. */
  maps: IovaMapping[];
  /** As clients receive them: the unmaps (each one whole mapping), then the maps. */
  ops: IoasTxnOp[];
}

/** Index of the first entry of `list` (sorted by `key`) whose key is >= `x`. */
function lowerBound<T>(list: readonly T[], x: number, key: (t: T) => number): number {
  let lo = 0;
  let hi = list.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (key(list[mid] as T) < x) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}
const byIova = (m: IovaMapping) => m.iova;
const byGpa = (r: Region) => r.gpa;

/** The region of `regions` (sorted by gpa, never overlapping) that contains `gpa`. */
export function regionAt(regions: readonly Region[], gpa: number): Region | undefined {
  const r = regions[lowerBound(regions, gpa + 1, byGpa) - 1];
  return r && rangeHas(r.gpa, r.size, gpa) ? r : undefined;
}

/** A plan's total bytes. */
export const bytesOf = (ms: readonly IovaMapping[]): number => ms.reduce((n, m) => n + m.size, 0);

/** Above this many changes, commit() rebuilds the sorted list in one pass instead of splicing each one. */
const SPLICE_MAX = 16;

export class IovaMap {
  /** Sorted by IOVA; mappings never overlap. */
  private sorted: IovaMapping[] = [];
  private _bytes = 0;

  get size(): number {
    return this.sorted.length;
  }

  /** Bytes mapped (what a shadowing vfio client pins, counted once per mapping). */
  get bytes(): number {
    return this._bytes;
  }

  mappings(): readonly IovaMapping[] {
    return this.sorted;
  }

  /** The committed mappings that point into guest-physical [gpa, gpa + size). */
  into(gpa: number, size: number): IovaMapping[] {
    return this.sorted.filter((m) => rangesOverlap(m.gpa, m.size, gpa, size));
  }

  /**
   * Validates `ops` against the committed mappings and `regions` (the committed guest-physical map, sorted
   * by gpa) and returns the plan, or throws the typed error of the first problem, naming the op.
   */
  plan(ops: readonly IoasOp[], regions: readonly Region[]): IovaPlan {
    const removed = new Set<IovaMapping>();
    const unmaps: IovaMapping[] = [];
    const at = (i: number, op: IoasOp) => `ops[${i}] (${op.op} ${span(op.iova, op.size)})`;
    const aligned = (i: number, op: IoasOp) => {
      const gpa = op.op === 'map' ? op.gpa : 0;
      if (op.iova % PAGE_SIZE || op.size % PAGE_SIZE || gpa % PAGE_SIZE) {
        throw new UnalignedError(
          `${at(i, op)}: iova ${hex(op.iova)}, ${op.op === 'map' ? `gpa ${hex(gpa)}, ` : ''}size ${hex(op.size)} must be multiples of ${PAGE_SIZE}`,
        );
      }
      if (op.size === 0) throw new OutOfRangeError(`${at(i, op)}: an IOVA range cannot be empty`);
      if (rangeEnd(op.iova, op.size) > GPA_LIMIT || rangeEnd(gpa, op.size) > GPA_LIMIT)
        throw new OutOfRangeError(`${at(i, op)}: reaches beyond the 52-bit limit`);
    };

    ops.forEach((op, i) => {
      if (op.op !== 'unmap') return;
      aligned(i, op);
      // A mapping starting before `iova` may reach into the range: start one before.
      for (let k = Math.max(0, lowerBound(this.sorted, op.iova, byIova) - 1); k < this.sorted.length; k++) {
        const m = this.sorted[k] as IovaMapping;
        if (m.iova >= rangeEnd(op.iova, op.size)) break;
        if (!rangesOverlap(m.iova, m.size, op.iova, op.size)) continue;
        if (!rangeContains(op.iova, op.size, m.iova, m.size)) {
          throw new IovaPartialError(`${at(i, op)}: would cut the mapping ${span(m.iova, m.size)} -> gpa ${hex(m.gpa)}; unmap whole mappings`);
        }
        if (!removed.has(m)) {
          removed.add(m);
          unmaps.push(m);
        }
      }
    });

    const maps: { m: IovaMapping; i: number }[] = [];
    ops.forEach((op, i) => {
      if (op.op !== 'map') return;
      aligned(i, op);
      const r = regionAt(regions, op.gpa);
      if (!r || !rangeContains(r.gpa, r.size, op.gpa, op.size)) {
        throw new NotRamError(
          r
            ? `${at(i, op)}: gpa ${span(op.gpa, op.size)} runs past the end of region ${JSON.stringify(r.name)} ${span(r.gpa, r.size)}; map each region's part on its own`
            : `${at(i, op)}: no RAM at gpa ${hex(op.gpa)}`,
        );
      }
      const readonly = op.readonly ?? false;
      if (!readonly && r.readonly) throw new NotRamError(`${at(i, op)}: region ${JSON.stringify(r.name)} is read-only; map it read-only`);
      const clash = this.findOverlap(op.iova, op.size, removed);
      if (clash) throw new IovaOverlapError(`${at(i, op)}: overlaps the mapping ${span(clash.iova, clash.size)} -> gpa ${hex(clash.gpa)}`);
      maps.push({ m: { iova: asIova(op.iova), gpa: asGpa(op.gpa), size: op.size, readonly }, i });
    });
    // The new mappings against each other: sorted, each must end before the next begins.
    maps.sort((a, b) => a.m.iova - b.m.iova);
    for (let k = 1; k < maps.length; k++) {
      const prev = maps[k - 1] as { m: IovaMapping; i: number };
      const cur = maps[k] as { m: IovaMapping; i: number };
      if (rangesOverlap(prev.m.iova, prev.m.size, cur.m.iova, cur.m.size)) {
        const later = prev.i > cur.i ? prev : cur;
        const other = later === prev ? cur : prev;
        throw new IovaOverlapError(`${at(later.i, ops[later.i] as IoasOp)}: overlaps ops[${other.i}] ${span(other.m.iova, other.m.size)}`);
      }
    }
    const added = maps.map((x) => x.m);
    unmaps.sort((a, b) => a.iova - b.iova);
    return {
      unmaps,
      maps: added,
      ops: [
        ...unmaps.map((m): IoasTxnOp => ({ op: 'unmap', iova: m.iova, size: m.size })),
        ...added.map((m): IoasTxnOp => ({ op: 'map', iova: m.iova, gpa: m.gpa, size: m.size, readonly: m.readonly })),
      ],
    };
  }

  /** Applies a plan that was made against these exact mappings (nothing committed in between). */
  commit(plan: IovaPlan): void {
    this._bytes += bytesOf(plan.maps) - bytesOf(plan.unmaps);
    if (plan.unmaps.length + plan.maps.length <= SPLICE_MAX) {
      for (const m of plan.unmaps) this.sorted.splice(lowerBound(this.sorted, m.iova, byIova), 1);
      for (const m of plan.maps) this.sorted.splice(lowerBound(this.sorted, m.iova, byIova), 0, m);
      return;
    }
    // A large batch: one merge of what stays with what comes, O(mappings + changes).
    const gone = new Set(plan.unmaps);
    const out: IovaMapping[] = [];
    let j = 0;
    for (const m of this.sorted) {
      if (gone.has(m)) continue;
      while (j < plan.maps.length && (plan.maps[j] as IovaMapping).iova < m.iova) out.push(plan.maps[j++] as IovaMapping);
      out.push(m);
    }
    while (j < plan.maps.length) out.push(plan.maps[j++] as IovaMapping);
    this.sorted = out;
  }

  /** The first committed mapping overlapping [iova, iova + size) that is not being removed. */
  private findOverlap(iova: number, size: number, removed: ReadonlySet<IovaMapping>): IovaMapping | undefined {
    for (let k = lowerBound(this.sorted, rangeEnd(iova, size), byIova) - 1; k >= 0; k--) {
      const m = this.sorted[k] as IovaMapping;
      if (rangeEnd(m.iova, m.size) <= iova) return undefined;
      if (!removed.has(m)) return m;
    }
    return undefined;
  }
}

/** Upper bound of one mapping's msgpack encoding: four keys, 64-bit integers, a bool. */
const MAPPING_WIRE_MAX_BYTES = 64;
/** Everything in an EV_IOAS_SYNC besides its array (keys, seq, a 64-byte name, generation, part, last). */
const ENVELOPE_BYTES = 256;

/** An IOAS's mappings in parts that each fit one EV_IOAS_SYNC frame (at least one part, maybe empty). */
export function splitMappings(mappings: readonly IovaMapping[], maxFrameBytes: number): { part: number; last: boolean; mappings: IovaMapping[] }[] {
  const per = Math.max(1, Math.floor((maxFrameBytes - ENVELOPE_BYTES) / MAPPING_WIRE_MAX_BYTES));
  const parts: { part: number; last: boolean; mappings: IovaMapping[] }[] = [];
  for (let i = 0; i === 0 || i < mappings.length; i += per) {
    parts.push({ part: parts.length, last: i + per >= mappings.length, mappings: mappings.slice(i, i + per) });
  }
  return parts;
}
