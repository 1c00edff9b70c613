// IOVA translation for device back-ends (feature IOAS, docs/ioas.md): what a virtio device behind a guest
// IOMMU (VIRTIO_F_ACCESS_PLATFORM) needs. Its descriptors carry IOVAs; each IOAS the client follows is a
// table from IOVA ranges to views of this process's mappings of guest memory (GuestMemory), built when the
// broker's IOAS changes and looked up on every buffer with the same allocation-free search GuestMemory
// uses for guest-physical addresses (findRange over two flat Float64Arrays, last hit first).
//
// An IOVA mapping becomes one table entry per 1 GiB chunk of the region it points into (a view never
// crosses a chunk). Entries are views of the region's mapping: the broker refuses to remove or remap
// guest memory an IOAS maps, so a view stays valid for as long as its mapping is in the table. A lookup
// for writing fails on a read-only mapping: the device must not write where the guest's IOMMU says it
// may only read.
import { InvalidArgError, NoRegionError, type Iova, type IovaMapping, hex, rangeEnd } from '../protocol/index.js';
import { findRange, type GuestMemory, type GuestPointer } from './memory.js';
import type { IoasApplier, IoasChange } from './ioas-view.js';

/** IOVA [start, end) -> view. */
interface Entry {
  start: Iova;
  end: Iova;
  view: Uint8Array;
  writable: boolean;
}

/** Above this many changes, apply() rebuilds the flat arrays in one pass instead of shifting them per entry. */
const SHIFT_MAX = 16;

/** One IOAS's translation table. */
export class IovaTranslation {
  /** Sorted by start; the flat arrays below follow them entry for entry. */
  private entries: Entry[] = [];
  private starts = new Float64Array(0);
  private ends = new Float64Array(0);
  private views: Uint8Array[] = [];
  private writable = new Uint8Array(0);
  private lastHit = 0;

  constructor(readonly ioas: string) {}

  /** Entries in the table (one per mapping, more for a mapping across 1 GiB chunks). */
  get size(): number {
    return this.entries.length;
  }

  /**
   * The hot-path lookup: points `out` at the memory of IOVA [iova, iova + length) and returns true, or
   * returns false (leaving `out` as it was) when the range is not inside one entry: unmapped (the device
   * would fault), crossing into another mapping (translate() walks it), or, with `write`, read-only.
   * Allocates nothing.
   */
  resolve(iova: number, length: number, out: GuestPointer, write = false): boolean {
    if (!Number.isSafeInteger(iova) || !Number.isSafeInteger(length) || iova < 0 || length < 0) return false;
    const i = findRange(this.starts, this.ends, this.entries.length, this.lastHit, iova);
    if (i < 0 || iova + length > (this.ends[i] as number) || (write && this.writable[i] === 0)) return false;
    this.lastHit = i;
    out.bytes = this.views[i] as Uint8Array;
    out.offset = iova - (this.starts[i] as number);
    return true;
  }

  /**
   * Views covering IOVA [iova, iova + length) in order (an iovec), across adjacent mappings; a hole is
   * MMB_ERR_NO_REGION (the device's access would fault), a read-only part with `write` MMB_ERR_INVALID_ARG.
   */
  translate(iova: number, length: number, write = false): Uint8Array[] {
    if (!Number.isSafeInteger(iova) || !Number.isSafeInteger(length) || iova < 0 || length < 0)
      throw new InvalidArgError(`invalid IOVA range ${iova}+${length}`);
    const out: Uint8Array[] = [];
    let at = iova;
    const end = iova + length;
    while (at < end) {
      const i = findRange(this.starts, this.ends, this.entries.length, this.lastHit, at);
      if (i < 0) throw new NoRegionError(`IOAS ${JSON.stringify(this.ioas)} maps nothing at IOVA ${hex(at)}`);
      if (write && this.writable[i] === 0) throw new InvalidArgError(`IOAS ${JSON.stringify(this.ioas)} maps IOVA ${hex(at)} read-only`);
      const from = at - (this.starts[i] as number);
      const n = Math.min(end, this.ends[i] as number) - at;
      out.push((this.views[i] as Uint8Array).subarray(from, from + n));
      at += n;
    }
    return out;
  }

  /** Drops `unmapped`, adds `made` (entries built beforehand, so that nothing here can fail). */
  update(unmapped: readonly IovaMapping[], made: readonly Entry[]): void {
    if (unmapped.length + made.length > SHIFT_MAX) {
      // An entry belongs to the mapping whose IOVA range holds it: every entry inside an unmapped one goes.
      const gone = new Set<Entry>();
      for (const m of unmapped) {
        for (let i = this.lowerBound(m.iova); i < this.entries.length && (this.entries[i] as Entry).start < rangeEnd(m.iova, m.size); i++)
          gone.add(this.entries[i] as Entry);
      }
      const kept = gone.size === 0 ? this.entries : this.entries.filter((e) => !gone.has(e));
      this.entries = made.length === 0 ? kept : [...kept, ...made].sort((a, b) => a.start - b.start);
      this.rebuild();
    } else {
      for (const m of unmapped) {
        const i = this.lowerBound(m.iova);
        while (i < this.entries.length && (this.entries[i] as Entry).start < rangeEnd(m.iova, m.size)) this.removeAt(i);
      }
      for (const e of made) this.insertAt(this.lowerBound(e.start), e);
    }
    this.lastHit = 0;
  }

  private lowerBound(x: number): number {
    let lo = 0;
    let hi = this.entries.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if ((this.entries[mid] as Entry).start < x) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  private grow(n: number): void {
    if (n <= this.starts.length) return;
    const cap = Math.max(64, 2 * n);
    const starts = new Float64Array(cap);
    const ends = new Float64Array(cap);
    const writable = new Uint8Array(cap);
    starts.set(this.starts);
    ends.set(this.ends);
    writable.set(this.writable);
    this.starts = starts;
    this.ends = ends;
    this.writable = writable;
  }

  private insertAt(i: number, e: Entry): void {
    const n = this.entries.length;
    this.grow(n + 1);
    this.entries.splice(i, 0, e);
    this.views.splice(i, 0, e.view);
    this.starts.copyWithin(i + 1, i, n);
    this.ends.copyWithin(i + 1, i, n);
    this.writable.copyWithin(i + 1, i, n);
    this.starts[i] = e.start;
    this.ends[i] = e.end;
    this.writable[i] = e.writable ? 1 : 0;
  }

  private removeAt(i: number): void {
    const n = this.entries.length;
    this.entries.splice(i, 1);
    this.views.splice(i, 1);
    this.starts.copyWithin(i, i + 1, n);
    this.ends.copyWithin(i, i + 1, n);
    this.writable.copyWithin(i, i + 1, n);
  }

  private rebuild(): void {
    this.grow(this.entries.length);
    this.views = this.entries.map((e) => e.view);
    this.entries.forEach((e, i) => {
      this.starts[i] = e.start;
      this.ends[i] = e.end;
      this.writable[i] = e.writable ? 1 : 0;
    });
  }
}

/** The IoasApplier of device back-ends: one IovaTranslation per IOAS followed, over the client's GuestMemory. */
export class IovaTables implements IoasApplier {
  private readonly tables = new Map<string, IovaTranslation>();

  constructor(private readonly memory: GuestMemory) {}

  /** The translation table of `ioas` (empty until the client follows it). Keep it: lookups need no name. */
  table(ioas: string): IovaTranslation {
    let t = this.tables.get(ioas);
    if (!t) {
      t = new IovaTranslation(ioas);
      this.tables.set(ioas, t);
    }
    return t;
  }

  applyIoas(change: IoasChange): void {
    // Every new entry is built (and checked) before the table changes: all or nothing.
    const made: Entry[] = [];
    for (const m of change.mapped) {
      let at = m.iova;
      for (const view of this.memory.segments(m.gpa, m.size)) {
        made.push({ start: at, end: rangeEnd(at, view.length), view, writable: !m.readonly });
        at = rangeEnd(at, view.length);
      }
    }
    this.table(change.ioas).update(change.unmapped, made);
  }
}
