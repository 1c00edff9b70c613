// A VFIO device fd (from VFIO_GROUP_GET_DEVICE_FD or /dev/vfio/devices/vfioN) and what a driver needs
// to program the device: its info and its regions (BARs, config space), whose offsets in the fd are used
// with pread / pwrite / mmap (native.mmap(fd, region.offset, ...)).
import { isNativeError } from '../../native/index.js';
import { IommuError, type MmbError } from '../../protocol/index.js';
import type { DeviceInfo, VfioDevice } from './backend.js';
import { LAYOUTS, REQUEST, VFIO, get, pack, parseRegionInfo, type RegionInfo } from './structs.js';
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

  close(): void {
    this.sys.close(this.fd);
  }
}
