// A subscriber's view of the map, and the one mechanism that changes it: compute the target map, diff it
// against what is actually established (mapped, pinned, slotted), and hand the difference to the client
// kind's applier. Transactions, rollbacks, syncs and resumes all go through this, so a resume after a
// broken connection touches exactly the regions that differ and nothing else.
//
// A region's key is what its establishment depends on: where it sits (gpa, size), what it maps (the
// backing's inode and the offset) and how (read-only or not). Two regions with the same key can share one
// mapping, even across broker restarts (new epoch, new ids, same memfd). logDirty, id and name are
// metadata: changing only those is an `updated` entry, not a remap.
import { NoBackingError, NoRegionError, type Gpa, type Offset, type Region, type RegionColumns, type TxnOp, rangesOverlap } from '../protocol/index.js';
import type { DirtyLog } from './dirty.js';

/** A backing as a client holds it: the broker's id, our own fd, and the file's identity. */
export interface LocalBacking {
  id: number;
  name: string;
  size: number;
  fd: number;
  dev: number;
  ino: number;
}

export interface ViewRegion extends Region {
  /** Identity of the establishment: gpa, size, backing inode, offset, access. An opaque string (compare it,
   *  use it as a map key; it is not meant to be read). */
  readonly key: string;
  /** "dev:ino" of the backing file. */
  readonly file: string;
}

/**
 * What an applier must do, in this order: drop `removed`, update `updated`, establish `added`.
 * `cause`: 'txn' a transaction (for a two-phase subscriber: its vote, which only adds), 'commit' the rest
 * of a two-phase transaction once every client voted yes (removals, updates, adds that replace something
 * at the same addresses), 'sync' an initial sync or resume, 'rollback' and 'undo' taking a change back.
 */
export interface Change {
  generation: number;
  cause: 'sync' | 'txn' | 'commit' | 'rollback' | 'undo';
  removed: ViewRegion[];
  updated: { before: ViewRegion; after: ViewRegion }[];
  added: ViewRegion[];
  /**
   * A two-phase vote only: adds that wait for the commit (they replace something at the same addresses).
   * An applier with `stage` does their failing part now (see Applier.stage); they are not established.
   */
  staged?: ViewRegion[];
}

/** What an applier can consult while it works on a change that takes long (pinning gigabytes). */
export interface ApplyContext {
  /**
   * Aborted when the whole change is void: the broker rolled the transaction back, or the subscriber is
   * closing. The applier should stop, undo what it did, and throw (MMB_ERR_CANCELLED).
   */
  signal: AbortSignal;
  /**
   * True once a transaction queued behind this change removes the region with this key. The applier may
   * then stop establishing that region (undoing its part) and carry on with the rest; the region still
   * counts as established, and the queued removal will hand it back in `removed`, where removing a region
   * that was never fully established must be a no-op.
   */
  cancelled(key: string): boolean;
}

/** Makes changes real for one client kind (mappings, memslots, IOMMU mappings). */
export interface Applier {
  /**
   * Establishes `change`. On failure it must throw (ideally an MmbError with a meaningful code) and leave
   * everything exactly as it was before the call: the subscriber then nacks and the broker rolls back.
   */
  apply(change: Change, backings: ReadonlyMap<number, LocalBacking>, ctx: ApplyContext): void | Promise<void>;
  /**
   * Dirty logging (feature DIRTY): before a sync, put into `log` the dirty pages this client knows of but
   * has not marked yet (a KVM client copies KVM's dirty log; a VFIO client without hardware dirty
   * tracking marks everything it has mapped writable). Writes made through GuestMemory are marked as
   * they happen and need nothing here.
   */
  flushDirty?(log: DirtyLog): void | Promise<void>;
  /**
   * Two-phase votes (feature TWO_PHASE): does now, for regions that the commit will add in place of
   * something it removes, the work that can fail (mapping, pinning, accounting), without installing them
   * where anything running would see them; the commit's apply() then only switches. Throws (leaving
   * nothing staged) to refuse the transaction. Optional: without it, that work happens at the commit.
   */
  stage?(regions: readonly ViewRegion[], backings: ReadonlyMap<number, LocalBacking>, ctx: ApplyContext): void | Promise<void>;
  /**
   * Two-phase votes: refuses now (throws) what the commit would fail on, so that the commit, which cannot
   * be refused, does not fail: a removal the client cannot make (the memory of a running vring), a
   * reshape that would not fit. `change` is the commit's part, checked against what is established after
   * the vote. Must change nothing.
   */
  check?(change: Change, backings: ReadonlyMap<number, LocalBacking>): void | Promise<void>;
  /** Drops what stage() prepared for `regions` (the transaction was rolled back). */
  unstage?(regions: readonly ViewRegion[]): void | Promise<void>;
  /** Releases everything it established, and anything staged (the subscriber is closing). */
  close?(): void | Promise<void>;
}

/** A backing's file identity, computed once per LocalBacking object rather than once per region. */
interface FileIdentity {
  /** "dev:ino". */
  readonly file: string;
  /** This process's number for the file (see regionKey). */
  readonly index: number;
}

const identities = new WeakMap<LocalBacking, FileIdentity>();

/**
 * A number per backing file ("dev:ino") this process has seen, in the order it saw them: keys are local to
 * the process (nothing outside it reads one), and one number stands for the 14 bytes of dev and ino in
 * every key. An entry per file for the life of the process: a few dozen bytes each.
 */
const fileIndexes = new Map<string, number>();

function identityOf(b: LocalBacking): FileIdentity {
  let id = identities.get(b);
  if (id === undefined) {
    const file = `${b.dev}:${b.ino}`;
    let index = fileIndexes.get(file);
    if (index === undefined) {
      index = fileIndexes.size;
      // Two 16-bit units hold it beside the access bit (below).
      if (index >= 2 ** 31) throw new RangeError('more than 2^31 backing files in one process');
      fileIndexes.set(file, index);
    }
    id = { file, index };
    identities.set(b, id);
  }
  return id;
}

/**
 * The key of an establishment: gpa, size, offset, the backing file, access. Each integer below 2^53 is
 * written as four 16-bit code units, least significant first, then the file's number in this process (see
 * fileIndexes) and the access bit in two more: fixed width, so equal tuples give equal strings and
 * different tuples different ones, without separators. 14 code units: what V8 builds in one call and hashes
 * in 14 steps, 40 bytes of heap. Opaque: nothing parses it (code units need not be valid UTF-16). It
 * replaced one byte per character with dev and ino spelled out (36 characters), and before that a decimal
 * template (`${gpa}+${size}@${dev}:${ino}+${offset}:rw`) that cost a number-to-string conversion per field
 * and a cons string every Map lookup flattened: for a 65,536-region snapshot about 60 ms to build and as
 * much again in the maps.
 */
function regionKey(gpa: Gpa, size: number, offset: Offset, f: FileIdentity, readonly: boolean): string {
  const gl = gpa >>> 0;
  const gh = (gpa - gl) / 0x1_0000_0000;
  const sl = size >>> 0;
  const sh = (size - sl) / 0x1_0000_0000;
  const ol = offset >>> 0;
  const oh = (offset - ol) / 0x1_0000_0000;
  const fi = f.index;
  return String.fromCharCode(
    gl & 0xffff,
    gl >>> 16,
    gh & 0xffff,
    gh >>> 16,
    sl & 0xffff,
    sl >>> 16,
    sh & 0xffff,
    sh >>> 16,
    ol & 0xffff,
    ol >>> 16,
    oh & 0xffff,
    oh >>> 16,
    fi & 0xffff,
    ((fi >>> 16) << 1) | (readonly ? 1 : 0),
  );
}

/** The backing of `r` among `backings`, or the error every view of a region without one is. */
function backingOf(r: Pick<Region, 'name' | 'backing'>, backings: ReadonlyMap<number, LocalBacking>): LocalBacking {
  const b = backings.get(r.backing);
  if (!b) throw new NoBackingError(`region ${JSON.stringify(r.name)} references backing ${r.backing}, which this client was never sent`);
  return b;
}

function viewOf(r: Region, f: FileIdentity, key: string): ViewRegion {
  // Every field spelled out: an object spread ({ ...r, file, key }) cost about 4 us per region in V8 (a
  // 65,536-region snapshot spent a quarter of a second in it); a literal costs a few nanoseconds.
  return {
    id: r.id,
    name: r.name,
    gpa: r.gpa,
    size: r.size,
    backing: r.backing,
    offset: r.offset,
    readonly: r.readonly,
    logDirty: r.logDirty,
    file: f.file,
    key,
  };
}

export function toView(r: Region, backings: ReadonlyMap<number, LocalBacking>): ViewRegion {
  const f = identityOf(backingOf(r, backings));
  return viewOf(r, f, regionKey(r.gpa, r.size, r.offset, f, r.readonly));
}

/**
 * The change that makes what is established (`actual`) equal the map `target`, as diff(toView of every
 * region) would have it, without building a view of a region that is established already and unchanged:
 * a resync that changes nothing (a broker restart) computes one key and one lookup per region. The
 * target's keys must be distinct (regions of a map never overlap).
 */
export function diffRegions(
  actual: ReadonlyMap<string, ViewRegion>,
  target: Iterable<Region>,
  backings: ReadonlyMap<number, LocalBacking>,
  generation: number,
  cause: Change['cause'],
): Change {
  const change: Change = { generation, cause, removed: [], updated: [], added: [] };
  const first = actual.size === 0;
  const keys: string[] = [];
  let matched = 0;
  let lastBacking: LocalBacking | undefined;
  let f: FileIdentity | undefined;
  for (const r of target) {
    const b = backingOf(r, backings);
    if (b !== lastBacking) {
      lastBacking = b;
      f = identityOf(b);
    }
    const key = regionKey(r.gpa, r.size, r.offset, f as FileIdentity, r.readonly);
    const a = first ? undefined : actual.get(key);
    if (a === undefined) change.added.push(viewOf(r, f as FileIdentity, key));
    else {
      matched++;
      if (a.logDirty !== r.logDirty || a.id !== r.id || a.name !== r.name || a.backing !== r.backing) {
        change.updated.push({ before: a, after: viewOf(r, f as FileIdentity, key) });
      }
    }
    if (!first) keys.push(key);
  }
  // As in diff(): every established region matched, nothing to remove.
  if (matched === actual.size) return change;
  const keep = new Set(keys);
  for (const [key, a] of actual) if (!keep.has(key)) change.removed.push(a);
  return change;
}

/** A part of a snapshot: regions as objects (the plain form), and more as columns (feature COMPACT_SYNC). */
export interface SnapshotPart {
  readonly regions: readonly Region[];
  readonly columns?: RegionColumns | undefined;
}

/**
 * A snapshot sync in one pass: the map it sends, by id, and the change that makes what is established
 * (`actual`) equal it, as diffRegions() over that map would have it. Each region costs one key and, unless
 * it is established already and unchanged, one view, which is also what the map holds for it: no Region
 * object is made from columns, and a region established and unchanged (a broker restart) is held as its
 * established view, which equals it field for field. undefined when two regions of the snapshot share an
 * id (no broker sends that): the caller then takes the general path.
 */
export function diffSnapshot(
  actual: ReadonlyMap<string, ViewRegion>,
  parts: readonly SnapshotPart[],
  backings: ReadonlyMap<number, LocalBacking>,
  generation: number,
): { target: Map<number, Region>; change: Change } | undefined {
  const d = new SnapshotDiff(actual, backings, generation);
  let count = 0;
  // A call of a small function per part: after a deopt (V8 deciding to allocate the views in the old
  // generation) the next part starts in freshly compiled code rather than waiting for the loop to be
  // compiled on the stack again.
  for (const p of parts) {
    addRegions(d, p.regions);
    count += p.regions.length;
    if (p.columns === undefined) continue;
    addColumns(d, p.columns);
    count += p.columns.length;
  }
  const { target, change } = d;
  if (target.size !== count) return undefined;
  // As in diffRegions(): every established region matched, nothing to remove.
  if (d.matched === actual.size) return { target, change };
  const keep = new Set(d.keys);
  for (const [key, a] of actual) if (!keep.has(key)) change.removed.push(a);
  return { target, change };
}

function addRegions(d: SnapshotDiff, regions: readonly Region[]): void {
  for (const r of regions) d.add(r.id, r.name, r.gpa, r.size, r.backing, r.offset, r.readonly, r.logDirty);
}

function addColumns(d: SnapshotDiff, c: RegionColumns): void {
  for (let i = 0; i < c.length; i++) d.add(c.id(i), c.name(i), c.gpa(i), c.size(i), c.backing(i), c.offset(i), c.readonly(i), c.logDirty(i));
}

/** diffSnapshot()'s state while it goes through the regions. */
class SnapshotDiff {
  readonly change: Change;
  readonly target = new Map<number, Region>();
  /** The snapshot's keys, when something is established (to find what it no longer has). */
  readonly keys: string[] = [];
  matched = 0;
  private readonly first: boolean;
  private lastBacking = -1;
  private file: FileIdentity | undefined;

  constructor(
    private readonly actual: ReadonlyMap<string, ViewRegion>,
    private readonly backings: ReadonlyMap<number, LocalBacking>,
    generation: number,
  ) {
    this.change = { generation, cause: 'sync', removed: [], updated: [], added: [] };
    this.first = actual.size === 0;
  }

  /** One region: its key, then the established view when nothing differs, else a new view. */
  add(id: number, name: string, gpa: Gpa, size: number, backing: number, offset: Offset, readonly: boolean, logDirty: boolean): void {
    if (backing !== this.lastBacking) {
      this.file = identityOf(backingOf({ name, backing }, this.backings));
      this.lastBacking = backing;
    }
    const f = this.file as FileIdentity;
    const key = regionKey(gpa, size, offset, f, readonly);
    const a = this.first ? undefined : this.actual.get(key);
    let v: ViewRegion;
    if (a === undefined) this.change.added.push((v = { id, name, gpa, size, backing, offset, readonly, logDirty, file: f.file, key }));
    else {
      this.matched++;
      if (a.logDirty !== logDirty || a.id !== id || a.name !== name || a.backing !== backing) {
        v = { id, name, gpa, size, backing, offset, readonly, logDirty, file: f.file, key };
        this.change.updated.push({ before: a, after: v });
      } else v = a;
    }
    this.target.set(id, v);
    if (!this.first) this.keys.push(key);
  }
}

/**
 * The difference between what is established and a target map. `target` holds the views of one map's
 * regions, whose keys are distinct (regions of a map never overlap, so no two share gpa and size).
 */
export function diff(actual: ReadonlyMap<string, ViewRegion>, target: readonly ViewRegion[], generation: number, cause: Change['cause']): Change {
  const change: Change = { generation, cause, removed: [], updated: [], added: [] };
  // Nothing established yet (a first sync): everything is added, and no set of keys to keep is needed.
  if (actual.size === 0) {
    change.added = [...target];
    return change;
  }
  let matched = 0;
  for (const t of target) {
    const a = actual.get(t.key);
    if (!a) change.added.push(t);
    else {
      matched++;
      if (metadataDiffers(a, t)) change.updated.push({ before: a, after: t });
    }
  }
  // Every established region is in the target (the resync after a broker restart that changed nothing):
  // nothing to remove, and no set of the target's keys to build (with distinct keys, as many matches as
  // established regions means each one was matched).
  if (matched === actual.size) return change;
  const keep = new Set<string>();
  for (const t of target) keep.add(t.key);
  for (const [key, a] of actual) if (!keep.has(key)) change.removed.push(a);
  return change;
}

export function inverse(c: Change): Change {
  return {
    generation: c.generation,
    cause: 'undo',
    removed: c.added,
    updated: c.updated.map(({ before, after }) => ({ before: after, after: before })),
    added: c.removed,
  };
}

/**
 * Splits a transaction's change into its two phases (feature TWO_PHASE). The vote holds only what can be
 * established without disturbing anything that runs: adds that overlap nothing being removed (new memory
 * to map and pin). The commit holds the rest: removals, updates, and adds at addresses a removal frees
 * (a move, a resize, a read-only toggle, a replacement), which can only be established after it.
 * `room` is how many more regions the client can hold at once beside what it has (its slot limit minus
 * what is established): the vote holds old and new side by side, so adds beyond it wait for the commit,
 * after the removals made room.
 */
export function splitChange(c: Change, room = Number.POSITIVE_INFINITY, removing: readonly ViewRegion[] = []): { vote: Change; commit: Change } {
  // `removing` (feature PIPELINE): what earlier transactions, voted on and not committed yet, remove at their
  // commit. An add at addresses they free waits for this transaction's commit, which comes after theirs.
  const removed = removing.length === 0 ? c.removed : [...c.removed, ...removing];
  const clashes = (a: ViewRegion) => removed.some((r) => rangesOverlap(a.gpa, a.size, r.gpa, r.size));
  const now: ViewRegion[] = [];
  const later: ViewRegion[] = [];
  // Without removals nothing frees room later: every add goes in the vote (the broker checked the limits),
  // so a transaction that only adds leaves its commit nothing to do (and the broker asks no finish round).
  for (const a of c.added) (removed.length > 0 && (now.length >= room || clashes(a)) ? later : now).push(a);
  return {
    vote: { generation: c.generation, cause: c.cause, removed: [], updated: [], added: now, staged: later },
    commit: { generation: c.generation, cause: 'commit', removed: c.removed, updated: c.updated, added: later },
  };
}

export function isEmpty(c: Change): boolean {
  return c.removed.length === 0 && c.updated.length === 0 && c.added.length === 0;
}

/**
 * Feature PIPELINE: the change a transaction's ops make to `base`, the map the transactions before it leave
 * once committed (what is established may still lag behind it: their commits are to come), from the ops
 * alone. The views of what it removes or changes are made from `base`; their keys are those of the
 * establishments they name.
 */
export function changeAfter(ops: readonly TxnOp[], base: ReadonlyMap<number, Region>, backings: ReadonlyMap<number, LocalBacking>, generation: number): Change {
  const named = new Map<string, ViewRegion>();
  const keyById = new Map<number, string>();
  for (const op of ops) {
    if (op.op === 'add') continue;
    const r = base.get(op.region);
    if (!r) continue;
    const v = toView(r, backings);
    named.set(v.key, v);
    keyById.set(r.id, v.key);
  }
  return changeFromOps(ops, base, named, keyById, backings, generation);
}

/**
 * What is established once each change of `undone` (newest first) is taken back from `actual`: the views the
 * rollback of a run of pipelined votes must leave.
 */
export function undoneViews(actual: ReadonlyMap<string, ViewRegion>, undone: readonly Change[]): ViewRegion[] {
  const out = new Map(actual);
  for (const c of undone) {
    for (const a of c.added) out.delete(a.key);
    for (const { before, after } of c.updated) {
      out.delete(after.key);
      out.set(before.key, before);
    }
    for (const r of c.removed) out.set(r.key, r);
  }
  return [...out.values()];
}

/** Applies a transaction's ops (removes, sets, adds) to `map`, in place. */
export function applyOpsTo(map: Map<number, Region>, ops: readonly TxnOp[]): Map<number, Region> {
  for (const op of ops) {
    if (op.op === 'remove') map.delete(op.region);
    else if (op.op === 'set') {
      const r = map.get(op.region);
      if (!r) throw new NoRegionError(`the transaction changes region ${op.region}, which this client does not have`);
      // Spelled out: `r` may be a view (diffSnapshot's map holds them), whose key and file the new access
      // would make wrong.
      map.set(r.id, { id: r.id, name: r.name, gpa: r.gpa, size: r.size, backing: r.backing, offset: r.offset, readonly: op.readonly, logDirty: op.logDirty });
    } else map.set(op.region.id, op.region);
  }
  return map;
}

/** The map after a transaction's ops, as a new map keyed by region id. */
export function applyOps(base: ReadonlyMap<number, Region>, ops: readonly TxnOp[]): Map<number, Region> {
  return applyOpsTo(new Map(base), ops);
}

/** True when two views of the same establishment differ in metadata (an `updated` entry is needed). */
export function metadataDiffers(a: ViewRegion, b: ViewRegion): boolean {
  return a.logDirty !== b.logDirty || a.id !== b.id || a.name !== b.name || a.backing !== b.backing;
}

/**
 * The change a transaction's ops make to what is established, computed from the ops alone (O(ops), not
 * O(map)): `actual` must be the established view of `committed`, and `keyById` map each established
 * region's id to its key. A remove and an add of the same establishment collapse into an update, as
 * diff() would have it.
 */
export function changeFromOps(
  ops: readonly TxnOp[],
  committed: ReadonlyMap<number, Region>,
  actual: ReadonlyMap<string, ViewRegion>,
  keyById: ReadonlyMap<number, string>,
  backings: ReadonlyMap<number, LocalBacking>,
  generation: number,
): Change {
  const established = (id: number): ViewRegion => {
    const key = keyById.get(id);
    const r = key === undefined ? undefined : actual.get(key);
    if (!r) throw new NoRegionError(`the transaction names region ${id}, which this client does not have`);
    return r;
  };
  const removed = new Map<string, ViewRegion>();
  const change: Change = { generation, cause: 'txn', removed: [], updated: [], added: [] };
  const added: ViewRegion[] = [];
  for (const op of ops) {
    if (op.op === 'remove') {
      const r = established(op.region);
      removed.set(r.key, r);
    } else if (op.op === 'set') {
      const before = established(op.region);
      const base = committed.get(op.region) as Region;
      const after = toView({ ...base, readonly: op.readonly, logDirty: op.logDirty }, backings);
      if (after.key === before.key) change.updated.push({ before, after });
      else {
        removed.set(before.key, before);
        added.push(after);
      }
    } else added.push(toView(op.region, backings));
  }
  for (const a of added) {
    const r = removed.get(a.key);
    if (!r) change.added.push(a);
    else {
      removed.delete(a.key);
      if (metadataDiffers(r, a)) change.updated.push({ before: r, after: a });
    }
  }
  change.removed = [...removed.values()];
  return change;
}
