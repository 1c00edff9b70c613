// The type1 and iommufd backends' logic, driven against a simulated kernel (this machine has no IOMMU; a
// later issue runs them for real in a QEMU guest). The simulation keeps the kernel's rules that matter to
// the client: type1 drops the container's IOMMU and every mapping with its last group, GET_INFO asks for
// more argsz when capabilities do not fit, IOAS_IOVA_RANGES answers EMSGSIZE with the count, mappings may
// not overlap or leave the usable ranges, dma_entry_limit; and dirty tracking as the kernel does it: type1
// reports every page of every mapping a GET_BITMAP range covers (no vendor driver pins pages) and refuses
// a range that bisects a mapping; iommufd tracks only on a HWPT allocated with DIRTY_TRACKING on an IOMMU
// that has the capability, answers EOPNOTSUPP otherwise, and reports exactly the IOPTEs written. The
// struct bytes it reads and writes go through the layouts checked against the kernel headers in
// vfio-structs.test.ts.
import { afterEach, describe, expect, it } from 'vitest';
import { createSealedMemfd } from '../clients/memfd.js';
import { toView, type ApplyContext, type Change, type LocalBacking, type ViewRegion } from '../clients/view.js';
import { DirtyLog } from '../clients/dirty.js';
import { VfioApplier, type VfioApplierOptions } from '../clients/vfio/applier.js';
import { reportedDirtyTracking } from '../clients/vfio/subscriber.js';
import { Domain } from '../clients/vfio/domain.js';
import { IommufdBackend } from '../clients/vfio/iommufd.js';
import { LAYOUTS, REQUEST, VFIO, IOMMUFD, get, unpack, type StructName } from '../clients/vfio/structs.js';
import type { VfioSys } from '../clients/vfio/sys.js';
import { Type1Backend } from '../clients/vfio/type1.js';
import { constants, native } from '../native/index.js';
import { bitmapLayout, forEachBitRun, isMmbError, type Region } from '../protocol/index.js';

const MiB = 2 ** 20;
const NAMES = new Map(Object.entries(REQUEST).map(([k, v]) => [v, k]));
const ERRNO: Record<string, number> = { EACCES: 13, EINVAL: 22, EEXIST: 17, ENOSPC: 28, EBUSY: 16, EPERM: 1, ENOENT: 2, EMSGSIZE: 90, EBADF: 9, EOPNOTSUPP: 95, ENOTTY: 25 };

function fail(code: string, syscall: string): never {
  throw Object.assign(new Error(`${syscall} failed: (${code})`), { code, errno: -(ERRNO[code] ?? 5), syscall });
}

type File =
  | { kind: 'container' }
  | { kind: 'group'; id: string; inContainer: boolean }
  | { kind: 'device'; bdf: string }
  | { kind: 'iommufd' }
  | { kind: 'cdev'; bdf: string; devid?: number; ioas?: number; hwpt?: number };

interface Mapping {
  iova: bigint;
  size: bigint;
  vaddr: bigint;
  flags: number;
}

const le = true;
const dv = (b: Uint8Array) => new DataView(b.buffer, b.byteOffset, b.byteLength);
function put(b: Uint8Array, s: StructName, field: string, v: number | bigint, base = 0): void {
  const at = (LAYOUTS[s].fields as Record<string, { offset: number; size: number }>)[field]!;
  if (at.size === 2) dv(b).setUint16(base + at.offset, Number(v), le);
  else if (at.size === 4) dv(b).setUint32(base + at.offset, Number(v), le);
  else dv(b).setBigUint64(base + at.offset, BigInt(v), le);
}
const align8 = (n: number) => Math.ceil(n / 8) * 8;

/** A small model of the VFIO type1 and iommufd kernel interfaces. */
class SimKernel implements VfioSys {
  readonly calls: string[] = [];
  readonly files = new Map<number, File>();
  private nextFd = 100;
  groupOf: Record<string, string> = { '0000:00:01.0': '5', '0000:00:02.0': '5', '0000:00:03.0': '6', '0000:00:04.0': '7' };
  viable = new Set(['5', '6']);
  nodes = new Set(['/dev/vfio/vfio', '/dev/iommu', '/dev/vfio/5', '/dev/vfio/6', '/dev/vfio/7']);
  usable: [bigint, bigint][] = [
    [0n, 0xfedf_ffffn],
    [0xfef0_0000n, 0x7f_ffff_ffffn],
  ];
  dmaLimit = 65_535;
  // type1
  containerGroups = new Set<string>();
  iommu = false;
  readonly dma = new Map<bigint, Mapping>();
  // iommufd
  private nextId = 1;
  readonly ioas = new Map<number, Map<bigint, Mapping>>();
  // dirty tracking
  /** type1: GET_INFO carries the MIGRATION capability (dirty-page tracking at 4 KiB). */
  migrationCap = false;
  /** type1: VFIO_IOMMU_DIRTY_PAGES started. */
  dirtyPages = false;
  /** iommufd: the IOMMU behind every device has IOMMU_HW_CAP_DIRTY_TRACKING. */
  dirtyCapable = false;
  /** iommufd: HWPTs allocated with IOMMU_HWPT_ALLOC (all with DIRTY_TRACKING here), by id. */
  readonly hwpts = new Map<number, { ioas: number; tracking: boolean }>();
  /** iommufd: IOVAs of 4 KiB pages a device wrote whose IOPTE dirty bit is set. */
  readonly written = new Set<bigint>();
  /** Devices whose driver implements VFIO migration (VFIO_DEVICE_FEATURE_MIGRATION: STOP_COPY). */
  readonly migratable = new Set<string>();

  /** A device writes the page at `iova` (iommufd sets the IOPTE's dirty bit where tracking is on). */
  dmaWrite(iova: bigint): void {
    if ([...this.hwpts.values()].some((h) => h.tracking)) this.written.add(iova & ~0xfffn);
  }

  open(path: string): number {
    this.calls.push(`open ${path}`);
    if (!this.nodes.has(path) && !this.cdevs.has(path)) fail('ENOENT', 'open');
    let f: File;
    if (path === '/dev/vfio/vfio') f = { kind: 'container' };
    else if (path === '/dev/iommu') f = { kind: 'iommufd' };
    else if (path.startsWith('/dev/vfio/devices/')) f = { kind: 'cdev', bdf: this.cdevs.get(path)! };
    else f = { kind: 'group', id: path.slice('/dev/vfio/'.length), inContainer: false };
    const fd = this.nextFd++;
    this.files.set(fd, f);
    return fd;
  }

  close(fd: number): void {
    const f = this.files.get(fd);
    if (!f) fail('EBADF', 'close');
    if (f.kind === 'group' && f.inContainer) this.leave(f);
    this.files.delete(fd);
  }

  private leave(g: File & { kind: 'group' }): void {
    g.inContainer = false;
    this.containerGroups.delete(g.id);
    if (this.containerGroups.size === 0) {
      // The kernel releases the container's IOMMU, and every DMA mapping in it, with its last group.
      this.iommu = false;
      this.dma.clear();
    }
  }

  private file(fd: number, kind: File['kind'], req: number): File {
    const f = this.files.get(fd);
    if (!f || f.kind !== kind) fail('ENOTTY', NAMES.get(req) ?? String(req));
    return f;
  }

  ioctlInt(fd: number, req: number, value: number): number {
    const name = NAMES.get(req)!;
    this.calls.push(`${name}(${value})`);
    if (req === REQUEST.VFIO_GET_API_VERSION) return this.file(fd, 'container', req) && 0;
    if (req === REQUEST.VFIO_CHECK_EXTENSION) {
      this.file(fd, 'container', req);
      if (value === VFIO.VFIO_TYPE1v2_IOMMU) return 1;
      if (value === VFIO.VFIO_DMA_CC_IOMMU) return this.iommu ? 1 : 0;
      return 0;
    }
    if (req === REQUEST.VFIO_SET_IOMMU) {
      this.file(fd, 'container', req);
      if (this.containerGroups.size === 0) fail('EINVAL', name);
      if (this.iommu) fail('EBUSY', name);
      this.iommu = true;
      return 0;
    }
    if (req === REQUEST.VFIO_GROUP_SET_CONTAINER) {
      const g = this.file(fd, 'group', req) as File & { kind: 'group' };
      if (this.files.get(value)?.kind !== 'container') fail('EBADF', name);
      if (!this.viable.has(g.id)) fail('EPERM', name);
      if (g.inContainer) fail('EBUSY', name);
      g.inContainer = true;
      this.containerGroups.add(g.id);
      return 0;
    }
    if (req === REQUEST.VFIO_GROUP_UNSET_CONTAINER) {
      const g = this.file(fd, 'group', req) as File & { kind: 'group' };
      if (!g.inContainer) fail('EINVAL', name);
      if (this.stillOpen.has(g.id)) fail('EBUSY', name); // a device of the group is still open (an mmap)
      this.leave(g);
      return 0;
    }
    return fail('EPERM', 'ioctl');
  }

  ioctl(fd: number, req: number, arg: Uint8Array, data?: Uint8Array): number {
    // VFIO_BASE + 17 is VFIO_IOMMU_DIRTY_PAGES on a container, VFIO_DEVICE_FEATURE on a device.
    const name = req === REQUEST.VFIO_IOMMU_DIRTY_PAGES ? (this.files.get(fd)?.kind === 'container' ? 'VFIO_IOMMU_DIRTY_PAGES' : 'VFIO_DEVICE_FEATURE') : NAMES.get(req)!;
    const argsz = dv(arg).getUint32(0, le);
    this.calls.push(`${name}[${argsz}]`);
    if (argsz > arg.length) fail('EINVAL', name);
    switch (req) {
      case REQUEST.VFIO_GROUP_GET_STATUS: {
        const g = this.file(fd, 'group', req) as File & { kind: 'group' };
        put(arg, 'vfio_group_status', 'flags', (this.viable.has(g.id) ? VFIO.VFIO_GROUP_FLAGS_VIABLE : 0) | (g.inContainer ? VFIO.VFIO_GROUP_FLAGS_CONTAINER_SET : 0));
        return 0;
      }
      case REQUEST.VFIO_IOMMU_GET_INFO: {
        this.file(fd, 'container', req);
        if (!this.iommu) fail('EINVAL', name);
        const base = LAYOUTS.vfio_iommu_type1_info.size;
        const rangeCap = align8(LAYOUTS.vfio_iommu_type1_info_cap_iova_range.size + this.usable.length * LAYOUTS.vfio_iova_range.size);
        const availCap = align8(LAYOUTS.vfio_iommu_type1_info_dma_avail.size);
        const needed = base + rangeCap + availCap + (this.migrationCap ? LAYOUTS.vfio_iommu_type1_info_cap_migration.size : 0);
        put(arg, 'vfio_iommu_type1_info', 'flags', VFIO.VFIO_IOMMU_INFO_PGSIZES | VFIO.VFIO_IOMMU_INFO_CAPS);
        put(arg, 'vfio_iommu_type1_info', 'iova_pgsizes', 0x4020_1000n);
        if (argsz < needed) {
          put(arg, 'vfio_iommu_type1_info', 'argsz', needed);
          put(arg, 'vfio_iommu_type1_info', 'cap_offset', 0);
          return 0;
        }
        put(arg, 'vfio_iommu_type1_info', 'cap_offset', base);
        put(arg, 'vfio_info_cap_header', 'id', VFIO.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, base);
        put(arg, 'vfio_info_cap_header', 'version', 1, base);
        put(arg, 'vfio_info_cap_header', 'next', base + rangeCap, base);
        put(arg, 'vfio_iommu_type1_info_cap_iova_range', 'nr_iovas', this.usable.length, base);
        this.usable.forEach(([s, e], i) => {
          const at = base + LAYOUTS.vfio_iommu_type1_info_cap_iova_range.size + i * LAYOUTS.vfio_iova_range.size;
          put(arg, 'vfio_iova_range', 'start', s, at);
          put(arg, 'vfio_iova_range', 'end', e, at);
        });
        put(arg, 'vfio_info_cap_header', 'id', VFIO.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL, base + rangeCap);
        put(arg, 'vfio_info_cap_header', 'version', 1, base + rangeCap);
        put(arg, 'vfio_iommu_type1_info_dma_avail', 'avail', this.dmaLimit - this.dma.size, base + rangeCap);
        if (this.migrationCap) {
          const at = base + rangeCap + availCap;
          put(arg, 'vfio_info_cap_header', 'next', at, base + rangeCap);
          put(arg, 'vfio_info_cap_header', 'id', VFIO.VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION, at);
          put(arg, 'vfio_info_cap_header', 'version', 1, at);
          put(arg, 'vfio_iommu_type1_info_cap_migration', 'pgsize_bitmap', 0x4020_1000n, at);
          put(arg, 'vfio_iommu_type1_info_cap_migration', 'max_dirty_bitmap_size', 256n * BigInt(MiB), at);
        }
        return 0;
      }
      case REQUEST.VFIO_IOMMU_DIRTY_PAGES: {
        // The same number is VFIO_DEVICE_FEATURE on a device fd.
        if (this.files.get(fd)?.kind === 'device' || this.files.get(fd)?.kind === 'cdev') {
          const bdf = (this.files.get(fd) as { bdf: string }).bdf;
          const flags = get('vfio_device_feature', arg, 'flags');
          if ((flags & VFIO.VFIO_DEVICE_FEATURE_MASK) !== VFIO.VFIO_DEVICE_FEATURE_MIGRATION || !this.migratable.has(bdf)) fail('ENOTTY', 'VFIO_DEVICE_FEATURE');
          put(arg, 'vfio_device_feature_migration', 'flags', VFIO.VFIO_MIGRATION_STOP_COPY | VFIO.VFIO_MIGRATION_P2P, LAYOUTS.vfio_device_feature.size);
          return 0;
        }
        this.file(fd, 'container', req);
        if (!this.iommu) fail('EACCES', name);
        const flags = get('vfio_iommu_type1_dirty_bitmap', arg, 'flags');
        if (flags === VFIO.VFIO_IOMMU_DIRTY_PAGES_FLAG_START) this.dirtyPages = true;
        else if (flags === VFIO.VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP) this.dirtyPages = false;
        else if (flags === VFIO.VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP) {
          const g = unpack('vfio_iommu_type1_dirty_bitmap_get', arg, LAYOUTS.vfio_iommu_type1_dirty_bitmap.size);
          if (!this.dirtyPages || g.bitmap_pgsize !== 4096n || !data || BigInt(data.length) < g.bitmap_size) fail('EINVAL', name);
          const end = g.iova + g.size;
          for (const m of this.dma.values()) {
            // The range must not bisect a mapping.
            if ((m.iova < g.iova && m.iova + m.size > g.iova) || (m.iova < end && m.iova + m.size > end)) fail('EINVAL', name);
          }
          // No vendor driver pins pages: every page of every mapping in the range is reported dirty.
          for (const m of this.dma.values()) {
            if (m.iova < g.iova || m.iova + m.size > end) continue;
            for (let p = (m.iova - g.iova) / 4096n; p < (m.iova + m.size - g.iova) / 4096n; p++) data[Number(p >> 3n)]! |= 1 << Number(p & 7n);
          }
        } else fail('EINVAL', name);
        return 0;
      }
      case REQUEST.VFIO_DEVICE_GET_INFO:
        this.devFile(fd, req);
        put(arg, 'vfio_device_info', 'flags', VFIO.VFIO_DEVICE_FLAGS_PCI | VFIO.VFIO_DEVICE_FLAGS_RESET);
        put(arg, 'vfio_device_info', 'num_regions', 9);
        put(arg, 'vfio_device_info', 'num_irqs', 5);
        return 0;
      case REQUEST.VFIO_DEVICE_GET_REGION_INFO: {
        this.devFile(fd, req);
        const index = get('vfio_region_info', arg, 'index');
        const s = 'vfio_region_info';
        put(arg, s, 'offset', BigInt(index) << 40n);
        if (index === 7) {
          put(arg, s, 'flags', VFIO.VFIO_REGION_INFO_FLAG_READ | VFIO.VFIO_REGION_INFO_FLAG_WRITE);
          put(arg, s, 'size', 256);
          return 0;
        }
        // BAR0 with a sparse-mmap capability (one area): needs room beyond the struct.
        const needed = LAYOUTS.vfio_region_info.size + 16 + 16;
        put(arg, s, 'size', 4096);
        put(arg, s, 'flags', VFIO.VFIO_REGION_INFO_FLAG_READ | VFIO.VFIO_REGION_INFO_FLAG_WRITE | VFIO.VFIO_REGION_INFO_FLAG_MMAP | VFIO.VFIO_REGION_INFO_FLAG_CAPS);
        if (argsz < needed) {
          put(arg, s, 'argsz', needed);
          return 0;
        }
        put(arg, s, 'cap_offset', LAYOUTS.vfio_region_info.size);
        put(arg, 'vfio_info_cap_header', 'id', 1, LAYOUTS.vfio_region_info.size);
        return 0;
      }
      case REQUEST.VFIO_DEVICE_BIND_IOMMUFD: {
        const c = this.file(fd, 'cdev', req) as File & { kind: 'cdev' };
        if (this.files.get(get('vfio_device_bind_iommufd', arg, 'iommufd'))?.kind !== 'iommufd') fail('EBADF', name);
        if (c.devid !== undefined) fail('EBUSY', name);
        c.devid = this.nextId++;
        put(arg, 'vfio_device_bind_iommufd', 'out_devid', c.devid);
        return 0;
      }
      case REQUEST.VFIO_DEVICE_ATTACH_IOMMUFD_PT: {
        const c = this.file(fd, 'cdev', req) as File & { kind: 'cdev' };
        const pt = get('vfio_device_attach_iommufd_pt', arg, 'pt_id');
        const hwpt = this.hwpts.get(pt);
        if (c.devid === undefined || (!this.ioas.has(pt) && !hwpt)) fail('EINVAL', name);
        // An IOAS gets the kernel's auto-created domain (id 1000 + ioas here); a HWPT is used as it is.
        c.ioas = hwpt ? hwpt.ioas : pt;
        c.hwpt = hwpt ? pt : 1000 + pt;
        put(arg, 'vfio_device_attach_iommufd_pt', 'pt_id', c.hwpt);
        return 0;
      }
      case REQUEST.IOMMU_GET_HW_INFO: {
        this.file(fd, 'iommufd', req);
        const devid = get('iommu_hw_info', arg, 'dev_id');
        if (![...this.files.values()].some((f) => f.kind === 'cdev' && f.devid === devid)) fail('ENOENT', name);
        if (get('iommu_hw_info', arg, 'data_len') !== 0 || data) fail('EINVAL', name); // the client asks for no vendor data
        put(arg, 'iommu_hw_info', 'out_capabilities', this.dirtyCapable ? IOMMUFD.IOMMU_HW_CAP_DIRTY_TRACKING : 0);
        return 0;
      }
      case REQUEST.IOMMU_HWPT_ALLOC: {
        this.file(fd, 'iommufd', req);
        const ioas = get('iommu_hwpt_alloc', arg, 'pt_id');
        if (!this.ioas.has(ioas)) fail('ENOENT', name);
        // Like intel-iommu without second-level access/dirty support.
        if (get('iommu_hwpt_alloc', arg, 'flags') & IOMMUFD.IOMMU_HWPT_ALLOC_DIRTY_TRACKING && !this.dirtyCapable) fail('EOPNOTSUPP', name);
        const id = this.nextId++;
        this.hwpts.set(id, { ioas, tracking: false });
        put(arg, 'iommu_hwpt_alloc', 'out_hwpt_id', id);
        return 0;
      }
      case REQUEST.IOMMU_HWPT_SET_DIRTY_TRACKING: {
        this.file(fd, 'iommufd', req);
        const hwpt = this.hwpts.get(get('iommu_hwpt_set_dirty_tracking', arg, 'hwpt_id'));
        if (!hwpt) fail('EOPNOTSUPP', name); // an auto-created domain has no dirty ops
        const enable = (get('iommu_hwpt_set_dirty_tracking', arg, 'flags') & IOMMUFD.IOMMU_HWPT_DIRTY_TRACKING_ENABLE) !== 0;
        if (enable && !hwpt.tracking) this.written.clear(); // a clean snapshot
        hwpt.tracking = enable;
        return 0;
      }
      case REQUEST.IOMMU_HWPT_GET_DIRTY_BITMAP: {
        this.file(fd, 'iommufd', req);
        const g = unpack('iommu_hwpt_get_dirty_bitmap', arg);
        if (!this.hwpts.has(Number(g.hwpt_id))) fail('EOPNOTSUPP', name);
        if (g.page_size !== 4096n || !data || BigInt(data.length) * 8n < g.length / 4096n) fail('EINVAL', name);
        for (const iova of [...this.written]) {
          if (iova < g.iova || iova >= g.iova + g.length) continue;
          const p = (iova - g.iova) / 4096n;
          data[Number(p >> 3n)]! |= 1 << Number(p & 7n);
          this.written.delete(iova); // read and cleared
        }
        return 0;
      }
      case REQUEST.VFIO_DEVICE_DETACH_IOMMUFD_PT: {
        const c = this.file(fd, 'cdev', req) as File & { kind: 'cdev' };
        if (c.ioas === undefined) fail('EINVAL', name);
        c.ioas = undefined;
        return 0;
      }
      case REQUEST.IOMMU_IOAS_ALLOC: {
        this.file(fd, 'iommufd', req);
        const id = this.nextId++;
        this.ioas.set(id, new Map());
        put(arg, 'iommu_ioas_alloc', 'out_ioas_id', id);
        return 0;
      }
      case REQUEST.IOMMU_DESTROY: {
        this.file(fd, 'iommufd', req);
        const id = get('iommu_destroy', arg, 'id');
        if (this.hwpts.has(id)) {
          if ([...this.files.values()].some((f) => f.kind === 'cdev' && f.hwpt === id && f.ioas !== undefined)) fail('EBUSY', name);
          this.hwpts.delete(id);
          return 0;
        }
        if ([...this.hwpts.values()].some((h) => h.ioas === id)) fail('EBUSY', name);
        if (!this.ioas.has(id)) fail('ENOENT', name);
        if ([...this.files.values()].some((f) => f.kind === 'cdev' && f.ioas === id)) fail('EBUSY', name);
        this.ioas.delete(id);
        return 0;
      }
      case REQUEST.IOMMU_IOAS_IOVA_RANGES: {
        this.file(fd, 'iommufd', req);
        if (!this.ioas.has(get('iommu_ioas_iova_ranges', arg, 'ioas_id'))) fail('ENOENT', name);
        const room = get('iommu_ioas_iova_ranges', arg, 'num_iovas');
        put(arg, 'iommu_ioas_iova_ranges', 'num_iovas', this.usable.length);
        put(arg, 'iommu_ioas_iova_ranges', 'out_iova_alignment', 4096);
        if (room < this.usable.length) fail('EMSGSIZE', name);
        this.usable.forEach(([s, e], i) => {
          put(data!, 'iommu_iova_range', 'start', s, i * 16);
          put(data!, 'iommu_iova_range', 'last', e, i * 16);
        });
        return 0;
      }
    }
    return fail('EPERM', 'ioctl');
  }

  async ioctlAsync(fd: number, req: number, arg: Uint8Array): Promise<number> {
    await new Promise((r) => setImmediate(r)); // a worker thread, as far as the caller can tell
    const name = NAMES.get(req)!;
    this.calls.push(name);
    const check = (table: Map<bigint, Mapping>, iova: bigint, size: bigint) => {
      if (!this.usable.some(([s, e]) => iova >= s && iova + size - 1n <= e)) fail('EINVAL', name);
      for (const m of table.values()) if (iova < m.iova + m.size && m.iova < iova + size) fail('EEXIST', name);
    };
    const unmap = (table: Map<bigint, Mapping>, iova: bigint, size: bigint) => {
      let done = 0n;
      for (const m of [...table.values()]) {
        const inside = m.iova >= iova && m.iova + m.size <= iova + size;
        if (inside) {
          table.delete(m.iova);
          done += m.size;
        } else if (m.iova < iova + size && iova < m.iova + m.size) fail('EINVAL', name); // would bisect
      }
      return done;
    };
    switch (req) {
      case REQUEST.VFIO_IOMMU_MAP_DMA: {
        this.file(fd, 'container', req);
        if (!this.iommu) fail('EINVAL', name);
        const m = unpack('vfio_iommu_type1_dma_map', arg);
        if (!(Number(m.flags) & VFIO.VFIO_DMA_MAP_FLAG_READ) || m.vaddr === 0n) fail('EINVAL', name);
        check(this.dma, m.iova, m.size);
        if (this.dma.size >= this.dmaLimit) fail('ENOSPC', name);
        this.dma.set(m.iova, { iova: m.iova, size: m.size, vaddr: m.vaddr, flags: Number(m.flags) });
        return 0;
      }
      case REQUEST.VFIO_IOMMU_UNMAP_DMA: {
        this.file(fd, 'container', req);
        const u = unpack('vfio_iommu_type1_dma_unmap', arg);
        put(arg, 'vfio_iommu_type1_dma_unmap', 'size', unmap(this.dma, u.iova, u.size));
        return 0;
      }
      case REQUEST.IOMMU_IOAS_MAP: {
        this.file(fd, 'iommufd', req);
        const m = unpack('iommu_ioas_map', arg);
        const table = this.ioas.get(Number(m.ioas_id));
        if (!table || !(Number(m.flags) & IOMMUFD.IOMMU_IOAS_MAP_FIXED_IOVA)) fail('EINVAL', name);
        check(table, m.iova, m.length);
        table.set(m.iova, { iova: m.iova, size: m.length, vaddr: m.user_va, flags: Number(m.flags) });
        return 0;
      }
      case REQUEST.IOMMU_IOAS_UNMAP: {
        this.file(fd, 'iommufd', req);
        const u = unpack('iommu_ioas_unmap', arg);
        const table = this.ioas.get(Number(u.ioas_id));
        if (!table) fail('ENOENT', name);
        put(arg, 'iommu_ioas_unmap', 'length', unmap(table, u.iova, u.length));
        return 0;
      }
    }
    return fail('EINVAL', name);
  }

  groupGetDeviceFd(groupFd: number, bdf: string): number {
    this.calls.push(`VFIO_GROUP_GET_DEVICE_FD(${bdf})`);
    const g = this.file(groupFd, 'group', REQUEST.VFIO_GROUP_GET_DEVICE_FD) as File & { kind: 'group' };
    if (!this.iommu || !g.inContainer) fail('EINVAL', 'VFIO_GROUP_GET_DEVICE_FD');
    if (this.groupOf[bdf] !== g.id) fail('EINVAL', 'VFIO_GROUP_GET_DEVICE_FD');
    const fd = this.nextFd++;
    this.files.set(fd, { kind: 'device', bdf });
    return fd;
  }

  private devFile(fd: number, req: number): void {
    const f = this.files.get(fd);
    if (f?.kind !== 'device' && f?.kind !== 'cdev') fail('ENOTTY', NAMES.get(req)!);
  }

  private readonly cdevs = new Map(Object.keys(this.groupOf).map((bdf, i) => [`/dev/vfio/devices/vfio${i}`, bdf]));

  exists(path: string): boolean {
    if (this.nodes.has(path) || this.cdevs.has(path)) return true;
    const m = /^\/sys\/bus\/pci\/devices\/([^/]+)(\/vfio-dev)?$/.exec(path);
    return m !== null && m[1]! in this.groupOf;
  }

  readlink(path: string): string {
    const m = /^\/sys\/bus\/pci\/devices\/([^/]+)\/iommu_group$/.exec(path);
    const group = m ? this.groupOf[m[1]!] : undefined;
    if (!group) fail('ENOENT', 'readlink');
    return `../../../kernel/iommu_groups/${group}`;
  }

  /** Groups whose devices stay open in the kernel after their fd is closed (mapped BARs), and mapped files. */
  readonly stillOpen = new Set<string>();
  readonly mapped = new Set<string>();

  mapsFile(path: string): boolean {
    return this.mapped.has(path);
  }

  readdir(path: string): string[] {
    const m = /^\/sys\/bus\/pci\/devices\/([^/]+)\/vfio-dev$/.exec(path);
    const entry = [...this.cdevs].find(([, bdf]) => bdf === m?.[1]);
    if (!entry) fail('ENOENT', 'readdir');
    return [entry[0].slice('/dev/vfio/devices/'.length)];
  }

  openFds(): File['kind'][] {
    return [...this.files.values()].map((f) => f.kind);
  }
}

// --- harness ---------------------------------------------------------------------------------------

const cleanups: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0)) await c();
});

function harness(backend: Type1Backend | IommufdBackend, chunk = 4 * MiB, opts: VfioApplierOptions = {}) {
  const domain = new Domain(backend, { chunkBytes: chunk });
  const applier = new VfioApplier(domain, opts);
  const backings = new Map<number, LocalBacking>();
  const fds: number[] = [];
  cleanups.push(async () => {
    await applier.close();
    for (const fd of fds) native.close(fd);
  });
  let id = 1;
  return {
    domain,
    applier,
    backings,
    region(name: string, gpa: number, size: number, readonly = false, logDirty = false): ViewRegion {
      const fd = createSealedMemfd(name, size);
      fds.push(fd);
      const st = native.fstat(fd);
      const n = id++;
      backings.set(n, { id: n, name, size, fd, dev: st.dev, ino: st.ino });
      const r: Region = { id: n, name, gpa, size, backing: n, offset: 0, readonly, logDirty };
      return toView(r, backings);
    },
    /** Turns a region's logging on or off (a metadata update); returns the region as it is now. */
    async log(r: ViewRegion, logDirty: boolean): Promise<ViewRegion> {
      const after = toView({ ...r, logDirty }, backings);
      await applier.apply(change({ updated: [{ before: r, after }] }), backings, ctx);
      return after;
    },
    add(...added: ViewRegion[]) {
      return applier.apply(change({ added }), backings, ctx);
    },
    remove(...removed: ViewRegion[]) {
      return applier.apply(change({ removed }), backings, ctx);
    },
    address(name: string): number {
      return applier.memory.regions().find((m) => m.region.name === name)!.address;
    },
  };
}
const ctx: ApplyContext = { signal: new AbortController().signal, cancelled: () => false };
const change = (c: Partial<Change>): Change => ({ generation: 1, cause: 'txn', removed: [], updated: [], added: [], ...c });
async function error(p: Promise<unknown> | (() => unknown)) {
  const e = await (typeof p === 'function' ? Promise.resolve().then(p) : p).then(
    () => undefined,
    (x: unknown) => x,
  );
  if (!isMmbError(e)) throw new Error(`expected an MmbError, got ${String(e)}`);
  return e;
}

describe('type1 against a simulated kernel', () => {
  it('opens the container and checks the API and the type1v2 extension', () => {
    const k = new SimKernel();
    const b = Type1Backend.open(k);
    cleanups.push(() => b.close());
    expect(k.calls).toEqual(['open /dev/vfio/vfio', 'VFIO_GET_API_VERSION(0)', `VFIO_CHECK_EXTENSION(${VFIO.VFIO_TYPE1v2_IOMMU})`]);
  });

  it('one container for all devices: groups join it, SET_IOMMU once, and the memory is mapped once', async () => {
    const k = new SimKernel();
    const t = harness(Type1Backend.open(k));
    await t.applier.attachDevice('0000:00:01.0');
    expect(k.calls.slice(3)).toEqual([
      'open /dev/vfio/5',
      'VFIO_GROUP_GET_STATUS[8]',
      `VFIO_GROUP_SET_CONTAINER(${[...k.files].find(([, f]) => f.kind === 'container')![0]})`,
      `VFIO_SET_IOMMU(${VFIO.VFIO_TYPE1v2_IOMMU})`,
      'VFIO_GROUP_GET_DEVICE_FD(0000:00:01.0)',
      // The new domain's limits, before mapping what is already there into it.
      `VFIO_IOMMU_GET_INFO[${LAYOUTS.vfio_iommu_type1_info.size}]`,
      'VFIO_IOMMU_GET_INFO[88]',
      `VFIO_CHECK_EXTENSION(${VFIO.VFIO_DMA_CC_IOMMU})`,
    ]);
    k.calls.length = 0;
    await t.applier.attachDevice('0000:00:02.0'); // same group: no new group fd
    await t.applier.attachDevice('0000:00:03.0'); // another group joins the container
    expect(k.calls.filter((c) => c.startsWith('VFIO_SET_IOMMU'))).toEqual([]);
    expect(k.calls.filter((c) => c.startsWith('open'))).toEqual(['open /dev/vfio/6']);
    expect(k.containerGroups).toEqual(new Set(['5', '6']));

    const ram = t.region('ram', 0x1_0000_0000, 16 * MiB);
    const rom = t.region('rom', 0x2_0000_0000, 4 * MiB, true);
    await t.add(ram, rom);
    const maps = [...k.dma.values()].sort((a, b) => Number(a.iova - b.iova));
    expect(maps).toHaveLength(5); // 16 MiB in 4 MiB pieces, once for three devices; 4 MiB read-only
    for (let i = 0; i < 4; i++) {
      expect(maps[i]).toEqual({ iova: BigInt(0x1_0000_0000 + i * 4 * MiB), size: BigInt(4 * MiB), vaddr: BigInt(t.address('ram') + i * 4 * MiB), flags: 3 });
    }
    expect(maps[4]).toMatchObject({ iova: 0x2_0000_0000n, vaddr: BigInt(t.address('rom')), flags: VFIO.VFIO_DMA_MAP_FLAG_READ });
    expect(t.domain.pinnedBytes).toBe(20 * MiB);
  });

  it('GET_INFO grows argsz and reads IOVA ranges and DMA_AVAIL; reserved = the complement, clipped to 52 bits', async () => {
    const k = new SimKernel();
    const t = harness(Type1Backend.open(k));
    await t.applier.attachDevice('0000:00:01.0');
    const l = t.domain.limits();
    const infos = k.calls.filter((c) => c.startsWith('VFIO_IOMMU_GET_INFO'));
    // First with argsz = sizeof; the kernel asks for more; from then on with that much room at once.
    expect(infos[0]).toBe(`VFIO_IOMMU_GET_INFO[${LAYOUTS.vfio_iommu_type1_info.size}]`);
    const grown = Number(/\[(\d+)\]/.exec(infos[1]!)![1]);
    expect(grown).toBeGreaterThan(LAYOUTS.vfio_iommu_type1_info.size);
    expect(infos.slice(1)).toEqual(infos.slice(1).map(() => `VFIO_IOMMU_GET_INFO[${grown}]`));
    expect(l.reserved).toEqual([
      { start: 0xfee0_0000, last: 0xfeef_ffff },
      { start: 0x80_0000_0000, last: 2 ** 52 - 1 },
    ]);
    expect(l.dmaAvailable).toBe(65_535);
    expect(l.coherent).toBe(true);
    // A region in the MSI window is refused before any MAP_DMA.
    const msi = t.region('msi', 0xfee0_0000, 4 * MiB);
    expect((await error(t.add(msi))).code).toBe('MMB_ERR_RESERVED_RANGE');
    expect(k.dma.size).toBe(0);
  });

  it('the DMA budget (dma_entry_limit) is checked before mapping: nothing half-mapped', async () => {
    const k = new SimKernel();
    k.dmaLimit = 6;
    const t = harness(Type1Backend.open(k));
    await t.applier.attachDevice('0000:00:01.0');
    await t.add(t.region('a', 0x1000_0000, 16 * MiB));
    expect(t.domain.limits().dmaAvailable).toBe(2);
    const e = await error(t.add(t.region('b', 0x2000_0000, 16 * MiB)));
    expect(e.code).toBe('MMB_ERR_CLIENT_LIMIT');
    expect(k.dma.size).toBe(4);
    expect(t.applier.memory.regions()).toHaveLength(1);
  });

  it('the container loses its IOMMU with its last group; a new first device maps everything again', async () => {
    const k = new SimKernel();
    const t = harness(Type1Backend.open(k));
    await t.applier.attachDevice('0000:00:01.0');
    await t.applier.attachDevice('0000:00:03.0');
    await t.add(t.region('ram', 0x1_0000_0000, 8 * MiB));
    await t.applier.detachDevice('0000:00:01.0');
    expect(k.dma.size).toBe(2); // another group still holds the domain
    k.calls.length = 0;
    await t.applier.detachDevice('0000:00:03.0');
    expect(k.calls).toContain('VFIO_IOMMU_UNMAP_DMA');
    expect(k.iommu).toBe(false);
    expect(k.dma.size).toBe(0);
    expect(t.domain).toMatchObject({ active: false, pinnedBytes: 0 });
    expect(k.openFds()).toEqual(['container']);

    k.calls.length = 0;
    await t.applier.attachDevice('0000:00:03.0');
    expect(k.calls).toContain(`VFIO_SET_IOMMU(${VFIO.VFIO_TYPE1v2_IOMMU})`);
    expect([...k.dma.values()].map((m) => m.vaddr)).toEqual([BigInt(t.address('ram')), BigInt(t.address('ram') + 4 * MiB)]);
    expect(t.domain.pinnedBytes).toBe(8 * MiB);
  });

  it('a device still open in the kernel at detach (its BAR still mmapped): detached here, and the caller is told (EBUSY)', async () => {
    const k = new SimKernel();
    const t = harness(Type1Backend.open(k));
    await t.applier.attachDevice('0000:00:03.0');
    await t.add(t.region('ram', 0x1_0000_0000, 8 * MiB));
    k.stillOpen.add('6'); // the group of 0000:00:03.0: the real kernel answers UNSET_CONTAINER with EBUSY then
    const e = await error(t.applier.detachDevice('0000:00:03.0'));
    expect(e).toMatchObject({ code: 'MMB_ERR_IOMMU', errno: 'EBUSY' });
    expect(e.message).toMatch(/still holds it open .*IOMMU group 6.*unmap/);
    // Everything was unmapped before the device went, and it is gone on our side.
    expect(k.dma.size).toBe(0);
    expect(t.domain).toMatchObject({ active: false, pinnedBytes: 0, devices: [] });
  });

  it('devices: not viable, no group node, unknown: MMB_ERR_NO_DEVICE and nothing left in the container', async () => {
    const k = new SimKernel();
    const t = harness(Type1Backend.open(k));
    for (const bdf of ['0000:00:04.0', '0000:00:09.0']) expect((await error(t.applier.attachDevice(bdf))).code).toBe('MMB_ERR_NO_DEVICE');
    k.nodes.delete('/dev/vfio/6');
    expect((await error(t.applier.attachDevice('0000:00:03.0'))).message).toContain('/dev/vfio/6');
    expect((await error(t.applier.attachDevice('00:01.0'))).code).toBe('MMB_ERR_INVALID_ARG');
    expect(k.containerGroups.size).toBe(0);
    expect(k.openFds()).toEqual(['container']);
  });

  it('device fd helpers: device info and region info (growing argsz for the capability chain)', async () => {
    const k = new SimKernel();
    const b = Type1Backend.open(k);
    cleanups.push(() => b.close());
    b.attach('0000:00:01.0');
    const dev = b.device('0000:00:01.0')!;
    expect(dev.fd).toBeGreaterThan(0);
    expect(dev.info()).toEqual({ flags: 3, numRegions: 9, numIrqs: 5, pci: true, resettable: true });
    k.calls.length = 0;
    const bar0 = dev.regionInfo(0);
    expect(k.calls).toEqual([`VFIO_DEVICE_GET_REGION_INFO[${LAYOUTS.vfio_region_info.size}]`, `VFIO_DEVICE_GET_REGION_INFO[${LAYOUTS.vfio_region_info.size + 32}]`]);
    expect(bar0).toMatchObject({ index: 0, size: 4096, offset: 0, mmappable: true, caps: [{ id: 1, version: 0, offset: 32 }] });
    expect(dev.regionInfo(7)).toMatchObject({ index: 7, size: 256, offset: 7 * 2 ** 40, mmappable: false });
  });

  it('without /dev/vfio/vfio: MMB_ERR_UNSUPPORTED naming it', async () => {
    const k = new SimKernel();
    k.nodes.delete('/dev/vfio/vfio');
    const e = await error(() => Type1Backend.open(k));
    expect(e.code).toBe('MMB_ERR_UNSUPPORTED');
    expect(e.message).toContain('/dev/vfio/vfio');
  });
});

describe('iommufd against a simulated kernel', () => {
  it('one IOAS for all devices: BIND, ALLOC once, ATTACH; IOVA ranges after EMSGSIZE; IOAS_MAP with FIXED_IOVA', async () => {
    const k = new SimKernel();
    const t = harness(IommufdBackend.open(k));
    await t.applier.attachDevice('0000:00:01.0');
    await t.applier.attachDevice('0000:00:03.0');
    expect(k.calls.filter((c) => !c.startsWith('IOMMU_IOAS_IOVA_RANGES'))).toEqual([
      'open /dev/iommu',
      'open /dev/vfio/devices/vfio0',
      `VFIO_DEVICE_BIND_IOMMUFD[${LAYOUTS.vfio_device_bind_iommufd.size}]`,
      // Can this device's IOMMU track dirty pages? (Not in this simulation: the IOAS's own domain.)
      `IOMMU_GET_HW_INFO[${LAYOUTS.iommu_hw_info.size}]`,
      `IOMMU_IOAS_ALLOC[${LAYOUTS.iommu_ioas_alloc.size}]`,
      `VFIO_DEVICE_ATTACH_IOMMUFD_PT[${LAYOUTS.vfio_device_attach_iommufd_pt.size}]`,
      'open /dev/vfio/devices/vfio2',
      `VFIO_DEVICE_BIND_IOMMUFD[${LAYOUTS.vfio_device_bind_iommufd.size}]`,
      `IOMMU_GET_HW_INFO[${LAYOUTS.iommu_hw_info.size}]`,
      `VFIO_DEVICE_ATTACH_IOMMUFD_PT[${LAYOUTS.vfio_device_attach_iommufd_pt.size}]`,
    ]);
    expect(k.ioas.size).toBe(1);
    const b = t.domain.backend as IommufdBackend;
    // The first query (at attach) asked how many ranges there are (EMSGSIZE), then read them.
    expect(k.calls.filter((c) => c.startsWith('IOMMU_IOAS_IOVA_RANGES')).slice(0, 2)).toEqual([`IOMMU_IOAS_IOVA_RANGES[32]`, `IOMMU_IOAS_IOVA_RANGES[32]`]);
    expect(b.ranges()).toEqual({ ranges: k.usable.map(([start, last]) => ({ start, last })), alignment: 4096 });
    k.calls.length = 0;
    expect(t.domain.limits().reserved).toEqual([
      { start: 0xfee0_0000, last: 0xfeef_ffff },
      { start: 0x80_0000_0000, last: 2 ** 52 - 1 },
    ]);
    expect(k.calls).toEqual([`IOMMU_IOAS_IOVA_RANGES[32]`]); // the count is remembered: no EMSGSIZE round any more
    // Should the count grow, EMSGSIZE says so and the call is made again with room for all of them.
    k.usable.push([0x100_0000_0000n, 0x1ff_ffff_ffffn]);
    k.calls.length = 0;
    expect(b.ranges().ranges).toHaveLength(3);
    expect(k.calls).toEqual([`IOMMU_IOAS_IOVA_RANGES[32]`, `IOMMU_IOAS_IOVA_RANGES[32]`]);
    k.usable.pop();

    await t.add(t.region('ram', 0x1_0000_0000, 8 * MiB));
    const table = [...k.ioas.values()][0]!;
    const flags = IOMMUFD.IOMMU_IOAS_MAP_FIXED_IOVA | IOMMUFD.IOMMU_IOAS_MAP_READABLE | IOMMUFD.IOMMU_IOAS_MAP_WRITEABLE;
    expect([...table.values()]).toEqual([
      { iova: 0x1_0000_0000n, size: BigInt(4 * MiB), vaddr: BigInt(t.address('ram')), flags },
      { iova: BigInt(0x1_0000_0000 + 4 * MiB), size: BigInt(4 * MiB), vaddr: BigInt(t.address('ram') + 4 * MiB), flags },
    ]);
    expect(b.binding('0000:00:01.0')).toMatchObject({ hwpt: 1000 + b.ioasId! });
  });

  it('the IOAS goes with the last device (unmapped, destroyed); the next first device gets a new one, mapped again', async () => {
    const k = new SimKernel();
    const t = harness(IommufdBackend.open(k));
    await t.applier.attachDevice('0000:00:01.0');
    const ram = t.region('ram', 0x1_0000_0000, 8 * MiB);
    await t.add(ram);
    await t.applier.detachDevice('0000:00:01.0');
    expect(k.ioas.size).toBe(0);
    expect(k.openFds()).toEqual(['iommufd']);
    expect(t.domain.pinnedBytes).toBe(0);
    await t.applier.attachDevice('0000:00:02.0');
    expect([...[...k.ioas.values()][0]!.values()].map((m) => m.vaddr)).toEqual([BigInt(t.address('ram')), BigInt(t.address('ram') + 4 * MiB)]);
    await t.remove(ram);
    expect([...[...k.ioas.values()][0]!.values()]).toEqual([]);
  });

  it('a device whose cdev this process still maps at detach: detached here, and the caller is told (EBUSY)', async () => {
    const k = new SimKernel();
    const t = harness(IommufdBackend.open(k));
    await t.applier.attachDevice('0000:00:01.0');
    await t.applier.attachDevice('0000:00:02.0');
    await t.add(t.region('ram', 0x1_0000_0000, 8 * MiB));
    k.mapped.add('/dev/vfio/devices/vfio0');
    const e = await error(t.applier.detachDevice('0000:00:01.0'));
    expect(e).toMatchObject({ code: 'MMB_ERR_IOMMU', errno: 'EBUSY' });
    expect(e.message).toContain('/dev/vfio/devices/vfio0');
    expect(t.domain).toMatchObject({ active: true, devices: ['0000:00:02.0'], pinnedBytes: 8 * MiB });
    k.mapped.clear();
    await t.applier.detachDevice('0000:00:02.0');
    expect(t.domain).toMatchObject({ active: false, pinnedBytes: 0 });
  });

  it('without /dev/iommu: MMB_ERR_UNSUPPORTED naming it', async () => {
    const k = new SimKernel();
    k.nodes.delete('/dev/iommu');
    const e = await error(() => IommufdBackend.open(k));
    expect(e.code).toBe('MMB_ERR_UNSUPPORTED');
    expect(e.message).toContain('/dev/iommu');
  });
});

/** A subscriber's dirty log with one bitmap per region (as the broker would send them), and its bits. */
function testLog(regions: readonly ViewRegion[]) {
  const log = new DirtyLog();
  const infos = regions.map((r, i) => ({ bitmap: i + 1, region: r.id, gpa: r.gpa, pages: r.size / 4096 }));
  const fds = infos.map((i) => createSealedMemfd('bitmap', bitmapLayout(i.pages).size));
  const mine = fds.map((fd) => native.dup(fd));
  log.add(infos, fds);
  cleanups.push(() => {
    log.close();
    for (const fd of mine) native.close(fd);
  });
  return {
    log,
    /** Guest pages (gpa / 4096) marked in the active half since the last call, which clears them. */
    take(): number[] {
      const out: number[] = [];
      infos.forEach((info, i) => {
        const layout = bitmapLayout(info.pages);
        const m = native.mmap(mine[i]!, 0, layout.size, constants.PROT_READ | constants.PROT_WRITE, constants.MAP_SHARED);
        const half = new Uint8Array(m.buffer, layout.offset(0), layout.bytes);
        forEachBitRun(half, info.pages, (first, count) => {
          for (let p = first; p < first + count; p++) out.push(info.gpa / 4096 + p);
        });
        half.fill(0);
        native.munmap(m);
      });
      return out.sort((a, b) => a - b);
    },
  };
}
const pagesOf = (gpa: number, size: number) => Array.from({ length: size / 4096 }, (_, i) => gpa / 4096 + i);

describe('dirty tracking against a simulated kernel', () => {
  it('type1: DIRTY_PAGES starts with the first logging region, GET_BITMAP per region reports every mapped page, STOP with the last', async () => {
    const k = new SimKernel();
    k.migrationCap = true;
    let log: ReturnType<typeof testLog> | undefined;
    const t = harness(Type1Backend.open(k), 4 * MiB, { dirtyLog: () => log?.log });
    await t.applier.attachDevice('0000:00:01.0');
    let ram = t.region('ram', 0x1_0000_0000, 8 * MiB, false, true);
    const rom = t.region('rom', 0x2_0000_0000, 4 * MiB, true, true);
    const plain = t.region('plain', 0x3_0000_0000, 4 * MiB);
    log = testLog([ram, rom]);
    k.calls.length = 0;
    await t.add(ram, rom, plain);
    expect(k.calls.filter((c) => c.startsWith('VFIO_IOMMU_DIRTY_PAGES'))).toEqual(['VFIO_IOMMU_DIRTY_PAGES[8]']); // START
    expect(k.dirtyPages).toBe(true);
    expect(t.applier.dirtyTracking).toEqual({ mode: 'type1' });
    expect(reportedDirtyTracking(t.applier.dirtyTracking)).toBe('VFIO_IOMMU_DIRTY_PAGES');

    // One GET_BITMAP for the writable logging region (its two MAP_DMA pieces in one range), none for the
    // read-only or the non-logging one. Without a vendor driver type1 reports every page it maps.
    k.calls.length = 0;
    await t.applier.flushDirty(log.log);
    expect(k.calls).toEqual([`VFIO_IOMMU_DIRTY_PAGES[${LAYOUTS.vfio_iommu_type1_dirty_bitmap.size + LAYOUTS.vfio_iommu_type1_dirty_bitmap_get.size}]`]);
    expect(log.take()).toEqual(pagesOf(0x1_0000_0000, 8 * MiB));

    // A read the kernel refuses counts the whole region: never a lost bit.
    k.dirtyPages = false;
    await t.applier.flushDirty(log.log);
    expect(log.take()).toEqual(pagesOf(0x1_0000_0000, 8 * MiB));
    k.dirtyPages = true;

    // The last device goes and comes back: the container's IOMMU (and its log) was re-created, so START again.
    await t.applier.detachDevice('0000:00:01.0');
    expect(t.applier.dirtyTracking).toBeUndefined();
    log.take();
    k.dirtyPages = false;
    await t.applier.attachDevice('0000:00:02.0');
    expect(k.dirtyPages).toBe(true);

    // Logging off everywhere: STOP.
    ram = await t.log(ram, false);
    await t.log(rom, false);
    expect(k.dirtyPages).toBe(false);
    expect(t.applier.dirtyTracking).toBeUndefined();
    expect(reportedDirtyTracking(t.applier.dirtyTracking)).toBeUndefined();
  });

  it('type1 without the MIGRATION capability: no tracking, every writable page counts at every flush', async () => {
    const k = new SimKernel();
    let log: ReturnType<typeof testLog> | undefined;
    const t = harness(Type1Backend.open(k), 4 * MiB, { dirtyLog: () => log?.log });
    await t.applier.attachDevice('0000:00:01.0');
    const ram = t.region('ram', 0x1_0000_0000, 4 * MiB, false, true);
    log = testLog([ram]);
    await t.add(ram);
    expect(t.applier.dirtyTracking).toMatchObject({ mode: 'none', reason: expect.stringMatching(/no MIGRATION capability/) });
    expect(reportedDirtyTracking(t.applier.dirtyTracking)).toBe('all');
    expect(k.calls.some((c) => c.startsWith('VFIO_IOMMU_DIRTY_PAGES'))).toBe(false);
    await t.applier.flushDirty(log.log);
    expect(log.take()).toEqual(pagesOf(0x1_0000_0000, 4 * MiB));
  });

  it('iommufd on an IOMMU without dirty tracking: no DIRTY_TRACKING HWPT, SET_DIRTY_TRACKING answers EOPNOTSUPP once, every writable page counts', async () => {
    const k = new SimKernel();
    let log: ReturnType<typeof testLog> | undefined;
    const t = harness(IommufdBackend.open(k), 4 * MiB, { dirtyLog: () => log?.log });
    await t.applier.attachDevice('0000:00:01.0');
    expect(k.calls.some((c) => c.startsWith('IOMMU_HWPT_ALLOC'))).toBe(false); // the capability is missing
    const ram = t.region('ram', 0x1_0000_0000, 4 * MiB, false, true);
    log = testLog([ram]);
    k.calls.length = 0;
    await t.add(ram);
    expect(k.calls.filter((c) => c.startsWith('IOMMU_HWPT_SET_DIRTY_TRACKING'))).toEqual(['IOMMU_HWPT_SET_DIRTY_TRACKING[16]']);
    expect(t.applier.dirtyTracking).toMatchObject({ mode: 'none', reason: expect.stringMatching(/EOPNOTSUPP.*no IOMMU_HW_CAP_DIRTY_TRACKING/) });
    expect(reportedDirtyTracking(t.applier.dirtyTracking)).toBe('all');
    k.calls.length = 0;
    await t.add(t.region('more', 0x2_0000_0000, 4 * MiB, false, true));
    expect(k.calls.some((c) => c.startsWith('IOMMU_HWPT_SET_DIRTY_TRACKING'))).toBe(false); // not asked again
    await t.applier.flushDirty(log.log);
    expect(log.take()).toEqual(pagesOf(0x1_0000_0000, 4 * MiB));
  });

  it('iommufd on an IOMMU with dirty tracking: devices share a DIRTY_TRACKING HWPT, and a flush reports exactly the pages written', async () => {
    const k = new SimKernel();
    k.dirtyCapable = true;
    let log: ReturnType<typeof testLog> | undefined;
    const t = harness(IommufdBackend.open(k), 4 * MiB, { dirtyLog: () => log?.log });
    await t.applier.attachDevice('0000:00:01.0');
    await t.applier.attachDevice('0000:00:03.0');
    expect(k.calls.filter((c) => c.startsWith('IOMMU_HWPT_ALLOC'))).toEqual([`IOMMU_HWPT_ALLOC[${LAYOUTS.iommu_hwpt_alloc.size}]`]);
    const b = t.domain.backend as IommufdBackend;
    const hwpt = [...k.hwpts.keys()][0]!;
    expect([b.binding('0000:00:01.0')?.hwpt, b.binding('0000:00:03.0')?.hwpt]).toEqual([hwpt, hwpt]);

    let ram = t.region('ram', 0x1_0000_0000, 8 * MiB, false, true);
    log = testLog([ram]);
    await t.add(ram);
    expect(t.applier.dirtyTracking).toEqual({ mode: 'iommufd' });
    expect(k.hwpts.get(hwpt)?.tracking).toBe(true);
    expect(reportedDirtyTracking(t.applier.dirtyTracking)).toBe('IOMMU_HWPT_GET_DIRTY_BITMAP');
    k.dmaWrite(0x1_0000_0000n + 5n * 4096n);
    k.dmaWrite(0x1_0000_0000n + BigInt(4 * MiB) + 100n);
    await t.applier.flushDirty(log.log);
    expect(log.take()).toEqual([0x1_0000_0000 / 4096 + 5, (0x1_0000_0000 + 4 * MiB) / 4096]);
    await t.applier.flushDirty(log.log);
    expect(log.take()).toEqual([]); // read and cleared

    // Removing the region counts it whole (DMA to it stops; a read before the unmap could miss a write).
    k.dmaWrite(0x1_0000_0000n);
    ram = await t.log(ram, true);
    await t.remove(ram);
    expect(log.take()).toEqual(pagesOf(0x1_0000_0000, 8 * MiB));
    expect(k.hwpts.get(hwpt)?.tracking).toBe(false); // nothing logs any more
    await t.applier.detachDevice('0000:00:01.0');
    await t.applier.detachDevice('0000:00:03.0');
    expect(k.hwpts.size).toBe(0);
    expect(k.ioas.size).toBe(0);
  });

  it('VFIO_DEVICE_FEATURE(GET, MIGRATION): ENOTTY without a migration driver, STOP_COPY where there is one', async () => {
    const k = new SimKernel();
    k.migratable.add('0000:00:03.0');
    const t = harness(Type1Backend.open(k));
    await t.applier.attachDevice('0000:00:01.0');
    await t.applier.attachDevice('0000:00:03.0');
    expect(t.domain.backend.device('0000:00:01.0')?.migration?.()).toMatchObject({ supported: false, stopCopy: false, reason: expect.stringMatching(/ENOTTY/) });
    expect(t.domain.backend.device('0000:00:03.0')?.migration?.()).toMatchObject({ supported: true, stopCopy: true, p2p: true });
  });
});
