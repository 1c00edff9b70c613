// Guest memory mapped into this process: each region is its own MAP_SHARED mapping of its backing
// (PROT_READ only for read-only regions), never pinned. This is the applier of the plain subscriber and
// the base of the device-back-end kind: translate a GPA to local memory, read and write guest memory.
//
// Applying a change maps what is added *before* unmapping what is removed: mappings of different regions
// never conflict in our address space, so a failed mmap can be undone by unmapping the new mappings alone
// and the change stays all-or-nothing without ever remapping old memory.
//
// A region is mapped at one contiguous host range, as chunks of at most 1 GiB: Node 20 caps an
// ArrayBuffer at 4 GiB, and guest RAM regions are often larger. The range starts on a boundary of the
// backing's page size (2 MiB or 1 GiB for hugetlbfs: the kernel maps hugetlb memory nowhere else), and on
// a 2 MiB boundary for a region whose gpa and offset are 2 MiB aligned: the host address is then
// congruent to the gpa modulo the huge page size, so THP and hugetlb pages can be mapped whole in the
// host page tables and in KVM's (a memslot's huge mappings need hva = gpa modulo the huge page size). slice() returns one view inside one
// chunk; resolve() points a reused object at it without allocating; segments(), read() and write() cross
// chunks and adjacent regions, and refuse holes.
//
// Translation (GPA -> memory) is the hot path of every device back-end: a binary search over two flat
// Float64Arrays of region starts and ends, tried after the region of the last hit, then the view of the
// region's first chunk from a flat array beside them. With tens of thousands of regions, each object on the
// way to the memory is a cache and TLB miss: the common case (a range inside a region's first 1 GiB)
// touches the two arrays and that one view, not the region's record, its chunk list and its chunk.
import { constants, filePageSize, isNativeError, native, PAGE_SIZE, pageSizeName, type Mapping } from '../native/index.js';
import { InvalidArgError, MapFailedError, NoRegionError, UnalignedError, asHva, hex, rangeEnd, rangeText, type Hva } from '../protocol/index.js';
import type { DirtyLog } from './dirty.js';
import type { Applier, ApplyContext, Change, LocalBacking, ViewRegion } from './view.js';

/** Largest single mapping: a power of two, so chunk boundaries stay page (and huge page) aligned. */
export const CHUNK_BYTES = 2 ** 30;

/** x86's PMD size: THP and 2 MiB hugetlb pages. */
const HUGE_2M = 2 * 2 ** 20;

/** Page size of each backing a region was mapped from (fstatfs once per backing). */
const pageSizes = new WeakMap<LocalBacking, number>();

/** The page size of `b`'s memory: its huge page size on hugetlbfs, else the system page size. */
export function backingPageSize(b: LocalBacking): number {
  let size = pageSizes.get(b);
  if (size === undefined) {
    size = filePageSize(b.fd);
    pageSizes.set(b, size);
  }
  return size;
}

export interface Chunk {
  mapping: Mapping;
  bytes: Uint8Array;
}

/**
 * Where a guest range lives in this process, filled in by GuestMemory.resolve(): `bytes[offset]` is the
 * byte at the GPA looked up, and the range continues for its length inside `bytes` (the mapping of the
 * region's first chunk, up to 1 GiB). The JavaScript form of the host pointer a C back-end computes.
 */
export interface GuestPointer {
  bytes: Uint8Array;
  offset: number;
}

export interface MappedRegion {
  region: ViewRegion;
  /** chunks[i] maps [gpa + i * CHUNK_BYTES, ...) of the region. */
  chunks: Chunk[];
  /** Host address of the region's first byte; the chunks follow contiguously (as in /proc/PID/maps). */
  address: Hva;
}

export class GuestMemory implements Applier {
  private readonly byKey = new Map<string, MappedRegion>();
  /** Mapped by stage() for a two-phase commit and not installed yet, by key: apply() takes them. */
  private readonly staged = new Map<string, MappedRegion>();
  /** Sorted by gpa, for translation. */
  private sorted: MappedRegion[] = [];
  /** The translation table: starts[i] / ends[i] (exclusive) of sorted[i], in flat typed arrays so the
   *  binary search of the hot path touches two cache-friendly arrays and no objects. Only the first
   *  sorted.length entries are meaningful; the rest is spare capacity. */
  private starts = new Float64Array(0);
  private ends = new Float64Array(0);
  /** firstBytes[i]: the bytes of sorted[i]'s first chunk (the whole region, up to 1 GiB). */
  private firstBytes: Uint8Array[] = [];
  /** Index of the last region a lookup hit: device queues mostly hit the same region again. */
  private lastHit = 0;
  /**
   * resolve()'s own cache of its last hit, as plain fields: the region's start, how far from it a range
   * may reach and still lie in its first chunk (min(size, CHUNK_BYTES); -1 when there is no hit, which no
   * range fits), and that chunk's bytes. A hit then costs two subtractions, four compares and two stores.
   */
  private hitStart = 0;
  private hitSpan = -1;
  private hitBytes: Uint8Array = new Uint8Array(0);

  apply(change: Change, backings: ReadonlyMap<number, LocalBacking>, _ctx?: ApplyContext): void {
    const made: MappedRegion[] = [];
    try {
      for (const r of change.added) made.push(this.takeStaged(r) ?? this.map(r, backings));
    } catch (err) {
      for (const m of made) unmapAll(m);
      throw err;
    }
    for (const r of change.removed) {
      const m = this.byKey.get(r.key);
      if (!m) continue;
      this.byKey.delete(r.key);
      // Two establishments may share a gpa for a moment (an applier that maps the new access before
      // unmapping the old in two calls): remove this exact one.
      let i = this.position(m.region.gpa);
      while (this.sorted[i] !== m) i++;
      this.removeAt(i);
      unmapAll(m);
    }
    for (const { after } of change.updated) {
      const m = this.byKey.get(after.key);
      if (m) m.region = after;
    }
    for (const m of made) {
      this.byKey.set(m.region.key, m);
      this.insertAt(this.position(m.region.gpa), m);
    }
    this.forgetHits();
  }

  /** After a map change: indexes moved, views may be detached. */
  private forgetHits(): void {
    this.lastHit = 0;
    this.hitSpan = -1;
    this.hitBytes = new Uint8Array(0);
  }

  /**
   * Maps `regions` now, for a commit that will add them in place of what it removes (the mmap is what can
   * fail); nothing translates to them until apply() installs them. All or nothing.
   */
  stage(regions: readonly ViewRegion[], backings: ReadonlyMap<number, LocalBacking>): void {
    const made: MappedRegion[] = [];
    try {
      for (const r of regions) if (!this.staged.has(r.key)) made.push(this.map(r, backings));
    } catch (err) {
      for (const m of made) unmapAll(m);
      throw err;
    }
    for (const m of made) this.staged.set(m.region.key, m);
  }

  unstage(regions: readonly ViewRegion[]): void {
    for (const r of regions) {
      const m = this.staged.get(r.key);
      if (!m) continue;
      this.staged.delete(r.key);
      unmapAll(m);
    }
  }

  /** The staged mapping of `r`'s establishment, if any, now carrying `r`'s metadata. */
  private takeStaged(r: ViewRegion): MappedRegion | undefined {
    const m = this.staged.get(r.key);
    if (!m) return undefined;
    this.staged.delete(r.key);
    m.region = r;
    return m;
  }

  // The translation table follows `sorted` entry for entry; both move with one memmove each.
  private insertAt(i: number, m: MappedRegion): void {
    const n = this.sorted.length;
    if (n + 1 > this.starts.length) {
      const starts = new Float64Array(Math.max(64, 2 * (n + 1)));
      const ends = new Float64Array(starts.length);
      starts.set(this.starts.subarray(0, n));
      ends.set(this.ends.subarray(0, n));
      this.starts = starts;
      this.ends = ends;
    }
    this.sorted.splice(i, 0, m);
    this.firstBytes.splice(i, 0, (m.chunks[0] as Chunk).bytes);
    this.starts.copyWithin(i + 1, i, n);
    this.ends.copyWithin(i + 1, i, n);
    this.starts[i] = m.region.gpa;
    this.ends[i] = rangeEnd(m.region.gpa, m.region.size);
  }

  private removeAt(i: number): void {
    const n = this.sorted.length;
    this.sorted.splice(i, 1);
    this.firstBytes.splice(i, 1);
    this.starts.copyWithin(i, i + 1, n);
    this.ends.copyWithin(i, i + 1, n);
  }

  /** Index of the first mapped region whose gpa >= `gpa` in `sorted`. */
  private position(gpa: number): number {
    let lo = 0;
    let hi = this.sorted.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if ((this.sorted[mid] as MappedRegion).region.gpa < gpa) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  close(): void {
    for (const m of this.byKey.values()) unmapAll(m);
    this.byKey.clear();
    for (const m of this.staged.values()) unmapAll(m);
    this.staged.clear();
    this.sorted = [];
    this.firstBytes = [];
    this.forgetHits();
  }

  /** Mapped regions, sorted by gpa. */
  regions(): readonly MappedRegion[] {
    return this.sorted;
  }

  /** The mapped region containing `gpa` (its host mapping: what an IOVA mapping into it is made from). */
  regionAt(gpa: number): MappedRegion | undefined {
    return this.find(gpa);
  }

  /**
   * The bytes of guest memory at [gpa, gpa + length), as a view into the mapping (no copy). The range must
   * lie inside one region (MMB_ERR_NO_REGION otherwise: a hole, or a range running into one) and inside
   * one 1 GiB chunk of it (MMB_ERR_INVALID_ARG otherwise: use read() / write(), which cross chunks).
   */
  slice(gpa: number, length: number): Uint8Array {
    const fast = this.firstChunkView(gpa, length);
    if (fast) return fast;
    const { m, off } = this.locate(gpa, length);
    const chunk = Math.floor(off / CHUNK_BYTES);
    const at = off - chunk * CHUNK_BYTES;
    if (at + length > CHUNK_BYTES) {
      throw new InvalidArgError(`${rangeText(gpa, length)} crosses a ${CHUNK_BYTES >>> 20} MiB mapping boundary; use read() or write()`);
    }
    return (m.chunks[chunk] as Chunk).bytes.subarray(at, at + length);
  }

  /**
   * The allocation-free lookup of a device back-end's hot path: points `out` at the memory holding
   * [gpa, gpa + length) and returns true, or returns false (leaving `out` as it was) when the range is not
   * inside the first 1 GiB chunk of one region: a hole, a range crossing into another region or chunk,
   * or invalid numbers; segments() then walks the range or says what is wrong. Reuse one `out` across
   * lookups: nothing is allocated, so a lookup costs what the search costs. The view in `out.bytes` is
   * detached when its region is unmapped (a later removal): look up again after every map change.
   */
  resolve(gpa: number, length: number, out: GuestPointer): boolean {
    // The last hit's region again (a descriptor chain's buffers, a queue's ring): x >>> 0 === x says x is
    // an integer in [0, 2^32), so these three compares say that [gpa, gpa + length) is a whole range inside
    // that region's first chunk. Anything else, NaN included, takes the full path, which checks everything.
    const off = gpa - this.hitStart;
    if (off >>> 0 === off && length >>> 0 === length && off + length <= this.hitSpan) {
      const bytes = this.hitBytes;
      // Mostly the same view as the last lookup's: a compare is cheaper than a store of an object.
      if (out.bytes !== bytes) out.bytes = bytes;
      out.offset = off;
      return true;
    }
    return this.resolveSearch(gpa, length, out);
  }

  /**
   * resolve() past its last hit: searches the table (NaN and non-integers find nothing or fail below),
   * remembers the region found, then checks the range as resolve() does: an integer offset below 2^32
   * from the region's (integer) start makes gpa an integer, and the range must end inside the region's
   * first chunk.
   */
  private resolveSearch(gpa: number, length: number, out: GuestPointer): boolean {
    // Not indexOf(): its last hit is the region resolve() just tried.
    const i = this.search(gpa);
    if (i < 0) return false;
    const start = this.starts[i] as number;
    const span = Math.min((this.ends[i] as number) - start, CHUNK_BYTES);
    const bytes = this.firstBytes[i] as Uint8Array;
    this.hitStart = start;
    this.hitSpan = span;
    this.hitBytes = bytes;
    const off = gpa - start;
    if (off >>> 0 !== off || length >>> 0 !== length || off + length > span) return false;
    out.bytes = bytes;
    out.offset = off;
    return true;
  }

  /**
   * Views covering guest memory [gpa, gpa + length) in order, one per region chunk touched (an iovec):
   * the range may span adjacent regions, but a hole anywhere in it is MMB_ERR_NO_REGION.
   */
  segments(gpa: number, length: number): Uint8Array[] {
    const fast = this.firstChunkView(gpa, length);
    if (fast) return [fast];
    const out: Uint8Array[] = [];
    this.each(gpa, length, (bytes) => out.push(bytes));
    return out;
  }

  /** A copy of guest memory at [gpa, gpa + length). */
  read(gpa: number, length: number): Uint8Array {
    const out = new Uint8Array(length);
    this.each(gpa, length, (bytes, done) => out.set(bytes, done));
    return out;
  }

  /**
   * Writes guest memory at gpa; every region the range touches must be writable. While dirty logging is
   * on the pages are marked dirty; while paused for migration the write is refused (MMB_ERR_PAUSED).
   */
  write(gpa: number, data: Uint8Array): void {
    this.dirty?.assertWritable();
    this.each(gpa, data.length, () => undefined, true);
    this.each(gpa, data.length, (bytes, done) => bytes.set(data.subarray(done, done + bytes.length)));
    this.dirty?.mark(gpa, data.length);
  }

  /** The subscriber's dirty log, once it negotiated DIRTY: writes through this object mark it. */
  dirty: DirtyLog | undefined;

  /**
   * Calls fn with consecutive views covering [gpa, gpa + length), one per chunk touched, walking across
   * adjacent regions. Checks the whole range (holes, and writability when `forWrite`) before the first
   * call, so a refused range touches nothing.
   */
  private each(gpa: number, length: number, fn: (bytes: Uint8Array, done: number) => void, forWrite = false): void {
    if (!Number.isSafeInteger(gpa) || !Number.isSafeInteger(length) || gpa < 0 || length < 0) {
      throw new InvalidArgError(`invalid guest range ${gpa}+${length}`);
    }
    const first = this.indexOf(gpa);
    if (first < 0) throw new NoRegionError(`no region maps gpa ${hex(gpa)}`);
    // Check: the regions from `first` on must cover the range without a gap.
    let i = first;
    let end = this.ends[i] as number;
    for (;;) {
      const m = this.sorted[i] as MappedRegion;
      if (forWrite && m.region.readonly) throw new InvalidArgError(`region ${JSON.stringify(m.region.name)} is read-only`);
      if (end >= gpa + length) break;
      i++;
      if (i >= this.sorted.length || this.starts[i] !== end) {
        throw new NoRegionError(`${rangeText(gpa, length)} runs into a hole at ${hex(end)}`);
      }
      end = this.ends[i] as number;
    }
    if (forWrite) return;
    let done = 0;
    for (let r = first; done < length; r++) {
      const m = this.sorted[r] as MappedRegion;
      let off = gpa + done - m.region.gpa;
      while (done < length && off < m.region.size) {
        const chunk = Math.floor(off / CHUNK_BYTES);
        const at = off - chunk * CHUNK_BYTES;
        const n = Math.min(length - done, CHUNK_BYTES - at, m.region.size - off);
        fn((m.chunks[chunk] as Chunk).bytes.subarray(at, at + n), done);
        done += n;
        off += n;
      }
    }
  }

  /**
   * The view of [gpa, gpa + length) when it lies inside the first chunk of one region (almost always),
   * else undefined (invalid arguments, a hole, a range crossing a region or chunk boundary: the callers'
   * general paths then say what is wrong, or walk the range).
   */
  private firstChunkView(gpa: number, length: number): Uint8Array | undefined {
    const p = this.scratch;
    return this.resolve(gpa, length, p) ? p.bytes.subarray(p.offset, p.offset + length) : undefined;
  }

  private readonly scratch: GuestPointer = { bytes: new Uint8Array(0), offset: 0 };

  /** The region holding all of [gpa, gpa + length) and the offset of gpa inside it. */
  private locate(gpa: number, length: number): { m: MappedRegion; off: number } {
    if (!Number.isSafeInteger(gpa) || !Number.isSafeInteger(length) || gpa < 0 || length < 0) {
      throw new InvalidArgError(`invalid guest range ${gpa}+${length}`);
    }
    const m = this.find(gpa);
    if (!m) throw new NoRegionError(`no region maps gpa ${hex(gpa)}`);
    const off = gpa - m.region.gpa;
    if (off + length > m.region.size) {
      throw new NoRegionError(`${rangeText(gpa, length)} runs past the end of region ${JSON.stringify(m.region.name)}`);
    }
    return { m, off };
  }

  private find(gpa: number): MappedRegion | undefined {
    const i = this.indexOf(gpa);
    return i < 0 ? undefined : this.sorted[i];
  }

  /** Index in `sorted` of the region containing gpa, or -1: last hit first, then binary search. */
  private indexOf(gpa: number): number {
    const i = findRange(this.starts, this.ends, this.sorted.length, this.lastHit, gpa);
    if (i >= 0) this.lastHit = i;
    return i;
  }

  /** indexOf() without its last hit (resolve() just tried that region): the search alone, remembered. */
  private search(gpa: number): number {
    const count = this.sorted.length;
    const i = findRange(this.starts, this.ends, count, count, gpa);
    if (i >= 0) this.lastHit = i;
    return i;
  }

  private map(r: ViewRegion, backings: ReadonlyMap<number, LocalBacking>): MappedRegion {
    const b = backings.get(r.backing);
    if (!b) throw new NoRegionError(`region ${JSON.stringify(r.name)} has no backing here`);
    const prot = constants.PROT_READ | (r.readonly ? 0 : constants.PROT_WRITE);
    let page: number;
    try {
      page = backingPageSize(b);
    } catch (err) {
      throw new MapFailedError(`cannot inspect backing ${b.name} of region ${JSON.stringify(r.name)}`, {
        cause: err,
        ...(isNativeError(err) ? { errno: err.code } : {}),
      });
    }
    if (r.gpa % page || r.size % page || r.offset % page) {
      // The broker refuses these at planning; a region from a broker that does not know page sizes is
      // refused here, by name, instead of an EINVAL from mmap.
      throw new UnalignedError(
        `region ${JSON.stringify(r.name)}: backing ${b.name} has ${pageSizeName(page)} pages; gpa ${hex(r.gpa)}, size ${hex(r.size)} and offset ${hex(r.offset)} must be multiples of ${pageSizeName(page)}`,
      );
    }
    const align = page > PAGE_SIZE ? page : r.size >= HUGE_2M && r.gpa % HUGE_2M === 0 && r.offset % HUGE_2M === 0 ? HUGE_2M : PAGE_SIZE;
    try {
      // One contiguous range of addresses, so the region can be handed to KVM or an IOMMU as a whole.
      const chunks = native
        .mmapChunked(b.fd, r.offset, r.size, prot, constants.MAP_SHARED, CHUNK_BYTES, align)
        .map((mapping) => ({ mapping, bytes: new Uint8Array(mapping.buffer) }));
      return { region: r, chunks, address: asHva((chunks[0] as Chunk).mapping.address) };
    } catch (err) {
      throw new MapFailedError(`cannot map region ${JSON.stringify(r.name)} (${hex(r.size)} bytes of ${b.name} at ${hex(r.offset)})`, {
        cause: err,
        ...(isNativeError(err) ? { errno: err.code } : {}),
      });
    }
  }
}

/**
 * The lookup of every translation hot path (GPA -> region here, IOVA -> mapping in clients/ioas-table.ts):
 * the index of the range containing `x` among the first `count` of `starts` / `ends` (sorted, disjoint,
 * `ends` exclusive), or -1. Tries `hint` (the last hit; `count` for none) first, then a binary search over
 * the two flat arrays; touches no object and allocates nothing.
 */
export function findRange(starts: Float64Array, ends: Float64Array, count: number, hint: number, x: number): number {
  if (hint < count && x >= (starts[hint] as number) && x < (ends[hint] as number)) return hint;
  if (count === 0) return -1;
  // The last range starting at or below x, without a branch on the comparison: every step halves the
  // candidates and adds 0 or half arithmetically. A search that branches mispredicts about every other step
  // on addresses it cannot predict (random lookups), which costs more than the search itself.
  let base = 0;
  let n = count;
  while (n > 1) {
    const half = n >>> 1;
    base += half * +((starts[base + half] as number) <= x);
    n -= half;
  }
  return x >= (starts[base] as number) && x < (ends[base] as number) ? base : -1;
}

function unmapAll(m: MappedRegion): void {
  for (const c of m.chunks) native.munmap(c.mapping);
  m.chunks = [];
}
