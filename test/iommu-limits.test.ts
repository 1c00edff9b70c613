// IOMMU limits known before a change goes out (issue 17): the broker predicts a vfio-like client's DMA
// mappings and their IOVA alignment exactly as the client makes them (REPORT.dma, feature DMA_RULES) and
// refuses, before anything is sent, what its IOMMU could not take; a client reports a device's reserved
// IOVA ranges from sysfs before it opens the device; a failed unmap is never forgotten. The type1 and
// iommufd backends run against the simulated kernel (test/helpers/vfio-sim.ts); test/vm.test.ts runs them
// against the real one.
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterEach, describe, expect, it } from 'vitest';
import type { Broker } from '../broker/index.js';
import { Connection } from '../clients/connection.js';
import { VfioSubscriber, type VfioSubscriberOptions } from '../clients/vfio/subscriber.js';
import { parseReservedRegions, reservedRegionsPath } from '../clients/vfio/sysfs-reserved.js';
import { realSys } from '../clients/vfio/sys.js';
import { native } from '../native/index.js';
import { ALL_FEATURES, Feature, Msg, toInclusive, type MmbError } from '../protocol/index.js';
import { defer, embeddedBroker, ownerOf, runCleanups, subscriberOf } from './helpers/embedded.js';
import { tempDir } from './helpers/procs.js';
import { SimKernel } from './helpers/vfio-sim.js';
import { rejection } from './helpers/throws.js';

const MiB = 2 ** 20;
const GiB = 2 ** 30;
const FIXTURE = fileURLToPath(new URL('./fixtures/sysfs/reserved_regions', import.meta.url));
afterEach(runCleanups);

/** A broker, its owner with one 256 MiB backing, and a plain witness that counts what it is sent. */
async function setup() {
  const broker = embeddedBroker();
  const owner = await ownerOf(broker);
  const ram = await owner.createBacking(256 * MiB, 'ram');
  defer(() => native.close(ram.fd));
  const witness = await subscriberOf(broker, { name: 'witness', reconnect: false });
  const seen = { changes: 0 };
  witness.on('change', () => seen.changes++);
  const add = (name: string, gpa: number, size: number, offset = 0) => owner.addRegion({ name, gpa, size, backing: ram.backing, offset });
  const generation = () => broker.status('vm0').spaces[0]!.generation;
  const client = (name: string) => broker.status('vm0').spaces[0]!.clients.find((c) => c.name === name);
  return { broker, owner, ram, witness, seen, add, generation, client };
}

async function vfioSim(broker: Broker | string, k: SimKernel, opts: Partial<VfioSubscriberOptions> = {}): Promise<VfioSubscriber> {
  const s = await VfioSubscriber.attach(broker as never, {
    space: 'vm0',
    name: 'vfio-sim',
    backend: 'type1',
    devices: ['0000:00:01.0'],
    pinChunkBytes: 4 * MiB,
    sys: k,
    reconnect: false,
    ...opts,
  });
  defer(() => s.close());
  return s;
}

describe('DMA mappings and their alignment, predicted at planning (REPORT.dma)', () => {
  it('type1: a region takes one DMA mapping per pin piece; an add DMA_AVAIL cannot hold is refused before anything is sent, naming the client', async () => {
    const t = await setup();
    const k = new SimKernel();
    k.dmaLimit = 10;
    const v = await vfioSim(t.broker, k);
    expect(v.domain.dma).toEqual({ chunkBytes: GiB, pieceBytes: 4 * MiB, align: 4096 });
    let vfioChanges = 0;
    v.on('change', () => vfioChanges++);
    await t.add('a', 0x1000_0000, 32 * MiB);
    // The kernel holds 8 mappings, and the broker knew the 2 left by the time the owner heard "done".
    expect(k.dma.size).toBe(8);
    expect(t.client('vfio-sim')?.dmaAvailable).toBe(2);
    const before = { gen: t.generation(), witness: t.seen.changes, vfio: vfioChanges, calls: k.calls.length };
    // 16 MiB is 4 pieces: one region, but 4 DMA mappings, and only 2 are left.
    const err = await rejection(t.add('b', 0x2000_0000, 16 * MiB, 32 * MiB));
    expect([err.code, err.client?.name]).toEqual(['MMB_ERR_CLIENT_LIMIT', 'vfio-sim']);
    expect(err.message).toMatch(
      /room for 2 more DMA mappings; the transaction needs 4 \(region "b" alone takes 4: chunks of 1 GiB, mappings of at most 4 MiB\)/,
    );
    // Nothing was sent to anyone: no vote, no kernel call.
    expect({ gen: t.generation(), witness: t.seen.changes, vfio: vfioChanges, calls: k.calls.length }).toEqual(before);
    // What fits goes through: 8 MiB is 2 pieces.
    await t.add('c', 0x2000_0000, 8 * MiB, 32 * MiB);
    expect([k.dma.size, t.client('vfio-sim')?.dmaAvailable]).toEqual([10, 0]);
  });

  it('two-phase: the vote maps what overlaps nothing removed before the commit unmaps anything, and is counted so', async () => {
    const t = await setup();
    const k = new SimKernel();
    k.dmaLimit = 4;
    await vfioSim(t.broker, k);
    await t.add('a', 0x1000_0000, 8 * MiB);
    expect(t.client('vfio-sim')?.dmaAvailable).toBe(2);
    // Remove a (2 mappings) and add 12 MiB elsewhere (3): 1 more in all, but the vote maps the 3 while a
    // still holds its 2.
    const gen = t.generation();
    const changes = t.seen.changes;
    const err = await rejection(
      t.owner.commit([
        { op: 'remove', region: 'a' },
        { op: 'add', name: 'b', gpa: 0x2000_0000, size: 12 * MiB, backing: t.ram.backing, offset: 8 * MiB },
      ]),
    );
    expect([err.code, err.client?.name]).toEqual(['MMB_ERR_CLIENT_LIMIT', 'vfio-sim']);
    expect(err.message).toMatch(/needs 3/);
    expect([t.generation(), t.seen.changes]).toEqual([gen, changes]);
    // The same memory replacing a at its own GPA waits for the commit, after a is unmapped: it fits.
    await t.owner.commit([
      { op: 'remove', region: 'a' },
      { op: 'add', name: 'b', gpa: 0x1000_0000, size: 12 * MiB, backing: t.ram.backing, offset: 8 * MiB },
    ]);
    expect([k.dma.size, t.client('vfio-sim')?.dmaAvailable]).toEqual([3, 1]);
    // A read-only toggle unmaps and maps again (3 and 3): nothing more needed.
    await t.owner.commit([{ op: 'set', region: 'b', readonly: true }]);
    expect(k.dma.size).toBe(3);
  });

  for (const backend of ['type1', 'iommufd'] as const) {
    it(`${backend}: the IOMMU's alignment (${backend === 'type1' ? 'the smallest of iova_pgsizes' : 'out_iova_alignment'}) is reported, pieces are cut on it, and an add off it is refused at planning`, async () => {
      const t = await setup();
      const k = new SimKernel();
      k.pageSizes = 0x4020_0000n | 0x1_0000n; // 64 KiB, 2 MiB, 1 GiB
      k.iovaAlignment = 0x1_0000;
      const v = await vfioSim(t.broker, k, { backend, pinChunkBytes: 0x5000 });
      // A 20 KiB pin chunk would make pieces the kernel refuses: 64 KiB pieces instead, and said so.
      expect(v.domain.dma).toEqual({ chunkBytes: GiB, pieceBytes: 0x1_0000, align: 0x1_0000 });
      await t.add('ok', 0x20_0000, 2 * MiB);
      expect(v.domain.mappings.find((m) => m.region === 'ok')?.pieces).toBe(32);
      const changes = t.seen.changes;
      for (const [gpa, size, why] of [
        [0x40_1000, 0x1_0000, /first DMA mapping would start at IOVA 0x401000/],
        [0x60_0000, 0x1_1000, /last DMA mapping would end at IOVA 0x611000/],
      ] as const) {
        const err = await rejection(t.add(`bad${gpa}`, gpa, size, 4 * MiB));
        expect([err.code, err.client?.name]).toEqual(['MMB_ERR_UNALIGNED', 'vfio-sim']);
        expect(err.message).toMatch(why);
        expect(err.message).toMatch(/aligned to 64 KiB/);
      }
      expect(t.seen.changes).toBe(changes);
    });
  }

  it('without DMA_RULES the broker counts one mapping per region, and the client refuses after fan-out (as before the feature)', async () => {
    const t = await setup();
    const k = new SimKernel();
    k.dmaLimit = 10;
    await vfioSim(t.broker, k, { features: ALL_FEATURES & ~Feature.DMA_RULES });
    await t.add('a', 0x1000_0000, 32 * MiB);
    const changes = t.seen.changes;
    const err = await rejection(t.add('b', 0x2000_0000, 16 * MiB, 32 * MiB));
    // The client's own count, after everyone was sent the vote (and then the rollback).
    expect([err.code, err.client?.name]).toEqual(['MMB_ERR_CLIENT_LIMIT', 'vfio-sim']);
    expect(t.seen.changes).toBeGreaterThan(changes);
    expect(k.dma.size).toBe(8);
  });

  it('REPORT.dma needs its feature; impossible rules are refused and nothing of that report is taken', async () => {
    const broker = embeddedBroker();
    await ownerOf(broker);
    const socket = path.join(tempDir(), 'b.sock');
    broker.listen(socket);
    const old = await Connection.open(socket, { name: 'old', features: ALL_FEATURES & ~Feature.DMA_RULES });
    defer(() => old.close());
    await old.request({ t: Msg.ATTACH, space: 'vm0', role: 'subscriber', kind: 'vfio' });
    expect((await rejection(old.request({ t: Msg.REPORT, dma: { align: 4096 } }))).code).toBe('MMB_ERR_FEATURE');
    const c = await Connection.open(socket, { name: 'new' });
    defer(() => c.close());
    await c.request({ t: Msg.ATTACH, space: 'vm0', role: 'subscriber', kind: 'vfio' });
    for (const dma of [{ align: 3 * 4096 }, { pieceBytes: 0x1800 }, { chunkBytes: GiB, pieceBytes: 0x1000, align: 0x1_0000 }]) {
      expect((await rejection(c.request({ t: Msg.REPORT, reserved: [{ start: 0, last: 0xfff }], dma }))).code).toBe('MMB_ERR_INVALID_ARG');
    }
    expect(broker.status('vm0').spaces[0]!.clients.find((x) => x.name === 'new')?.reserved).toBeUndefined();
    await c.request({ t: Msg.REPORT, dma: { chunkBytes: GiB, pieceBytes: 0x1_0000, align: 0x1_0000 } });
  });
});

describe('reserved IOVA ranges from sysfs, reported before the device is opened', () => {
  it('reserved_regions as the kernel writes it: msi, direct and reserved refuse DMA, direct-relaxable does not; clipped to 52 bits', () => {
    expect(parseReservedRegions(fs.readFileSync(FIXTURE, 'utf8'), FIXTURE).map(toInclusive)).toEqual([
      { start: 0xbd00_0000, last: 0xbd0f_ffff },
      { start: 0xfee0_0000, last: 0xfeef_ffff },
      { start: 0x4_0000_0000, last: 0x4_000f_ffff },
      { start: 0xf_ffff_fff0_0000, last: 2 ** 52 - 1 },
    ]);
    expect(parseReservedRegions('', 'empty')).toEqual([]);
    expect(() => parseReservedRegions('0xfee00000 msi\n', 'bad')).toThrow(/bad, line 1/);
  });

  it('soft, with a fixture file: the ranges of a device it will attach are reported at attach; FIND_FREE and COMMIT keep RAM off them', async () => {
    const t = await setup();
    const bdf = '0000:00:05.0';
    const sys = { ...realSys, readFile: (p: string) => (p === reservedRegionsPath(bdf) ? fs.readFileSync(FIXTURE, 'utf8') : realSys.readFile(p)) };
    // reserved: [] drops soft's own MSI window: everything reserved here comes from the file.
    await VfioSubscriber.attach(t.broker, { space: 'vm0', name: 'vfio-later', backend: 'soft', reserved: [], reserveFor: [bdf], sys, reconnect: false }).then(
      (s) => defer(() => s.close()),
    );
    expect(t.client('vfio-later')?.reserved).toEqual(parseReservedRegions(fs.readFileSync(FIXTURE, 'utf8'), FIXTURE).map(toInclusive));
    // Placement steps over the RMRR and the MSI window; the relaxable RMRR stays usable.
    expect(await t.owner.findFree(2 * MiB, { align: 2 * MiB, min: 0xbc00_0000 })).toBe(0xbc00_0000);
    expect(await t.owner.findFree(32 * MiB, { align: 2 * MiB, min: 0xbc00_0000 })).toBe(0xbd20_0000);
    expect(await t.owner.findFree(2 * MiB, { align: 2 * MiB, min: 0xfec0_0000 })).toBe(0xfec0_0000);
    expect(await t.owner.findFree(4 * MiB, { align: 2 * MiB, min: 0xfec0_0000 })).toBe(0xff00_0000);
    expect(await t.owner.findFree(2 * MiB, { align: 2 * MiB, min: 0x7b80_0000 })).toBe(0x7b80_0000);
    const err = await rejection(t.add('msi', 0xfee0_0000, 2 * MiB));
    expect([err.code, err.client?.name]).toEqual(['MMB_ERR_RESERVED_RANGE', 'vfio-later']);
    // A device sysfs knows nothing of: refused by name, before connecting.
    const none = await rejection(
      VfioSubscriber.attach(t.broker, { space: 'vm0', name: 'x', backend: 'soft', reserveFor: ['0000:00:06.0'], sys, reconnect: false }),
    );
    expect(none.code).toBe('MMB_ERR_NO_DEVICE');
  });

  it("type1: a hot-added device's reserved regions reach the broker before its group is opened; mapped memory over one refuses the device unopened", async () => {
    const t = await setup();
    const k = new SimKernel();
    k.reservedRegions['6'] = `${k.reservedRegions['6']}0x0000000030000000 0x00000000300fffff reserved\n`;
    const seenAtOpen: unknown[] = [];
    const open = k.open.bind(k);
    k.open = (p: string) => {
      if (p === '/dev/vfio/6') seenAtOpen.push(t.client('vfio-sim')?.reserved);
      return open(p);
    };
    const v = await vfioSim(t.broker, k);
    expect(t.client('vfio-sim')?.reserved).not.toContainEqual({ start: 0x3000_0000, last: 0x300f_ffff });
    await v.attachDevice('0000:00:03.0');
    // Judged when the kernel was asked to open the group: the broker had the range already.
    expect(seenAtOpen).toHaveLength(1);
    expect(seenAtOpen[0]).toContainEqual({ start: 0x3000_0000, last: 0x300f_ffff });
    expect((await rejection(t.add('rmrr', 0x3000_0000, 2 * MiB))).code).toBe('MMB_ERR_RESERVED_RANGE');

    // Another client already maps memory where its device's group reserves a range (placed before anyone
    // knew of it): the device is refused unopened.
    const k2 = new SimKernel();
    k2.reservedRegions['6'] = `${k2.reservedRegions['6']}0x0000000030200000 0x00000000302fffff reserved\n`;
    await t.add('early', 0x3020_0000, 2 * MiB);
    const w = await vfioSim(t.broker, k2, { name: 'vfio-two' });
    const calls = k2.calls.length;
    const err = await rejection(w.attachDevice('0000:00:03.0'));
    expect(err.code).toBe('MMB_ERR_RESERVED_RANGE');
    expect(err.message).toMatch(/region "early" .* covers \[0x30200000, 0x302fffff\]/);
    // sysfs was read; nothing was opened or changed in the kernel (only queries: GET_INFO for the report).
    const after = k2.calls.slice(calls);
    expect(after[0]).toBe(`read ${reservedRegionsPath('0000:00:03.0')}`);
    expect(after.filter((c) => !/^(VFIO_IOMMU_GET_INFO|VFIO_CHECK_EXTENSION)/.test(c))).toHaveLength(1);
    expect(w.domain.devices).toEqual(['0000:00:01.0']);
  });
});

describe('a failed unmap is never forgotten', () => {
  it('two-phase: the commit fails, the client keeps the mapping as the kernel does, nacks, and the broker fences it (in-process: it cannot, and says so)', async () => {
    const t = await setup();
    const k = new SimKernel();
    const v = await vfioSim(t.broker, k);
    const errors: MmbError[] = [];
    v.on('error', (e) => errors.push(e));
    await t.add('a', 0x1000_0000, 16 * MiB);
    const pinned = v.domain.pinnedBytes;
    // The kernel refuses to unmap the third of a's four pieces.
    k.failUnmap.add(BigInt(0x1000_0000 + 8 * MiB));
    const err = await rejection(t.owner.removeRegion('a'));
    expect([err.code, err.client?.name]).toEqual(['MMB_ERR_COMMITTED_UNFENCED', 'vfio-sim']);
    // The client's bookkeeping is the kernel's: a is mapped whole (the pieces unmapped meanwhile mapped
    // again), all four pieces in the kernel, pinned bytes unchanged.
    expect(v.domain.mappings.map((m) => [m.region, m.pieces])).toEqual([['a', 4]]);
    expect([...k.dma.keys()].sort()).toEqual([0n, 1n, 2n, 3n].map((i) => BigInt(0x1000_0000) + i * BigInt(4 * MiB)));
    expect(v.domain.pinnedBytes).toBe(pinned);
    // Loudly: an error event naming the region, and the broker evicted the client and still counts it as
    // holding the memory (the backing is not reported unreferenced).
    expect(errors.map((e) => [e.code, /region "a" .* could not be unmapped/.test(e.message)])).toEqual([['MMB_ERR_IOMMU', true]]);
    const space = t.broker.status('vm0').spaces[0]!;
    expect(space.clients.find((c) => c.name === 'vfio-sim')).toBeUndefined();
    expect(space.holders?.map((h) => h.client.name)).toContain('vfio-sim');
  });

  it('single-phase: the removal is refused, the region stays mapped whole, and nothing changed anywhere', async () => {
    const t = await setup();
    const k = new SimKernel();
    const v = await vfioSim(t.broker, k, { features: ALL_FEATURES & ~Feature.TWO_PHASE });
    await t.add('a', 0x1000_0000, 16 * MiB);
    const gen = t.generation();
    k.failUnmap.add(BigInt(0x1000_0000 + 4 * MiB));
    const err = await rejection(t.owner.removeRegion('a'));
    expect([err.code, err.client?.name]).toEqual(['MMB_ERR_IOMMU', 'vfio-sim']);
    expect(t.generation()).toBe(gen);
    expect(k.dma.size).toBe(4);
    expect(v.domain.mappings.map((m) => [m.region, m.pieces])).toEqual([['a', 4]]);
    // The kernel lets go now: the removal goes through, and the books agree.
    await t.owner.removeRegion('a');
    expect([k.dma.size, v.domain.mappings.length, v.domain.pinnedBytes]).toEqual([0, 0, 0]);
  });
});
