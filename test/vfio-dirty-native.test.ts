// native/src/vfio.c, the requests of dirty tracking and device migration: what C refuses before the
// kernel is asked. This machine has no /dev/vfio and no /dev/iommu: a call that passes every check ends in
// ENOTTY (the memfd is not a VFIO descriptor), one that fails a check ends in EINVAL / ERANGE first.
// The kernel's side of these requests is exercised in the VM test (test/vm.test.ts) and, as sequences,
// against the simulated kernel (test/vfio-kernel-sim.test.ts).
import { afterAll, describe, expect, it } from 'vitest';
import { createSealedMemfd } from '../clients/memfd.js';
import { IOMMUFD, LAYOUTS, REQUEST, VFIO, pack, packInto } from '../clients/vfio/structs.js';
import { native } from '../native/index.js';
import { vfio } from '../native/vfio.js';
import { thrown } from './helpers/throws.js';

const memfd = createSealedMemfd('mmb-vfio-dirty-native', 4096);
afterAll(() => native.close(memfd));

const HEADER = LAYOUTS.vfio_iommu_type1_dirty_bitmap.size;

/** VFIO_IOMMU_DIRTY_PAGES {GET_BITMAP, iova, size, bitmap {4096, bytes}}. */
function getBitmap(size: number, bytes: number): Uint8Array {
  const arg = pack(
    'vfio_iommu_type1_dirty_bitmap',
    { flags: VFIO.VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP },
    HEADER + LAYOUTS.vfio_iommu_type1_dirty_bitmap_get.size,
  );
  packInto('vfio_iommu_type1_dirty_bitmap_get', arg, HEADER, { iova: 0x1_0000_0000, size, bitmap_pgsize: 4096, bitmap_size: bytes });
  return arg;
}

describe('VFIO_IOMMU_DIRTY_PAGES (container) and VFIO_DEVICE_FEATURE (device) share a number', () => {
  it('both names are the same request number, told apart by the descriptor', () => {
    expect(REQUEST.VFIO_IOMMU_DIRTY_PAGES).toBe(REQUEST.VFIO_DEVICE_FEATURE);
    expect(vfio.vfioRequests.VFIO_IOMMU_DIRTY_PAGES).toBe(vfio.vfioRequests.VFIO_DEVICE_FEATURE);
    // On neither kind of descriptor: the checks run, then ENOTTY.
    const start = pack('vfio_iommu_type1_dirty_bitmap', { flags: VFIO.VFIO_IOMMU_DIRTY_PAGES_FLAG_START });
    expect(thrown(() => vfio.vfioIoctl(memfd, REQUEST.VFIO_IOMMU_DIRTY_PAGES, start))).toMatchObject({ code: 'ENOTTY' });
  });

  it('DIRTY_PAGES: flags outside START / STOP / GET_BITMAP are refused; GET_BITMAP needs its struct and a bitmap as large as it says', () => {
    expect(thrown(() => vfio.vfioIoctl(memfd, REQUEST.VFIO_IOMMU_DIRTY_PAGES, pack('vfio_iommu_type1_dirty_bitmap', { flags: 1 << 3 })))).toMatchObject({
      code: 'EINVAL',
    });
    // GET_BITMAP with only the 8-byte header: C cannot find the bitmap pointer, so it refuses.
    const short = pack('vfio_iommu_type1_dirty_bitmap', { flags: VFIO.VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP });
    expect(thrown(() => vfio.vfioIoctl(memfd, REQUEST.VFIO_IOMMU_DIRTY_PAGES, short, new Uint8Array(8)))).toMatchObject({ code: 'EINVAL' });
    // 8 MiB = 2048 pages = 256 bytes of bitmap: a smaller buffer than bitmap.size, or none, is ERANGE.
    expect(thrown(() => vfio.vfioIoctl(memfd, REQUEST.VFIO_IOMMU_DIRTY_PAGES, getBitmap(8 << 20, 256), new Uint8Array(255)))).toMatchObject({ code: 'ERANGE' });
    expect(thrown(() => vfio.vfioIoctl(memfd, REQUEST.VFIO_IOMMU_DIRTY_PAGES, getBitmap(8 << 20, 256)))).toMatchObject({ code: 'ERANGE' });
    // A size word beyond the header + dirty_bitmap_get (48 bytes) is refused.
    const long = getBitmap(8 << 20, 256);
    const bigger = new Uint8Array(64);
    bigger.set(long);
    new DataView(bigger.buffer).setUint32(0, 64, true);
    expect(thrown(() => vfio.vfioIoctl(memfd, REQUEST.VFIO_IOMMU_DIRTY_PAGES, bigger, new Uint8Array(256)))).toMatchObject({ code: 'EINVAL' });
    // A buffer for START (no pointer used) is a misuse.
    const start = pack('vfio_iommu_type1_dirty_bitmap', { flags: VFIO.VFIO_IOMMU_DIRTY_PAGES_FLAG_START });
    expect(thrown(() => vfio.vfioIoctl(memfd, REQUEST.VFIO_IOMMU_DIRTY_PAGES, start, new Uint8Array(8)))).toMatchObject({ code: 'EINVAL' });
    // Everything right: the descriptor check is what stops it here.
    expect(thrown(() => vfio.vfioIoctl(memfd, REQUEST.VFIO_IOMMU_DIRTY_PAGES, getBitmap(8 << 20, 256), new Uint8Array(256)))).toMatchObject({
      code: 'ENOTTY',
      syscall: 'ioctl',
      request: 'VFIO_IOMMU_DIRTY_PAGES',
    });
  });

  it('DEVICE_FEATURE: only GET or PROBE of MIGRATION (a SET would change the device state)', () => {
    const feature = (flags: number) => {
      const b = pack('vfio_device_feature', { flags }, LAYOUTS.vfio_device_feature.size + LAYOUTS.vfio_device_feature_migration.size);
      return b;
    };
    const MIG = VFIO.VFIO_DEVICE_FEATURE_MIGRATION;
    expect(thrown(() => vfio.vfioIoctl(memfd, REQUEST.VFIO_DEVICE_FEATURE, feature(MIG | VFIO.VFIO_DEVICE_FEATURE_SET)))).toMatchObject({ code: 'EINVAL' });
    expect(thrown(() => vfio.vfioIoctl(memfd, REQUEST.VFIO_DEVICE_FEATURE, feature(2 /* MIG_DEVICE_STATE */ | VFIO.VFIO_DEVICE_FEATURE_GET)))).toMatchObject({
      code: 'EINVAL',
    });
    expect(thrown(() => vfio.vfioIoctl(memfd, REQUEST.VFIO_DEVICE_FEATURE, feature(MIG | VFIO.VFIO_DEVICE_FEATURE_GET)))).toMatchObject({ code: 'ENOTTY' });
    expect(
      thrown(() => vfio.vfioIoctl(memfd, REQUEST.VFIO_DEVICE_FEATURE, feature(MIG | VFIO.VFIO_DEVICE_FEATURE_PROBE | VFIO.VFIO_DEVICE_FEATURE_GET))),
    ).toMatchObject({ code: 'ENOTTY' });
  });
});

describe('iommufd dirty tracking', () => {
  it('IOMMU_HWPT_ALLOC: DIRTY_TRACKING or NEST_PARENT, data_len bytes behind data_uptr, nothing beyond 40 bytes (fault_id)', () => {
    const ok = pack('iommu_hwpt_alloc', { flags: IOMMUFD.IOMMU_HWPT_ALLOC_DIRTY_TRACKING, dev_id: 1, pt_id: 2 });
    expect(thrown(() => vfio.vfioIoctl(memfd, REQUEST.IOMMU_HWPT_ALLOC, ok))).toMatchObject({ code: 'ENOTTY', syscall: 'ioctl', request: 'IOMMU_HWPT_ALLOC' });
    expect(thrown(() => vfio.vfioIoctl(memfd, REQUEST.IOMMU_HWPT_ALLOC, pack('iommu_hwpt_alloc', { flags: 1 << 2 /* FAULT_ID_VALID */ })))).toMatchObject({
      code: 'EINVAL',
    });
    expect(thrown(() => vfio.vfioIoctl(memfd, REQUEST.IOMMU_HWPT_ALLOC, pack('iommu_hwpt_alloc', {}, 48)))).toMatchObject({ code: 'EINVAL' });
    // The kernel reads data_len bytes through data_uptr: a smaller buffer is ERANGE; the 6.6 size has no pointer.
    expect(thrown(() => vfio.vfioIoctl(memfd, REQUEST.IOMMU_HWPT_ALLOC, pack('iommu_hwpt_alloc', { data_len: 16 }), new Uint8Array(8)))).toMatchObject({
      code: 'ERANGE',
    });
    const short = pack('iommu_hwpt_alloc', { data_len: 16 }).slice(0, 24); // the 6.6 struct, up to __reserved
    new DataView(short.buffer).setUint32(0, 24, true);
    expect(thrown(() => vfio.vfioIoctl(memfd, REQUEST.IOMMU_HWPT_ALLOC, short, new Uint8Array(8)))).toMatchObject({ code: 'EINVAL' });
    expect(thrown(() => vfio.vfioIoctl(memfd, REQUEST.IOMMU_HWPT_ALLOC, short))).toMatchObject({ code: 'ENOTTY' });
  });

  it('IOMMU_GET_HW_INFO: flags zero, data_len bytes of buffer behind data_uptr', () => {
    expect(thrown(() => vfio.vfioIoctl(memfd, REQUEST.IOMMU_GET_HW_INFO, pack('iommu_hw_info', { flags: 1 })))).toMatchObject({ code: 'EINVAL' });
    expect(thrown(() => vfio.vfioIoctl(memfd, REQUEST.IOMMU_GET_HW_INFO, pack('iommu_hw_info', { data_len: 16 }), new Uint8Array(8)))).toMatchObject({
      code: 'ERANGE',
    });
    expect(thrown(() => vfio.vfioIoctl(memfd, REQUEST.IOMMU_GET_HW_INFO, pack('iommu_hw_info', { data_len: 0 })))).toMatchObject({ code: 'ENOTTY' });
  });

  it('IOMMU_HWPT_SET_DIRTY_TRACKING: ENABLE is the only flag', () => {
    expect(thrown(() => vfio.vfioIoctl(memfd, REQUEST.IOMMU_HWPT_SET_DIRTY_TRACKING, pack('iommu_hwpt_set_dirty_tracking', { flags: 2 })))).toMatchObject({
      code: 'EINVAL',
    });
    expect(
      thrown(() => vfio.vfioIoctl(memfd, REQUEST.IOMMU_HWPT_SET_DIRTY_TRACKING, pack('iommu_hwpt_set_dirty_tracking', { flags: 1, hwpt_id: 3 }))),
    ).toMatchObject({ code: 'ENOTTY' });
  });

  it('IOMMU_HWPT_GET_DIRTY_BITMAP: a power-of-two page size, a bitmap of a bit per page in whole 64-bit words', () => {
    const arg = (length: number, pageSize: number) => pack('iommu_hwpt_get_dirty_bitmap', { hwpt_id: 3, iova: 0x1_0000_0000, length, page_size: pageSize });
    expect(thrown(() => vfio.vfioIoctl(memfd, REQUEST.IOMMU_HWPT_GET_DIRTY_BITMAP, arg(8 << 20, 3000), new Uint8Array(4096)))).toMatchObject({
      code: 'EINVAL',
    });
    expect(thrown(() => vfio.vfioIoctl(memfd, REQUEST.IOMMU_HWPT_GET_DIRTY_BITMAP, arg(0, 4096), new Uint8Array(4096)))).toMatchObject({ code: 'EINVAL' });
    // 8 MiB of 4 KiB pages: 2048 bits, 256 bytes; 65 pages need two words (16 bytes).
    expect(thrown(() => vfio.vfioIoctl(memfd, REQUEST.IOMMU_HWPT_GET_DIRTY_BITMAP, arg(8 << 20, 4096), new Uint8Array(255)))).toMatchObject({ code: 'ERANGE' });
    expect(thrown(() => vfio.vfioIoctl(memfd, REQUEST.IOMMU_HWPT_GET_DIRTY_BITMAP, arg(65 * 4096, 4096), new Uint8Array(15)))).toMatchObject({
      code: 'ERANGE',
    });
    expect(thrown(() => vfio.vfioIoctl(memfd, REQUEST.IOMMU_HWPT_GET_DIRTY_BITMAP, arg(65 * 4096, 4096), new Uint8Array(16)))).toMatchObject({
      code: 'ENOTTY',
    });
    expect(
      thrown(() =>
        vfio.vfioIoctl(
          memfd,
          REQUEST.IOMMU_HWPT_GET_DIRTY_BITMAP,
          pack('iommu_hwpt_get_dirty_bitmap', { flags: 2, length: 4096, page_size: 4096 }),
          new Uint8Array(8),
        ),
      ),
    ).toMatchObject({ code: 'EINVAL' });
    // None of these may run on a worker thread (they are quick, and carry pointers into JS memory).
    return expect(vfio.vfioIoctlAsync(memfd, REQUEST.IOMMU_HWPT_GET_DIRTY_BITMAP, arg(4096, 4096))).rejects.toMatchObject({ code: 'EINVAL' });
  });
});
