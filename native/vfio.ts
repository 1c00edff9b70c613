// The typed face of native/src/vfio.c: the VFIO type1 and iommufd ioctls of the vfio-like client.
//
// C issues ioctls and nothing else; clients/vfio/structs.ts packs every structure, per the kernel uAPI
// headers. C refuses (see vfio.c):
//   - a request number that is not in its whitelist (EPERM), or one used through the wrong entry point
//     (EINVAL);
//   - a descriptor that is not of the kind the request is for: container /dev/vfio/vfio, group
//     /dev/vfio/N, device (VFIO_GROUP_GET_DEVICE_FD's anon inode, or /dev/vfio/devices/vfioN), iommufd
//     /dev/iommu (ENOTTY);
//   - a struct whose leading size word (argsz / size) is below the kernel's minimum for the request, above
//     the buffer's length, or above the largest size C knows where later kernels append pointers; or
//     whose flags would make the kernel follow an unchecked pointer, or are outside the request's allowed
//     set (VFIO_DEVICE_FEATURE: GET / PROBE of MIGRATION only) (EINVAL);
//   - for the requests with a pointer the kernel follows, a `data` buffer too small for it (ERANGE):
//     IOMMU_IOAS_IOVA_RANGES (num_iovas entries), IOMMU_GET_HW_INFO (data_len bytes, written),
//     IOMMU_HWPT_ALLOC (data_len bytes the kernel reads, in a struct of 40 bytes or more; used to ask
//     whether the IOMMU offers nesting, docs/ioas.md),
//     VFIO_IOMMU_DIRTY_PAGES with GET_BITMAP (bitmap.size bytes), IOMMU_HWPT_GET_DIRTY_BITMAP (a bit per
//     page_size of length, in 64-bit words; page_size a power of two, else EINVAL). C points the field at
//     `data` for the call and zeroes it again afterwards.
// The lookup is by request number and descriptor kind: VFIO_BASE + 17 is VFIO_IOMMU_DIRTY_PAGES on a
// container and VFIO_DEVICE_FEATURE on a device.
// Failures, refusals included, are the addon's one ioctl error shape (IoctlError in ./index.ts): `code`
// (errno name), `errno` (negative), `syscall` 'ioctl' and `request` = the request's name
// ('VFIO_IOMMU_MAP_DMA'), so a message says which ioctl failed. vfioOpen's errors have syscall 'open'.
import { native } from './index.js';

/** Request numbers C accepts, by their kernel names (as compiled against the system's headers). */
export interface VfioRequests {
  readonly VFIO_GET_API_VERSION: number;
  readonly VFIO_CHECK_EXTENSION: number;
  readonly VFIO_SET_IOMMU: number;
  readonly VFIO_IOMMU_GET_INFO: number;
  readonly VFIO_IOMMU_MAP_DMA: number;
  readonly VFIO_IOMMU_UNMAP_DMA: number;
  readonly VFIO_IOMMU_DIRTY_PAGES: number;
  readonly VFIO_DEVICE_FEATURE: number;
  readonly VFIO_GROUP_GET_STATUS: number;
  readonly VFIO_GROUP_SET_CONTAINER: number;
  readonly VFIO_GROUP_UNSET_CONTAINER: number;
  /** Only through vfioGroupGetDeviceFd(). */
  readonly VFIO_GROUP_GET_DEVICE_FD: number;
  readonly VFIO_DEVICE_GET_INFO: number;
  readonly VFIO_DEVICE_GET_REGION_INFO: number;
  readonly VFIO_DEVICE_RESET: number;
  readonly VFIO_DEVICE_BIND_IOMMUFD: number;
  readonly VFIO_DEVICE_ATTACH_IOMMUFD_PT: number;
  readonly VFIO_DEVICE_DETACH_IOMMUFD_PT: number;
  readonly IOMMU_DESTROY: number;
  readonly IOMMU_IOAS_ALLOC: number;
  readonly IOMMU_IOAS_IOVA_RANGES: number;
  readonly IOMMU_IOAS_MAP: number;
  readonly IOMMU_IOAS_UNMAP: number;
  readonly IOMMU_HWPT_ALLOC: number;
  readonly IOMMU_GET_HW_INFO: number;
  readonly IOMMU_HWPT_SET_DIRTY_TRACKING: number;
  readonly IOMMU_HWPT_GET_DIRTY_BITMAP: number;
}

export interface VfioNative {
  readonly vfioRequests: VfioRequests;
  /**
   * open(2) O_RDWR | O_CLOEXEC of a VFIO or iommufd node: /dev/vfio/vfio, /dev/vfio/<group>,
   * /dev/vfio/devices/vfioN, /dev/iommu. Any other path throws EPERM. ENOENT when the node is missing.
   */
  vfioOpen(path: string): number;
  /**
   * An ioctl whose argument is an int (VFIO_GET_API_VERSION, VFIO_CHECK_EXTENSION, VFIO_SET_IOMMU,
   * VFIO_GROUP_UNSET_CONTAINER, VFIO_DEVICE_RESET; pass 0 when the kernel ignores it) or a pointer to an
   * __s32 (VFIO_GROUP_SET_CONTAINER: the container fd). Returns the ioctl's return value.
   */
  vfioIoctlInt(fd: number, request: number, value: number): number;
  /**
   * An ioctl on a packed struct (argsz / size first); the kernel's results are written back into `arg`.
   * `data` only for the requests with a pointer (IOMMU_IOAS_IOVA_RANGES' allowed_iovas, the data_uptr of
   * IOMMU_GET_HW_INFO and IOMMU_HWPT_ALLOC, the dirty bitmaps of VFIO_IOMMU_DIRTY_PAGES / GET_BITMAP and
   * IOMMU_HWPT_GET_DIRTY_BITMAP); it may be left out when the kernel would follow nothing (num_iovas or
   * data_len 0).
   * Returns the ioctl's return value. Runs on the main thread: for quick ioctls only.
   */
  vfioIoctl(fd: number, request: number, arg: Uint8Array, data?: Uint8Array): number;
  /**
   * vfioIoctl on a libuv worker thread, for the calls that pin and can take seconds: VFIO_IOMMU_MAP_DMA,
   * VFIO_IOMMU_UNMAP_DMA, IOMMU_IOAS_MAP, IOMMU_IOAS_UNMAP (EINVAL for any other). C works on a copy of
   * `arg` and writes the results back into it before the promise resolves. Every failure rejects.
   */
  vfioIoctlAsync(fd: number, request: number, arg: Uint8Array): Promise<number>;
  /** VFIO_GROUP_GET_DEVICE_FD with the device's name ("0000:00:01.0"); returns the device fd (O_CLOEXEC). */
  vfioGroupGetDeviceFd(groupFd: number, name: string): number;
}

export const vfio = native as unknown as VfioNative;
