// What the hardware backends need from the system: the addon's VFIO calls (native/vfio.ts) and a few
// sysfs look-ups. One object, so that the type1 and iommufd logic can also be driven by a simulated
// kernel in tests (test/vfio-kernel-sim.test.ts) on machines without an IOMMU.
import fs from 'node:fs';
import { native } from '../../native/index.js';
import { vfio } from '../../native/vfio.js';

export interface VfioSys {
  /** open(2) of a VFIO / iommufd node (the addon refuses other paths). */
  open(path: string): number;
  close(fd: number): void;
  ioctlInt(fd: number, request: number, value: number): number;
  ioctl(fd: number, request: number, arg: Uint8Array, data?: Uint8Array): number;
  /** On a worker thread: MAP_DMA / UNMAP_DMA / IOAS_MAP / IOAS_UNMAP. */
  ioctlAsync(fd: number, request: number, arg: Uint8Array): Promise<number>;
  groupGetDeviceFd(groupFd: number, name: string): number;
  exists(path: string): boolean;
  readlink(path: string): string;
  readdir(path: string): string[];
  /** Whether this process maps (a region of) the file at `path` now: /proc/self/maps names it. */
  mapsFile(path: string): boolean;
  /** A sysfs file's text (reserved_regions of an IOMMU group). */
  readFile(path: string): string;
}

export const realSys: VfioSys = {
  open: (path) => vfio.vfioOpen(path),
  close: (fd) => native.close(fd),
  ioctlInt: (fd, request, value) => vfio.vfioIoctlInt(fd, request, value),
  ioctl: (fd, request, arg, data) => (data ? vfio.vfioIoctl(fd, request, arg, data) : vfio.vfioIoctl(fd, request, arg)),
  ioctlAsync: (fd, request, arg) => vfio.vfioIoctlAsync(fd, request, arg),
  groupGetDeviceFd: (fd, name) => vfio.vfioGroupGetDeviceFd(fd, name),
  exists: (path) => fs.existsSync(path),
  readlink: (path) => fs.readlinkSync(path),
  readdir: (path) => fs.readdirSync(path),
  readFile: (path) => fs.readFileSync(path, 'utf8'),
  mapsFile: (path) =>
    fs
      .readFileSync('/proc/self/maps', 'utf8')
      .split('\n')
      .some((l) => l.endsWith(` ${path}`) || l.endsWith(` ${path} (deleted)`)),
};
