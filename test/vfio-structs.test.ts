// The VFIO / iommufd structures clients/vfio/structs.ts packs, against the kernel's own headers: a C
// probe (test/fixtures/vfio-offsets.c) compiled here with gcc prints sizeof / offsetof / member sizes from
// the installed linux/vfio.h (and linux/iommufd.h where installed), through the layout probe every struct
// table is checked with (test/helpers/layout-probe.ts; KVM and vhost-user use it too). Structures missing from the installed
// headers are checked against the layouts of Linux's include/uapi headers, transcribed below.
import os from 'node:os';
import { beforeAll, describe, expect, it } from 'vitest';
import { vfio } from '../native/vfio.js';
import {
  IOMMUFD,
  LAYOUTS,
  REQUEST,
  VFIO,
  capabilities,
  get,
  pack,
  parseIommuRanges,
  parseRegionInfo,
  parseType1Info,
  unpack,
  type Layout,
  type StructName,
} from '../clients/vfio/structs.js';
import { expectLayout, runFixtureProbe, type Probe } from './helpers/layout-probe.js';

let probe: Probe;

beforeAll(() => {
  probe = runFixtureProbe('vfio-offsets.c');
});

/**
 * Layouts of structs that Debian bookworm's 6.1 headers lack, transcribed from Linux master's
 * include/uapi/linux/iommufd.h (iommu_*) and include/uapi/linux/vfio.h (the VFIO cdev structs, 6.6+),
 * as [offset, size] per member, with the struct's size in the version we pack.
 */
const UPSTREAM: Record<string, { size: number; fields: Record<string, [number, number]> }> = {
  vfio_device_bind_iommufd: { size: 16, fields: { argsz: [0, 4], flags: [4, 4], iommufd: [8, 4], out_devid: [12, 4] } },
  vfio_device_attach_iommufd_pt: { size: 12, fields: { argsz: [0, 4], flags: [4, 4], pt_id: [8, 4] } },
  vfio_device_detach_iommufd_pt: { size: 8, fields: { argsz: [0, 4], flags: [4, 4] } },
  iommu_destroy: { size: 8, fields: { size: [0, 4], id: [4, 4] } },
  iommu_ioas_alloc: { size: 12, fields: { size: [0, 4], flags: [4, 4], out_ioas_id: [8, 4] } },
  iommu_iova_range: { size: 16, fields: { start: [0, 8], last: [8, 8] } },
  iommu_ioas_iova_ranges: {
    size: 32,
    fields: { size: [0, 4], ioas_id: [4, 4], num_iovas: [8, 4], __reserved: [12, 4], allowed_iovas: [16, 8], out_iova_alignment: [24, 8] },
  },
  iommu_ioas_map: {
    size: 40,
    fields: { size: [0, 4], flags: [4, 4], ioas_id: [8, 4], __reserved: [12, 4], user_va: [16, 8], length: [24, 8], iova: [32, 8] },
  },
  iommu_ioas_unmap: { size: 24, fields: { size: [0, 4], ioas_id: [4, 4], iova: [8, 8], length: [16, 8] } },
  // Nesting queries (6.7+), as of Linux 6.12, the VM test's kernel (later ones split iommu_hw_info's
  // __reserved into out_max_pasid_log2 and __reserved[3], at the same place).
  iommu_hw_info: {
    size: 40,
    fields: {
      size: [0, 4],
      flags: [4, 4],
      dev_id: [8, 4],
      data_len: [12, 4],
      data_uptr: [16, 8],
      out_data_type: [24, 4],
      __reserved: [28, 4],
      out_capabilities: [32, 8],
    },
  },
  iommu_hw_info_vtd: { size: 24, fields: { flags: [0, 4], __reserved: [4, 4], cap_reg: [8, 8], ecap_reg: [16, 8] } },
  iommu_hwpt_alloc: {
    size: 48,
    fields: {
      size: [0, 4],
      flags: [4, 4],
      dev_id: [8, 4],
      pt_id: [12, 4],
      out_hwpt_id: [16, 4],
      __reserved: [20, 4],
      data_type: [24, 4],
      data_len: [28, 4],
      data_uptr: [32, 8],
      fault_id: [40, 4],
      __reserved2: [44, 4],
    },
  },
  iommu_hwpt_set_dirty_tracking: { size: 16, fields: { size: [0, 4], flags: [4, 4], hwpt_id: [8, 4], __reserved: [12, 4] } },
  iommu_hwpt_get_dirty_bitmap: {
    size: 48,
    fields: { size: [0, 4], hwpt_id: [4, 4], flags: [8, 4], __reserved: [12, 4], iova: [16, 8], length: [24, 8], page_size: [32, 8], data: [40, 8] },
  },
};
/** include/uapi/linux/iommufd.h: IOMMUFD_TYPE ';', IOMMUFD_CMD_BASE 0x80; vfio.h: VFIO_BASE + 18..20. */
const UPSTREAM_REQUESTS: Record<string, number> = {
  VFIO_DEVICE_BIND_IOMMUFD: (0x3b << 8) | (100 + 18),
  VFIO_DEVICE_ATTACH_IOMMUFD_PT: (0x3b << 8) | (100 + 19),
  VFIO_DEVICE_DETACH_IOMMUFD_PT: (0x3b << 8) | (100 + 20),
  IOMMU_DESTROY: 0x3b80,
  IOMMU_IOAS_ALLOC: 0x3b81,
  IOMMU_IOAS_IOVA_RANGES: 0x3b84,
  IOMMU_IOAS_MAP: 0x3b85,
  IOMMU_IOAS_UNMAP: 0x3b86,
  IOMMU_HWPT_ALLOC: 0x3b89,
  IOMMU_GET_HW_INFO: 0x3b8a,
  IOMMU_HWPT_SET_DIRTY_TRACKING: 0x3b8b,
  IOMMU_HWPT_GET_DIRTY_BITMAP: 0x3b8c,
};
const UPSTREAM_CONSTANTS: Record<string, number> = {
  IOMMU_IOAS_MAP_FIXED_IOVA: 1,
  IOMMU_IOAS_MAP_WRITEABLE: 2,
  IOMMU_IOAS_MAP_READABLE: 4,
  IOMMU_HWPT_ALLOC_NEST_PARENT: 1,
  IOMMU_HW_INFO_TYPE_NONE: 0,
  IOMMU_HW_INFO_TYPE_INTEL_VTD: 1,
  IOMMU_HW_INFO_TYPE_ARM_SMMUV3: 2,
  IOMMU_HWPT_ALLOC_DIRTY_TRACKING: 2,
  IOMMU_HW_CAP_DIRTY_TRACKING: 1,
  IOMMU_HWPT_DIRTY_TRACKING_ENABLE: 1,
  IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR: 1,
};

const names = Object.keys(LAYOUTS) as StructName[];

describe('struct layouts against the kernel headers', () => {
  it('the probe saw the installed linux/vfio.h', () => {
    expect(probe.structs.vfio_iommu_type1_dma_map).toBeDefined();
    expect(Object.keys(probe.structs).length).toBeGreaterThanOrEqual(11);
  });

  it.each(names)("%s: every member at the header's offset and size, and the header's size", (name) => {
    // The installed headers, else the upstream transcription; every member the header has before the end
    // of what we pack is packed too (no member forgotten).
    expectLayout(name, LAYOUTS[name], probe.structs[name] ?? UPSTREAM[name]);
  });

  it('structs missing from the installed headers are the ones structs.ts says are newer', () => {
    const missing = names.filter((n) => !probe.structs[n]);
    for (const n of missing) expect((LAYOUTS[n] as Layout).since, n).toBeDefined();
  });

  it('layouts are naturally aligned, do not overlap, and end where C would pad them', () => {
    for (const name of names) {
      const layout: Layout = LAYOUTS[name];
      const fields = Object.entries(layout.fields).sort(([, a], [, b]) => a.offset - b.offset);
      let end = 0;
      let align = 1;
      for (const [member, f] of fields) {
        // `header` is an embedded vfio_info_cap_header (u16, u16, u32): 4-byte aligned.
        const fa = member === 'header' ? 4 : f.size;
        expect(f.offset % fa, `${name} member at ${f.offset}`).toBe(0);
        expect(f.offset, `${name} overlap at ${f.offset}`).toBeGreaterThanOrEqual(end);
        end = f.offset + f.size;
        align = Math.max(align, fa);
      }
      if (!layout.otherSizes) expect(layout.size, name).toBe(Math.ceil(end / align) * align);
    }
  });

  it("constants equal the headers' (upstream ones where not installed)", () => {
    for (const [k, v] of Object.entries(VFIO)) expect(v, k).toBe(probe.constants[k]);
    for (const [k, v] of Object.entries(IOMMUFD)) expect(v, k).toBe(probe.constants[k] ?? UPSTREAM_CONSTANTS[k]);
  });

  it('request numbers: TypeScript, the addon and the headers agree', () => {
    for (const [k, v] of Object.entries(REQUEST)) {
      expect(v, `${k} vs headers`).toBe(probe.requests[k] ?? UPSTREAM_REQUESTS[k]);
      expect(v, `${k} vs addon`).toBe((vfio.vfioRequests as unknown as Record<string, number>)[k]);
    }
    expect(Object.keys(vfio.vfioRequests).sort()).toEqual(Object.keys(REQUEST).sort());
  });
});

const dv = (b: Uint8Array) => new DataView(b.buffer, b.byteOffset, b.byteLength);
/** Reads a member at the offset the C compiler gave it (native endianness). */
function cread(b: Uint8Array, struct: string, field: string, base = 0): bigint {
  const ref = probe.structs[struct] ?? UPSTREAM[struct];
  const [off, size] = ref!.fields[field]!;
  const le = os.endianness() === 'LE';
  const v = dv(b);
  if (size === 2) return BigInt(v.getUint16(base + off, le));
  if (size === 4) return BigInt(v.getUint32(base + off, le));
  if (size === 8) return v.getBigUint64(base + off, le);
  throw new Error(`size ${size}`);
}
function cwrite(b: Uint8Array, struct: string, field: string, value: bigint, base = 0): void {
  const ref = probe.structs[struct] ?? UPSTREAM[struct];
  const [off, size] = ref!.fields[field]!;
  const le = os.endianness() === 'LE';
  if (size === 2) dv(b).setUint16(base + off, Number(value), le);
  else if (size === 4) dv(b).setUint32(base + off, Number(value), le);
  else dv(b).setBigUint64(base + off, value, le);
}

describe('packed bytes', () => {
  it('VFIO_IOMMU_MAP_DMA: argsz = sizeof, flags, vaddr, iova, size at the header offsets; nothing else set', () => {
    const b = pack('vfio_iommu_type1_dma_map', { flags: 3, vaddr: 0x7f12_3456_7000, iova: 0x1_0000_0000, size: 128 << 20 });
    expect(b.length).toBe(probe.structs.vfio_iommu_type1_dma_map!.size);
    expect(cread(b, 'vfio_iommu_type1_dma_map', 'argsz')).toBe(BigInt(b.length));
    expect(cread(b, 'vfio_iommu_type1_dma_map', 'flags')).toBe(3n);
    expect(cread(b, 'vfio_iommu_type1_dma_map', 'vaddr')).toBe(0x7f12_3456_7000n);
    expect(cread(b, 'vfio_iommu_type1_dma_map', 'iova')).toBe(0x1_0000_0000n);
    expect(cread(b, 'vfio_iommu_type1_dma_map', 'size')).toBe(BigInt(128 << 20));
  });

  it('every struct: the size word is first and equals the buffer length; unset members and padding are zero', () => {
    for (const name of names) {
      const layout: Layout = LAYOUTS[name];
      const b = pack(name, {});
      const sizeField = 'argsz' in layout.fields ? 'argsz' : layout.fields.size?.offset === 0 ? 'size' : undefined;
      const expected = new Uint8Array(layout.size);
      if (sizeField) {
        expect(layout.fields[sizeField]).toEqual({ offset: 0, size: 4 });
        dv(expected).setUint32(0, layout.size, os.endianness() === 'LE');
      }
      expect(b, name).toEqual(expected);
    }
    // A larger buffer (room for capabilities): argsz says so.
    expect(get('vfio_iommu_type1_info', pack('vfio_iommu_type1_info', {}, 256), 'argsz')).toBe(256);
  });

  it('IOMMU_IOAS_MAP: size, flags FIXED_IOVA|READABLE|WRITEABLE, ioas_id, reserved zero, user_va, length, iova', () => {
    const flags = IOMMUFD.IOMMU_IOAS_MAP_FIXED_IOVA | IOMMUFD.IOMMU_IOAS_MAP_READABLE | IOMMUFD.IOMMU_IOAS_MAP_WRITEABLE;
    const b = pack('iommu_ioas_map', { flags, ioas_id: 9, user_va: 0x7f00_0000_0000, length: 1 << 30, iova: 0x2_0000_0000 });
    const s = 'iommu_ioas_map';
    expect([cread(b, s, 'size'), cread(b, s, 'flags'), cread(b, s, 'ioas_id'), cread(b, s, '__reserved')]).toEqual([40n, 7n, 9n, 0n]);
    expect([cread(b, s, 'user_va'), cread(b, s, 'length'), cread(b, s, 'iova')]).toEqual([0x7f00_0000_0000n, BigInt(1 << 30), 0x2_0000_0000n]);
  });

  it('VFIO_DEVICE_BIND_IOMMUFD carries a negative-safe s32 fd; u64 fields take bigints up to 2^64 - 1', () => {
    const b = pack('vfio_device_bind_iommufd', { iommufd: 42 });
    expect(cread(b, 'vfio_device_bind_iommufd', 'iommufd')).toBe(42n);
    const u = pack('iommu_ioas_unmap', { iova: 0n, length: 2n ** 64n - 1n });
    expect(cread(u, 'iommu_ioas_unmap', 'length')).toBe(2n ** 64n - 1n);
    expect(() => pack('iommu_ioas_unmap', { length: 2n ** 64n })).toThrow(RangeError);
    expect(() => pack('iommu_ioas_alloc', { flags: 2 ** 32 })).toThrow(RangeError);
    expect(() => pack('iommu_ioas_alloc', { nope: 1 } as never)).toThrow(/no field nope/);
  });
});

describe('parsing what the kernel writes back', () => {
  /** A VFIO_IOMMU_GET_INFO reply as the kernel lays it out, built with the C offsets. */
  function type1Reply(total: number, ranges: [bigint, bigint][], avail: number): Uint8Array {
    const b = new Uint8Array(total);
    const info = 'vfio_iommu_type1_info';
    const infoSize = probe.structs[info]!.size;
    const rangeCap = 'vfio_iommu_type1_info_cap_iova_range';
    const rangeBase = probe.structs[rangeCap]!.fields.iova_ranges![0];
    const rangeSize = probe.structs.vfio_iova_range!.size;
    const capA = infoSize; // the kernel puts the first cap right after the struct
    const capB = capA + rangeBase + ranges.length * rangeSize;
    const needed = capB + probe.structs.vfio_iommu_type1_info_dma_avail!.size;
    cwrite(b, info, 'argsz', BigInt(needed));
    cwrite(b, info, 'flags', BigInt(VFIO.VFIO_IOMMU_INFO_PGSIZES | VFIO.VFIO_IOMMU_INFO_CAPS));
    cwrite(b, info, 'iova_pgsizes', 0x40201000n);
    if (needed > total) return b; // caps did not fit: argsz tells how much room is needed, cap_offset 0
    cwrite(b, info, 'cap_offset', BigInt(capA));
    cwrite(b, 'vfio_info_cap_header', 'id', 1n, capA);
    cwrite(b, 'vfio_info_cap_header', 'version', 1n, capA);
    cwrite(b, 'vfio_info_cap_header', 'next', BigInt(capB), capA);
    cwrite(b, rangeCap, 'nr_iovas', BigInt(ranges.length), capA);
    ranges.forEach(([s, e], i) => {
      cwrite(b, 'vfio_iova_range', 'start', s, capA + rangeBase + i * rangeSize);
      cwrite(b, 'vfio_iova_range', 'end', e, capA + rangeBase + i * rangeSize);
    });
    cwrite(b, 'vfio_info_cap_header', 'id', 3n, capB);
    cwrite(b, 'vfio_info_cap_header', 'version', 1n, capB);
    cwrite(b, 'vfio_iommu_type1_info_dma_avail', 'avail', BigInt(avail), capB);
    return b;
  }

  it('VFIO_IOMMU_GET_INFO: IOVA ranges and DMA_AVAIL from the capability chain', () => {
    const ranges: [bigint, bigint][] = [
      [0n, 0xfedfffffn],
      [0xfef00000n, 0x7fffffffffn],
    ];
    const info = parseType1Info(type1Reply(256, ranges, 65_000));
    expect(info.ranges).toEqual([
      { start: 0n, last: 0xfedfffffn },
      { start: 0xfef00000n, last: 0x7fffffffffn },
    ]);
    expect(info.dmaAvailable).toBe(65_000);
    expect(info.iovaPageSizes).toBe(0x40201000n);
    expect(info.argsz).toBeLessThanOrEqual(256);
  });

  it('VFIO_IOMMU_GET_INFO with too small a buffer: argsz asks for more and no capability is read', () => {
    const info = parseType1Info(type1Reply(probe.structs.vfio_iommu_type1_info!.size, [[0n, 0xffffn]], 1));
    expect(info.argsz).toBeGreaterThan(probe.structs.vfio_iommu_type1_info!.size);
    expect(info.ranges).toBeUndefined();
    expect(info.dmaAvailable).toBeUndefined();
  });

  it('a capability chain that loops or runs past the buffer is refused', () => {
    const b = new Uint8Array(64);
    cwrite(b, 'vfio_info_cap_header', 'next', 24n, 24);
    expect(() => capabilities(b, 24, 24)).toThrow(/malformed/);
    expect(() => capabilities(b, 60, 24)).toThrow(/malformed/);
  });

  it('IOMMU_IOAS_IOVA_RANGES array and VFIO_DEVICE_GET_REGION_INFO', () => {
    const data = new Uint8Array(32);
    cwrite(data, 'iommu_iova_range', 'start', 0x1000n, 0);
    cwrite(data, 'iommu_iova_range', 'last', 0xfedfffffn, 0);
    cwrite(data, 'iommu_iova_range', 'start', 0xfef00000n, 16);
    cwrite(data, 'iommu_iova_range', 'last', 2n ** 64n - 1n, 16);
    expect(parseIommuRanges(data, 2)).toEqual([
      { start: 0x1000n, last: 0xfedfffffn },
      { start: 0xfef00000n, last: 2n ** 64n - 1n },
    ]);

    const r = pack('vfio_region_info', { index: 7 });
    cwrite(r, 'vfio_region_info', 'flags', 3n);
    cwrite(r, 'vfio_region_info', 'size', 256n);
    cwrite(r, 'vfio_region_info', 'offset', 0x70000000000n);
    const info = parseRegionInfo(r);
    expect(info).toMatchObject({ index: 7, size: 256, offset: 0x70000000000, readable: true, writable: true, mmappable: false, caps: [] });
    expect(unpack('vfio_region_info', r).index).toBe(7n);
  });
});
