// One IOMMU domain per client, shared by all of its devices: one container (type1), one IOAS (iommufd)
// or one pin table (soft). Memory is pinned and mapped into it once, whatever the number of devices, and
// counted once. The domain is refcounted by its devices: the first device creates it (and everything
// already mapped in the process is pinned into it), the last one destroys it (everything is unpinned).
//
// The pin table is keyed by a region's key (clients/view.ts): what its establishment depends on.
import {
  IommuError,
  NoDeviceError,
  isMmbError,
  ReservedRangeError,
  UnalignedError,
  dmaMisalignment,
  formatSize,
  type DmaRules,
  type Gpa,
  type Iova,
  type Range,
  hex,
  inclusiveText,
  iovaOfGpa,
  rangeText,
} from '../../protocol/index.js';
import { CHUNK_BYTES, type MappedRegion } from '../memory.js';
import type { ViewRegion } from '../view.js';
import { clash, mergeRanges, type IommuBackendName, type DirtyTracking, type DomainLimits, type IommuBackend, type Piece } from './iommu-backend.js';
import { pieces, pinPieces, type PinControl } from './pinning.js';

/** A `pinProgress` event: `done` of `total` bytes of region `region` are pinned and mapped. */
export interface PinProgress {
  region: string;
  id: number;
  gpa: number;
  done: number;
  total: number;
  backend: IommuBackendName;
}

export interface DomainMapping {
  region: string;
  id: number;
  gpa: Gpa;
  size: number;
  /** IOVA = GPA. */
  iova: Iova;
  readonly: boolean;
  /** Pieces it was pinned and mapped in. */
  pieces: number;
  /** Shadow mode: the IOAS of this IOVA mapping (its `iova` then differs from `gpa`). */
  ioas?: string;
}

export interface DomainOptions {
  /** Bytes per pinning call. */
  chunkBytes: number;
  /** Reserved ranges to add to what the backend reports (hardware backends). */
  extraReserved?: readonly Range<Iova>[];
  onProgress?: (p: PinProgress) => void;
}

interface Entry {
  region: ViewRegion;
  pieces: Piece[];
}

export class Domain {
  private readonly entries = new Map<string, Entry>();
  private bytes = 0;
  /** Reserved ranges added since (reserve(): a device's sysfs reserved_regions, read before it is opened). */
  private reservedExtra: Range<Iova>[] = [];
  /** The kernel's dirty tracking, while started; and the devices it was started for. */
  private tracking: { state: DirtyTracking; devices: string } | undefined;

  constructor(
    readonly backend: IommuBackend,
    private readonly opts: DomainOptions,
  ) {}

  /** The domain exists (at least one device). */
  get active(): boolean {
    return this.backend.active;
  }

  get devices(): readonly string[] {
    return this.backend.devices;
  }

  /** Bytes pinned and mapped now, each region counted once. */
  get pinnedBytes(): number {
    return this.bytes;
  }

  get chunkBytes(): number {
    return this.opts.chunkBytes;
  }

  /**
   * Bytes per DMA mapping: the pin chunk, rounded up to the IOMMU's alignment (a piece off it would be
   * refused by the kernel whatever the region's own alignment). `align`: limits().align, if known.
   */
  pieceBytes(align = this.limits().align): number {
    const a = align ?? 1;
    return Math.ceil(this.opts.chunkBytes / a) * a;
  }

  /**
   * How this client cuts regions into DMA mappings and the alignment they need (REPORT.dma, feature
   * DMA_RULES): GuestMemory's 1 GiB chunks in pieces of pieceBytes() for type1 and iommufd; one mapping
   * per region for soft. The broker predicts with it what this client counts (protocol/dma-rules.ts).
   */
  dmaRules(): DmaRules {
    const align = this.limits().align;
    const a = align !== undefined ? { align } : {};
    if (!this.backend.mappingPerPiece) return a;
    return { chunkBytes: CHUNK_BYTES, pieceBytes: this.pieceBytes(align), ...a };
  }

  /** Adds reserved ranges (a device's sysfs reserved_regions) to what limits() reports, for good. */
  reserve(ranges: readonly Range<Iova>[]): void {
    this.reservedExtra = mergeRanges([...this.reservedExtra, ...ranges]);
  }

  /** Refuses a region whose DMA mappings would be off the IOMMU's alignment (MMB_ERR_UNALIGNED). */
  checkAligned(region: ViewRegion, align: number | undefined): void {
    const why = dmaMisalignment(region.gpa, region.size, align !== undefined ? { align } : undefined);
    if (why) {
      throw new UnalignedError(
        `region ${JSON.stringify(region.name)} ${rangeText(region.gpa, region.size)}: the ${this.backend.name} IOMMU maps at multiples of ${formatSize(align as number)}: ${why}`,
      );
    }
  }

  isPinned(key: string): boolean {
    return this.entries.has(key);
  }

  mappings(): DomainMapping[] {
    return [...this.entries.values()]
      .map(({ region: r, pieces: p }) => ({
        region: r.name,
        id: r.id,
        gpa: r.gpa,
        size: r.size,
        iova: iovaOfGpa(r.gpa),
        readonly: r.readonly,
        pieces: p.length,
      }))
      .sort((a, b) => a.gpa - b.gpa);
  }

  /** The backend's limits, with the configured extra reserved ranges merged into `reserved`. */
  limits(): DomainLimits & { reserved: Range<Iova>[] } {
    const l = this.backend.limits();
    return { ...l, reserved: mergeRanges([...(l.reserved ?? []), ...(this.opts.extraReserved ?? []), ...this.reservedExtra]) };
  }

  /** The dirty tracker in use while dirty logging is on (undefined while it is off). */
  get dirtyTracking(): DirtyTracking | undefined {
    return this.tracking?.state;
  }

  /**
   * Starts (or extends to new devices) the kernel's tracking of device writes. A backend without one
   * (soft) and a kernel that refuses leave `none`: every writable page then counts as dirty. Asked again
   * only when the set of devices changed, so a refusal is not retried at every change.
   */
  startDirty(): DirtyTracking {
    const devices = [...this.backend.devices].sort().join(',');
    if (this.tracking && this.tracking.devices === devices) return this.tracking.state;
    let state: DirtyTracking;
    if (!this.backend.active) state = { mode: 'none', reason: 'no device in the domain' };
    else if (!this.backend.startDirty)
      state = {
        mode: 'none',
        reason: `${this.backend.name}: ${this.backend.software ? 'a software stand-in, nothing tracks what its devices write' : 'no dirty tracking'}`,
      };
    else state = this.backend.startDirty();
    this.tracking = { state, devices };
    return state;
  }

  stopDirty(): void {
    if (!this.tracking) return;
    this.tracking = undefined;
    this.backend.stopDirty?.();
  }

  /**
   * Pinned regions a device may have written since the last call, for a dirty flush: with the kernel's
   * tracking, what it reports for each logging region (a failed read counts the whole region); without,
   * every writable pinned region whole. `whole` (the default with `keys`, regions about to be unpinned)
   * counts the regions whole even with tracking: DMA to them stops, and a read before the unmap could miss
   * what a device writes in between. `mark(gpa, size)` / `markBits(gpa, bits, pages)` receive them.
   */
  collectDirty(
    mark: (gpa: number, size: number) => void,
    markBits: (gpa: number, bits: Uint8Array, pages: number) => void,
    opts: { keys?: ReadonlySet<string>; whole?: boolean } = {},
  ): void {
    if (!this.backend.active) return;
    const { keys, whole = keys !== undefined } = opts;
    const tracked = this.tracking !== undefined && this.tracking.state.mode !== 'none' && this.backend.readDirty !== undefined;
    for (const { region: r } of this.entries.values()) {
      if (r.readonly || (keys && !keys.has(r.key))) continue;
      if (!tracked || whole) {
        mark(r.gpa, r.size);
        continue;
      }
      if (!r.logDirty) continue; // no bitmap to put it in; the kernel keeps its bits until logging resumes
      let bits: Uint8Array;
      try {
        bits = (this.backend.readDirty as (iova: Iova, size: number) => Uint8Array)(iovaOfGpa(r.gpa), r.size);
      } catch {
        mark(r.gpa, r.size); // never a lost bit: what could not be read counts as written
        continue;
      }
      markBits(r.gpa, bits, r.size / 4096);
    }
  }

  /** Refuses a region that covers a reserved range (MMB_ERR_RESERVED_RANGE). */
  checkReserved(region: ViewRegion, reserved: readonly Range<Iova>[]): void {
    const x = clash(reserved, iovaOfGpa(region.gpa), region.size);
    if (x) {
      throw new ReservedRangeError(
        `region ${JSON.stringify(region.name)} ${rangeText(region.gpa, region.size)} covers ${inclusiveText(x.start, x.size)}, reserved in the ${this.backend.name} IOMMU domain`,
      );
    }
  }

  /**
   * Pins and maps a mapped region into the domain, in pieces. 'inactive' (nothing done) while there is no
   * device; 'cancelled' if ctl.cancelled() turned true meanwhile (nothing left pinned).
   */
  async pin(m: MappedRegion, ctl: PinControl = {}): Promise<'pinned' | 'cancelled' | 'inactive'> {
    const r = m.region;
    if (!this.backend.active) return 'inactive';
    if (this.entries.has(r.key)) return 'pinned';
    const limits = this.limits();
    this.checkReserved(r, limits.reserved);
    this.checkAligned(r, limits.align);
    if (limits.align !== undefined && m.address % limits.align !== 0) {
      // GuestMemory maps on a 4 KiB, 2 MiB or huge page boundary; an IOMMU needing more refuses the vaddr.
      throw new UnalignedError(
        `region ${JSON.stringify(r.name)} is mapped at host address ${hex(m.address)} here, not a multiple of the ${formatSize(limits.align)} the ${this.backend.name} IOMMU maps at`,
      );
    }
    const list = pieces(m, this.pieceBytes(limits.align));
    this.backend.claim(iovaOfGpa(r.gpa), r.size, list.length);
    let outcome: 'done' | 'cancelled';
    try {
      outcome = await pinPieces(this.backend, list, {
        ...ctl,
        onProgress: (done, total) => {
          ctl.onProgress?.(done, total);
          this.opts.onProgress?.({ region: r.name, id: r.id, gpa: r.gpa, done, total, backend: this.backend.name });
        },
      });
    } catch (err) {
      this.backend.release(iovaOfGpa(r.gpa), r.size);
      throw err;
    }
    if (outcome === 'cancelled') {
      this.backend.release(iovaOfGpa(r.gpa), r.size);
      return 'cancelled';
    }
    this.entries.set(r.key, { region: r, pieces: list });
    this.bytes += r.size;
    return 'pinned';
  }

  /**
   * Unmaps and unpins a region; a no-op for one that is not pinned. Every piece is tried (last first). If
   * one fails, the pieces unmapped meanwhile are mapped again, so the region stays whole in the IOMMU and
   * in this table, and the failure is thrown (MMB_ERR_IOMMU naming what stays mapped): the device may
   * still reach that memory, so the caller must not say it let go of it. Should mapping them again fail
   * too, the table keeps exactly the pieces still mapped (and their bytes): it never forgets a mapping the
   * kernel may still have.
   */
  async unpin(key: string): Promise<void> {
    const e = this.entries.get(key);
    if (!e) return;
    const stuck: Piece[] = [];
    let first: unknown;
    for (let i = e.pieces.length - 1; i >= 0; i--) {
      const p = e.pieces[i] as Piece;
      try {
        await this.backend.unmap(p);
      } catch (err) {
        first ??= err;
        stuck.unshift(p);
      }
    }
    if (first === undefined) {
      this.entries.delete(key);
      this.bytes -= e.region.size;
      this.backend.release(iovaOfGpa(e.region.gpa), e.region.size);
      return;
    }
    const unmapped = e.pieces.filter((p) => !stuck.includes(p));
    const remapped: Piece[] = [];
    for (const p of unmapped) {
      try {
        await this.backend.map(p);
        remapped.push(p);
      } catch {
        // Stays unmapped: the table below keeps only what is mapped.
      }
    }
    const still = e.pieces.filter((p) => stuck.includes(p) || remapped.includes(p));
    const lost = e.pieces.filter((p) => !still.includes(p)).reduce((n, p) => n + p.size, 0);
    e.pieces = still;
    this.bytes -= lost;
    const r = e.region;
    throw new IommuError(
      `${this.backend.name}: region ${JSON.stringify(r.name)} ${rangeText(r.gpa, r.size)} could not be unmapped (${stuck.length} of ${stuck.length + unmapped.length} DMA mappings refused): ` +
        (lost === 0
          ? 'it stays mapped and pinned, and this client keeps it'
          : `${still.length} mappings stay and this client keeps them; ${formatSize(lost)} could not be mapped again`) +
        `: ${first instanceof Error ? first.message : String(first)}`,
      { cause: first, ...(isMmbError(first) ? { errno: first.errno } : {}) },
    );
  }

  /** A region's metadata changed (name, id, logDirty), not what is pinned. */
  update(after: ViewRegion): void {
    const e = this.entries.get(after.key);
    if (e) e.region = after;
  }

  /**
   * Attaches a device. The first one creates the domain, and everything in `regions` is pinned into it;
   * if that fails, the device is detached again and nothing stays pinned.
   */
  async attachDevice(name: string, regions: readonly MappedRegion[], ctl: PinControl = {}): Promise<{ created: boolean }> {
    const { created } = this.backend.attach(name);
    if (!created) return { created };
    const done: string[] = [];
    try {
      const reserved = this.limits().reserved;
      for (const m of regions) this.checkReserved(m.region, reserved);
      for (const m of regions) {
        const outcome = await this.pin(m, ctl);
        if (outcome === 'pinned') done.push(m.region.key);
      }
    } catch (err) {
      for (const key of done.reverse()) await this.unpin(key).catch(() => undefined);
      this.backend.detach(name);
      throw err;
    }
    return { created };
  }

  /** Detaches a device; with the last one everything is unpinned first and the domain destroyed. */
  async detachDevice(name: string): Promise<{ destroyed: boolean }> {
    if (!this.backend.devices.includes(name)) throw new NoDeviceError(`${JSON.stringify(name)} is not attached to this ${this.backend.name} domain`);
    let unpinError: unknown;
    if (this.backend.devices.length === 1) {
      try {
        await this.unpinAll();
      } catch (err) {
        unpinError = err;
      }
    }
    const { destroyed, stillOpen } = this.backend.detach(name);
    if (destroyed) {
      // Anything still in the table went with the domain, and so did its dirty tracking.
      this.entries.clear();
      this.bytes = 0;
      this.tracking = undefined;
    }
    if (unpinError !== undefined) throw unpinError;
    // Detached on our side; the kernel finishes when the caller lets go of the device (see detach()).
    if (stillOpen !== undefined) throw stillOpen;
    return { destroyed };
  }

  /** Unpins everything, highest GPA first; tries every region and throws the first failure. */
  async unpinAll(): Promise<void> {
    let first: unknown;
    const keys = [...this.entries.values()].sort((a, b) => b.region.gpa - a.region.gpa).map((e) => e.region.key);
    for (const key of keys) {
      try {
        await this.unpin(key);
      } catch (err) {
        first ??= err;
      }
    }
    if (first !== undefined) throw first;
  }

  /** Unpins everything and closes the backend (devices, container / iommufd). */
  async close(): Promise<void> {
    try {
      this.stopDirty();
      await this.unpinAll();
    } finally {
      this.entries.clear();
      this.bytes = 0;
      this.backend.close();
    }
  }
}
