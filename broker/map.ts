// The committed guest memory map of one address space, and the planning of a transaction against it.
// Pure data: no fds, no I/O. A plan is computed (and fully validated) against the committed map; the map
// changes only when the transaction has been acked by everyone and is applied with commitPlan().
//
// Address kinds stay apart in names: `gpa` is guest-physical, `offset` is a byte offset inside a backing.
// Ranges are half-open [gpa, gpa + size).
import { PAGE_SIZE, pageSizeName } from '../native/index.js';
import {
  BackingTooSmallError,
  GPA_LIMIT,
  NoBackingError,
  NoRegionError,
  OutOfRangeError,
  OverlapError,
  RegionExistsError,
  SpaceLimitError,
  UnalignedError,
  type CommitOp,
  type Region,
  type TxnOp,
  asGpa,
  asOffset,
  hex,
  rangeEnd,
  rangeText,
  rangesOverlap,
} from '../protocol/index.js';

export interface BackingSizeLookup {
  /** Size in bytes of backing `id`, or undefined if the space has no such backing. */
  backingSize(id: number): number | undefined;
  /**
   * Page size of backing `id`'s memory (2 MiB or 1 GiB on hugetlbfs); regions slicing it must be aligned
   * to it. Absent or undefined: the system page size.
   */
  backingPageSize?(id: number): number | undefined;
}

/** A validated transaction, ready to fan out. */
export interface Plan {
  /** Regions removed, as they were. */
  removes: Region[];
  /** Flag changes: the region before and after. */
  sets: { before: Region; after: Region }[];
  /** New regions with their ids assigned. */
  adds: Region[];
  /** The ops as subscribers receive them: removes, then sets, then adds. */
  ops: TxnOp[];
  /** Ids of backings the adds reference. */
  backings: Set<number>;
}

const span = (r: { gpa: number; size: number }) => rangeText(r.gpa, r.size);

export class MemoryMap {
  private readonly byId = new Map<number, Region>();
  private readonly byName = new Map<string, Region>();
  /** Regions sorted by gpa; regions never overlap, so this is also sorted by end. */
  private sorted: Region[] = [];
  private nextRegionId = 1;
  private _bytes = 0;

  get size(): number {
    return this.byId.size;
  }

  /** Total bytes of guest memory in the map. */
  get bytes(): number {
    return this._bytes;
  }

  /** The regions the map will have once `plan` is committed, sorted by gpa (the map is unchanged). */
  regionsAfter(plan: Plan): Region[] {
    const gone = new Set([...plan.removes, ...plan.sets.map((x) => x.before)]);
    const out = this.sorted.filter((r) => !gone.has(r));
    for (const r of [...plan.sets.map((x) => x.after), ...plan.adds]) insertSorted(out, r);
    return out;
  }

  regions(): readonly Region[] {
    return this.sorted;
  }

  get(id: number): Region | undefined {
    return this.byId.get(id);
  }

  lookup(ref: number | string): Region | undefined {
    return typeof ref === 'number' ? this.byId.get(ref) : this.byName.get(ref);
  }

  /**
   * Validates `ops` against the committed map and returns the plan, or throws the typed error of the
   * first problem (naming the op). Order inside a transaction: every remove, then every set, then every
   * add, so memory can be moved or replaced at the same GPA in one transaction.
   */
  plan(ops: readonly CommitOp[], backings: BackingSizeLookup, maxRegions: number): Plan {
    const removed = new Set<number>();
    const removes: Region[] = [];
    const sets: { before: Region; after: Region }[] = [];
    const adds: Region[] = [];
    const names = new Set<string>();
    const usedBackings = new Set<number>();
    const at = (i: number, op: CommitOp) => `ops[${i}] (${op.op} ${op.op === 'add' ? JSON.stringify(op.name) : JSON.stringify(op.region)})`;

    ops.forEach((op, i) => {
      if (op.op !== 'remove') return;
      const r = this.lookup(op.region);
      if (!r || removed.has(r.id)) throw new NoRegionError(`${at(i, op)}: no such region${r ? ' (already removed in this transaction)' : ''}`);
      removed.add(r.id);
      removes.push(r);
    });
    ops.forEach((op, i) => {
      if (op.op !== 'set') return;
      const r = this.lookup(op.region);
      if (!r || removed.has(r.id)) throw new NoRegionError(`${at(i, op)}: no such region${r ? ' (removed in this transaction)' : ''}`);
      const after = { ...r, readonly: op.readonly ?? r.readonly, logDirty: op.logDirty ?? r.logDirty };
      if (after.readonly !== r.readonly || after.logDirty !== r.logDirty) sets.push({ before: r, after });
    });

    let nextId = this.nextRegionId;
    // New regions, sorted as we go, to check them against each other.
    const pending: Region[] = [];
    ops.forEach((op, i) => {
      if (op.op !== 'add') return;
      const where = at(i, op);
      if ((this.byName.has(op.name) && !removed.has((this.byName.get(op.name) as Region).id)) || names.has(op.name)) {
        throw new RegionExistsError(`${where}: a region named ${JSON.stringify(op.name)} already exists`);
      }
      if (op.gpa % PAGE_SIZE || op.size % PAGE_SIZE || op.offset % PAGE_SIZE) {
        throw new UnalignedError(`${where}: gpa ${hex(op.gpa)}, size ${hex(op.size)} and offset ${hex(op.offset)} must be multiples of ${PAGE_SIZE}`);
      }
      if (op.size === 0) throw new OutOfRangeError(`${where}: a region cannot be empty`);
      if (rangeEnd(op.gpa, op.size) > GPA_LIMIT) {
        throw new OutOfRangeError(`${where}: ${span(op)} reaches beyond the 52-bit guest-physical limit`);
      }
      const backingSize = backings.backingSize(op.backing);
      if (backingSize === undefined) throw new NoBackingError(`${where}: no backing with id ${op.backing}`);
      // Hugetlb memory is mapped, pinned and slotted in whole huge pages only: a region that cuts one would
      // be accepted here and refused by every subscriber's mmap (EINVAL) after fan-out.
      const page = backings.backingPageSize?.(op.backing) ?? PAGE_SIZE;
      if (page > PAGE_SIZE && (op.gpa % page || op.size % page || op.offset % page)) {
        const huge = pageSizeName(page);
        throw new UnalignedError(
          `${where}: backing ${op.backing} is hugetlb memory with ${huge} pages: gpa ${hex(op.gpa)}, size ${hex(op.size)} and offset ${hex(op.offset)} must be multiples of ${huge}`,
        );
      }
      if (rangeEnd(op.offset, op.size) > backingSize) {
        throw new BackingTooSmallError(
          `${where}: offset ${hex(op.offset)} + size ${hex(op.size)} reaches past the end of backing ${op.backing} (${hex(backingSize)} bytes)`,
        );
      }
      const clash = this.findOverlap(op.gpa, op.size, removed) ?? findIn(pending, op.gpa, op.size);
      if (clash) throw new OverlapError(`${where}: ${span(op)} overlaps region ${JSON.stringify(clash.name)} ${span(clash)}`);
      if (nextId > 0xffff_ffff) throw new SpaceLimitError(`${where}: region ids are exhausted in this epoch`);
      const region: Region = {
        id: nextId++,
        name: op.name,
        gpa: asGpa(op.gpa),
        size: op.size,
        backing: op.backing,
        offset: asOffset(op.offset),
        readonly: op.readonly ?? false,
        logDirty: op.logDirty ?? false,
      };
      names.add(op.name);
      usedBackings.add(op.backing);
      insertSorted(pending, region);
      adds.push(region);
    });

    const total = this.byId.size - removes.length + adds.length;
    if (adds.length > 0 && total > maxRegions) {
      throw new SpaceLimitError(`the transaction would leave ${total} regions; the address space allows ${maxRegions}`);
    }
    const txnOps: TxnOp[] = [
      ...removes.map((r): TxnOp => ({ op: 'remove', region: r.id })),
      ...sets.map(({ after }): TxnOp => ({ op: 'set', region: after.id, readonly: after.readonly, logDirty: after.logDirty })),
      ...adds.map((r): TxnOp => ({ op: 'add', region: r })),
    ];
    return { removes, sets, adds, ops: txnOps, backings: usedBackings };
  }

  /** Applies a plan that was made against this exact map (nothing committed in between). */
  commit(plan: Plan): void {
    for (const r of plan.removes) this.delete(r);
    for (const { before, after } of plan.sets) {
      this.delete(before);
      this.insert(after);
    }
    for (const r of plan.adds) this.insert(r);
    const last = plan.adds[plan.adds.length - 1];
    if (last) this.nextRegionId = last.id + 1;
  }

  /**
   * Undoes `plan`, the last one committed to this map (feature PIPELINE: the broker plans each transaction
   * of a window against the map the earlier ones leave, and takes them back newest first if one is refused).
   */
  revert(plan: Plan): void {
    for (const r of plan.adds) this.delete(r);
    for (const { before, after } of plan.sets) {
      this.delete(after);
      this.insert(before);
    }
    for (const r of plan.removes) this.insert(r);
    const first = plan.adds[0];
    if (first) this.nextRegionId = first.id;
  }

  /** The regions as they were before `plans` (the last ones committed, oldest first), sorted by gpa. */
  regionsBefore(plans: readonly Plan[]): Region[] {
    let out = [...this.sorted];
    for (let i = plans.length - 1; i >= 0; i--) {
      const plan = plans[i] as Plan;
      const added = new Set([...plan.adds, ...plan.sets.map((x) => x.after)]);
      out = out.filter((r) => !added.has(r));
      for (const r of [...plan.removes, ...plan.sets.map((x) => x.before)]) insertSorted(out, r);
    }
    return out;
  }

  private insert(r: Region): void {
    this._bytes += r.size;
    this.byId.set(r.id, r);
    this.byName.set(r.name, r);
    insertSorted(this.sorted, r);
  }

  private delete(r: Region): void {
    this._bytes -= r.size;
    this.byId.delete(r.id);
    if (this.byName.get(r.name) === r) this.byName.delete(r.name);
    const i = lowerBound(this.sorted, r.gpa);
    if (this.sorted[i] === r) this.sorted.splice(i, 1);
    else this.sorted = this.sorted.filter((x) => x !== r);
  }

  /** The first committed region overlapping [gpa, gpa+size) that is not being removed. */
  private findOverlap(gpa: number, size: number, removed: Set<number>): Region | undefined {
    // Candidates: the last region starting before gpa + size, walking back while they end after gpa.
    let i = lowerBound(this.sorted, rangeEnd(gpa, size)) - 1;
    for (; i >= 0; i--) {
      const r = this.sorted[i] as Region;
      if (rangeEnd(r.gpa, r.size) <= gpa) return undefined;
      if (!removed.has(r.id)) return r;
    }
    return undefined;
  }
}

/** Index of the first region whose gpa >= `gpa`. */
function lowerBound(list: readonly Region[], gpa: number): number {
  let lo = 0;
  let hi = list.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if ((list[mid] as Region).gpa < gpa) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

function insertSorted(list: Region[], r: Region): void {
  list.splice(lowerBound(list, r.gpa), 0, r);
}

function findIn(list: readonly Region[], gpa: number, size: number): Region | undefined {
  const r = list[lowerBound(list, rangeEnd(gpa, size)) - 1];
  return r && rangesOverlap(r.gpa, r.size, gpa, size) ? r : undefined;
}
