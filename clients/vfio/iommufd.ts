// iommufd: one IO address space (IOAS) in /dev/iommu for all devices, each device opened through its
// VFIO cdev (/dev/vfio/devices/vfioN) and attached to the IOAS.
//
// The sequence (Linux 6.6+ with CONFIG_IOMMUFD and CONFIG_VFIO_DEVICE_CDEV; tried in a QEMU guest with a
// custom 6.12 kernel, see shared/reference/vfio-in-qemu.md):
//   open /dev/iommu
//   per device: find /sys/bus/pci/devices/$BDF/vfio-dev/vfioN; open /dev/vfio/devices/vfioN;
//     VFIO_DEVICE_BIND_IOMMUFD {iommufd} -> devid;
//     the first device: IOMMU_IOAS_ALLOC -> ioas_id;
//     VFIO_DEVICE_ATTACH_IOMMUFD_PT {pt_id = ioas_id} -> the (auto-created) hw pagetable id
//   IOMMU_IOAS_IOVA_RANGES with num_iovas = 0 -> EMSGSIZE and the count; again with room for that many
//   IOMMU_IOAS_MAP {FIXED_IOVA | READABLE | WRITEABLE, ioas_id, user_va, length, iova} / IOMMU_IOAS_UNMAP
// The IOAS would outlive its devices in the kernel; to keep one lifecycle for every backend the domain is
// destroyed (IOMMU_DESTROY) with its last device, and the next first device gets a fresh IOAS that the
// caller (Domain) maps everything into again.
//
// Cache coherency: iommufd enforces it by itself when every attached device's IOMMU can (the kernel's
// enforce_cache_coherency on the hw pagetable) and offers no query for it, so `coherent` stays unknown.
import { isNativeError } from '../../native/index.js';
import { IommuError, InvalidArgError, NoDeviceError, UnsupportedError, type IovaRange } from '../../protocol/index.js';
import { checkBdf, mapError, reservedFromUsable, unmapError, type Detached, type DomainLimits, type IommuBackend, type Piece, type VfioDevice } from './backend.js';
import { HwDevice, ioctlError } from './device.js';
import { IOMMUFD, LAYOUTS, REQUEST, get, pack, parseIommuRanges, type RawIovaRange } from './structs.js';
import { realSys, type VfioSys } from './sys.js';

export const IOMMUFD_NODE = '/dev/iommu';
const MAX_RANGES = 4096;

export class IommufdBackend implements IommuBackend {
  readonly name = 'iommufd' as const;
  readonly software = false;
  readonly description = 'iommufd: one IOAS in /dev/iommu, devices through VFIO cdevs (IOMMU_IOAS_MAP)';
  private ioas: number | undefined;
  private readonly devs = new Map<string, { dev: HwDevice; node: string; devid: number; hwpt: number }>();
  private lastReserved: IovaRange[] | undefined;
  private closed = false;
  /** How many IOVA ranges the kernel reported last time (room for them saves the EMSGSIZE round). */
  private rangeRoom = 0;

  private constructor(
    private readonly sys: VfioSys,
    readonly iommufd: number,
  ) {}

  /** Opens /dev/iommu; MMB_ERR_UNSUPPORTED naming it when it is missing. */
  static open(sys: VfioSys = realSys): IommufdBackend {
    const missing = `backend iommufd needs ${IOMMUFD_NODE}, which this machine does not have (the kernel lacks CONFIG_IOMMUFD, which no Debian kernel sets; or use backend "soft")`;
    if (!sys.exists(IOMMUFD_NODE)) throw new UnsupportedError(missing);
    try {
      return new IommufdBackend(sys, sys.open(IOMMUFD_NODE));
    } catch (err) {
      if (isNativeError(err, 'ENOENT')) throw new UnsupportedError(missing, { cause: err });
      throw ioctlError(err, `cannot open ${IOMMUFD_NODE}`);
    }
  }

  get active(): boolean {
    return this.ioas !== undefined;
  }

  get devices(): string[] {
    return [...this.devs.keys()];
  }

  /** The IOAS id (while a device is attached). */
  get ioasId(): number | undefined {
    return this.ioas;
  }

  attach(bdf: string): { created: boolean } {
    checkBdf(bdf);
    if (this.closed) throw new InvalidArgError('the iommufd backend is closed');
    if (this.devs.has(bdf)) throw new InvalidArgError(`${bdf} is already attached`);
    const sysfs = `/sys/bus/pci/devices/${bdf}`;
    if (!this.sys.exists(sysfs)) throw new NoDeviceError(`no PCI device ${bdf} (${sysfs} does not exist)`);
    const dir = `${sysfs}/vfio-dev`;
    const cdev = this.sys.exists(dir) ? this.sys.readdir(dir).find((n) => /^vfio\d+$/.test(n)) : undefined;
    if (!cdev) throw new NoDeviceError(`${bdf} has no VFIO device cdev in ${dir}: it is not bound to vfio-pci, or the kernel lacks CONFIG_VFIO_DEVICE_CDEV`);
    const node = `/dev/vfio/devices/${cdev}`;
    if (!this.sys.exists(node)) throw new UnsupportedError(`${node} does not exist (no /dev/vfio/devices: the kernel lacks CONFIG_VFIO_DEVICE_CDEV)`);
    let fd: number;
    try {
      fd = this.sys.open(node);
    } catch (err) {
      throw new NoDeviceError(`cannot open ${node} for ${bdf}: ${(err as Error).message}`, { cause: err, ...(isNativeError(err) ? { errno: err.code } : {}) });
    }
    let created = false;
    try {
      const bind = pack('vfio_device_bind_iommufd', { flags: 0, iommufd: this.iommufd });
      this.call(() => this.sys.ioctl(fd, REQUEST.VFIO_DEVICE_BIND_IOMMUFD, bind), `VFIO_DEVICE_BIND_IOMMUFD(${bdf})`);
      const devid = get('vfio_device_bind_iommufd', bind, 'out_devid');
      if (this.ioas === undefined) {
        const alloc = pack('iommu_ioas_alloc', { flags: 0 });
        this.call(() => this.sys.ioctl(this.iommufd, REQUEST.IOMMU_IOAS_ALLOC, alloc), 'IOMMU_IOAS_ALLOC');
        this.ioas = get('iommu_ioas_alloc', alloc, 'out_ioas_id');
        created = true;
      }
      const attach = pack('vfio_device_attach_iommufd_pt', { flags: 0, pt_id: this.ioas });
      this.call(() => this.sys.ioctl(fd, REQUEST.VFIO_DEVICE_ATTACH_IOMMUFD_PT, attach), `VFIO_DEVICE_ATTACH_IOMMUFD_PT(${bdf}, IOAS ${this.ioas})`);
      this.devs.set(bdf, { dev: new HwDevice(bdf, fd, this.sys), node, devid, hwpt: get('vfio_device_attach_iommufd_pt', attach, 'pt_id') });
      return { created };
    } catch (err) {
      this.sys.close(fd); // unbinds (and detaches) the device
      if (created) this.destroyIoas();
      throw err;
    }
  }

  detach(bdf: string): Detached {
    const d = this.devs.get(bdf);
    if (!d) throw new NoDeviceError(`${bdf} is not attached`);
    this.devs.delete(bdf);
    try {
      this.sys.ioctl(d.dev.fd, REQUEST.VFIO_DEVICE_DETACH_IOMMUFD_PT, pack('vfio_device_detach_iommufd_pt', { flags: 0 }));
    } catch {
      // Closing the device fd detaches and unbinds it anyway.
    }
    d.dev.close();
    // The cdev stays open in the kernel, bound to this iommufd, while this process maps one of its regions
    // (a BAR): binding it again then fails with EINVAL (seen in the VM test). /proc/self/maps names the cdev.
    const stillOpen = this.sys.mapsFile(d.node)
      ? new IommuError(
          `${bdf} is detached here, but the kernel still holds it open and bound to this iommufd: this process still maps one of its regions (${d.node}, a BAR mmap); unmap them (before detaching, next time)`,
          { errno: 'EBUSY' },
        )
      : undefined;
    if (this.devs.size > 0) return { destroyed: false, ...(stillOpen ? { stillOpen } : {}) };
    this.destroyIoas();
    return { destroyed: true, ...(stillOpen ? { stillOpen } : {}) };
  }

  private destroyIoas(): void {
    if (this.ioas === undefined) return;
    try {
      this.sys.ioctl(this.iommufd, REQUEST.IOMMU_DESTROY, pack('iommu_destroy', { id: this.ioas }));
    } catch {
      // Closing /dev/iommu frees it anyway.
    }
    this.ioas = undefined;
  }

  device(name: string): VfioDevice | undefined {
    return this.devs.get(name)?.dev;
  }

  /** Devices' ids and hw pagetables in the iommufd (for HWPT dirty tracking later). */
  binding(name: string): { devid: number; hwpt: number } | undefined {
    const d = this.devs.get(name);
    return d ? { devid: d.devid, hwpt: d.hwpt } : undefined;
  }

  /** iommufd has no per-mapping limit like type1's dma_entry_limit. */
  entriesFor(): number {
    return 0;
  }

  claim(): void {}
  release(): void {}

  async map(piece: Piece): Promise<void> {
    const ioas = this.requireIoas();
    const arg = pack('iommu_ioas_map', {
      flags: IOMMUFD.IOMMU_IOAS_MAP_FIXED_IOVA | IOMMUFD.IOMMU_IOAS_MAP_READABLE | (piece.readonly ? 0 : IOMMUFD.IOMMU_IOAS_MAP_WRITEABLE),
      ioas_id: ioas,
      user_va: piece.vaddr,
      length: piece.size,
      iova: piece.iova,
    });
    try {
      await this.sys.ioctlAsync(this.iommufd, REQUEST.IOMMU_IOAS_MAP, arg);
    } catch (err) {
      throw mapError(err, 'iommufd', piece);
    }
  }

  async unmap(piece: Piece): Promise<void> {
    const arg = pack('iommu_ioas_unmap', { ioas_id: this.requireIoas(), iova: piece.iova, length: piece.size });
    try {
      await this.sys.ioctlAsync(this.iommufd, REQUEST.IOMMU_IOAS_UNMAP, arg);
    } catch (err) {
      throw unmapError(err, 'iommufd', piece);
    }
    const done = get('iommu_ioas_unmap', arg, 'length');
    if (done !== piece.size) throw unmapError(new Error(`the kernel unmapped ${done} bytes, not ${piece.size}`), 'iommufd', piece);
  }

  /**
   * IOMMU_IOAS_IOVA_RANGES: with room for as many ranges as last time (none, the first time), which fails
   * with EMSGSIZE and says how many there are when that is too few; then with room for that many (again if
   * the count grew meanwhile). limits() runs before every change and report, so remembering the count
   * halves the calls (seen against the real kernel: 134 calls, half of them EMSGSIZE, in the VM test).
   */
  ranges(): { ranges: RawIovaRange[]; alignment: number } {
    const ioas = this.requireIoas();
    let room = this.rangeRoom;
    for (;;) {
      const arg = pack('iommu_ioas_iova_ranges', { ioas_id: ioas, num_iovas: room });
      const data = new Uint8Array(room * LAYOUTS.iommu_iova_range.size);
      try {
        this.sys.ioctl(this.iommufd, REQUEST.IOMMU_IOAS_IOVA_RANGES, arg, room > 0 ? data : undefined);
      } catch (err) {
        const wanted = get('iommu_ioas_iova_ranges', arg, 'num_iovas');
        if (isNativeError(err, 'EMSGSIZE') && wanted > room && wanted <= MAX_RANGES) {
          room = wanted;
          continue;
        }
        throw ioctlError(err, 'IOMMU_IOAS_IOVA_RANGES');
      }
      const n = get('iommu_ioas_iova_ranges', arg, 'num_iovas');
      this.rangeRoom = Math.min(n, MAX_RANGES);
      return { ranges: parseIommuRanges(data, Math.min(n, room)), alignment: get('iommu_ioas_iova_ranges', arg, 'out_iova_alignment') };
    }
  }

  limits(): DomainLimits {
    if (this.ioas === undefined) return { reserved: this.lastReserved, dmaAvailable: undefined, coherent: undefined };
    const { ranges } = this.ranges();
    this.lastReserved = reservedFromUsable(ranges);
    return { reserved: this.lastReserved, usable: ranges, dmaAvailable: undefined, coherent: undefined };
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    for (const bdf of [...this.devs.keys()]) this.detach(bdf);
    this.sys.close(this.iommufd);
  }

  private requireIoas(): number {
    if (this.ioas === undefined) throw new IommuError('iommufd: no IOAS (no device attached)');
    return this.ioas;
  }

  private call<T>(fn: () => T, what: string): T {
    try {
      return fn();
    } catch (err) {
      throw ioctlError(err, what);
    }
  }
}
