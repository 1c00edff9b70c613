// The VFIO and iommufd uAPI structures, packed and parsed in TypeScript exactly as the kernel lays them
// out (native endianness, natural alignment, argsz / size first, flags next, reserved fields zero).
// native/src/vfio.c only issues the ioctls.
//
// Sources, field by field:
//   - linux/vfio.h as installed here (Debian bookworm's linux-libc-dev 6.1): the container, group,
//     type1 (dirty-page log included) and device structures (device features included). test/vfio-structs.test.ts compiles test/fixtures/vfio-offsets.c against
//     the installed headers and compares every offset, size and constant below with what gcc says.
//   - Linux include/uapi/linux/iommufd.h (Linux 6.2+; not installed on bookworm) for iommu_* (the HWPT
//     and dirty-tracking ones from 6.6 / 6.7, checked against linux-source-6.12's header), and
//     include/uapi/linux/vfio.h (Linux 6.6+) for the VFIO cdev structs vfio_device_bind_iommufd,
//     vfio_device_attach_iommufd_pt and vfio_device_detach_iommufd_pt. Their offsets are hard-coded here
//     from those headers (torvalds/linux master); the probe checks them too on a machine whose headers
//     have them.
//
// Sizes: we pack the size a structure had when it was introduced, whenever later kernels only appended
// members that are ignored unless a flag asks for them (the kernel's `minsz` / offsetofend rule): then one
// packing works on every kernel that has the ioctl. Such structs list their other sizes in `otherSizes`.
import os from 'node:os';
import { hex } from '../../protocol/index.js';

const LE = os.endianness() === 'LE';

export interface Field {
  offset: number;
  size: 1 | 2 | 4 | 8;
}

export interface Layout {
  /** Bytes we pack (see `otherSizes`). Flexible array members are not counted, as in C's sizeof. */
  size: number;
  fields: Readonly<Record<string, Field>>;
  /** Which uAPI header defines it. */
  header: 'linux/vfio.h' | 'linux/iommufd.h';
  /** Sizes the struct has in other kernel versions (members appended later, which we do not use). */
  otherSizes?: readonly number[];
  /** Kernel release that introduced the struct, when it is newer than bookworm's 6.1 headers. */
  since?: string;
}

const f = (offset: number, size: Field['size']): Field => ({ offset, size });

/** Every structure this client packs or parses, by its kernel name. */
export const LAYOUTS = {
  // --- linux/vfio.h: common -----------------------------------------------------------------------
  vfio_info_cap_header: { header: 'linux/vfio.h', size: 8, fields: { id: f(0, 2), version: f(2, 2), next: f(4, 4) } },
  // --- container / type1 --------------------------------------------------------------------------
  vfio_iommu_type1_info: {
    header: 'linux/vfio.h',
    size: 24,
    fields: { argsz: f(0, 4), flags: f(4, 4), iova_pgsizes: f(8, 8), cap_offset: f(16, 4) },
  },
  vfio_iova_range: { header: 'linux/vfio.h', size: 16, fields: { start: f(0, 8), end: f(8, 8) } },
  vfio_iommu_type1_info_cap_iova_range: {
    header: 'linux/vfio.h',
    size: 16,
    fields: { header: f(0, 8), nr_iovas: f(8, 4), reserved: f(12, 4) /* iova_ranges[] at 16 */ },
  },
  vfio_iommu_type1_info_cap_migration: {
    header: 'linux/vfio.h',
    size: 32,
    fields: { header: f(0, 8), flags: f(8, 4), pgsize_bitmap: f(16, 8), max_dirty_bitmap_size: f(24, 8) },
  },
  vfio_iommu_type1_info_dma_avail: { header: 'linux/vfio.h', size: 12, fields: { header: f(0, 8), avail: f(8, 4) } },
  vfio_iommu_type1_dma_map: {
    header: 'linux/vfio.h',
    size: 32,
    fields: { argsz: f(0, 4), flags: f(4, 4), vaddr: f(8, 8), iova: f(16, 8), size: f(24, 8) },
  },
  vfio_iommu_type1_dma_unmap: {
    header: 'linux/vfio.h',
    size: 24,
    fields: { argsz: f(0, 4), flags: f(4, 4), iova: f(8, 8), size: f(16, 8) /* data[] at 24 */ },
  },
  // VFIO_IOMMU_DIRTY_PAGES: the 8-byte header alone for START / STOP; with GET_BITMAP it is followed by
  // vfio_iommu_type1_dirty_bitmap_get (iova, size, and a vfio_bitmap: pgsize, size, data pointer).
  vfio_iommu_type1_dirty_bitmap: { header: 'linux/vfio.h', size: 8, fields: { argsz: f(0, 4), flags: f(4, 4) /* data[] at 8 */ } },
  // The embedded struct vfio_bitmap {pgsize, size, data} is spelled out as bitmap_pgsize, bitmap_size and
  // bitmap_data (the probe prints offsetof(..., bitmap.pgsize) and so on). C fills bitmap_data.
  vfio_iommu_type1_dirty_bitmap_get: {
    header: 'linux/vfio.h',
    size: 40,
    fields: { iova: f(0, 8), size: f(8, 8), bitmap_pgsize: f(16, 8), bitmap_size: f(24, 8), bitmap_data: f(32, 8) },
  },
  // --- group --------------------------------------------------------------------------------------
  vfio_group_status: { header: 'linux/vfio.h', size: 8, fields: { argsz: f(0, 4), flags: f(4, 4) } },
  // --- device -------------------------------------------------------------------------------------
  vfio_device_info: {
    header: 'linux/vfio.h',
    // Linux 6.1 ends at cap_offset (20 bytes); later headers append `__u32 pad` (24). We pack 24 with
    // pad zero: the kernel reads offsetofend(num_irqs) and writes cap_offset only when argsz allows.
    size: 24,
    otherSizes: [20],
    fields: { argsz: f(0, 4), flags: f(4, 4), num_regions: f(8, 4), num_irqs: f(12, 4), cap_offset: f(16, 4) },
  },
  vfio_region_info: {
    header: 'linux/vfio.h',
    size: 32,
    fields: { argsz: f(0, 4), flags: f(4, 4), index: f(8, 4), cap_offset: f(12, 4), size: f(16, 8), offset: f(24, 8) },
  },
  // VFIO_DEVICE_FEATURE: flags = feature index | GET / SET / PROBE, then the feature's data[]; for
  // VFIO_DEVICE_FEATURE_MIGRATION that is vfio_device_feature_migration (a __u64 of flags).
  vfio_device_feature: { header: 'linux/vfio.h', size: 8, fields: { argsz: f(0, 4), flags: f(4, 4) /* data[] at 8 */ } },
  vfio_device_feature_migration: { header: 'linux/vfio.h', size: 8, fields: { flags: f(0, 8) } },
  // Linux 6.6+ include/uapi/linux/vfio.h; later kernels appended `__aligned_u64 token_uuid_ptr` (read
  // only with VFIO_DEVICE_BIND_FLAG_TOKEN, which C refuses).
  vfio_device_bind_iommufd: {
    header: 'linux/vfio.h',
    since: '6.6',
    size: 16,
    otherSizes: [24],
    fields: { argsz: f(0, 4), flags: f(4, 4), iommufd: f(8, 4), out_devid: f(12, 4) },
  },
  // Linux 6.6+; later kernels appended `__u32 pasid` (read only with VFIO_DEVICE_ATTACH_PASID).
  vfio_device_attach_iommufd_pt: {
    header: 'linux/vfio.h',
    since: '6.6',
    size: 12,
    otherSizes: [16],
    fields: { argsz: f(0, 4), flags: f(4, 4), pt_id: f(8, 4) },
  },
  // Linux 6.6+; later kernels appended `__u32 pasid` (read only with VFIO_DEVICE_DETACH_PASID).
  vfio_device_detach_iommufd_pt: {
    header: 'linux/vfio.h',
    since: '6.6',
    size: 8,
    otherSizes: [12],
    fields: { argsz: f(0, 4), flags: f(4, 4) },
  },
  // --- linux/iommufd.h (Linux 6.2+) --------------------------------------------------------------
  iommu_destroy: { header: 'linux/iommufd.h', since: '6.2', size: 8, fields: { size: f(0, 4), id: f(4, 4) } },
  iommu_ioas_alloc: {
    header: 'linux/iommufd.h',
    since: '6.2',
    size: 12,
    fields: { size: f(0, 4), flags: f(4, 4), out_ioas_id: f(8, 4) },
  },
  iommu_iova_range: { header: 'linux/iommufd.h', since: '6.2', size: 16, fields: { start: f(0, 8), last: f(8, 8) } },
  iommu_ioas_iova_ranges: {
    header: 'linux/iommufd.h',
    since: '6.2',
    size: 32,
    fields: {
      size: f(0, 4),
      ioas_id: f(4, 4),
      num_iovas: f(8, 4),
      __reserved: f(12, 4),
      allowed_iovas: f(16, 8),
      out_iova_alignment: f(24, 8),
    },
  },
  iommu_ioas_map: {
    header: 'linux/iommufd.h',
    since: '6.2',
    size: 40,
    fields: {
      size: f(0, 4),
      flags: f(4, 4),
      ioas_id: f(8, 4),
      __reserved: f(12, 4),
      user_va: f(16, 8),
      length: f(24, 8),
      iova: f(32, 8),
    },
  },
  iommu_ioas_unmap: {
    header: 'linux/iommufd.h',
    since: '6.2',
    size: 24,
    fields: { size: f(0, 4), ioas_id: f(4, 4), iova: f(8, 8), length: f(16, 8) },
  },
  // Nesting and dirty tracking (Linux 6.7+): what the IOMMU behind a device can do (IOMMU_GET_HW_INFO's
  // out_capabilities, out_data_type and vendor data), and page tables allocated for it: a nesting parent
  // (docs/ioas.md) or one with dirty tracking (IOMMU_HWPT_ALLOC_DIRTY_TRACKING, docs/dirty-logging.md).
  // 6.12 split iommu_hw_info's __u32 at 28 into out_max_pasid_log2 and three reserved bytes: nothing here
  // sets or reads it.
  iommu_hw_info: {
    header: 'linux/iommufd.h',
    since: '6.7',
    size: 40,
    fields: {
      size: f(0, 4),
      flags: f(4, 4),
      dev_id: f(8, 4),
      data_len: f(12, 4),
      data_uptr: f(16, 8),
      out_data_type: f(24, 4),
      __reserved: f(28, 4),
      out_capabilities: f(32, 8),
    },
  },
  iommu_hw_info_vtd: {
    header: 'linux/iommufd.h',
    since: '6.7',
    size: 24,
    fields: { flags: f(0, 4), __reserved: f(4, 4), cap_reg: f(8, 8), ecap_reg: f(16, 8) },
  },
  iommu_hwpt_alloc: {
    header: 'linux/iommufd.h',
    since: '6.7',
    size: 40,
    // 6.11 appended fault_id and __reserved2 (48 bytes); zero-extended by the kernel when left out.
    otherSizes: [24, 48],
    fields: {
      size: f(0, 4),
      flags: f(4, 4),
      dev_id: f(8, 4),
      pt_id: f(12, 4),
      out_hwpt_id: f(16, 4),
      __reserved: f(20, 4),
      data_type: f(24, 4),
      data_len: f(28, 4),
      data_uptr: f(32, 8),
    },
  },
  iommu_hwpt_set_dirty_tracking: {
    header: 'linux/iommufd.h',
    since: '6.7',
    size: 16,
    fields: { size: f(0, 4), flags: f(4, 4), hwpt_id: f(8, 4), __reserved: f(12, 4) },
  },
  iommu_hwpt_get_dirty_bitmap: {
    header: 'linux/iommufd.h',
    since: '6.7',
    size: 48,
    fields: { size: f(0, 4), hwpt_id: f(4, 4), flags: f(8, 4), __reserved: f(12, 4), iova: f(16, 8), length: f(24, 8), page_size: f(32, 8), data: f(40, 8) },
  },
} as const satisfies Record<string, Layout>;

export type StructName = keyof typeof LAYOUTS;

/** Constants from the same headers (checked by the probe where the installed headers have them). */
export const VFIO = {
  VFIO_API_VERSION: 0,
  VFIO_TYPE1v2_IOMMU: 3,
  VFIO_DMA_CC_IOMMU: 4,
  VFIO_GROUP_FLAGS_VIABLE: 1 << 0,
  VFIO_GROUP_FLAGS_CONTAINER_SET: 1 << 1,
  VFIO_IOMMU_INFO_PGSIZES: 1 << 0,
  VFIO_IOMMU_INFO_CAPS: 1 << 1,
  VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE: 1,
  VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION: 2,
  VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL: 3,
  VFIO_DMA_MAP_FLAG_READ: 1 << 0,
  VFIO_DMA_MAP_FLAG_WRITE: 1 << 1,
  VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP: 1 << 0,
  VFIO_DEVICE_FLAGS_RESET: 1 << 0,
  VFIO_DEVICE_FLAGS_PCI: 1 << 1,
  VFIO_DEVICE_FLAGS_CAPS: 1 << 7,
  VFIO_REGION_INFO_FLAG_READ: 1 << 0,
  VFIO_REGION_INFO_FLAG_WRITE: 1 << 1,
  VFIO_REGION_INFO_FLAG_MMAP: 1 << 2,
  VFIO_REGION_INFO_FLAG_CAPS: 1 << 3,
  VFIO_PCI_BAR0_REGION_INDEX: 0,
  VFIO_PCI_CONFIG_REGION_INDEX: 7,
  VFIO_IOMMU_DIRTY_PAGES_FLAG_START: 1 << 0,
  VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP: 1 << 1,
  VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP: 1 << 2,
  VFIO_DEVICE_FEATURE_MASK: 0xffff,
  VFIO_DEVICE_FEATURE_GET: 1 << 16,
  VFIO_DEVICE_FEATURE_SET: 1 << 17,
  VFIO_DEVICE_FEATURE_PROBE: 1 << 18,
  VFIO_DEVICE_FEATURE_MIGRATION: 1,
  VFIO_MIGRATION_STOP_COPY: 1 << 0,
  VFIO_MIGRATION_P2P: 1 << 1,
} as const;

/** include/uapi/linux/iommufd.h: enum iommufd_ioas_map_flags, iommufd_hwpt_alloc_flags, iommu_hw_info_type. */
export const IOMMUFD = {
  IOMMU_IOAS_MAP_FIXED_IOVA: 1 << 0,
  IOMMU_IOAS_MAP_WRITEABLE: 1 << 1,
  IOMMU_IOAS_MAP_READABLE: 1 << 2,
  IOMMU_HWPT_ALLOC_NEST_PARENT: 1 << 0,
  IOMMU_HW_INFO_TYPE_NONE: 0,
  IOMMU_HW_INFO_TYPE_INTEL_VTD: 1,
  IOMMU_HW_INFO_TYPE_ARM_SMMUV3: 2,
  IOMMU_HWPT_ALLOC_DIRTY_TRACKING: 1 << 1,
  /** enum iommufd_hw_capabilities */
  IOMMU_HW_CAP_DIRTY_TRACKING: 1 << 0,
  /** enum iommufd_hwpt_set_dirty_tracking_flags */
  IOMMU_HWPT_DIRTY_TRACKING_ENABLE: 1,
  /** enum iommufd_hwpt_get_dirty_bitmap_flags */
  IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR: 1,
} as const;

/** VT-d's extended capability register (VT-d spec 11.4.3): nested translation support (ECAP.NEST). */
export const VTD_ECAP_NEST = 1n << 26n;

// --- request numbers ---------------------------------------------------------------------------------

/** _IO(type, nr) of asm-generic/ioctl.h: no direction and no size bits. VFIO and iommufd use only _IO. */
const _IO = (type: string, nr: number) => ((type.charCodeAt(0) << 8) | nr) >>> 0;
const VFIO_BASE = 100;

/** The request numbers, as linux/vfio.h and linux/iommufd.h define them. */
export const REQUEST = {
  VFIO_GET_API_VERSION: _IO(';', VFIO_BASE + 0),
  VFIO_CHECK_EXTENSION: _IO(';', VFIO_BASE + 1),
  VFIO_SET_IOMMU: _IO(';', VFIO_BASE + 2),
  VFIO_GROUP_GET_STATUS: _IO(';', VFIO_BASE + 3),
  VFIO_GROUP_SET_CONTAINER: _IO(';', VFIO_BASE + 4),
  VFIO_GROUP_UNSET_CONTAINER: _IO(';', VFIO_BASE + 5),
  VFIO_GROUP_GET_DEVICE_FD: _IO(';', VFIO_BASE + 6),
  VFIO_DEVICE_GET_INFO: _IO(';', VFIO_BASE + 7),
  VFIO_DEVICE_GET_REGION_INFO: _IO(';', VFIO_BASE + 8),
  VFIO_DEVICE_RESET: _IO(';', VFIO_BASE + 11),
  VFIO_IOMMU_GET_INFO: _IO(';', VFIO_BASE + 12),
  VFIO_IOMMU_MAP_DMA: _IO(';', VFIO_BASE + 13),
  VFIO_IOMMU_UNMAP_DMA: _IO(';', VFIO_BASE + 14),
  /** On a container; the same number on a device fd is VFIO_DEVICE_FEATURE. */
  VFIO_IOMMU_DIRTY_PAGES: _IO(';', VFIO_BASE + 17),
  /** On a device fd; the same number on a container is VFIO_IOMMU_DIRTY_PAGES. */
  VFIO_DEVICE_FEATURE: _IO(';', VFIO_BASE + 17),
  VFIO_DEVICE_BIND_IOMMUFD: _IO(';', VFIO_BASE + 18),
  VFIO_DEVICE_ATTACH_IOMMUFD_PT: _IO(';', VFIO_BASE + 19),
  VFIO_DEVICE_DETACH_IOMMUFD_PT: _IO(';', VFIO_BASE + 20),
  IOMMU_DESTROY: _IO(';', 0x80),
  IOMMU_IOAS_ALLOC: _IO(';', 0x81),
  IOMMU_IOAS_IOVA_RANGES: _IO(';', 0x84),
  IOMMU_IOAS_MAP: _IO(';', 0x85),
  IOMMU_IOAS_UNMAP: _IO(';', 0x86),
  IOMMU_HWPT_ALLOC: _IO(';', 0x89),
  IOMMU_GET_HW_INFO: _IO(';', 0x8a),
  IOMMU_HWPT_SET_DIRTY_TRACKING: _IO(';', 0x8b),
  IOMMU_HWPT_GET_DIRTY_BITMAP: _IO(';', 0x8c),
} as const;

// --- packing --------------------------------------------------------------------------------------

/** A JS number or a bigint for 64-bit fields (IOVA ranges reach 2^64 - 1). */
export type U64 = number | bigint;
type Values<S extends StructName> = { [K in keyof (typeof LAYOUTS)[S]['fields']]?: number | bigint };

/**
 * A zeroed buffer of `total` bytes (default the struct's size) with the struct's fields set. The leading
 * size word (argsz / size) is set to `total` unless given: reserved fields and padding stay zero.
 */
export function pack<S extends StructName>(name: S, values: Values<S>, total: number = LAYOUTS[name].size): Uint8Array {
  const layout: Layout = LAYOUTS[name];
  if (total < layout.size) throw new RangeError(`${name}: ${total} bytes is less than its ${layout.size}`);
  const buf = new Uint8Array(total);
  const sizeField = 'argsz' in layout.fields ? 'argsz' : 'size' in layout.fields && layout.fields.size?.offset === 0 ? 'size' : undefined;
  const all: Record<string, number | bigint | undefined> = {
    ...(sizeField ? { [sizeField]: total } : {}),
    ...(values as Record<string, number | bigint | undefined>),
  };
  for (const [field, value] of Object.entries(all)) {
    if (value === undefined) continue;
    const at = layout.fields[field];
    if (!at) throw new RangeError(`${name} has no field ${field}`);
    write(buf, at, value, `${name}.${field}`);
  }
  return buf;
}

/** Sets fields of `name` placed at `offset` of `buf` (a struct that follows another one, as VFIO's data[]). */
export function packInto<S extends StructName>(name: S, buf: Uint8Array, offset: number, values: Values<S>): void {
  const layout: Layout = LAYOUTS[name];
  if (offset < 0 || offset + layout.size > buf.length) throw new RangeError(`${name} at ${offset} runs past the ${buf.length}-byte buffer`);
  for (const [field, value] of Object.entries(values as Record<string, number | bigint | undefined>)) {
    if (value === undefined) continue;
    const at = layout.fields[field];
    if (!at) throw new RangeError(`${name} has no field ${field}`);
    write(buf, { offset: offset + at.offset, size: at.size }, value, `${name}.${field}`);
  }
}

/** Reads every field of `name` at `offset` of `buf` (64-bit fields as bigint). */
export function unpack<S extends StructName>(name: S, buf: Uint8Array, offset = 0): { [K in keyof (typeof LAYOUTS)[S]['fields']]: bigint } {
  const layout: Layout = LAYOUTS[name];
  if (offset < 0 || offset + layout.size > buf.length) {
    // Some structs are read with only their leading part present (a cap header, a short reply).
    const end = Math.max(...Object.values(layout.fields).map((x) => x.offset + x.size));
    if (offset < 0 || offset + end > buf.length) throw new RangeError(`${name} at ${offset} runs past the ${buf.length}-byte buffer`);
  }
  const out: Record<string, bigint> = {};
  for (const [field, at] of Object.entries(layout.fields)) out[field] = read(buf, offset + at.offset, at.size);
  return out as { [K in keyof (typeof LAYOUTS)[S]['fields']]: bigint };
}

/** One field, as a number (throws if it is not exactly representable). */
export function get<S extends StructName>(name: S, buf: Uint8Array, field: keyof (typeof LAYOUTS)[S]['fields'] & string, offset = 0): number {
  const at = (LAYOUTS[name] as Layout).fields[field] as Field;
  return toNumber(read(buf, offset + at.offset, at.size), `${name}.${field}`);
}

export function toNumber(v: bigint, what: string): number {
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new RangeError(`${what} = ${hex(v)} does not fit a JS number`);
  return Number(v);
}

function view(buf: Uint8Array): DataView {
  return new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
}

function write(buf: Uint8Array, at: Field, value: number | bigint, what: string): void {
  const dv = view(buf);
  const max = at.size === 8 ? 2n ** 64n - 1n : 2n ** BigInt(at.size * 8) - 1n;
  let v: bigint;
  if (typeof value === 'bigint') v = value;
  else {
    if (!Number.isSafeInteger(value)) throw new RangeError(`${what}: ${value} is not a safe integer`);
    // Signed 32-bit fields (an fd of -1) are written as their two's complement.
    v = value < 0 && at.size === 4 && value >= -(2 ** 31) ? BigInt(value >>> 0) : BigInt(value);
  }
  if (v < 0n || v > max) throw new RangeError(`${what}: ${value} does not fit ${at.size} bytes`);
  switch (at.size) {
    case 1:
      dv.setUint8(at.offset, Number(v));
      return;
    case 2:
      dv.setUint16(at.offset, Number(v), LE);
      return;
    case 4:
      dv.setUint32(at.offset, Number(v), LE);
      return;
    case 8:
      dv.setBigUint64(at.offset, v, LE);
  }
}

function read(buf: Uint8Array, offset: number, size: Field['size']): bigint {
  const dv = view(buf);
  switch (size) {
    case 1:
      return BigInt(dv.getUint8(offset));
    case 2:
      return BigInt(dv.getUint16(offset, LE));
    case 4:
      return BigInt(dv.getUint32(offset, LE));
    case 8:
      return dv.getBigUint64(offset, LE);
  }
}

// --- capability chains (VFIO INFO ioctls) -------------------------------------------------------------

export interface Capability {
  id: number;
  version: number;
  /** Offset of the capability's header inside the info buffer. */
  offset: number;
}

/**
 * Walks a VFIO capability chain: `first` is the info struct's cap_offset, each header's `next` the
 * following one (0 ends it). Offsets are from the start of the info buffer. A chain that loops, points
 * backwards or runs past the buffer is refused (the kernel never produces one).
 */
export function capabilities(buf: Uint8Array, first: number, minOffset: number): Capability[] {
  const caps: Capability[] = [];
  let at = first;
  let last = minOffset - 1;
  while (at !== 0) {
    if (at <= last || at + LAYOUTS.vfio_info_cap_header.size > buf.length || at % 4 !== 0) {
      throw new RangeError(`malformed VFIO capability chain: header at ${at} (buffer ${buf.length} bytes)`);
    }
    const h = unpack('vfio_info_cap_header', buf, at);
    caps.push({ id: Number(h.id), version: Number(h.version), offset: at });
    last = at;
    at = Number(h.next);
  }
  return caps;
}

/** An inclusive IOVA range as the kernel reports it (64-bit, so bigint). */
export interface RawIovaRange {
  start: bigint;
  last: bigint;
}

export interface Type1Info {
  flags: number;
  /** Bitmap of the IOMMU page sizes (VFIO_IOMMU_INFO_PGSIZES). */
  iovaPageSizes: bigint | undefined;
  /** Usable IOVA ranges (VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE), if the kernel reported them. */
  ranges: RawIovaRange[] | undefined;
  /** Remaining DMA mappings (VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL), if reported. */
  dmaAvailable: number | undefined;
  /** Dirty-page tracking (VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION), if reported. */
  migration: { flags: number; pageSizes: bigint; maxDirtyBitmapSize: bigint } | undefined;
  /** argsz the kernel asked for: larger than the buffer means the caps did not fit; call again. */
  argsz: number;
}

/** Parses a VFIO_IOMMU_GET_INFO reply (vfio_iommu_type1_info followed by its capability chain). */
export function parseType1Info(buf: Uint8Array): Type1Info {
  const info = unpack('vfio_iommu_type1_info', buf);
  const flags = Number(info.flags);
  const out: Type1Info = {
    flags,
    iovaPageSizes: flags & VFIO.VFIO_IOMMU_INFO_PGSIZES ? info.iova_pgsizes : undefined,
    ranges: undefined,
    dmaAvailable: undefined,
    migration: undefined,
    argsz: Number(info.argsz),
  };
  if (!(flags & VFIO.VFIO_IOMMU_INFO_CAPS) || out.argsz > buf.length) return out;
  for (const cap of capabilities(buf, Number(info.cap_offset), LAYOUTS.vfio_iommu_type1_info.size)) {
    if (cap.id === VFIO.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE) {
      const c = unpack('vfio_iommu_type1_info_cap_iova_range', buf, cap.offset);
      const n = Number(c.nr_iovas);
      const base = cap.offset + LAYOUTS.vfio_iommu_type1_info_cap_iova_range.size;
      if (base + n * LAYOUTS.vfio_iova_range.size > buf.length) throw new RangeError(`IOVA range capability with ${n} ranges runs past the buffer`);
      out.ranges = [];
      for (let i = 0; i < n; i++) {
        const r = unpack('vfio_iova_range', buf, base + i * LAYOUTS.vfio_iova_range.size);
        out.ranges.push({ start: r.start, last: r.end });
      }
    } else if (cap.id === VFIO.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL) {
      out.dmaAvailable = Number(unpack('vfio_iommu_type1_info_dma_avail', buf, cap.offset).avail);
    } else if (cap.id === VFIO.VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION) {
      const m = unpack('vfio_iommu_type1_info_cap_migration', buf, cap.offset);
      out.migration = { flags: Number(m.flags), pageSizes: m.pgsize_bitmap, maxDirtyBitmapSize: m.max_dirty_bitmap_size };
    }
  }
  return out;
}

/** Parses the allowed_iovas array IOMMU_IOAS_IOVA_RANGES filled in. */
export function parseIommuRanges(data: Uint8Array, count: number): RawIovaRange[] {
  const out: RawIovaRange[] = [];
  for (let i = 0; i < count; i++) {
    const r = unpack('iommu_iova_range', data, i * LAYOUTS.iommu_iova_range.size);
    out.push({ start: r.start, last: r.last });
  }
  return out;
}

export interface RegionInfo {
  index: number;
  flags: number;
  size: number;
  /** Offset of the region in the device fd (for pread / pwrite / mmap). */
  offset: number;
  readable: boolean;
  writable: boolean;
  mmappable: boolean;
  /** Capability ids present (sparse mmap = 1, type = 2, MSI-X mappable = 3, ...). */
  caps: Capability[];
}

/** Parses a VFIO_DEVICE_GET_REGION_INFO reply. */
export function parseRegionInfo(buf: Uint8Array): RegionInfo & { argsz: number } {
  const r = unpack('vfio_region_info', buf);
  const flags = Number(r.flags);
  const argsz = Number(r.argsz);
  const caps =
    flags & VFIO.VFIO_REGION_INFO_FLAG_CAPS && argsz <= buf.length && r.cap_offset !== 0n
      ? capabilities(buf, Number(r.cap_offset), LAYOUTS.vfio_region_info.size)
      : [];
  return {
    index: Number(r.index),
    flags,
    size: toNumber(r.size, 'vfio_region_info.size'),
    offset: toNumber(r.offset, 'vfio_region_info.offset'),
    readable: (flags & VFIO.VFIO_REGION_INFO_FLAG_READ) !== 0,
    writable: (flags & VFIO.VFIO_REGION_INFO_FLAG_WRITE) !== 0,
    mmappable: (flags & VFIO.VFIO_REGION_INFO_FLAG_MMAP) !== 0,
    caps,
    argsz,
  };
}
