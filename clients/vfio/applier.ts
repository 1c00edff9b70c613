// The vfio-like client's applier: maps every region into this process (GuestMemory: MAP_SHARED, one
// contiguous host range per region) and pins and maps it into the client's IOMMU domain at IOVA = GPA.
//
// A change, in this order (one at a time; device hot-add / hot-remove wait their turn):
//   1. refusals that need no work: the client's pin limit (bytes of the whole map after the change,
//      counted once however many devices), reserved IOVA ranges, the IOMMU's alignment, the domain's
//      remaining DMA mappings (counted as the broker predicts them from REPORT.dma);
//   2. removed regions are unpinned and IOMMU-unmapped (still mapped in the process): their IOVAs may be
//      reused by the added ones at once (a region replaced at the same GPA). One the kernel will not unmap
//      stays pinned and in the domain's table (Domain.unpin), and the change fails loudly (onError);
//   3. added regions are mapped in the process, then pinned and IOMMU-mapped piece by piece, off the event
//      loop, with progress. A region a queued transaction removes (ctx.cancelled) is undone and skipped
//      (and established later after all, should that removal not happen);
//      an aborted change (ctx.signal: rolled back, or closing) or a failure undoes everything of 2 and 3
//      and throws, leaving the state as it was;
//   4. removed regions are unmapped from the process; metadata updates are recorded.
// Then the owner of the applier is told (onChanged), to report the pinned bytes and DMA budget.
//
// Dirty logging: while a region logs, the domain's kernel tracking is on where the kernel has one (type1
// VFIO_IOMMU_DIRTY_PAGES; iommufd IOMMU_HWPT_SET_DIRTY_TRACKING on a dirty-capable page table) and each
// sync (flushDirty) copies what it reports into the logging regions' bitmaps. Where there is none (soft,
// an IOMMU without dirty bits), a device is assumed to have written every page it could reach by DMA, as
// QEMU assumes for VFIO devices without dirty tracking: every writable region mapped into an active
// domain is marked. Either way, the moment DMA to a region stops (unpinned by a change, the last device
// detached, the client closing) marks it whole, so that what a device wrote just before is in the next
// sync. Tracking starts with the first logging region (and is extended to devices attached later) and
// stops with the last.
import { CancelledError, ClientLimitError, PinBudgetError, dmaMappingCount, toMmbError } from '../../protocol/index.js';
import { CHUNK_BYTES, GuestMemory, type MappedRegion } from '../memory.js';
import type { DirtyLog } from '../dirty.js';
import type { Applier, ApplyContext, Change, LocalBacking, ViewRegion } from '../view.js';
import type { DirtyTracking } from './iommu-backend.js';
import type { Domain } from './domain.js';

const fmt = (bytes: number) => (bytes >= 2 ** 20 ? `${+(bytes / 2 ** 20).toFixed(1)} MiB` : `${bytes} bytes`);

/**
 * Pieces a region of `size` bytes is pinned in (GuestMemory chunks of 1 GiB, then `chunkBytes`): counted
 * as the broker predicts it from this client's REPORT.dma (protocol/dma-rules.ts).
 */
export function pieceCount(size: number, chunkBytes: number): number {
  return dmaMappingCount(size, { chunkBytes: CHUNK_BYTES, pieceBytes: chunkBytes });
}

export interface VfioApplierOptions {
  /** Most bytes this client may pin (the whole map, counted once). */
  pinLimit?: number;
  /** Called after every change and device change, when the state to report may have changed. */
  onChanged?: () => void;
  /** Called when an undo failed after a failure, or an unmap failed (a device may still reach that memory). */
  onError?: (err: unknown) => void;
  /** The subscriber's dirty log (feature DIRTY), where pages devices may have written are marked. */
  dirtyLog?: () => DirtyLog | undefined;
}

export class VfioApplier implements Applier {
  readonly memory = new GuestMemory();
  private queue: Promise<unknown> = Promise.resolve();
  private closed = false;
  /**
   * Regions whose establishment a queued removal cancelled: the subscriber counts them as established,
   * and the removal normally hands them back at once. Should that removal never be applied (the broker
   * rolled it back, or a resume says the region is still there), the next change establishes them.
   */
  private readonly unestablished = new Map<string, ViewRegion>();

  constructor(
    readonly domain: Domain,
    private readonly opts: VfioApplierOptions = {},
  ) {}

  /** Bytes of memory mapped now (what the domain pins while it has a device). */
  get mappedBytes(): number {
    return this.memory.regions().reduce((n, m) => n + m.region.size, 0);
  }

  apply(change: Change, backings: ReadonlyMap<number, LocalBacking>, ctx: ApplyContext): Promise<void> {
    return this.exclusive(() => this.applyNow(change, backings, ctx));
  }

  /** Attaches a device; the first one creates the domain and pins everything mapped into it. */
  attachDevice(name: string, signal?: AbortSignal): Promise<void> {
    return this.exclusive(async () => {
      this.assertOpen();
      try {
        await this.domain.attachDevice(name, this.memory.regions(), signal ? { signal } : {});
      } finally {
        this.updateDirtyTracking();
        this.opts.onChanged?.();
      }
    });
  }

  /**
   * Dirty logging (EV_DIRTY_FLUSH): every writable region a device can reach now counts as dirty. Waits
   * for a change in progress, so a region being pinned is either reachable and marked, or not yet.
   */
  flushDirty(log: DirtyLog): Promise<void> {
    return this.exclusive(async () => this.markReachable(log));
  }

  /**
   * Marks what devices wrote (or may have written) by DMA dirty in `log`: what the kernel's tracking
   * reports, or every writable pinned region; `whole` / `keys` (only those regions) count them whole.
   */
  private markReachable(log: DirtyLog | undefined, opts: { keys?: ReadonlySet<string>; whole?: boolean } = {}): void {
    if (!log) return;
    this.domain.collectDirty(
      (gpa, size) => log.mark(gpa, size),
      (gpa, bits, pages) => log.markBits(gpa, bits, pages),
      opts,
    );
  }

  /**
   * Turns the kernel's dirty tracking on while a pinned region logs (and for devices that joined since),
   * off once none does. Called after every change and device change.
   */
  private updateDirtyTracking(): void {
    const logging = this.memory.regions().some((m) => m.region.logDirty && !m.region.readonly && this.domain.isPinned(m.region.key));
    if (logging && this.domain.active) this.domain.startDirty();
    else this.domain.stopDirty();
  }

  /** The kernel's dirty tracker in use (undefined while no region logs). */
  get dirtyTracking(): DirtyTracking | undefined {
    return this.domain.dirtyTracking;
  }

  /** Detaches a device; the last one unpins everything and destroys the domain. */
  detachDevice(name: string): Promise<void> {
    return this.exclusive(async () => {
      this.assertOpen();
      // The last device: DMA stops, so what it may have written goes into the next sync now.
      if (this.domain.devices.length === 1 && this.domain.devices[0] === name) this.markReachable(this.opts.dirtyLog?.(), { whole: true });
      try {
        await this.domain.detachDevice(name);
      } finally {
        this.updateDirtyTracking();
        this.opts.onChanged?.();
      }
    });
  }

  /** Two-phase votes: maps now what the commit adds in place of what it removes (Applier.stage). */
  stage(regions: readonly ViewRegion[], backings: ReadonlyMap<number, LocalBacking>): void {
    this.memory.stage(regions, backings);
  }

  unstage(regions: readonly ViewRegion[]): void {
    this.memory.unstage(regions);
  }

  close(): Promise<void> {
    return this.exclusive(async () => {
      if (this.closed) return;
      this.closed = true;
      this.markReachable(this.opts.dirtyLog?.(), { whole: true });
      try {
        await this.domain.close();
      } finally {
        this.memory.close();
      }
    });
  }

  private assertOpen(): void {
    if (this.closed) throw new CancelledError('the vfio client is closed');
  }

  private exclusive<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.queue.then(fn, fn);
    this.queue = run.catch(() => undefined);
    return run;
  }

  private async applyNow(change: Change, backings: ReadonlyMap<number, LocalBacking>, ctx: ApplyContext): Promise<void> {
    this.assertOpen();
    const mapped = new Map(this.memory.regions().map((m) => [m.region.key, m]));
    const removed = change.removed.filter((r) => mapped.has(r.key));
    const gone = new Set(change.removed.map((r) => r.key));
    const revived = [...this.unestablished.values()].filter((r) => !gone.has(r.key));
    const added = [...revived, ...change.added];

    // 1. Refusals before any work.
    if (added.length > 0) {
      const after = this.mappedBytes - removed.reduce((n, r) => n + r.size, 0) + added.reduce((n, r) => n + r.size, 0);
      if (this.opts.pinLimit !== undefined && after > this.opts.pinLimit) {
        throw new PinBudgetError(`this vfio client (${this.domain.backend.name}) would pin ${fmt(after)}; its pin limit is ${fmt(this.opts.pinLimit)}`);
      }
      const limits = this.domain.limits();
      for (const r of added) this.domain.checkReserved(r, limits.reserved);
      for (const r of added) this.domain.checkAligned(r, limits.align);
      if (this.domain.active && limits.dmaAvailable !== undefined) {
        const piece = this.domain.pieceBytes(limits.align);
        const entries = (rs: readonly ViewRegion[]) => rs.reduce((n, r) => n + this.domain.backend.entriesFor(pieceCount(r.size, piece)), 0);
        const needed = entries(added) - entries(removed.filter((r) => this.domain.isPinned(r.key)));
        if (needed > limits.dmaAvailable) {
          throw new ClientLimitError(`the ${this.domain.backend.name} domain accepts ${limits.dmaAvailable} more DMA mappings; this change needs ${needed}`);
        }
      }
    }
    if (ctx.signal.aborted) throw toMmbError(ctx.signal.reason, 'MMB_ERR_CANCELLED');

    // 2. Unpin what goes (keeping it mapped, to restore it if the rest fails). What a device wrote there is
    // marked first: a region replaced at the same GPA (a read-only toggle, a move) keeps its dirty pages.
    this.markReachable(this.opts.dirtyLog?.(), { keys: new Set(removed.map((r) => r.key)) });
    const unpinned: MappedRegion[] = [];
    try {
      for (const r of removed) {
        if (!this.domain.isPinned(r.key)) continue;
        await this.domain.unpin(r.key);
        unpinned.push(mapped.get(r.key) as MappedRegion);
      }
    } catch (err) {
      // The domain kept what the kernel would not unmap (Domain.unpin); the change fails, and loudly: a
      // device may still reach memory the broker is about to take away. With two-phase transactions this
      // happens at the commit, where the nack gets this client fenced.
      this.opts.onError?.(err);
      await this.restore(unpinned);
      throw err;
    }

    // 3. Map and pin what comes.
    const pinned: string[] = [];
    const cancelled: ViewRegion[] = [];
    let memoryMapped = false;
    try {
      if (added.length > 0) {
        this.memory.apply({ ...change, added, removed: [], updated: [] }, backings);
        memoryMapped = true;
        const now = new Map(this.memory.regions().map((m) => [m.region.key, m]));
        for (const r of added) {
          if (ctx.signal.aborted) throw toMmbError(ctx.signal.reason, 'MMB_ERR_CANCELLED');
          if (ctx.cancelled(r.key)) {
            cancelled.push(r);
            continue;
          }
          const outcome = await this.domain.pin(now.get(r.key) as MappedRegion, { signal: ctx.signal, cancelled: () => ctx.cancelled(r.key) });
          if (outcome === 'pinned') pinned.push(r.key);
          else if (outcome === 'cancelled') cancelled.push(r);
        }
      }
    } catch (err) {
      for (const key of pinned.reverse()) await this.domain.unpin(key).catch((e: unknown) => this.opts.onError?.(e));
      if (memoryMapped) this.memory.apply({ ...change, removed: added, added: [], updated: [] }, backings);
      await this.restore(unpinned);
      this.updateDirtyTracking();
      this.opts.onChanged?.();
      throw err;
    }

    // 4. Let go of what went; record metadata. A region cancelled by a queued removal is unmapped too:
    // that removal will find nothing left to do.
    this.memory.apply({ ...change, removed: [...change.removed, ...cancelled], added: [] }, backings);
    for (const { after } of change.updated) this.domain.update(after);
    for (const key of gone) this.unestablished.delete(key);
    for (const r of revived) this.unestablished.delete(r.key);
    for (const r of cancelled) this.unestablished.set(r.key, r);
    this.updateDirtyTracking();
    this.opts.onChanged?.();
  }

  /** Pins again regions unpinned by a change that failed. */
  private async restore(regions: readonly MappedRegion[]): Promise<void> {
    for (const m of regions) {
      try {
        await this.domain.pin(m);
      } catch (err) {
        this.opts.onError?.(err);
      }
    }
  }
}
