// A simulated kernel for the type1 and iommufd backends (this machine has no IOMMU; test/vm.test.ts runs
// them for real in a QEMU guest). It keeps the kernel's rules that matter to the client: type1 drops the
// container's IOMMU and every mapping with its last group, GET_INFO asks for more argsz when capabilities
// do not fit, IOAS_IOVA_RANGES answers EMSGSIZE with the count, mappings may not overlap or leave the usable
// ranges, dma_entry_limit, the IOMMU's page size / IOVA alignment (EINVAL off it); dirty tracking as the
// kernel does it; sysfs reserved_regions per IOMMU group. Faults can be injected (`failUnmap`). The struct
// bytes it reads and writes go through the layouts checked against the kernel headers in
// vfio-structs.test.ts.
import { LAYOUTS, REQUEST, VFIO, IOMMUFD, get, unpack, type StructName } from '../../clients/vfio/structs.js';
import type { VfioSys } from '../../clients/vfio/sys.js';

const MiB = 2 ** 20;

const NAMES = new Map(Object.entries(REQUEST).map(([k, v]) => [v, k]));
const ERRNO: Record<string, number> = {
  EACCES: 13,
  EINVAL: 22,
  EEXIST: 17,
  ENOSPC: 28,
  EBUSY: 16,
  EPERM: 1,
  ENOENT: 2,
  EMSGSIZE: 90,
  EBADF: 9,
  EOPNOTSUPP: 95,
  ENOTTY: 25,
};

/** A failure in the addon's shape: an ioctl error (native/src/ioctl_gate.h) for a request name, else a syscall's. */
const SYSCALLS = new Set(['open', 'close', 'readlink', 'readdir']);
function fail(code: string, name: string): never {
  const errno = -(ERRNO[code] ?? 5);
  if (SYSCALLS.has(name)) throw Object.assign(new Error(`${name} failed: (${code})`), { code, errno, syscall: name });
  const request = name === 'ioctl' ? 'not allowed' : name;
  throw Object.assign(new Error(`ioctl ${request} failed: (${code})`), { code, errno, syscall: 'ioctl', request });
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
export class SimKernel implements VfioSys {
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
  /** type1: GET_INFO's iova_pgsizes (MAP_DMA needs iova, size and vaddr on the smallest). */
  pageSizes = 0x4020_1000n;
  /** iommufd: IOAS_IOVA_RANGES' out_iova_alignment (IOAS_MAP needs iova, length and user_va on it). */
  iovaAlignment = 4096;
  /** sysfs reserved_regions of each IOMMU group (drivers/iommu/iommu.c's format); none: ENOENT. */
  reservedRegions: Record<string, string> = {
    '5': '0x00000000fee00000 0x00000000feefffff msi\n',
    '6': '0x00000000fee00000 0x00000000feefffff msi\n0x000000007b800000 0x000000007f7fffff direct-relaxable\n',
  };
  /** Fault injection: the next UNMAP_DMA / IOAS_UNMAP of an IOVA in this set fails with EINVAL, mapping left. */
  readonly failUnmap = new Set<bigint>();
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
    const name =
      req === REQUEST.VFIO_IOMMU_DIRTY_PAGES ? (this.files.get(fd)?.kind === 'container' ? 'VFIO_IOMMU_DIRTY_PAGES' : 'VFIO_DEVICE_FEATURE') : NAMES.get(req)!;
    const argsz = dv(arg).getUint32(0, le);
    this.calls.push(`${name}[${argsz}]`);
    if (argsz > arg.length) fail('EINVAL', name);
    switch (req) {
      case REQUEST.VFIO_GROUP_GET_STATUS: {
        const g = this.file(fd, 'group', req) as File & { kind: 'group' };
        put(
          arg,
          'vfio_group_status',
          'flags',
          (this.viable.has(g.id) ? VFIO.VFIO_GROUP_FLAGS_VIABLE : 0) | (g.inContainer ? VFIO.VFIO_GROUP_FLAGS_CONTAINER_SET : 0),
        );
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
        put(arg, 'vfio_iommu_type1_info', 'iova_pgsizes', this.pageSizes);
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
          if ((flags & VFIO.VFIO_DEVICE_FEATURE_MASK) !== VFIO.VFIO_DEVICE_FEATURE_MIGRATION || !this.migratable.has(bdf))
            fail('ENOTTY', 'VFIO_DEVICE_FEATURE');
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
        put(
          arg,
          s,
          'flags',
          VFIO.VFIO_REGION_INFO_FLAG_READ | VFIO.VFIO_REGION_INFO_FLAG_WRITE | VFIO.VFIO_REGION_INFO_FLAG_MMAP | VFIO.VFIO_REGION_INFO_FLAG_CAPS,
        );
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
        put(arg, 'iommu_ioas_iova_ranges', 'out_iova_alignment', this.iovaAlignment);
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
      if (this.failUnmap.delete(iova)) fail('EINVAL', name);
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
        const pg = this.pageSizes & -this.pageSizes; // vfio_dma_do_map: (size | iova | vaddr) & (pgsize - 1)
        if ((m.size | m.iova | m.vaddr) & (pg - 1n)) fail('EINVAL', name);
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
        const a = BigInt(this.iovaAlignment); // iopt_check_iova, and the domain's page size for length and user_va
        if ((m.iova | m.length | m.user_va) % a !== 0n) fail('EINVAL', name);
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

  readFile(path: string): string {
    this.calls.push(`read ${path}`);
    const m = /^\/sys\/bus\/pci\/devices\/([^/]+)\/iommu_group\/reserved_regions$/.exec(path);
    const text = m ? this.reservedRegions[this.groupOf[m[1]!] ?? ''] : undefined;
    if (text === undefined) fail('ENOENT', 'open');
    return text;
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
