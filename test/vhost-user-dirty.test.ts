// vhost-user dirty logging as the spec defines it (issue 16): the bridge negotiates LOG_SHMFD, turns
// VHOST_F_LOG_ALL on while a region of the back-end's table logs, hands the back-end a shared log
// (SET_LOG_BASE), grows it on hotplug, and folds it into the broker's bitmaps at every sync. Pause stops
// the rings (requests in flight complete first, then GET_VRING_BASE); resume restarts them. A back-end that
// cannot log makes every page it has count as dirty.
//
// Real back-ends: qemu-storage-daemon (vhost-user-blk, libvhost-user) and dpdk-testpmd (net_vhost), both
// offering LOG_ALL and LOG_SHMFD. A fresh back-end per test, stopped by PID; every wait has a deadline; any
// line on qemu-storage-daemon's stderr (or an error line on testpmd's) fails the test. Without them the
// tests are skipped, except under CI=true.
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import {
  VhostUserSubscriber,
  VirtioBlk,
  VirtioNet,
  NET_HDR_BYTES,
  Feature,
  ProtocolFeature,
  Req,
  bit,
  type VhostUserOptions,
} from '../clients/vhost-user/index.js';
import { native } from '../native/index.js';
import { DIRTY_PAGE_SIZE } from '../protocol/index.js';
import { QSD, TESTPMD } from '../bench/vhost-user-backends.js';
import { FileDestination, MappingSubscriber, Migration, type DirtySnapshot } from '../clients/index.js';
import { defer, embeddedBroker, mappedBacking, ownerOf } from './helpers/embedded.js';
import { tempDir, waitFor } from './helpers/procs.js';
import { FakeBackend } from './helpers/vhost-user-fake.js';
import { bridgeTo as attach, ciRequires, ethFrame, NET_BRIDGE, patternSectors as sectors, realBackends, tool } from './helpers/vhost-user-real.js';

const MiB = 1 << 20;
const qsdTool = tool(QSD, 'vhost-user dirty-logging tests');
const pmdTool = tool(TESTPMD, 'vhost-user DPDK dirty-logging test');
const describeQsd = qsdTool.describe;
const describeDpdk = pmdTool.describe;

const SECTORS = 8192;
const backends = realBackends();

ciRequires('CI machines have qemu-storage-daemon and dpdk-testpmd', qsdTool, pmdTool);

/** The dirty pages of region `name` in a sync, as guest-physical addresses. */
function dirtyGpas(snap: DirtySnapshot, name: string): number[] {
  const r = snap.regions.find((x) => x.name === name);
  if (!r) return [];
  const out: number[] = [];
  for (let p = 0; p < r.pages; p++) if ((r.bits[p >>> 3] as number) & (1 << (p & 7))) out.push(r.gpa + p * DIRTY_PAGE_SIZE);
  return out;
}

async function sync(owner: Awaited<ReturnType<typeof ownerOf>>): Promise<(name: string) => number[]> {
  const snap = await owner.dirtySync();
  defer(() => snap.release());
  return (name) => dirtyGpas(snap, name);
}

/** A broker, its owner, 16 MiB of RAM at GPA 0 (mapped by the test too), a qsd, and the bridge with a disk. */
async function setup(opts: Partial<VhostUserOptions> = {}) {
  const { qsd } = await backends.qsd('mmb-vhu-dirty-', SECTORS);
  const broker = embeddedBroker();
  const owner = await ownerOf(broker);
  const ram = await mappedBacking(owner, 16 * MiB, 'ram');
  await owner.addRegion({ name: 'ram0', gpa: 0, size: 16 * MiB, backing: ram.backing });
  const sub = await attach(broker, qsd, opts);
  const blk = await VirtioBlk.start(sub, { gpa: 0x1000, timeoutMs: 5000 });
  defer(() => blk.close());
  return { qsd, broker, owner, sub, blk, bytes: ram.bytes };
}

describeQsd('vhost-user dirty logging: qemu-storage-daemon', () => {
  it("a virtio-blk READ into guest memory at GPA 0x10000 with logging on is in the owner's next dirty sync", async () => {
    const { owner, sub, blk, bytes } = await setup();
    expect(sub.negotiated.canLog).toBe(true);
    expect(sub.negotiated.protocolFeatures & bit(ProtocolFeature.LOG_SHMFD)).toBe(bit(ProtocolFeature.LOG_SHMFD));
    // Nothing logs yet: the back-end was not asked to.
    expect(sub.logging).toBe(false);
    expect(sub.negotiated.features & bit(Feature.LOG_ALL)).toBe(0n);
    await owner.commit([{ op: 'set', region: 'ram0', logDirty: true }]);
    expect(sub.logging).toBe(true);
    expect(sub.stats.logBases).toBe(1);
    (await sync(owner))('ram0'); // the first round: everything before it does not matter
    // Only the back-end writes 0x10000..0x11fff (the READ's data buffer): the driver writes its rings and
    // request headers at 0x1000.., nothing there.
    await blk.read(17, 0x10000, 16 * 512);
    expect(Buffer.from(bytes.subarray(0x10000, 0x10000 + 16 * 512)).equals(sectors(17, 16))).toBe(true);
    const dirty = (await sync(owner))('ram0');
    expect(dirty).toContain(0x10000);
    expect(dirty).toContain(0x11000);
    expect(dirty).not.toContain(0x12000);
    expect(dirty).not.toContain(0x80000);
    expect(sub.stats.logCollects).toBeGreaterThanOrEqual(2);
    // Get-and-clear: the next sync without I/O has nothing of the back-end's.
    expect((await sync(owner))('ram0')).not.toContain(0x10000);
    // Logging off: the back-end is told (SET_FEATURES without LOG_ALL).
    await owner.commit([{ op: 'set', region: 'ram0', logDirty: false }]);
    expect(sub.logging).toBe(false);
  });

  it('pre-copy migration while qemu-storage-daemon writes guest memory: every sector it READ after the first copy is at the destination, byte for byte', async () => {
    const { broker, owner, blk, bytes } = await setup();
    // The migration's reader: maps everything, writes nothing.
    const reader = await MappingSubscriber.attach(broker, { space: 'vm0', kind: 'migration', writes: false, reconnect: false });
    defer(() => reader.close());
    const dir = tempDir('mmb-vhu-migrate-');
    defer(() => fs.rmSync(dir, { recursive: true, force: true }));
    const image = path.join(dir, 'vm0.img');
    // Only the back-end writes these pages, each round after the first copy: nothing but its log can tell.
    const reads: { gpa: number; first: number; count: number }[] = [];
    const result = await new Migration(owner, reader, new FileDestination(image)).run({
      keepPaused: true,
      stopBytes: 0,
      maxRounds: 3,
      onProgress: async (p) => {
        if (p.phase === 'final') return;
        const at = { gpa: 0x20_0000 + p.round * 0x4_0000, first: 100 + p.round * 64, count: 32 };
        await blk.read(at.first, at.gpa, at.count * 512);
        reads.push(at);
      },
    });
    try {
      expect(result.verified).toBe(true);
      expect(reads.length).toBeGreaterThanOrEqual(2);
      const fd = fs.openSync(image, 'r');
      defer(() => fs.closeSync(fd));
      for (const r of reads) {
        const want = sectors(r.first, r.count);
        expect(Buffer.from(bytes.subarray(r.gpa, r.gpa + want.length)).equals(want)).toBe(true);
        const got = Buffer.alloc(want.length);
        fs.readSync(fd, got, 0, want.length, r.gpa);
        expect(got.equals(want), `the sectors READ at 0x${r.gpa.toString(16)}`).toBe(true);
      }
    } finally {
      await owner.resume();
    }
  });

  it('the log grows with hotplug: a READ into a region added at 1 GiB while logging is on is in the next sync', async () => {
    const { owner, sub, blk } = await setup();
    await owner.commit([{ op: 'set', region: 'ram0', logDirty: true }]);
    const hot = await owner.createBacking(4 * MiB, 'hot');
    defer(() => native.close(hot.fd));
    const bases = sub.stats.logBases;
    await owner.addRegion({ name: 'hot', gpa: 0x4000_0000, size: 4 * MiB, backing: hot.backing, logDirty: true });
    // The log covered 16 MiB of guest-physical space; now it must reach 1 GiB + 4 MiB, before ADD_MEM_REG.
    expect(sub.stats.logBases).toBe(bases + 1);
    (await sync(owner))('hot');
    await blk.read(3, 0x4000_0000 + 0x3000, 512);
    const dirty = (await sync(owner))('hot');
    expect(dirty).toEqual([0x4000_3000]);
    // Memory that does not log, added higher still: VHOST_F_LOG_ALL logs every write of the back-end, so
    // the log grows for it too (libvhost-user aborts on a write beyond its log), and nothing of it is
    // reported (it has no bitmap).
    const cold = await owner.createBacking(4 * MiB, 'cold');
    defer(() => native.close(cold.fd));
    await owner.addRegion({ name: 'cold', gpa: 0x8000_0000, size: 4 * MiB, backing: cold.backing });
    expect(sub.stats.logBases).toBe(bases + 2);
    await blk.read(4, 0x8000_0000 + 0x1000, 512);
    const after = await sync(owner);
    expect(after('hot')).toEqual([]);
    expect(after('cold')).toEqual([]);
    await blk.read(5, 0x4000_0000 + 0x5000, 512);
    expect((await sync(owner))('hot')).toEqual([0x4000_5000]);
  });

  it('pause completes only after the requests in flight finished; a READ issued during the pause lands only after resume, and is not lost', async () => {
    const { owner, sub, blk, bytes } = await setup();
    await owner.commit([{ op: 'set', region: 'ram0', logDirty: true }]);
    (await sync(owner))('ram0');
    // Requests in flight when the pause comes: it resolves only after all of them completed.
    const finished: boolean[] = [false, false, false, false, false];
    const reads = [0, 1, 2, 3, 4].map((i) => blk.read(1000 + i * 128, 0x100000 + i * 0x10000, 64 * 1024).then(() => (finished[i] = true)));
    await owner.pause();
    expect(finished).toEqual([true, true, true, true, true]);
    await Promise.all(reads);
    expect(sub.rings.stats.pauseStops).toBe(1);
    expect(blk.queue.inFlight).toBe(0);
    // Paused: a READ waits in this process; nothing of it reaches the ring or guest memory.
    bytes.fill(0xee, 0x200000, 0x200000 + 4096);
    let landed = false;
    const during = blk.read(42, 0x200000, 4096).then(() => (landed = true));
    expect(blk.queue.waiting).toBe(1);
    expect(blk.queue.inFlight).toBe(0);
    // The final round of a migration: the sync sees what the back-end wrote before the pause.
    const final = (await sync(owner))('ram0');
    expect(final).toContain(0x100000);
    expect(final).not.toContain(0x200000);
    expect(landed).toBe(false);
    expect(bytes.subarray(0x200000, 0x200000 + 4096).every((b) => b === 0xee)).toBe(true);
    await owner.resume();
    await during;
    expect(Buffer.from(bytes.subarray(0x200000, 0x200000 + 4096)).equals(sectors(42, 8))).toBe(true);
    expect(sub.rings.stats.restarts).toBe(1);
    expect((await sync(owner))('ram0')).toContain(0x200000);
    // And the device goes on as before.
    await blk.read(7, 0x300000, 512);
  });
});

describe('vhost-user dirty logging: a back-end that cannot log (scripted, no VHOST_F_LOG_ALL)', () => {
  it('every page it has counts as dirty at every sync, never as clean', async () => {
    const b = new FakeBackend(path.join(tempDir('mmb-vhu-nolog-'), 'fake.sock'));
    defer(() => b.close());
    const broker = embeddedBroker();
    const owner = await ownerOf(broker);
    const ram = await owner.createBacking(8 * MiB, 'nolog');
    defer(() => native.close(ram.fd));
    await owner.addRegion({ name: 'ram0', gpa: 0, size: 4 * MiB, backing: ram.backing, logDirty: true });
    await owner.addRegion({ name: 'rom', gpa: 0x1000_0000, size: 1 * MiB, backing: ram.backing, offset: 4 * MiB, readonly: true, logDirty: true });
    const sub = await VhostUserSubscriber.attach(broker, { space: 'vm0', name: 'nolog', backendSocket: b.socket, reconnect: false, backendTimeoutMs: 2000 });
    defer(() => sub.close());
    expect(sub.negotiated.canLog).toBe(false);
    expect(b.messages.some((m) => m.request === Req.SET_LOG_BASE)).toBe(false);
    for (let round = 0; round < 2; round++) {
      const dirty = await sync(owner);
      expect(dirty('ram0')).toHaveLength((4 * MiB) / DIRTY_PAGE_SIZE);
      // The back-end never has read-only memory: that stays clean.
      expect(dirty('rom')).toEqual([]);
    }
    expect(sub.stats.allDirtyFlushes).toBe(2);
  });
});

describeDpdk('vhost-user dirty logging: dpdk-testpmd', () => {
  it('a frame DPDK writes into an RX buffer while logging is on is in the next sync, and pause / resume stops and restarts both queues', async () => {
    const { pmd } = await backends.testpmd('mmb-vhu-dpdk-dirty-');
    const broker = embeddedBroker();
    const owner = await ownerOf(broker);
    const { bytes, backing } = await mappedBacking(owner, 4 * MiB, 'ram');
    await owner.addRegion({ name: 'ram0', gpa: 0, size: 4 * MiB, backing, logDirty: true });
    const sub = await attach(broker, pmd, NET_BRIDGE);
    expect(sub.negotiated.canLog).toBe(true);
    expect(sub.logging).toBe(true);
    const net = await VirtioNet.start(sub, { gpa: 0x1000, timeoutMs: 5000 });
    defer(() => net.close());
    (await sync(owner))('ram0');
    const frame = ethFrame('logged by dpdk');
    bytes.set(frame, 0x20000);
    const rxGpa = 0x180000;
    const received = net.receive(rxGpa, 2048);
    await net.transmit(0x20000, frame.length);
    expect(await received).toBe(frame.length);
    expect(Buffer.from(bytes.subarray(rxGpa + NET_HDR_BYTES, rxGpa + NET_HDR_BYTES + 60)).equals(frame)).toBe(true);
    const dirty = (await sync(owner))('ram0');
    expect(dirty).toContain(rxGpa);
    expect(dirty).not.toContain(0x300000);
    // Pause: both queues stopped (GET_VRING_BASE); a receive buffer stays posted across it.
    const posted = net.receive(0x190000, 2048);
    await owner.pause();
    expect(sub.rings.stats.pauseStops).toBe(1);
    await owner.resume();
    await net.transmit(0x20000, frame.length);
    expect(await posted).toBe(frame.length);
    await waitFor('the frame in the buffer posted before the pause', () => bytes[0x190000 + NET_HDR_BYTES + 14] === 'l'.charCodeAt(0), 5000);
    expect((await sync(owner))('ram0')).toContain(0x190000);
  });
});
