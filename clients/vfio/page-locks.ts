// Reference-counted mlock(2) for the soft backend when it shadows a guest IOMMU (clients/vfio/shadow.ts).
// IOVA mappings may alias: a guest maps one page at two IOVAs, or in two IOASes of one client, and mlock is
// not counted by the kernel (one munlock unlocks the page whatever locked it before). So the count lives
// here, per 4 KiB page of each GuestMemory chunk mapping: a page is locked when its count goes from 0 to 1
// and unlocked when it returns to 0. VmLck then shows exactly the distinct pages mapped, not the RAM.
//
// A batch locks (unlocks) the runs of pages whose count changes as few mlock (munlock) calls, one per
// contiguous run, all queued at once on libuv's workers. lock() is all or nothing: a failed mlock unlocks
// what the batch locked and gives the counts back.
import { native, PAGE_SIZE, type Mapping } from '../../native/index.js';

export interface PageRange {
  mapping: Mapping;
  /** Byte offset in the mapping, page aligned. */
  offset: number;
  size: number;
}

interface Run {
  mapping: Mapping;
  first: number;
  count: number;
}

/** Most references one page can have: more aliases than that is refused. */
const MAX_REFS = 0xffff;

export class PageLocks {
  private readonly counts = new Map<Mapping, Uint16Array>();
  private _bytes = 0;

  /** Bytes of distinct pages locked now. */
  get bytes(): number {
    return this._bytes;
  }

  /** Takes a reference on every page of `ranges`; mlocks the pages that had none. */
  async lock(ranges: readonly PageRange[]): Promise<void> {
    const runs = this.count(ranges, +1);
    const results = await Promise.allSettled(runs.map((r) => native.mlock(r.mapping, r.first * PAGE_SIZE, r.count * PAGE_SIZE)));
    const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (!failed) return;
    // mlock may have locked part of a run before failing: unlock every run, then give the counts back.
    await Promise.allSettled(runs.map((r) => native.munlock(r.mapping, r.first * PAGE_SIZE, r.count * PAGE_SIZE)));
    this.count(ranges, -1);
    throw failed.reason;
  }

  /** Drops a reference on every page of `ranges`; munlocks the pages that have none left. */
  async unlock(ranges: readonly PageRange[]): Promise<void> {
    const runs = this.count(ranges, -1);
    const results = await Promise.allSettled(runs.map((r) => native.munlock(r.mapping, r.first * PAGE_SIZE, r.count * PAGE_SIZE)));
    const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed) throw failed.reason;
  }

  /** Forgets the counts of a mapping that is going away (its pages are unlocked by the munmap). */
  forget(mapping: Mapping): void {
    const c = this.counts.get(mapping);
    if (!c) return;
    for (const n of c) if (n > 0) this._bytes -= PAGE_SIZE;
    this.counts.delete(mapping);
  }

  /**
   * Adds `delta` to the count of every page of `ranges` and returns the runs of pages whose count went
   * from 0 to 1 (+1) or from 1 to 0 (-1), in order, merged where contiguous.
   */
  private count(unsorted: readonly PageRange[], delta: 1 | -1): Run[] {
    // In address order, so that adjacent ranges make one run.
    const ranges = [...unsorted].sort((a, b) => (a.mapping === b.mapping ? a.offset - b.offset : a.mapping.address - b.mapping.address));
    const tables = ranges.map((r) => {
      let c = this.counts.get(r.mapping);
      if (!c) {
        c = new Uint16Array(Math.ceil(r.mapping.length / PAGE_SIZE));
        this.counts.set(r.mapping, c);
      }
      return c;
    });
    const runs: Run[] = [];
    for (let i = 0; i < ranges.length; i++) {
      const r = ranges[i] as PageRange;
      const c = tables[i] as Uint16Array;
      const first = Math.floor(r.offset / PAGE_SIZE);
      const end = Math.ceil((r.offset + r.size) / PAGE_SIZE);
      for (let p = first; p < end; p++) {
        const before = c[p] as number;
        if (delta > 0 && before >= MAX_REFS) {
          // Give back what this batch took so far, then refuse it.
          this.count([...ranges.slice(0, i), { mapping: r.mapping, offset: r.offset, size: (p - first) * PAGE_SIZE }], -1);
          throw new RangeError(`a page is mapped more than ${MAX_REFS} times`);
        }
        if (delta < 0 && before === 0) continue;
        c[p] = before + delta;
        if ((delta > 0 && before !== 0) || (delta < 0 && before !== 1)) continue;
        this._bytes += delta * PAGE_SIZE;
        const last = runs[runs.length - 1];
        if (last && last.mapping === r.mapping && last.first + last.count === p) last.count++;
        else runs.push({ mapping: r.mapping, first: p, count: 1 });
      }
    }
    return runs;
  }
}
