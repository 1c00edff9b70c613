// The software stand-in for an IOMMU, for machines without one (no /dev/vfio, no /dev/iommu): an IOVA
// table plus real pinning with mlock(2), run on libuv worker threads. Hugetlb memory is pinned the same
// way, with one difference the kernel shows: mlock faults every huge page in (smaps Private_Hugetlb /
// Shared_Hugetlb of the mapping: allocated and mapped, as a device's DMA needs it) but never marks a
// hugetlb mapping locked (smaps Locked, VmLck: 0), since hugetlb pages are never swapped out anyway; and
// munlock leaves them mapped until the region is unmapped. RLIMIT_MEMLOCK still applies to the length,
// as type1 charges hugetlb pages to locked_vm. It names itself `soft` in every
// status line and report, and never pretends to be a device's IOMMU: nothing translates DMA here.
//
// What it does model, the way VFIO type1 behaves:
//   - an IOVA table with one entry per mapped region, refusing overlaps (EEXIST) and, like type1's
//     dma_entry_limit module parameter (default 65535), limited in entries (`dmaEntryLimit`);
//   - an IOVA alignment (`iovaAlignment`, default 4 KiB), as an IOMMU whose smallest page is larger than
//     the CPU's imposes on every mapping (EINVAL off it);
//   - reserved IOVA ranges that cannot be mapped. By default the x86 MSI doorbell window
//     0xfee00000-0xfeefffff, which VFIO reports as reserved on every x86 host (an MSI write from a device
//     must reach the interrupt controller, so it can never be DMA-mapped RAM). `reserved` replaces the list
//     (an empty list reserves nothing);
//   - devices as names: the domain (the pin table) exists while at least one is attached and dies with
//     the last one, which unpins everything;
//   - cache coherency: DMA here is the CPU's own access, so the domain is coherent.
import { PAGE_SIZE, native } from '../../native/index.js';
import {
  ClientLimitError,
  IommuError,
  InvalidArgError,
  NoDeviceError,
  UnsupportedError,
  type Iova,
  type IovaRange,
  type Range,
  fromInclusive,
  hex,
  rangeText,
  rangesOverlap,
} from '../../protocol/index.js';
import {
  checkName,
  mapError,
  mergeRanges,
  unmapError,
  type DeviceInfo,
  type DomainLimits,
  type IommuBackend,
  type Piece,
  type VfioDevice,
} from './iommu-backend.js';
import type { PageLocks } from './page-locks.js';
import { pinPieces, unpinPieces } from './pinning.js';

/** The x86 MSI doorbell window, which VFIO reports as a reserved IOVA range on x86 hosts. */
export const X86_MSI_WINDOW: IovaRange = Object.freeze({ start: 0xfee0_0000, last: 0xfeef_ffff });
/** VFIO type1's default dma_entry_limit. */
export const DEFAULT_DMA_ENTRY_LIMIT = 65_535;

export interface SoftOptions {
  /** Reserved IOVA ranges (inclusive). Default: the x86 MSI window [0xfee00000, 0xfeefffff]. */
  reserved?: readonly IovaRange[];
  /** IOVA-table entries (one per mapped region). Default 65535, as type1's dma_entry_limit. */
  dmaEntryLimit?: number;
  /**
   * What every mapping's IOVA and size must be a multiple of, as an IOMMU whose smallest page is larger
   * than the CPU's would need (type1's iova_pgsizes, iommufd's out_iova_alignment). Default 4 KiB.
   */
  iovaAlignment?: number;
  /**
   * Shadow mode (one backend per IOAS, clients/vfio/shadow.ts): pin through these reference-counted page
   * locks, shared by the client's IOASes, since IOVA mappings may alias the same pages.
   */
  locks?: PageLocks;
}

class SoftDevice implements VfioDevice {
  readonly fd = undefined;
  constructor(readonly name: string) {}
  info(): DeviceInfo {
    throw new UnsupportedError(`soft device ${JSON.stringify(this.name)} is a name, not a VFIO device: it has no device info`);
  }
  regionInfo(): never {
    throw new UnsupportedError(`soft device ${JSON.stringify(this.name)} is a name, not a VFIO device: it has no regions`);
  }
}

export class SoftBackend implements IommuBackend {
  readonly name = 'soft' as const;
  readonly software = true;
  readonly description = 'soft: software stand-in for an IOMMU (no VFIO on this machine): an IOVA table and mlock pinning, devices are names';
  private readonly devs = new Map<string, SoftDevice>();
  /** The IOVA table: one entry per mapped region, [iova, size], sorted by IOVA. */
  private table: [number, number][] = [];
  private readonly reserved: Range<Iova>[];
  private readonly entryLimit: number;
  private readonly align: number;
  private readonly locks: PageLocks | undefined;

  constructor(opts: SoftOptions = {}) {
    this.locks = opts.locks;
    for (const r of opts.reserved ?? []) {
      if (!Number.isSafeInteger(r.start) || !Number.isSafeInteger(r.last) || r.start < 0 || r.last < r.start) {
        throw new InvalidArgError(`reserved range ${JSON.stringify(r)} must be {start, last} with 0 <= start <= last`);
      }
    }
    this.reserved = mergeRanges((opts.reserved ?? [X86_MSI_WINDOW]).map(fromInclusive<Iova>));
    this.entryLimit = opts.dmaEntryLimit ?? DEFAULT_DMA_ENTRY_LIMIT;
    this.align = opts.iovaAlignment ?? PAGE_SIZE;
    if (!Number.isSafeInteger(this.align) || this.align < PAGE_SIZE || 2 ** Math.round(Math.log2(this.align)) !== this.align || this.align > 2 ** 30) {
      throw new InvalidArgError(`iovaAlignment must be a power of two from 4 KiB to 1 GiB, got ${opts.iovaAlignment}`);
    }
    if (!Number.isSafeInteger(this.entryLimit) || this.entryLimit < 0 || this.entryLimit > 0xffff_ffff) {
      throw new InvalidArgError(`dmaEntryLimit must be an integer in [0, 2^32)`);
    }
  }

  get active(): boolean {
    return this.devs.size > 0;
  }

  get devices(): string[] {
    return [...this.devs.keys()];
  }

  attach(device: string): { created: boolean } {
    checkName(device, 'soft device name');
    if (this.devs.has(device)) throw new InvalidArgError(`soft device ${JSON.stringify(device)} is already attached`);
    const created = this.devs.size === 0;
    this.devs.set(device, new SoftDevice(device));
    return { created };
  }

  detach(device: string): { destroyed: boolean } {
    if (!this.devs.delete(device)) throw new NoDeviceError(`soft device ${JSON.stringify(device)} is not attached`);
    const destroyed = this.devs.size === 0;
    if (destroyed) this.table = [];
    return { destroyed };
  }

  device(name: string): VfioDevice | undefined {
    return this.devs.get(name);
  }

  readonly mappingPerPiece = false;

  entriesFor(): number {
    return 1;
  }

  claim(iova: Iova, size: number): void {
    if (iova % this.align !== 0 || size % this.align !== 0) {
      // As type1's MAP_DMA answers a mapping off its smallest IOMMU page.
      throw new IommuError(`soft: IOVA ${rangeText(iova, size)} is not aligned to ${hex(this.align)}`, { errno: 'EINVAL' });
    }
    const at = this.lowerBound(iova);
    for (const e of [this.table[at - 1], this.table[at]]) {
      if (e && rangesOverlap(iova, size, e[0], e[1])) {
        throw new IommuError(`soft: IOVA ${rangeText(iova, size)} overlaps the mapping at ${rangeText(e[0], e[1])}`, { errno: 'EEXIST' });
      }
    }
    if (this.table.length >= this.entryLimit) {
      throw new ClientLimitError(`soft: the IOVA table is full (${this.entryLimit} mappings, as type1's dma_entry_limit)`);
    }
    this.table.splice(at, 0, [iova, size]);
  }

  release(iova: Iova): void {
    const at = this.lowerBound(iova);
    if (this.table[at]?.[0] === iova) this.table.splice(at, 1);
  }

  /** Index of the first entry whose IOVA is >= iova. */
  private lowerBound(iova: number): number {
    let lo = 0;
    let hi = this.table.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if ((this.table[mid] as [number, number])[0] < iova) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  async map(piece: Piece): Promise<void> {
    if (this.locks) return this.mapMany([piece]);
    try {
      await native.mlock(piece.mapping, piece.offset, piece.size);
    } catch (err) {
      // mlock may have locked part of the range before failing.
      await native.munlock(piece.mapping, piece.offset, piece.size).catch(() => undefined);
      throw mapError(err, 'soft', piece);
    }
  }

  async unmap(piece: Piece): Promise<void> {
    if (this.locks) return this.unmapMany([piece]);
    try {
      await native.munlock(piece.mapping, piece.offset, piece.size);
    } catch (err) {
      throw unmapError(err, 'soft', piece);
    }
  }

  /** Shadow mode: locks the pages of every piece that no other mapping locks yet, all or nothing. */
  async mapMany(pieces: readonly Piece[]): Promise<void> {
    if (!this.locks) {
      await pinPieces(this, pieces);
      return;
    }
    try {
      await this.locks.lock(pieces);
    } catch (err) {
      throw mapError(err, 'soft', pieces[0] as Piece);
    }
  }

  /** Shadow mode: unlocks the pages of every piece that no other mapping still locks. */
  async unmapMany(pieces: readonly Piece[]): Promise<void> {
    if (!this.locks) {
      await unpinPieces(this, pieces);
      return;
    }
    try {
      await this.locks.unlock(pieces);
    } catch (err) {
      throw unmapError(err, 'soft', pieces[0] as Piece);
    }
  }

  limits(): DomainLimits {
    return {
      reserved: this.reserved.map((r) => ({ ...r })),
      dmaAvailable: Math.max(0, this.entryLimit - this.table.length),
      coherent: true,
      align: this.align,
    };
  }

  close(): void {
    this.devs.clear();
    this.table = [];
  }
}
