// Failure paths that must release what they took: DirtyLog.add when one bitmap cannot be mapped; and
// DirtyLog.mark's lookup of the bitmaps a range touches; SpaceDestination with a region over 4 GiB.
import fs from 'node:fs';
import { afterEach, describe, expect, it } from 'vitest';
import { CHUNK_BYTES, DirtyLog, SpaceDestination } from '../clients/index.js';
import { constants, native, type Mapping } from '../native/index.js';
import { DIRTY_PAGE_SIZE, asGpa, bitmapLayout, forEachBitRun, type BitmapInfo } from '../protocol/index.js';
import { embeddedBroker, runCleanups } from './helpers/embedded.js';
import { fdCount } from '../testkit/procfs.js';

const isOpen = (fd: number) => fs.existsSync(`/proc/self/fd/${fd}`);

/** A bitmap memfd for `info`; returns the fd to hand over and our own mapping of it, to look at the bits. */
function bitmapFd(info: BitmapInfo): { fd: number; view: Mapping } {
  const size = bitmapLayout(info.pages).size;
  const fd = native.memfdCreate(`bm${info.bitmap}`, constants.MFD_CLOEXEC);
  native.ftruncate(fd, size);
  const view = native.mmap(fd, 0, size, constants.PROT_READ | constants.PROT_WRITE, constants.MAP_SHARED);
  return { fd, view };
}

/** Pages set in half `h` of a bitmap, as [first, count] runs. */
function runs(view: Mapping, pages: number, h = 0): [number, number][] {
  const l = bitmapLayout(pages);
  const out: [number, number][] = [];
  forEachBitRun(new Uint8Array(view.buffer, l.offset(h), l.bytes), pages, (first, count) => out.push([first, count]));
  return out;
}

const views: Mapping[] = [];
afterEach(async () => {
  for (const v of views.splice(0)) native.munmap(v);
  await runCleanups();
});

describe('DirtyLog.add', () => {
  it('closes every remaining fd when one bitmap cannot be mapped, and keeps the ones before it', () => {
    const before = fdCount();
    const log = new DirtyLog();
    const a: BitmapInfo = { bitmap: 1, region: 1, gpa: asGpa(0), pages: 16 };
    const bad: BitmapInfo = { bitmap: 2, region: 2, gpa: asGpa(16 * DIRTY_PAGE_SIZE), pages: 16 };
    const c: BitmapInfo = { bitmap: 3, region: 3, gpa: asGpa(32 * DIRTY_PAGE_SIZE), pages: 16 };
    const ma = bitmapFd(a);
    const mc = bitmapFd(c);
    views.push(ma.view, mc.view);
    const dir = fs.openSync('/', 'r'); // a directory: mmap fails (ENODEV)
    expect(() => log.add([a, bad, c], [ma.fd, dir, mc.fd])).toThrow();
    expect(isOpen(dir)).toBe(false);
    expect(isOpen(mc.fd)).toBe(false);
    expect(isOpen(ma.fd)).toBe(true);
    // The bitmap added before the failure is in use: marks reach it.
    log.mark(2 * DIRTY_PAGE_SIZE, 3 * DIRTY_PAGE_SIZE);
    expect(runs(ma.view, a.pages)).toEqual([[2, 3]]);
    log.close();
    expect(isOpen(ma.fd)).toBe(false);
    for (const v of views.splice(0)) native.munmap(v);
    expect(fdCount()).toBe(before);
  });
});

describe('DirtyLog.mark', () => {
  it('marks exactly the pages of every bitmap a range touches, in the active half', async () => {
    const log = new DirtyLog();
    // Out of order, with a gap, and one large bitmap spanning small ones' neighbourhood.
    const infos: BitmapInfo[] = [
      { bitmap: 5, region: 5, gpa: asGpa(1000 * DIRTY_PAGE_SIZE), pages: 8 },
      { bitmap: 1, region: 1, gpa: asGpa(0), pages: 100 },
      { bitmap: 2, region: 2, gpa: asGpa(100 * DIRTY_PAGE_SIZE), pages: 10 },
      { bitmap: 3, region: 3, gpa: asGpa(200 * DIRTY_PAGE_SIZE), pages: 64 },
    ];
    const maps = infos.map(bitmapFd);
    views.push(...maps.map((m) => m.view));
    log.add(
      infos,
      maps.map((m) => m.fd),
    );
    const [m5, m1, m2, m3] = maps.map((m) => m.view) as [Mapping, Mapping, Mapping, Mapping];

    log.mark(95 * DIRTY_PAGE_SIZE + 17, 10 * DIRTY_PAGE_SIZE); // pages 95..105: end of 1, start of 2
    log.mark(150 * DIRTY_PAGE_SIZE, 10 * DIRTY_PAGE_SIZE); // the gap: nothing
    log.mark(263 * DIRTY_PAGE_SIZE, 1); // last page of 3
    log.mark(5000 * DIRTY_PAGE_SIZE, DIRTY_PAGE_SIZE); // past everything
    expect(runs(m1, 100)).toEqual([[95, 5]]);
    expect(runs(m2, 10)).toEqual([[0, 6]]);
    expect(runs(m3, 64)).toEqual([[63, 1]]);
    expect(runs(m5, 8)).toEqual([]);

    // The broker flips bitmap 3 to half 1: marks go there, and to half 0 while flushing.
    new DataView(m3.buffer, 0, 8).setBigUint64(0, 1n, true);
    log.mark(200 * DIRTY_PAGE_SIZE, 2 * DIRTY_PAGE_SIZE);
    expect(runs(m3, 64, 1)).toEqual([[0, 2]]);
    expect(runs(m3, 64, 0)).toEqual([[63, 1]]);
    await log.flush(() => log.mark(210 * DIRTY_PAGE_SIZE, DIRTY_PAGE_SIZE));
    expect(runs(m3, 64, 0)).toEqual([
      [10, 1],
      [63, 1],
    ]);

    // markBits: a bitmap not matching a region exactly goes through the runs.
    const bits = new Uint8Array(2);
    bits[0] = 0b1000_0001;
    bits[1] = 0b0000_0001;
    log.markBits(1000 * DIRTY_PAGE_SIZE - 2 * DIRTY_PAGE_SIZE, bits, 10); // pages 998, 1005, 1006
    expect(runs(m5, 8)).toEqual([[5, 2]]);
    log.close();
  });
});

describe('SpaceDestination', () => {
  it('maps a region over 4 GiB in chunks and writes and reads across chunk boundaries', async () => {
    const before = fdCount();
    const broker = embeddedBroker({ spaces: ['vm0', 'dst'] });
    const dest = new SpaceDestination(broker, 'dst');
    const GiB = 2 ** 30;
    const big = { id: 1, name: 'ram', gpa: asGpa(0x1_0000_0000), size: 5 * GiB, readonly: false };
    const read = (gpa: number, n: number) => {
      const out = Buffer.alloc(n);
      dest.image().read(big, gpa - big.gpa, out);
      return [...out];
    };
    try {
      await dest.open();
      await dest.setMap({ round: 0, phase: 'full', generation: 0, regions: [big] });
      const across = big.gpa + 4 * CHUNK_BYTES - 3;
      const data = Uint8Array.from([1, 2, 3, 4, 5, 6, 7]);
      dest.write(across, data);
      expect(read(across, data.length)).toEqual([...data]);
      const tail = big.gpa + big.size - 2;
      dest.write(tail, Uint8Array.from([9, 9]));
      expect(read(tail, 2)).toEqual([9, 9]);
      expect(dest.holds(tail, 3)).toBe(false);
      expect(() => dest.write(tail, Uint8Array.from([9, 9, 9]))).toThrow();
    } finally {
      await dest.close();
    }
    await broker.close(); // it holds the region's backing
    expect(fdCount()).toBe(before);
  });
});
