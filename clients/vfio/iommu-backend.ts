// The one interface the three IOMMU backends implement (soft.ts, type1.ts, iommufd.ts), and what they
// share: IOVA range arithmetic and the mapping of syscall failures to the broker's error codes. "IOMMU
// backend" is VFIO's own term (a container's type1 driver, an iommufd IOAS); the client REPORTs its name
// as `backend`.
//
// A backend knows nothing of regions or transactions. It attaches and detaches devices (the first one
// creates the IOMMU domain, the last one destroys it: with type1 the kernel drops the container's IOMMU
// and every DMA mapping with its last group), maps and unmaps pieces of pinned memory at an IOVA, and
// says what the domain allows (usable IOVA ranges, remaining DMA mappings, cache coherency).
import {
  GPA_LIMIT,
  IommuError,
  InvalidArgError,
  PinFailedError,
  type Hva,
  type Iova,
  type MmbError,
  type Range,
  asIova,
  hex,
  mergeRanges,
  rangesOverlap,
} from '../../protocol/index.js';
import { isNativeError, type Mapping } from '../../native/index.js';
import type { RawIovaRange, RegionInfo } from './structs.js';

export type IommuBackendName = 'soft' | 'type1' | 'iommufd';

/** A piece of a region, pinned and mapped with one call (one mlock, one MAP_DMA, one IOAS_MAP). */
export interface Piece {
  /** IOVA of the first byte (IOVA = GPA for a passthrough VM). */
  iova: Iova;
  size: number;
  /** Host virtual address of the first byte (inside GuestMemory's contiguous mapping of the region). */
  vaddr: Hva;
  /** The GuestMemory chunk that holds the piece, and the piece's offset in it. */
  mapping: Mapping;
  offset: number;
  /** Map for device reads only. */
  readonly: boolean;
}

/** What the domain allows now. */
export interface DomainLimits {
  /**
   * IOVA ranges that cannot be mapped, within [0, 2^52) (the complement of the IOMMU's usable ranges, or
   * soft's configured list), sorted and merged; undefined while unknown (a hardware backend before its
   * first device).
   */
  reserved: Range<Iova>[] | undefined;
  /** The usable ranges as the kernel reported them (64-bit), if it did. */
  usable?: RawIovaRange[];
  /** More DMA mappings the IOMMU accepts (type1's DMA_AVAIL, soft's table); undefined if unlimited. */
  dmaAvailable: number | undefined;
  /** Whether DMA is cache-coherent for the domain; undefined if the backend cannot tell. */
  coherent: boolean | undefined;
  /**
   * What every DMA mapping's IOVA, size and host address must be a multiple of (type1: the smallest page
   * size of VFIO_IOMMU_GET_INFO's iova_pgsizes; iommufd: IOMMU_IOAS_IOVA_RANGES' out_iova_alignment; soft:
   * its configured alignment); the last one known while there is no domain, undefined before any.
   */
  align?: number;
}

/** A device behind the client. For hardware backends, what a driver needs to program the device. */
export interface VfioDevice {
  /** The PCI address ("0000:00:01.0"), or the name of a soft device. */
  readonly name: string;
  /** The VFIO device fd (pread / pwrite / mmap at region offsets); undefined for soft devices. */
  readonly fd: number | undefined;
  /** VFIO_DEVICE_GET_INFO; MMB_ERR_UNSUPPORTED for soft devices. */
  info(): DeviceInfo;
  /** VFIO_DEVICE_GET_REGION_INFO of region `index` (BAR0 = 0, config space = 7); MMB_ERR_UNSUPPORTED for soft. */
  regionInfo(index: number): RegionInfo;
  /** VFIO_DEVICE_FEATURE(GET, MIGRATION); absent for soft devices (names, with no state to migrate). */
  migration?(): DeviceMigration;
}

/** Which of the kernel's dirty-page trackers the domain uses while dirty logging is on. */
export type DirtyTrackingMode = 'type1' | 'iommufd' | 'none';

export interface DirtyTracking {
  /**
   * `type1`: VFIO_IOMMU_DIRTY_PAGES on the container (START, GET_BITMAP per region, STOP); `iommufd`:
   * IOMMU_HWPT_SET_DIRTY_TRACKING and IOMMU_HWPT_GET_DIRTY_BITMAP on the domain's hardware page tables;
   * `none`: no tracking, every writable page a device can reach counts as dirty at every sync.
   */
  mode: DirtyTrackingMode;
  /** Why `none` (the backend has none, the IOMMU lacks it, the kernel's errno). */
  reason?: string;
}

/** How status names a tracker (in the REPORT `backend` while the client logs). */
export const DIRTY_TRACKER_NAMES: Record<DirtyTrackingMode, string> = {
  type1: 'VFIO_IOMMU_DIRTY_PAGES',
  iommufd: 'IOMMU_HWPT_GET_DIRTY_BITMAP',
  none: 'all',
};

/**
 * What the kernel says about a device's migration support (VFIO_DEVICE_FEATURE_MIGRATION, VFIO migration
 * protocol v2): `stopCopy` means the device can be stopped (no more DMA) and its state read out and
 * restored. Devices without a migration driver (vfio-pci alone, e.g. QEMU's edu) answer ENOTTY.
 */
export interface DeviceMigration {
  supported: boolean;
  stopCopy: boolean;
  p2p: boolean;
  /** The raw feature flags, when supported. */
  flags?: number;
  /** Why not (the errno the kernel gave, or "soft device"). */
  reason?: string;
}

export interface DeviceInfo {
  flags: number;
  numRegions: number;
  numIrqs: number;
  pci: boolean;
  resettable: boolean;
}

export interface Detached {
  destroyed: boolean;
  /** MMB_ERR_IOMMU (errno EBUSY): the kernel still holds the device open; see IommuBackend.detach. */
  stillOpen?: MmbError;
}

export interface IommuBackend {
  readonly name: IommuBackendName;
  /** True for the software stand-in (no IOMMU, mlock pinning). */
  readonly software: boolean;
  /** One line for logs and status ("soft: software stand-in, no IOMMU; pins with mlock"). */
  readonly description: string;
  /** The domain exists: at least one device is attached. */
  readonly active: boolean;
  readonly devices: readonly string[];
  /**
   * Attaches a device; the first one creates the domain (`created`: the caller must then map everything
   * again). Leaves nothing behind on failure.
   */
  attach(device: string): { created: boolean };
  /**
   * Detaches a device; the last one destroys the domain (`destroyed`), with every mapping in it. On our side
   * the device is always gone afterwards; `stillOpen` says the kernel could not release it because this
   * process still holds it open elsewhere (an mmap of one of its regions, a dup of its fd): it stays bound
   * (type1: its group stays in the container) until that goes away. Found against the real kernel.
   */
  detach(device: string): Detached;
  device(name: string): VfioDevice | undefined;
  /** How many DMA mappings (entries of the IOMMU's table) a region made of `pieces` pieces takes. */
  entriesFor(pieces: number): number;
  /**
   * Each piece is a DMA mapping of its own (type1, iommufd: one MAP_DMA / IOAS_MAP per piece); false: one
   * per region (soft's IOVA table). Says how REPORT.dma describes the client's mappings.
   */
  readonly mappingPerPiece: boolean;
  /** Pins and maps one piece at its IOVA (on a worker thread). */
  map(piece: Piece): Promise<void>;
  /** Unmaps and unpins one piece. */
  unmap(piece: Piece): Promise<void>;
  /**
   * Optional batch forms, for a guest IOMMU's many small mappings (shadow mode, clients/vfio/ioas-domain.ts):
   * mapMany is all or nothing; unmapMany tries every piece and throws the first failure.
   */
  mapMany?(pieces: readonly Piece[]): Promise<void>;
  unmapMany?(pieces: readonly Piece[]): Promise<void>;
  /**
   * Before a region's pieces are mapped: checks that the domain can take it and claims what it needs (soft:
   * its IOVA-table entry, refused on overlap or when the table is full; type1: enough DMA mappings left).
   */
  claim(iova: Iova, size: number, pieces: number): void;
  /** After a region's pieces were unmapped (or its mapping failed): gives back what claim() took. */
  release(iova: Iova, size: number): void;
  /** What the domain allows now (re-read from the kernel). */
  limits(): DomainLimits;
  /**
   * Starts the kernel's tracking of what devices write, for the whole domain (idempotent); says which
   * tracker is in use, `none` when the kernel offers none (the caller then counts every writable page as
   * dirty). Absent for soft, which has no device to track.
   */
  startDirty?(): DirtyTracking;
  /** Stops it (the domain may already be gone). */
  stopDirty?(): void;
  /**
   * What devices wrote in [iova, iova + size) since the last read (or the start), as a bitmap: bit i = the
   * 4 KiB page at iova + i * 4096, whole little-endian 64-bit words. Clears the kernel's record. The range
   * must start and end at mapping boundaries (a whole region). Throws if the kernel refuses: the caller
   * then counts the whole range as dirty.
   */
  readDirty?(iova: Iova, size: number): Uint8Array;
  /** Detaches every device and closes every fd. */
  close(): void;
}

// --- IOVA ranges ---------------------------------------------------------------------------------

/** The last usable GPA: ranges are clipped to the protocol's 52-bit guest-physical space. */
export const GPA_LAST = GPA_LIMIT - 1;

/** The one implementation is protocol/address.ts's (re-exported here, where the vfio client has always had it). */
export { mergeRanges };

/**
 * The reserved ranges (the complement of the usable ones) within [0, 2^52), as numbers. The kernel's
 * ranges are 64-bit and inclusive (this is where that form arrives); everything at or above 2^52 lies
 * outside any guest-physical address anyway.
 */
export function reservedFromUsable(usable: readonly RawIovaRange[]): Range<Iova>[] {
  const limit = BigInt(GPA_LIMIT);
  const sorted = [...usable].filter((r) => r.start <= r.last).sort((a, b) => (a.start < b.start ? -1 : a.start > b.start ? 1 : 0));
  const out: Range<Iova>[] = [];
  let next = 0n; // first address not yet known to be usable
  for (const r of sorted) {
    if (next >= limit) break;
    if (r.start > next) out.push({ start: asIova(Number(next)), size: Number((r.start < limit ? r.start : limit) - next) });
    if (r.last + 1n > next) next = r.last + 1n;
  }
  if (next < limit) out.push({ start: asIova(Number(next)), size: Number(limit - next) });
  return mergeRanges(out);
}

/** The first reserved range [iova, iova + size) touches, if any. */
export function clash(reserved: readonly Range<Iova>[], iova: Iova, size: number): Range<Iova> | undefined {
  return reserved.find((x) => rangesOverlap(iova, size, x.start, x.size));
}

/** A valid device or region name for the protocol: 1 to 64 bytes of UTF-8, no control characters. */
export function checkName(name: string, what: string): void {
  // eslint-disable-next-line no-control-regex -- control characters are what it looks for
  if (typeof name !== 'string' || name.length === 0 || Buffer.byteLength(name) > 64 || /[\u0000-\u001f\u007f]/.test(name)) {
    throw new InvalidArgError(`${what} ${JSON.stringify(name)} must be 1 to 64 bytes without control characters`);
  }
}

/** Whether `name` is a PCI address as sysfs spells them: domain:bus:device.function, lower-case hex. */
export const isBdf = (name: string): boolean => /^[0-9a-f]{4}:[0-9a-f]{2}:[0-1][0-9a-f]\.[0-7]$/.test(name);

/** PCI addresses as sysfs spells them: domain:bus:device.function, lower-case hex. */
export function checkBdf(bdf: string): void {
  if (!isBdf(bdf)) {
    throw new InvalidArgError(`${JSON.stringify(bdf)} is not a PCI address like 0000:00:01.0`);
  }
}

/**
 * The broker error for a failed map: ENOMEM (pinning beyond RLIMIT_MEMLOCK, or out of memory) and
 * EAGAIN are pinning failures, anything else an IOMMU failure; the errno rides along.
 */
export function mapError(err: unknown, backend: IommuBackendName, piece: Piece): MmbError {
  const what = `${backend}: cannot pin and map ${hex(piece.size)} bytes at IOVA ${hex(piece.iova)}`;
  if (isNativeError(err)) {
    const opts = { cause: err, errno: err.code };
    if (err.code === 'ENOMEM' || err.code === 'EAGAIN' || err.syscall === 'mlock') return new PinFailedError(`${what}: ${err.message}`, opts);
    return new IommuError(`${what}: ${err.message}`, opts);
  }
  return new IommuError(`${what}: ${err instanceof Error ? err.message : String(err)}`, { cause: err });
}

export function unmapError(err: unknown, backend: IommuBackendName, piece: Piece): MmbError {
  const what = `${backend}: cannot unmap ${hex(piece.size)} bytes at IOVA ${hex(piece.iova)}`;
  return new IommuError(`${what}: ${err instanceof Error ? err.message : String(err)}`, { cause: err, ...(isNativeError(err) ? { errno: err.code } : {}) });
}
