// What subscribers declare and report, enforced by the broker before anything changes: coalesced views
// for clients with few slots, reserved IOVA ranges, remaining DMA mappings, pin limits and the space's
// pin budget; and placement of hotplugged memory around all of it.
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import type { Broker, BrokerOptions } from '../broker/index.js';
import type { SubscriberOptions } from '../clients/index.js';
import { constants, native } from '../native/index.js';
import { memfdMaps, spawnSubscriber, tempDir, type JsonProc } from './helpers/procs.js';
import { codeOf, defer, embeddedBroker, ownerOf, runCleanups, subscriberOf } from './helpers/embedded.js';

const MiB = 1 << 20;
afterEach(runCleanups);

async function setup(opts: BrokerOptions = {}) {
  const broker = embeddedBroker(opts);
  return { broker, owner: await ownerOf(broker) };
}

const sub = (target: Broker | string, opts: Partial<SubscriberOptions> = {}) => subscriberOf(target, { reconnect: false, ...opts });

describe('coalesced views', () => {
  it('a client declaring 8 slots follows a map of 200 contiguous 2 MiB blocks', async () => {
    const { broker, owner } = await setup();
    const socket = path.join(tempDir(), 'b.sock');
    broker.listen(socket);
    const blocks = await owner.createBacking(400 * MiB, 'blocks');
    defer(() => native.close(blocks.fd));
    const ownerView = native.mmap(blocks.fd, 0, 400 * MiB, constants.PROT_READ | constants.PROT_WRITE, constants.MAP_SHARED);
    defer(() => native.munmap(ownerView));
    const small: JsonProc = await spawnSubscriber(socket, 'vm0', ['--max-regions', '8', '--coalesce', '--name', 'eight-slots']);
    defer(() => small.stop());
    const base = 0x1_0000_0000;
    // Hotplugged one block at a time, as virtio-mem or DIMM hotplug would.
    for (let i = 0; i < 200; i++) {
      await owner.addRegion({ name: `blk${i}`, gpa: base + i * 2 * MiB, size: 2 * MiB, backing: blocks.backing, offset: i * 2 * MiB });
    }
    const st = broker.status('vm0').spaces[0]!;
    expect(st.regions).toHaveLength(200);
    const client = st.clients.find((c) => c.name === 'eight-slots')!;
    // Only new memory is merged: a block hotplugged next to a run the client follows is a region of its
    // own until the 8 slots are full; then the runs are merged (the budget forces the reshape). Block 192
    // was the last such merge: one run of 193 blocks, and the 7 blocks after it.
    expect(client.regions).toBe(8);
    expect(client.ackedGeneration).toBe(200);
    // The kernel's view: 8 mappings in that process, 400 MiB in all, the first one 386 MiB.
    const maps = memfdMaps(small.pid, 'blocks');
    expect(maps).toHaveLength(8);
    const sizes = maps
      .map(
        (m) =>
          m
            .split(' ')[0]!
            .split('-')
            .map((h) => parseInt(h, 16)) as [number, number],
      )
      .map(([lo, hi]) => hi - lo);
    expect(sizes.reduce((a, b) => a + b, 0)).toBe(400 * MiB);
    expect(Math.max(...sizes)).toBe(193 * 2 * MiB);
    // And memory is where the GPAs say: the owner writes block 150, the client reads it.
    new Uint8Array(ownerView.buffer).set(Buffer.from('block150'), 150 * 2 * MiB + 8);
    const read = await small.request({ cmd: 'read', gpa: base + 150 * 2 * MiB + 8, len: 8 }, 'read');
    expect(Buffer.from(read.hex as string, 'hex').toString()).toBe('block150');

    // Unplugging a block in the middle splits the run: 9 regions would not fit, so everything contiguous
    // is merged again: two runs.
    await owner.removeRegion('blk100');
    const view = await small.request({ cmd: 'regions' }, 'regions');
    expect((view.regions as { gpa: number; size: number }[]).map((r) => [r.gpa - base, r.size / MiB])).toEqual([
      [0, 200],
      [101 * 2 * MiB, 198],
    ]);
    expect(memfdMaps(small.pid, 'blocks')).toHaveLength(2);
  });

  it('without coalescing, the same client refuses the 9th region before anything changes', async () => {
    const { broker, owner } = await setup();
    const blocks = await owner.createBacking(32 * MiB, 'blocks');
    native.close(blocks.fd);
    const s = await sub(broker, { maxRegions: 8, name: 'plain8' });
    for (let i = 0; i < 8; i++) await owner.addRegion({ name: `b${i}`, gpa: i * 2 * MiB, size: 2 * MiB, backing: blocks.backing, offset: i * 2 * MiB });
    const err = await owner.addRegion({ name: 'b8', gpa: 8 * 2 * MiB, size: 2 * MiB, backing: blocks.backing, offset: 8 * 2 * MiB }).catch((e) => e);
    expect(err.code).toBe('MMB_ERR_CLIENT_LIMIT');
    expect(err.client.name).toBe('plain8');
    expect(s.regions()).toHaveLength(8);
  });

  it('flag changes break runs: a block with dirty logging on stands alone', async () => {
    const { broker, owner } = await setup();
    const blocks = await owner.createBacking(8 * MiB, 'blocks');
    native.close(blocks.fd);
    for (let i = 0; i < 4; i++) await owner.addRegion({ name: `b${i}`, gpa: i * 2 * MiB, size: 2 * MiB, backing: blocks.backing, offset: i * 2 * MiB });
    const s = await sub(broker, { coalesce: true });
    expect(s.regions()).toHaveLength(1);
    await owner.commit([{ op: 'set', region: 'b1', logDirty: true }]);
    expect(s.regions().map((r) => [r.name, r.logDirty])).toEqual([
      ['b0', false],
      ['b1', true],
      ['b2..b3', false],
    ]);
  });
});

describe('reported constraints', () => {
  it('an add over a reserved IOVA range is refused naming the client; FIND_FREE places around it', async () => {
    const { broker, owner } = await setup();
    const ram = await owner.createBacking(64 * MiB, 'ram');
    native.close(ram.fd);
    const s = await sub(broker, { name: 'iommu-client' });
    await s.report({ reserved: [{ start: 0xfee0_0000, last: 0xfeef_ffff }], backend: 'test', coherent: false });
    const err = await owner.addRegion({ name: 'msi', gpa: 0xfec0_0000, size: 4 * MiB, backing: ram.backing }).catch((e) => e);
    expect(err.code).toBe('MMB_ERR_RESERVED_RANGE');
    expect(err.client.name).toBe('iommu-client');
    const client = broker.status('vm0').spaces[0]!.clients.find((c) => c.name === 'iommu-client')!;
    expect(client.reserved).toEqual([{ start: 0xfee0_0000, last: 0xfeef_ffff }]);
    expect(client.coherent).toBe(false);
    expect(client.backend).toBe('test');
    // Placement: the lowest 4 MiB, 2 MiB-aligned range at or above 0xfe000000 that avoids regions and
    // the reserved window.
    await owner.addRegion({ name: 'low', gpa: 0xfe00_0000, size: 4 * MiB, backing: ram.backing });
    const gpa = await owner.findFree(4 * MiB, { align: 2 * MiB, min: 0xfe00_0000 });
    expect(gpa).toBe(0xfe40_0000);
    const gpa2 = await owner.findFree(16 * MiB, { align: 2 * MiB, min: 0xfe00_0000 });
    expect(gpa2).toBe(0xfef0_0000 + 0x10_0000); // above the window, rounded up to 2 MiB
    await owner.addRegion({ name: 'placed', gpa: gpa2, size: 16 * MiB, backing: ram.backing, offset: 16 * MiB });
    expect(await codeOf(owner.findFree(8 * MiB, { min: 0, max: 0x40_0000 }))).toBe('MMB_ERR_NO_FREE_RANGE');
  });

  it("the wire's inclusive last is converted exactly: regions touching a reserved page from either side are accepted, its last byte is refused", async () => {
    const { broker, owner } = await setup();
    const ram = await owner.createBacking(16 * MiB, 'ram');
    native.close(ram.fd);
    const s = await sub(broker, { name: 'one-page' });
    // A page, and a single byte (the last one of the page at 0x102000).
    await s.report({
      reserved: [
        { start: 0x10_0000, last: 0x10_0fff },
        { start: 0x10_2fff, last: 0x10_2fff },
      ],
    });
    // The first free page at or above the reserved one is the page right after its last byte.
    expect(await owner.findFree(0x1000, { min: 0x10_0000 })).toBe(0x10_1000);
    expect(await owner.findFree(0x1000, { min: 0xf_f000 })).toBe(0xf_f000);
    await owner.addRegion({ name: 'below', gpa: 0xf_f000, size: 0x1000, backing: ram.backing });
    await owner.addRegion({ name: 'above', gpa: 0x10_1000, size: 0x1000, backing: ram.backing, offset: 0x1000 });
    const err = await owner.addRegion({ name: 'over', gpa: 0x10_0000, size: 0x1000, backing: ram.backing, offset: 0x2000 }).catch((e) => e);
    expect(err.code).toBe('MMB_ERR_RESERVED_RANGE');
    expect(err.message).toContain('covers [0x100000, 0x100fff]');
    expect(await codeOf(owner.addRegion({ name: 'byte', gpa: 0x10_2000, size: 0x1000, backing: ram.backing, offset: 0x2000 }))).toBe('MMB_ERR_RESERVED_RANGE');
    expect(await owner.findFree(0x1000, { min: 0x10_2000 })).toBe(0x10_3000);
    expect(broker.status('vm0').spaces[0]!.clients.find((c) => c.name === 'one-page')!.reserved).toEqual([
      { start: 0x10_0000, last: 0x10_0fff },
      { start: 0x10_2fff, last: 0x10_2fff },
    ]);
  });

  it('a client out of DMA mappings refuses the next add before anything changes', async () => {
    const { broker, owner } = await setup();
    const ram = await owner.createBacking(16 * MiB, 'ram');
    native.close(ram.fd);
    const s = await sub(broker, { name: 'dma' });
    await s.report({ dmaAvailable: 1 });
    await owner.addRegion({ name: 'a', gpa: 0, size: 4 * MiB, backing: ram.backing });
    await s.report({ dmaAvailable: 0 });
    const err = await owner.addRegion({ name: 'b', gpa: 8 * MiB, size: 4 * MiB, backing: ram.backing }).catch((e) => e);
    expect(err.code).toBe('MMB_ERR_CLIENT_LIMIT');
    // Moving memory needs no extra mapping: remove + add in one transaction is still fine.
    await owner.commit([
      { op: 'remove', region: 'a' },
      { op: 'add', name: 'a2', gpa: 0, size: 4 * MiB, backing: ram.backing, offset: 4 * MiB },
    ]);
  });

  it('pin limit and the space pin budget are checked before anything changes, naming the client', async () => {
    const { broker, owner } = await setup({ limits: { ackTimeoutMs: 5000, pinBudgetBytes: 96 * MiB } });
    const ram = await owner.createBacking(256 * MiB, 'ram');
    native.close(ram.fd);
    await owner.addRegion({ name: 'base', gpa: 0, size: 32 * MiB, backing: ram.backing });
    const a = await sub(broker, { name: 'pinner-a', pin: { limit: 64 * MiB } });
    await a.report({ pinned: 32 * MiB });
    let events = 0;
    a.on('change', () => events++);
    const tooBig = await owner.addRegion({ name: 'big', gpa: 0x1_0000_0000, size: 64 * MiB, backing: ram.backing, offset: 64 * MiB }).catch((e) => e);
    expect(tooBig.code).toBe('MMB_ERR_PIN_BUDGET');
    expect(tooBig.client.name).toBe('pinner-a');
    expect(events).toBe(0);
    const st = broker.status('vm0').spaces[0]!;
    expect(st.clients.find((c) => c.name === 'pinner-a')?.pin).toEqual({ limit: 64 * MiB, predicted: 32 * MiB, actual: 32 * MiB });
    // A second pinning client: together they pin 2 x 32 MiB. One more 16 MiB block makes it 2 x 48 = 96 MiB,
    // exactly the budget...
    await sub(broker, { name: 'pinner-b', pin: {} });
    await owner.addRegion({ name: 'fits', gpa: 0x1_0000_0000, size: 16 * MiB, backing: ram.backing, offset: 64 * MiB });
    // ...and 2 x 52 MiB = 104 MiB does not.
    const over = await owner.addRegion({ name: 'over', gpa: 0x2_0000_0000, size: 4 * MiB, backing: ram.backing, offset: 128 * MiB }).catch((e) => e);
    expect(over.code).toBe('MMB_ERR_PIN_BUDGET');
    expect(broker.status('vm0').spaces[0]!.pinBudget).toMatchObject({ limit: 96 * MiB, predicted: 96 * MiB });
    // A third pinning client would push the total over the budget: refused at attach.
    expect(await codeOf(sub(broker, { name: 'pinner-c', pin: {} }))).toBe('MMB_ERR_PIN_BUDGET');
    // Removals are always allowed.
    await owner.removeRegion('fits');
  });
});
