// VFIO type1: a container (/dev/vfio/vfio) holding the IOMMU groups of the devices, one IOMMU domain
// for all of them (type1v2), DMA mappings by VFIO_IOMMU_MAP_DMA / UNMAP_DMA.
//
// The sequence (as QEMU's hw/vfio does it, and as tried in a QEMU guest with intel-iommu and edu, see
// shared/reference/vfio-in-qemu.md):
//   open /dev/vfio/vfio; VFIO_GET_API_VERSION == VFIO_API_VERSION; VFIO_CHECK_EXTENSION(VFIO_TYPE1v2_IOMMU)
//   per device: readlink /sys/bus/pci/devices/$BDF/iommu_group -> group N; open /dev/vfio/N;
//     VFIO_GROUP_GET_STATUS must say VIABLE; VFIO_GROUP_SET_CONTAINER(container);
//     the first group: VFIO_SET_IOMMU(VFIO_TYPE1v2_IOMMU);
//     VFIO_GROUP_GET_DEVICE_FD("$BDF")
//   VFIO_IOMMU_GET_INFO with argsz = sizeof; if the kernel answers with a larger argsz, again with that
//     much room; then the capability chain: IOVA_RANGE (1), MIGRATION (2), DMA_AVAIL (3)
//   VFIO_CHECK_EXTENSION(VFIO_DMA_CC_IOMMU) on the container: are DMA writes cache-coherent
//   VFIO_IOMMU_MAP_DMA {READ|WRITE, vaddr, iova, size} / VFIO_IOMMU_UNMAP_DMA {iova, size}
//   dirty logging: VFIO_IOMMU_DIRTY_PAGES {START}, then {GET_BITMAP, iova, size, bitmap {4096, bytes, data}}
//     per region (the range must begin and end at MAP_DMA boundaries), {STOP} at the end. Offered when
//     GET_INFO has the MIGRATION capability with 4 KiB in its page sizes. Without a vendor driver that pins
//     pages itself (vfio_pin_pages), type1 cannot know what a device wrote and reports every mapped page
//     of the range dirty at every GET_BITMAP (vfio_iommu_type1.c, update_user_bitmap: seen in the VM test).
// A later group joins the same container: the kernel replays the existing mappings into it. When the
// last group leaves, the kernel releases the container's IOMMU with every mapping; the next device must
// VFIO_SET_IOMMU again, and the caller (Domain) maps everything again.
import path from 'node:path';
import { PAGE_SIZE, isNativeError } from '../../native/index.js';
import {
  ClientLimitError,
  IommuError,
  InvalidArgError,
  NoDeviceError,
  UnsupportedError,
  type Iova,
  type Range,
  type MmbError,
  hex,
} from '../../protocol/index.js';
import {
  GPA_LAST,
  checkBdf,
  mapError,
  reservedFromUsable,
  unmapError,
  type Detached,
  type DirtyTracking,
  type DomainLimits,
  type IommuBackend,
  type Piece,
  type VfioDevice,
} from './iommu-backend.js';
import { HwDevice, MAX_INFO_BYTES, ioctlError } from './device.js';
import { LAYOUTS, REQUEST, VFIO, get, pack, packInto, parseType1Info, type Type1Info } from './structs.js';
import { realSys, type VfioSys } from './sys.js';

export const VFIO_CONTAINER = '/dev/vfio/vfio';

interface Group {
  id: string;
  fd: number;
  devices: Set<string>;
}

export class Type1Backend implements IommuBackend {
  readonly name = 'type1' as const;
  readonly software = false;
  readonly description = 'type1: VFIO container with a type1v2 IOMMU (VFIO_IOMMU_MAP_DMA)';
  private readonly groups = new Map<string, Group>();
  private readonly devs = new Map<string, { group: Group; dev: HwDevice }>();
  private iommuSet = false;
  /** VFIO_IOMMU_DIRTY_PAGES started on the container (the kernel forgets it with the container's IOMMU). */
  private dirtyOn = false;
  /** Reserved ranges last reported by the kernel: kept while no device is attached, for placement. */
  private lastReserved: Range<Iova>[] | undefined;
  /** The smallest IOMMU page size last reported (kept like lastReserved). */
  private lastAlign: number | undefined;
  private closed = false;
  /** argsz GET_INFO needed last time (capability chains rarely change size): saves the retry. */
  private infoSize: number = LAYOUTS.vfio_iommu_type1_info.size;

  private constructor(
    private readonly sys: VfioSys,
    readonly container: number,
  ) {}

  /** Opens the container and checks the API; MMB_ERR_UNSUPPORTED naming what is missing. */
  static open(sys: VfioSys = realSys): Type1Backend {
    if (!sys.exists(VFIO_CONTAINER)) {
      throw new UnsupportedError(
        `backend type1 needs ${VFIO_CONTAINER}, which this machine does not have (no VFIO: load vfio-pci and vfio_iommu_type1 on a host with an IOMMU, or use backend "soft")`,
      );
    }
    let fd: number;
    try {
      fd = sys.open(VFIO_CONTAINER);
    } catch (err) {
      if (isNativeError(err, 'ENOENT')) throw new UnsupportedError(`backend type1 needs ${VFIO_CONTAINER}, which this machine does not have`, { cause: err });
      throw ioctlError(err, `cannot open ${VFIO_CONTAINER}`);
    }
    try {
      const version = sys.ioctlInt(fd, REQUEST.VFIO_GET_API_VERSION, 0);
      if (version !== VFIO.VFIO_API_VERSION) throw new UnsupportedError(`${VFIO_CONTAINER} speaks VFIO API version ${version}, not ${VFIO.VFIO_API_VERSION}`);
      if (sys.ioctlInt(fd, REQUEST.VFIO_CHECK_EXTENSION, VFIO.VFIO_TYPE1v2_IOMMU) !== 1) {
        throw new UnsupportedError(`${VFIO_CONTAINER} does not offer the type1v2 IOMMU (VFIO_CHECK_EXTENSION(VFIO_TYPE1v2_IOMMU) is 0)`);
      }
    } catch (err) {
      sys.close(fd);
      throw err instanceof UnsupportedError ? err : ioctlError(err, `${VFIO_CONTAINER}`);
    }
    return new Type1Backend(sys, fd);
  }

  get active(): boolean {
    return this.iommuSet;
  }

  get devices(): string[] {
    return [...this.devs.keys()];
  }

  attach(bdf: string): { created: boolean } {
    checkBdf(bdf);
    if (this.closed) throw new InvalidArgError('the type1 backend is closed');
    if (this.devs.has(bdf)) throw new InvalidArgError(`${bdf} is already attached`);
    const sysfs = `/sys/bus/pci/devices/${bdf}`;
    if (!this.sys.exists(sysfs)) throw new NoDeviceError(`no PCI device ${bdf} (${sysfs} does not exist)`);
    let link: string;
    try {
      link = this.sys.readlink(`${sysfs}/iommu_group`);
    } catch (err) {
      throw new NoDeviceError(`${bdf} has no IOMMU group (${sysfs}/iommu_group): is an IOMMU enabled (intel_iommu=on)?`, { cause: err });
    }
    const id = path.basename(link);
    if (!/^\d+$/.test(id)) throw new NoDeviceError(`${bdf}'s IOMMU group link ${link} does not name a group number`);

    let group = this.groups.get(id);
    let newGroup: Group | undefined;
    let created = false;
    try {
      if (!group) {
        const node = `/dev/vfio/${id}`;
        if (!this.sys.exists(node)) throw new NoDeviceError(`${node} does not exist: ${bdf} (IOMMU group ${id}) is not bound to vfio-pci`);
        let fd: number;
        try {
          fd = this.sys.open(node);
        } catch (err) {
          throw new NoDeviceError(`cannot open ${node} for ${bdf}: ${(err as Error).message}`, {
            cause: err,
            ...(isNativeError(err) ? { errno: err.code } : {}),
          });
        }
        group = newGroup = { id, fd, devices: new Set() };
        const status = pack('vfio_group_status', {});
        this.call(() => this.sys.ioctl(fd, REQUEST.VFIO_GROUP_GET_STATUS, status), `VFIO_GROUP_GET_STATUS on group ${id}`);
        if (!(get('vfio_group_status', status, 'flags') & VFIO.VFIO_GROUP_FLAGS_VIABLE)) {
          throw new NoDeviceError(`IOMMU group ${id} of ${bdf} is not viable: every device in it must be bound to vfio-pci (or have no driver)`);
        }
        this.call(() => this.sys.ioctlInt(fd, REQUEST.VFIO_GROUP_SET_CONTAINER, this.container), `VFIO_GROUP_SET_CONTAINER for group ${id}`);
        if (!this.iommuSet) {
          this.call(() => this.sys.ioctlInt(this.container, REQUEST.VFIO_SET_IOMMU, VFIO.VFIO_TYPE1v2_IOMMU), 'VFIO_SET_IOMMU(VFIO_TYPE1v2_IOMMU)');
          this.iommuSet = created = true;
        }
      }
      const fd = this.call(() => this.sys.groupGetDeviceFd((group as Group).fd, bdf), `VFIO_GROUP_GET_DEVICE_FD(${bdf})`);
      group.devices.add(bdf);
      this.groups.set(id, group);
      this.devs.set(bdf, { group, dev: new HwDevice(bdf, fd, this.sys) });
      return { created };
    } catch (err) {
      if (newGroup) this.dropGroup(newGroup);
      throw err;
    }
  }

  detach(bdf: string): Detached {
    const d = this.devs.get(bdf);
    if (!d) throw new NoDeviceError(`${bdf} is not attached`);
    this.devs.delete(bdf);
    d.dev.close();
    d.group.devices.delete(bdf);
    let stillOpen: MmbError | undefined;
    if (d.group.devices.size === 0) {
      const err = this.dropGroup(d.group);
      // EBUSY: a device of the group is still open in the kernel although we closed its fd: this process
      // still maps one of its regions (or holds a dup of the fd). The kernel keeps the group in the container
      // until that goes away (seen in the VM test: re-opening the group then fails with EBUSY).
      if (isNativeError(err, 'EBUSY')) {
        stillOpen = new IommuError(
          `${bdf} is detached here, but the kernel still holds it open (IOMMU group ${d.group.id} stays in the container): this process still maps one of its regions (a BAR mmap) or holds a copy of its fd; unmap them (before detaching, next time)`,
          { cause: err, errno: 'EBUSY' },
        );
      }
    }
    return { destroyed: !this.iommuSet, ...(stillOpen ? { stillOpen } : {}) };
  }

  /**
   * Takes a group out of the container; the container loses its IOMMU with its last group. Returns why
   * VFIO_GROUP_UNSET_CONTAINER failed, if it did (not in the container because SET_CONTAINER failed; or
   * EBUSY, a device of the group still open): closing the group fd unsets it too, once no device is open.
   */
  private dropGroup(g: Group): unknown {
    let failure: unknown;
    try {
      this.sys.ioctlInt(g.fd, REQUEST.VFIO_GROUP_UNSET_CONTAINER, 0);
    } catch (err) {
      failure = err;
    }
    this.sys.close(g.fd);
    this.groups.delete(g.id);
    if (this.groups.size === 0) this.iommuSet = this.dirtyOn = false;
    return failure;
  }

  device(name: string): VfioDevice | undefined {
    return this.devs.get(name)?.dev;
  }

  readonly mappingPerPiece = true;

  /** type1 keeps one vfio_dma per VFIO_IOMMU_MAP_DMA: each piece takes one of dma_entry_limit. */
  entriesFor(pieces: number): number {
    return pieces;
  }

  claim(_iova: Iova, _size: number, pieces: number): void {
    const avail = this.info()?.dmaAvailable;
    if (avail !== undefined && avail < pieces) {
      throw new ClientLimitError(`type1: the container accepts ${avail} more DMA mappings (DMA_AVAIL); this region needs ${pieces}`);
    }
  }

  release(): void {}

  async map(piece: Piece): Promise<void> {
    const arg = pack('vfio_iommu_type1_dma_map', {
      flags: VFIO.VFIO_DMA_MAP_FLAG_READ | (piece.readonly ? 0 : VFIO.VFIO_DMA_MAP_FLAG_WRITE),
      vaddr: piece.vaddr,
      iova: piece.iova,
      size: piece.size,
    });
    try {
      await this.sys.ioctlAsync(this.container, REQUEST.VFIO_IOMMU_MAP_DMA, arg);
    } catch (err) {
      throw mapError(err, 'type1', piece);
    }
  }

  async unmap(piece: Piece): Promise<void> {
    const arg = pack('vfio_iommu_type1_dma_unmap', { iova: piece.iova, size: piece.size });
    try {
      await this.sys.ioctlAsync(this.container, REQUEST.VFIO_IOMMU_UNMAP_DMA, arg);
    } catch (err) {
      throw unmapError(err, 'type1', piece);
    }
    const done = get('vfio_iommu_type1_dma_unmap', arg, 'size');
    if (done !== piece.size) throw unmapError(new Error(`the kernel unmapped ${done} bytes, not ${piece.size}`), 'type1', piece);
  }

  /** VFIO_IOMMU_GET_INFO, growing argsz until the capability chain fits; undefined without an IOMMU set. */
  info(): Type1Info | undefined {
    if (!this.iommuSet) return undefined;
    let size = this.infoSize;
    for (;;) {
      const buf = pack('vfio_iommu_type1_info', {}, size);
      this.call(() => this.sys.ioctl(this.container, REQUEST.VFIO_IOMMU_GET_INFO, buf), 'VFIO_IOMMU_GET_INFO');
      const info = parseType1Info(buf);
      if (info.argsz <= size) {
        this.infoSize = size;
        return info;
      }
      if (info.argsz > MAX_INFO_BYTES) throw new IommuError(`VFIO_IOMMU_GET_INFO asks for ${info.argsz} bytes`);
      size = info.argsz;
    }
  }

  limits(): DomainLimits {
    const info = this.info();
    const last = this.lastAlign !== undefined ? { align: this.lastAlign } : {};
    if (!info) return { reserved: this.lastReserved, dmaAvailable: undefined, coherent: undefined, ...last };
    if (info.ranges) this.lastReserved = reservedFromUsable(info.ranges);
    this.lastAlign = smallestPageSize(info.iovaPageSizes);
    const coherent =
      this.call(() => this.sys.ioctlInt(this.container, REQUEST.VFIO_CHECK_EXTENSION, VFIO.VFIO_DMA_CC_IOMMU), 'VFIO_CHECK_EXTENSION(VFIO_DMA_CC_IOMMU)') === 1;
    return { reserved: this.lastReserved, ...(info.ranges ? { usable: info.ranges } : {}), dmaAvailable: info.dmaAvailable, coherent, align: this.lastAlign };
  }

  /**
   * VFIO_IOMMU_DIRTY_PAGES {START}: from now on the container logs what devices (may) write, until STOP or
   * until its IOMMU goes with its last group. `none` when the container offers no tracking (no MIGRATION
   * capability, or not at 4 KiB) or refuses to start it.
   */
  startDirty(): DirtyTracking {
    if (this.dirtyOn) return { mode: 'type1' };
    const info = this.info();
    if (!info) return { mode: 'none', reason: 'type1: no IOMMU set on the container (no device)' };
    if (!info.migration) return { mode: 'none', reason: 'type1: VFIO_IOMMU_GET_INFO has no MIGRATION capability (no dirty-page tracking)' };
    if ((info.migration.pageSizes & 4096n) === 0n) {
      return { mode: 'none', reason: `type1: dirty pages are tracked at page sizes ${hex(info.migration.pageSizes)}, not 4 KiB` };
    }
    try {
      this.sys.ioctl(this.container, REQUEST.VFIO_IOMMU_DIRTY_PAGES, pack('vfio_iommu_type1_dirty_bitmap', { flags: VFIO.VFIO_IOMMU_DIRTY_PAGES_FLAG_START }));
    } catch (err) {
      return { mode: 'none', reason: `type1: VFIO_IOMMU_DIRTY_PAGES(START): ${isNativeError(err) ? err.code : String(err)}` };
    }
    this.dirtyOn = true;
    return { mode: 'type1' };
  }

  stopDirty(): void {
    if (!this.dirtyOn) return;
    this.dirtyOn = false;
    try {
      this.sys.ioctl(this.container, REQUEST.VFIO_IOMMU_DIRTY_PAGES, pack('vfio_iommu_type1_dirty_bitmap', { flags: VFIO.VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP }));
    } catch {
      // The container's IOMMU went with its last group, and the log with it.
    }
  }

  /** VFIO_IOMMU_DIRTY_PAGES {GET_BITMAP} over [iova, iova + size): one bit per 4 KiB page, cleared in the kernel. */
  readDirty(iova: Iova, size: number): Uint8Array {
    const pages = Math.ceil(size / 4096);
    const bits = new Uint8Array(Math.ceil(pages / 64) * 8);
    const header = LAYOUTS.vfio_iommu_type1_dirty_bitmap.size;
    const arg = pack(
      'vfio_iommu_type1_dirty_bitmap',
      { flags: VFIO.VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP },
      header + LAYOUTS.vfio_iommu_type1_dirty_bitmap_get.size,
    );
    packInto('vfio_iommu_type1_dirty_bitmap_get', arg, header, { iova, size, bitmap_pgsize: 4096, bitmap_size: bits.length });
    this.call(
      () => this.sys.ioctl(this.container, REQUEST.VFIO_IOMMU_DIRTY_PAGES, arg, bits),
      `VFIO_IOMMU_DIRTY_PAGES(GET_BITMAP, ${hex(iova)}, ${hex(size)})`,
    );
    return bits;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.stopDirty();
    for (const bdf of [...this.devs.keys()]) this.detach(bdf);
    this.sys.close(this.container);
  }

  private call<T>(fn: () => T, what: string): T {
    try {
      return fn();
    } catch (err) {
      throw ioctlError(err, what);
    }
  }
}

/**
 * What VFIO_IOMMU_MAP_DMA needs every IOVA, size and vaddr aligned to: the smallest page size of the
 * container's iova_pgsizes (vfio_iommu_type1.c: `(size | iova | vaddr) & (pgsize - 1)` is EINVAL, pgsize
 * being 1 << __ffs(pgsize_bitmap)); the CPU's page size when the kernel did not say.
 */
export function smallestPageSize(pageSizes: bigint | undefined): number {
  if (pageSizes === undefined || pageSizes <= 0n) return PAGE_SIZE;
  const lowest = pageSizes & -pageSizes;
  return lowest > BigInt(GPA_LAST) ? PAGE_SIZE : Math.max(PAGE_SIZE, Number(lowest));
}
