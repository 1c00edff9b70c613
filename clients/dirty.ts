// A subscriber's side of dirty logging (feature DIRTY): the bitmaps the broker sent (one per logging
// region, mapped here), marking pages dirty by guest-physical address, and the paused state during the
// last round of a migration. Bits are set with atomic ORs in the shared memfd, in the half the header
// names active; while the subscriber handles a flush (EV_DIRTY_FLUSH), what it puts in goes to the other
// half, the one the broker retired and is about to collect. Nothing here sends a message per page.
import { constants, native, type Mapping } from '../native/index.js';
import { DIRTY_PAGE_SIZE, PausedError, bitmapLayout, forEachBitRun, type BitmapInfo } from '../protocol/index.js';
import { closeAll } from '../transport/index.js';

interface MappedBitmap extends BitmapInfo {
  fd: number;
  mapping: Mapping;
  layout: ReturnType<typeof bitmapLayout>;
  header: DataView;
}

export class DirtyLog {
  private byId = new Map<number, MappedBitmap>();
  /** Sorted by gpa. */
  private sorted: MappedBitmap[] = [];
  /** reachEnds[i]: the largest end (gpa + size) among sorted[0..i], for mark()'s binary search. */
  private reachEnds = new Float64Array(0);
  private _paused = false;
  /** Handling a flush: marks go to the retired half. */
  private flushing = false;

  /** Whether the broker paused this client's writes (migration's last round). */
  get paused(): boolean {
    return this._paused;
  }

  setPaused(paused: boolean): void {
    this._paused = paused;
  }

  /** Throws MMB_ERR_PAUSED while paused: call before writing guest memory. */
  assertWritable(): void {
    if (this._paused) throw new PausedError('guest memory is paused for migration');
  }

  /**
   * Runs `fn` (the applier's flushDirty) with marks going to the half the broker retired, the one this
   * sync collects. The subscriber acks the flush once it returns: nothing of this process writes the
   * retired half after that (writes start over in the new half).
   */
  async flush(fn: () => void | Promise<void>): Promise<void> {
    this.flushing = true;
    try {
      await fn();
    } finally {
      this.flushing = false;
    }
  }

  /**
   * Byte offset in `b`'s mapping of the half marks go to now; -1 for both, when the header (the active
   * half: a little-endian u64, 0 or 1, written by the broker) holds anything else. Another writer
   * may have scribbled on it; marking both halves loses nothing, and the broker, which trusts only its
   * own record, rewrites the header and collects both halves at its next sync.
   */
  private half(b: MappedBitmap): number {
    const lo = b.header.getUint32(0, true);
    if (b.header.getUint32(4, true) !== 0 || lo > 1) return -1;
    return b.layout.offset(this.flushing ? 1 - lo : lo);
  }

  /**
   * Takes ownership of `fds` (one per info, in order). If mapping one fails, the bitmaps before it stay
   * added, its fd and every later one are closed, and the error is thrown.
   */
  add(infos: readonly BitmapInfo[], fds: readonly number[]): void {
    let i = 0;
    try {
      for (; i < infos.length; i++) {
        const info = infos[i] as BitmapInfo;
        const fd = fds[i] as number;
        const layout = bitmapLayout(info.pages);
        const old = this.byId.get(info.bitmap);
        if (old) this.drop(old);
        const mapping = native.mmap(fd, 0, layout.size, constants.PROT_READ | constants.PROT_WRITE, constants.MAP_SHARED);
        this.byId.set(info.bitmap, { ...info, fd, mapping, layout, header: new DataView(mapping.buffer, 0, 8) });
      }
    } catch (err) {
      closeAll(fds.slice(i));
      throw err;
    } finally {
      this.sort();
    }
  }

  remove(ids: readonly number[]): void {
    for (const id of ids) {
      const b = this.byId.get(id);
      if (b) this.drop(b);
    }
    this.sort();
  }

  /** Drops every bitmap whose id is not in `ids`. */
  retain(ids: ReadonlySet<number>): void {
    for (const b of [...this.byId.values()]) if (!ids.has(b.bitmap)) this.drop(b);
    this.sort();
  }

  /** Marks the pages of [gpa, gpa + length) dirty in every logging region they touch. */
  mark(gpa: number, length: number): void {
    const sorted = this.sorted;
    if (length <= 0 || sorted.length === 0) return;
    const end = gpa + length;
    // The first bitmap that can overlap: reachEnds is non-decreasing, so binary search it.
    const reach = this.reachEnds;
    let lo = 0;
    let hi = sorted.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if ((reach[mid] as number) <= gpa) lo = mid + 1;
      else hi = mid;
    }
    for (let i = lo; i < sorted.length; i++) {
      const b = sorted[i] as MappedBitmap;
      if (b.gpa >= end) break;
      const bEnd = b.gpa + b.pages * DIRTY_PAGE_SIZE;
      if (bEnd <= gpa) continue;
      const first = Math.floor((Math.max(gpa, b.gpa) - b.gpa) / DIRTY_PAGE_SIZE);
      const last = Math.ceil((Math.min(end, bEnd) - b.gpa) / DIRTY_PAGE_SIZE);
      const half = this.half(b);
      if (half >= 0) {
        native.bitmapSet(b.mapping, half * 8 + first, last - first);
      } else {
        native.bitmapSet(b.mapping, b.layout.offset(0) * 8 + first, last - first);
        native.bitmapSet(b.mapping, b.layout.offset(1) * 8 + first, last - first);
      }
    }
  }

  /**
   * ORs a page bitmap describing [gpa, gpa + pages * 4 KiB) (bit i = page i, as KVM's dirty log) into the
   * logging regions it overlaps.
   */
  markBits(gpa: number, bits: Uint8Array, pages: number): void {
    const exact = this.sorted.find((b) => b.gpa === gpa && b.pages === pages);
    if (exact && bits.length % 8 === 0 && bits.length <= exact.layout.half) {
      const half = this.half(exact);
      for (const h of half >= 0 ? [half] : [exact.layout.offset(0), exact.layout.offset(1)]) native.bitmapOr(exact.mapping, h, bits);
      return;
    }
    forEachBitRun(bits, pages, (first, count) => this.mark(gpa + first * DIRTY_PAGE_SIZE, count * DIRTY_PAGE_SIZE));
  }

  close(): void {
    for (const b of [...this.byId.values()]) this.drop(b);
    this.sort();
  }

  private drop(b: MappedBitmap): void {
    this.byId.delete(b.bitmap);
    native.munmap(b.mapping);
    closeAll([b.fd]);
  }

  private sort(): void {
    this.sorted = [...this.byId.values()].sort((a, b) => a.gpa - b.gpa);
    this.reachEnds = new Float64Array(this.sorted.length);
    let reach = 0;
    this.sorted.forEach((b, i) => {
      reach = Math.max(reach, b.gpa + b.pages * DIRTY_PAGE_SIZE);
      this.reachEnds[i] = reach;
    });
  }
}
