// The vfio-like client in shadow mode (docs/ioas.md): its devices sit behind a guest IOMMU, so instead of
// pinning all guest RAM at IOVA = GPA it shadows the guest's I/O address spaces. Guest memory is mapped
// into this process (GuestMemory) but never pinned; each IOAS the client's devices are attached to gets a
// host IOMMU domain of its own (IoasDomain: a type1 container, an iommufd IOAS, or a soft table) that maps
// exactly the IOVAs the guest mapped, IOVA -> the client's mapping of the guest page, pinned while mapped.
//
// One change at a time, map and IOAS changes and device hot-add / hot-remove alike (they share the queue).
// The soft backend shares one set of counted page locks across the client's IOASes: a page mapped at two
// IOVAs is locked once, unlocked with the last mapping. Dirty logging: a device is assumed to have written
// every page a writable IOVA mapping reaches (no IOMMU dirty tracking is read), at each sync and when the
// mapping goes.
import { NoDeviceError, PinBudgetError } from '../../protocol/index.js';
import type { DirtyLog } from '../dirty.js';
import type { IoasApplier, IoasChange } from '../ioas-view.js';
import { GuestMemory } from '../memory.js';
import type { Applier, ApplyContext, Change, LocalBacking, ViewRegion } from '../view.js';
import type { IommuBackend } from './iommu-backend.js';
import { IoasDomain, type IoasDomainOptions } from './ioas-domain.js';
import { PageLocks } from './page-locks.js';

const fmt = (bytes: number) => (bytes >= 2 ** 20 ? `${+(bytes / 2 ** 20).toFixed(1)} MiB` : `${bytes} bytes`);

export interface ShadowOptions extends IoasDomainOptions {
  /** Opens a host IOMMU backend for a new domain (one per IOAS); soft ones get the shared page locks. */
  open(locks: PageLocks): IommuBackend;
  /** Most bytes this client may pin, across its IOASes. */
  pinLimit?: number;
  /** Called after every change and device change, when the state to report may have changed. */
  onChanged?: () => void;
  /** The subscriber's dirty log (feature DIRTY). */
  dirtyLog?: () => DirtyLog | undefined;
}

export class ShadowApplier implements Applier, IoasApplier {
  readonly memory = new GuestMemory();
  /** Counted mlock of the soft backend, shared by every IOAS of this client. */
  readonly locks = new PageLocks();
  private readonly domains = new Map<string, IoasDomain>();
  private readonly deviceIoas = new Map<string, string>();
  private queue: Promise<unknown> = Promise.resolve();
  private closed = false;

  constructor(private readonly opts: ShadowOptions) {}

  /** The host domain of each IOAS this client's devices are attached to. */
  ioasDomains(): IoasDomain[] {
    return [...this.domains.values()];
  }

  /** The IOAS `device` is attached to. */
  ioasOf(device: string): string | undefined {
    return this.deviceIoas.get(device);
  }

  /** Bytes pinned now: distinct locked pages (soft), or every IOVA mapping's bytes (the kernel counts each). */
  get pinnedBytes(): number {
    let n = 0;
    for (const d of this.domains.values()) if (!d.backend.software) n += d.mappedBytes;
    return n + this.locks.bytes;
  }

  /** The guest-physical map: mapped into this process only; nothing is pinned for it. */
  apply(change: Change, backings: ReadonlyMap<number, LocalBacking>, _ctx: ApplyContext): Promise<void> {
    return this.exclusive(async () => this.memory.apply(change, backings));
  }

  stage(regions: readonly ViewRegion[], backings: ReadonlyMap<number, LocalBacking>): void {
    this.memory.stage(regions, backings);
  }

  unstage(regions: readonly ViewRegion[]): void {
    this.memory.unstage(regions);
  }

  applyIoas(change: IoasChange): Promise<void> {
    return this.exclusive(async () => {
      const d = this.domains.get(change.ioas);
      if (!d) throw new NoDeviceError(`no device of this client is attached to IOAS ${JSON.stringify(change.ioas)}`);
      const added = change.mapped.reduce((n, m) => n + m.size, 0) - change.unmapped.reduce((n, m) => n + m.size, 0);
      if (this.opts.pinLimit !== undefined && added > 0 && this.pinnedBytes + added > this.opts.pinLimit) {
        throw new PinBudgetError(`this vfio client would pin ${fmt(this.pinnedBytes + added)} in shadow mode; its pin limit is ${fmt(this.opts.pinLimit)}`);
      }
      // What a device may have written through a mapping that goes is in the next dirty sync.
      const log = this.opts.dirtyLog?.();
      if (log) for (const m of change.unmapped) if (!m.readonly) log.mark(m.gpa, m.size);
      try {
        await d.apply(change, this.memory);
      } finally {
        this.opts.onChanged?.();
      }
    });
  }

  /** Attaches a device to the host domain of `ioas`, creating it (and its backend) with the first one. */
  attachDevice(device: string, ioas: string): Promise<void> {
    return this.exclusive(async () => {
      let d = this.domains.get(ioas);
      const created = !d;
      if (!d) d = new IoasDomain(ioas, this.opts.open(this.locks), this.opts);
      try {
        d.backend.attach(device);
      } catch (err) {
        if (created) d.backend.close();
        throw err;
      }
      this.domains.set(ioas, d);
      this.deviceIoas.set(device, ioas);
      this.opts.onChanged?.();
    });
  }

  /**
   * Detaches a device; the last one of an IOAS closes its domain (the subscriber detached it from the
   * broker's IOAS first, so nothing is mapped there any more).
   */
  detachDevice(device: string): Promise<void> {
    return this.exclusive(async () => {
      const ioas = this.deviceIoas.get(device);
      const d = ioas === undefined ? undefined : this.domains.get(ioas);
      if (!d || ioas === undefined) return;
      this.deviceIoas.delete(device);
      try {
        if (d.devices.length === 1) await d.unmapAll();
        const { stillOpen } = d.backend.detach(device);
        if (stillOpen) throw stillOpen;
      } finally {
        if (!d.active) {
          d.backend.close();
          this.domains.delete(ioas);
        }
        this.opts.onChanged?.();
      }
    });
  }

  /** Dirty logging: every page a writable IOVA mapping reaches counts as written. */
  flushDirty(log: DirtyLog): Promise<void> {
    return this.exclusive(async () => {
      for (const d of this.domains.values()) for (const m of d.mappings()) if (!m.readonly) log.mark(m.gpa, m.size);
    });
  }

  close(): Promise<void> {
    return this.exclusive(async () => {
      if (this.closed) return;
      this.closed = true;
      const log = this.opts.dirtyLog?.();
      let first: unknown;
      for (const d of this.domains.values()) {
        if (log) for (const m of d.mappings()) if (!m.readonly) log.mark(m.gpa, m.size);
        try {
          await d.unmapAll();
        } catch (err) {
          first ??= err;
        }
        d.backend.close();
      }
      this.domains.clear();
      this.deviceIoas.clear();
      this.memory.close();
      if (first !== undefined) throw first;
    });
  }

  private exclusive<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.queue.then(fn, fn);
    this.queue = run.catch(() => undefined);
    return run;
  }
}
