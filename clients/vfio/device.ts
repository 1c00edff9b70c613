// A VFIO device fd (from VFIO_GROUP_GET_DEVICE_FD or /dev/vfio/devices/vfioN) and what a driver needs
// to program the device: its info and its regions (BARs, config space), whose offsets in the fd are used
// with pread / pwrite / mmap (native.mmap(fd, region.offset, ...)).
import { isNativeError } from '../../native/index.js';
import { IommuError, type MmbError } from '../../protocol/index.js';
import type { DeviceInfo, DeviceMigration, VfioDevice } from './iommu-backend.js';
import { LAYOUTS, REQUEST, VFIO, get, pack, packInto, parseRegionInfo, unpack, type RegionInfo } from './structs.js';
import type { VfioSys } from './sys.js';

/** Largest INFO buffer we grow to when the kernel asks for more (capability chains are small). */
export const MAX_INFO_BYTES = 64 * 1024;

export function ioctlError(err: unknown, what: string): MmbError {
  return new IommuError(`${what}: ${err instanceof Error ? err.message : String(err)}`, { cause: err, ...(isNativeError(err) ? { errno: err.code } : {}) });
}

export class HwDevice implements VfioDevice {
  constructor(
    readonly name: string,
    readonly fd: number,
    private readonly sys: VfioSys,
  ) {}

  info(): DeviceInfo {
    const buf = pack('vfio_device_info', {});
    try {
      this.sys.ioctl(this.fd, REQUEST.VFIO_DEVICE_GET_INFO, buf);
    } catch (err) {
      throw ioctlError(err, `VFIO_DEVICE_GET_INFO on ${this.name}`);
    }
    const flags = get('vfio_device_info', buf, 'flags');
    return {
      flags,
      numRegions: get('vfio_device_info', buf, 'num_regions'),
      numIrqs: get('vfio_device_info', buf, 'num_irqs'),
      pci: (flags & VFIO.VFIO_DEVICE_FLAGS_PCI) !== 0,
      resettable: (flags & VFIO.VFIO_DEVICE_FLAGS_RESET) !== 0,
    };
  }

  /** VFIO_DEVICE_GET_REGION_INFO, growing argsz when the kernel asks for room for capabilities. */
  regionInfo(index: number): RegionInfo {
    let size: number = LAYOUTS.vfio_region_info.size;
    for (;;) {
      const buf = pack('vfio_region_info', { index }, size);
      try {
        this.sys.ioctl(this.fd, REQUEST.VFIO_DEVICE_GET_REGION_INFO, buf);
      } catch (err) {
        throw ioctlError(err, `VFIO_DEVICE_GET_REGION_INFO(${index}) on ${this.name}`);
      }
      const info = parseRegionInfo(buf);
      if (info.argsz <= size || info.argsz > MAX_INFO_BYTES) {
        const { argsz: _argsz, ...rest } = info;
        return rest;
      }
      size = info.argsz;
    }
  }

  /**
   * VFIO_DEVICE_FEATURE(GET | MIGRATION): whether the device's driver implements VFIO migration v2 (it can
   * stop the device, STOP_COPY its state out and RESUME it elsewhere). vfio-pci without a variant driver
   * has no migration ops and answers ENOTTY (seen with QEMU's edu in the VM test).
   */
  migration(): DeviceMigration {
    const header = LAYOUTS.vfio_device_feature.size;
    const buf = pack(
      'vfio_device_feature',
      { flags: VFIO.VFIO_DEVICE_FEATURE_MIGRATION | VFIO.VFIO_DEVICE_FEATURE_GET },
      header + LAYOUTS.vfio_device_feature_migration.size,
    );
    packInto('vfio_device_feature_migration', buf, header, { flags: 0 });
    try {
      this.sys.ioctl(this.fd, REQUEST.VFIO_DEVICE_FEATURE, buf);
    } catch (err) {
      const errno = isNativeError(err) ? err.code : String(err);
      return {
        supported: false,
        stopCopy: false,
        p2p: false,
        reason: `VFIO_DEVICE_FEATURE(GET, MIGRATION) on ${this.name}: ${errno}${errno === 'ENOTTY' ? ' (its driver has no VFIO migration support)' : ''}`,
      };
    }
    const flags = Number(unpack('vfio_device_feature_migration', buf, header).flags);
    return { supported: true, stopCopy: (flags & VFIO.VFIO_MIGRATION_STOP_COPY) !== 0, p2p: (flags & VFIO.VFIO_MIGRATION_P2P) !== 0, flags };
  }

  close(): void {
    this.sys.close(this.fd);
  }
}
