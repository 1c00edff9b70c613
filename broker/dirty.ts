// Dirty bitmaps of an address space: one per region whose logging is on, 1 bit per 4 KiB page, in a
// sealed memfd the broker creates, maps, and sends (EV_BITMAPS) to every subscriber that negotiated
// DIRTY. Writers set bits with atomic ORs in shared memory, without a message per page.
//
// Each bitmap is double-buffered (protocol/constants.ts bitmapLayout): writers set bits in the active
// half. A sync flips `active` first, then has every writer flush and ack; after that no writer touches
// the retired half, so the broker collects it with plain loads and stores at memory speed (an atomic
// swap per word would be ten times slower). Bits set after a writer saw the flip land in the new half:
// the next sync reports them. None is lost.
//
// The header lives in memory every writer maps read-write, so a writer can scribble on it. The broker
// never believes it: the active half is its own record (Bitmap.active), which it writes into the header
// at every flip. When it finds the header different from that record (at the flip, or when it collects),
// honest writers may have put bits in either half, so that collection takes both halves with atomic
// get-and-clear and reports them all: a corrupted header costs one slower sync, never a lost bit nor a
// failed DIRTY_SYNC. (A writer can still clear bits outright: writers are trusted with the bitmaps'
// contents, as KVM and vhost back-ends are; see docs/security.md.)
import { constants, native, type Mapping } from '../native/index.js';
import { DIRTY_PAGE_SIZE, bitmapLayout, forEachBitRun, type BitmapInfo, type Gpa, type Region, rangeEnd } from '../protocol/index.js';

export interface Bitmap {
  id: number;
  region: number;
  gpa: Gpa;
  pages: number;
  layout: ReturnType<typeof bitmapLayout>;
  fd: number;
  mapping: Mapping;
  /** The header's view: its first u64 is the active half, as the broker last wrote it. */
  header: DataView;
  /** The active half: the broker's own record, which the header only mirrors. */
  active: number;
  /** The header was found corrupted since the last collection: collect both halves next time. */
  suspect: boolean;
}

export class DirtyBitmaps {
  private readonly byRegion = new Map<number, Bitmap>();
  private nextId = 1;

  get size(): number {
    return this.byRegion.size;
  }

  forRegion(id: number): Bitmap | undefined {
    return this.byRegion.get(id);
  }

  all(): IterableIterator<Bitmap> {
    return this.byRegion.values();
  }

  /** A new, empty bitmap for `r` (not yet in the table: see adopt()). */
  create(r: Region): Bitmap {
    const pages = r.size / DIRTY_PAGE_SIZE;
    const layout = bitmapLayout(pages);
    const fd = native.memfdCreate(`dirty:${r.name}`, constants.MFD_CLOEXEC | constants.MFD_ALLOW_SEALING);
    try {
      native.ftruncate(fd, layout.size);
      native.addSeals(fd, constants.F_SEAL_SHRINK | constants.F_SEAL_GROW | constants.F_SEAL_SEAL);
      const mapping = native.mmap(fd, 0, layout.size, constants.PROT_READ | constants.PROT_WRITE, constants.MAP_SHARED);
      return { id: this.nextId++, region: r.id, gpa: r.gpa, pages, layout, fd, mapping, header: new DataView(mapping.buffer, 0, 8), active: 0, suspect: false };
    } catch (err) {
      native.close(fd);
      throw err;
    }
  }

  adopt(b: Bitmap): void {
    this.byRegion.set(b.region, b);
  }

  /** Forgets a bitmap and releases its mapping and fd. */
  destroy(b: Bitmap): void {
    if (this.byRegion.get(b.region) === b) this.byRegion.delete(b.region);
    native.munmap(b.mapping);
    native.close(b.fd);
  }

  info(b: Bitmap): BitmapInfo {
    return { bitmap: b.id, region: b.region, gpa: b.gpa, pages: b.pages };
  }

  active(b: Bitmap): number {
    return b.active;
  }

  /** Does the header still say what the broker wrote? If not, rewrites it and remembers to collect both halves. */
  private checkHeader(b: Bitmap): void {
    if (b.header.getBigUint64(0, true) === BigInt(b.active)) return;
    b.suspect = true;
    b.header.setBigUint64(0, BigInt(b.active), true);
  }

  /** Makes the other half active; returns the half retired (to collect once every writer flushed). */
  flip(b: Bitmap): number {
    this.checkHeader(b);
    const old = b.active;
    b.active = 1 - old;
    b.header.setBigUint64(0, BigInt(b.active), true);
    return old;
  }

  /** Marks every page dirty in half `h` (a writer that cannot say which pages it wrote). */
  markAll(b: Bitmap, h: number): void {
    native.bitmapSet(b.mapping, b.layout.offset(h) * 8, b.pages);
  }

  /**
   * Moves the bits of retired half `h` into `dst` at `offset` and zeroes the half; returns the dirty pages.
   * After a corrupted header, both halves, atomically (writers may still be setting bits in either).
   */
  take(b: Bitmap, h: number, dst: Mapping, offset: number): number {
    const out = new Uint8Array(dst.buffer, offset, b.layout.bytes);
    this.checkHeader(b);
    if (!b.suspect) return native.bitmapTake(b.mapping, b.layout.offset(h), b.layout.bytes, out);
    b.suspect = false;
    native.bitmapFetchClear(b.mapping, b.layout.offset(h), b.layout.bytes, out);
    native.bitmapFetchClear(b.mapping, b.layout.offset(1 - h), b.layout.bytes, out);
    return popcount(out);
  }

  closeAll(): void {
    for (const b of [...this.byRegion.values()]) this.destroy(b);
  }
}

/** Set bits in `bits`. */
function popcount(bits: Uint8Array): number {
  let n = 0;
  for (let v of bits) {
    for (; v !== 0; v &= v - 1) n++;
  }
  return n;
}

/** Runs of set bits of a bitmap, as guest-physical ranges (for observers). */
export function dirtyRanges(bits: Uint8Array, gpa: Gpa, pages: number): { gpa: Gpa; size: number }[] {
  const out: { gpa: Gpa; size: number }[] = [];
  forEachBitRun(bits, pages, (first, count) => out.push({ gpa: rangeEnd(gpa, first * DIRTY_PAGE_SIZE), size: count * DIRTY_PAGE_SIZE }));
  return out;
}
