// No reshaping under I/O (issue 17): hot-adds next to the region that holds a running device's vrings,
// against a real, unmodified qemu-storage-daemon (libvhost-user), with virtio-blk I/O running the whole
// time. A region the back-end has is never removed to be re-added bigger while its rings run: coalescing
// merges only new memory; when the slot budget forces a reshape, the rings are stopped (drained, then
// GET_VRING_BASE) and restarted around it. A back-end lost during a transaction fails the transaction.
//
// A fresh back-end per test, stopped by PID; every wait has a deadline; any line on the back-end's stderr
// ("vu_panic: ...") fails the test. Without qemu-storage-daemon the tests are skipped, except under CI=true.
import { expect, it } from 'vitest';
import { VhostUserSubscriber, VirtioBlk, type VhostUserOptions } from '../clients/vhost-user/index.js';
import { native } from '../native/index.js';
import { isMmbError } from '../protocol/index.js';
import { patternSector, QSD, type Backend } from '../bench/vhost-user-backends.js';
import { defer, embeddedBroker, mappedBacking, ownerOf } from './helpers/embedded.js';
import { memfdMaps, waitFor } from './helpers/procs.js';
import { bridgeTo, ciRequires, realBackends, tool } from './helpers/vhost-user-real.js';

const MiB = 1 << 20;
const qsdTool = tool(QSD, 'vhost-user reshape tests');
const describeQsd = qsdTool.describe;

const SECTORS = 8192;
const backends = realBackends();

ciRequires('CI machines have qemu-storage-daemon', qsdTool);

/**
 * The issue's layout: blocks of 2 MiB cut from one memfd, b0 at GPA 0 (the vrings at 0x1000), and another
 * region elsewhere (its own memfd at 1 GiB). Returns the blocks' memfd as the owner maps it.
 */
async function setup(blockCount: number) {
  const { qsd } = await backends.qsd('mmb-vhu-reshape-', SECTORS);
  const broker = embeddedBroker();
  const owner = await ownerOf(broker);
  const blocks = await mappedBacking(owner, blockCount * 2 * MiB, 'blocks');
  const other = await owner.createBacking(2 * MiB, 'other');
  defer(() => native.close(other.fd));
  await owner.addRegion({ name: 'b0', gpa: 0, size: 2 * MiB, backing: blocks.backing, offset: 0 });
  await owner.addRegion({ name: 'other', gpa: 0x4000_0000, size: 2 * MiB, backing: other.backing });
  const addBlock = (i: number) => owner.addRegion({ name: `b${i}`, gpa: i * 2 * MiB, size: 2 * MiB, backing: blocks.backing, offset: i * 2 * MiB });
  return { qsd, broker, owner, bytes: blocks.bytes, addBlock };
}

async function attach(broker: Parameters<typeof VhostUserSubscriber.attach>[0], qsd: Backend, opts: Partial<VhostUserOptions> = {}) {
  const sub = await bridgeTo(broker, qsd, opts);
  const blk = await VirtioBlk.start(sub, { gpa: 0x1000, timeoutMs: 5000 });
  defer(() => blk.close());
  return { sub, blk };
}

/**
 * I/O that runs until stopped: 4 READs in flight at a time into b0 (next to the rings), each checked
 * against the image. Resolves with the number of requests completed; rejects at the first failure.
 */
function backgroundIo(blk: VirtioBlk, bytes: Uint8Array) {
  let running = true;
  let done = 0;
  const lane = async (l: number) => {
    for (let i = 0; running; i++) {
      const sector = (l * 1000 + i) % SECTORS;
      const gpa = 0x10000 + l * 0x4000;
      await blk.read(sector, gpa, 2048);
      for (let s = 0; s < 4; s++) {
        if (
          !Buffer.from(bytes.subarray(gpa + s * 512, gpa + (s + 1) * 512)).equals(patternSector(sector + s < SECTORS ? sector + s : 0)) &&
          sector + s < SECTORS
        ) {
          throw new Error(`lane ${l}: sector ${sector + s} read wrong data`);
        }
      }
      done++;
    }
  };
  const all = Promise.all([0, 1, 2, 3].map(lane));
  return {
    stop: async () => {
      running = false;
      await all;
      return done;
    },
    get done() {
      return done;
    },
  };
}

describeQsd('vhost-user: no reshaping under I/O (qemu-storage-daemon)', () => {
  it('23 hot-adds right after the region holding the vrings, with I/O running: the ring region is never removed, the disk answers after each', async () => {
    const { qsd, broker, owner, bytes, addBlock } = await setup(24);
    const { sub, blk } = await attach(broker, qsd);
    const io = backgroundIo(blk, bytes);
    const b0 = () => sub.backendTable().find((e) => e.gpa === 0);
    expect(b0()?.size).toBe(2 * MiB);
    for (let i = 1; i <= 23; i++) {
      await addBlock(i);
      // The region holding the rings is exactly what it was: never removed, never grown.
      expect(b0()?.size).toBe(2 * MiB);
      // The new block is in the back-end and does I/O, seen by the owner.
      const gpa = i * 2 * MiB + 0x1000;
      await blk.read(i, gpa, 512);
      expect(Buffer.from(bytes.subarray(gpa, gpa + 512)).equals(patternSector(i))).toBe(true);
    }
    const completed = await io.stop();
    expect(completed).toBeGreaterThan(0);
    expect(sub.stats.remMemReg).toBe(0);
    expect(sub.rings.stats.stops).toBe(0);
    expect(sub.backendTable()).toHaveLength(25);
    expect(broker.status('vm0').spaces[0]!.clients.map((c) => c.name)).toContain('vhost-user-blk0');
    expect(qsd.errors()).toEqual([]);
    void owner;
  });

  it('when the slot budget forces a reshape, the rings are drained, stopped and restarted around it; no request is lost', async () => {
    const { qsd, broker, bytes, addBlock } = await setup(12);
    // 4 slots: b0, other, b1, b2 fill them; b3 cannot be a region of its own.
    const { sub, blk } = await attach(broker, qsd, { maxSlots: 4 });
    const io = backgroundIo(blk, bytes);
    for (let i = 1; i <= 11; i++) {
      await addBlock(i);
      const gpa = i * 2 * MiB + 0x800;
      await blk.read(100 + i, gpa, 512);
      expect(Buffer.from(bytes.subarray(gpa, gpa + 512)).equals(patternSector(100 + i))).toBe(true);
      expect(sub.backendTable().length).toBeLessThanOrEqual(4);
    }
    const completed = await io.stop();
    expect(completed).toBeGreaterThan(0);
    // The I/O did run across the stops: requests waited for the rings and then completed.
    expect(blk.queue.stats.held).toBeGreaterThan(0);
    expect(blk.queue.stats.stops).toBe(sub.rings.stats.stops);
    expect(blk.queue.stats.restarts).toBe(sub.rings.stats.restarts);
    // Reshapes happened (the run holding the rings grew), each one inside a ring stop, as a rebuilt table
    // (SET_MEM_TABLE): libvhost-user 7.2 cannot take REM_MEM_REG + ADD_MEM_REG of the ring region.
    expect(sub.stats.setMemTable).toBeGreaterThan(1);
    expect(sub.rings.stats.reshapeStops).toBe(sub.stats.reshapes);
    expect(sub.stats.reshapes).toBeGreaterThan(0);
    expect(sub.backendTable().find((e) => e.gpa === 0)!.size).toBeGreaterThan(2 * MiB);
    // One mapping per region in the back-end, nothing left over from the reshapes.
    expect(memfdMaps(qsd.pid, 'blocks')).toHaveLength(sub.backendTable().filter((e) => e.name !== 'other').length);
    await blk.read(7, 11 * 2 * MiB + 0x1000, 512);
    expect(qsd.errors()).toEqual([]);
  });

  it('a broker reconnect that brings the fully coalesced view reshapes the ring region with the rings stopped, under I/O', async () => {
    const { qsd, broker, bytes, addBlock } = await setup(4);
    const { sub, blk } = await attach(broker, qsd, { reconnect: true, reconnectDelayMs: 10 });
    await addBlock(1);
    await addBlock(2);
    expect(sub.backendTable().map((e) => e.size / MiB)).toEqual([2, 2, 2, 2]);
    const io = backgroundIo(blk, bytes);
    // A new connection's view is the fully coalesced map (the broker does not know the old one): b0..b2
    // is one run now, which the bridge applies as a reshape of the region holding the rings.
    const stops = sub.rings.stats.reshapeStops;
    sub.dropConnection();
    await new Promise<void>((r) => sub.once('reconnected', () => r()));
    await waitFor('the resync to be applied', () => sub.backendTable().length === 2, 10_000);
    expect(sub.backendTable().map((e) => [e.gpa, e.size / MiB])).toEqual([
      [0, 6],
      [0x4000_0000, 2],
    ]);
    expect(sub.rings.stats.reshapeStops).toBe(stops + 1);
    expect(await io.stop()).toBeGreaterThan(0);
    await blk.read(9, 2 * 2 * MiB + 0x400, 512);
    expect(Buffer.from(bytes.subarray(2 * 2 * MiB + 0x400, 2 * 2 * MiB + 0x600)).equals(patternSector(9))).toBe(true);
    expect(qsd.errors()).toEqual([]);
  });

  it('a back-end lost while it applies a transaction fails the transaction, naming the client; the map is unchanged', async () => {
    const { qsd, broker, owner, addBlock } = await setup(4);
    const { sub } = await attach(broker, qsd);
    const before = broker.status('vm0').spaces[0]!.generation;
    // Stopped, the back-end never answers the ADD_MEM_REG; killed, it drops the connection mid-transaction.
    process.kill(qsd.pid, 'SIGSTOP');
    const sent = sub.frontend.stats.sent;
    const add = addBlock(1).catch((e: unknown) => e);
    await waitFor('ADD_MEM_REG to go out', () => sub.frontend.stats.sent > sent, 10_000);
    process.kill(qsd.pid, 'SIGKILL');
    const err = await add;
    expect(isMmbError(err), String(err)).toBe(true);
    expect(isMmbError(err) && err.client?.name).toBe('vhost-user-blk0');
    expect(broker.status('vm0').spaces[0]!.generation).toBe(before);
    expect(broker.status('vm0').spaces[0]!.regions.map((r) => r.name)).not.toContain('b1');
    void owner;
  });
});
