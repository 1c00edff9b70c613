// The type1 and iommufd backends' logic, driven against a simulated kernel (test/helpers/vfio-sim.ts;
// this machine has no IOMMU, test/vm.test.ts runs them for real in a QEMU guest): call sequences, the DMA
// budget, the IOMMU's page size and IOVA alignment, a failed unmap; and dirty tracking as the kernel does
// it: type1 reports every page of every mapping a GET_BITMAP range covers (no vendor driver pins pages) and
// refuses a range that bisects a mapping; iommufd tracks only on a HWPT allocated with DIRTY_TRACKING on an
// IOMMU that has the capability, answers EOPNOTSUPP otherwise, and reports exactly the IOPTEs written.
import { afterEach, describe, expect, it } from 'vitest';
import { createSealedMemfd } from '../clients/memfd.js';
import { toView, type ApplyContext, type Change, type LocalBacking, type ViewRegion } from '../clients/view.js';
import { DirtyLog } from '../clients/dirty.js';
import { VfioApplier, type VfioApplierOptions } from '../clients/vfio/applier.js';
import { reportedDirtyTracking } from '../clients/vfio/subscriber.js';
import { Domain } from '../clients/vfio/domain.js';
import { IommufdBackend } from '../clients/vfio/iommufd.js';
import { IOMMUFD, LAYOUTS, VFIO } from '../clients/vfio/structs.js';
import { Type1Backend } from '../clients/vfio/type1.js';
import { constants, native } from '../native/index.js';
import { asGpa, asOffset, bitmapLayout, toInclusive, forEachBitRun, isMmbError, type Region } from '../protocol/index.js';
import { SimKernel } from './helpers/vfio-sim.js';

const MiB = 2 ** 20;

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
      const r: Region = { id: n, name, gpa: asGpa(gpa), size, backing: n, offset: asOffset(0), readonly, logDirty };
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
    expect(l.reserved?.map(toInclusive)).toEqual([
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
    expect(k.calls).toEqual([
      `VFIO_DEVICE_GET_REGION_INFO[${LAYOUTS.vfio_region_info.size}]`,
      `VFIO_DEVICE_GET_REGION_INFO[${LAYOUTS.vfio_region_info.size + 32}]`,
    ]);
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
    expect(t.domain.limits().reserved.map(toInclusive)).toEqual([
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
    expect(t.domain.backend.device('0000:00:01.0')?.migration?.()).toMatchObject({
      supported: false,
      stopCopy: false,
      reason: expect.stringMatching(/ENOTTY/),
    });
    expect(t.domain.backend.device('0000:00:03.0')?.migration?.()).toMatchObject({ supported: true, stopCopy: true, p2p: true });
  });
});
