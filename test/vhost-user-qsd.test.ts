// The vhost-user front-end against a real, unmodified qemu-storage-daemon (vhost-user-blk, libvhost-user):
// virtio-blk READ / WRITE / FLUSH between a raw image and guest memory the broker manages, hotplug and
// unplug through the broker seen in the back-end's /proc/PID/maps, the back-end's slot limit enforced by
// the front-end, and 200 contiguous blocks followed through the coalesced view within the slots.
//
// A fresh back-end per test, stopped by PID; every wait has a deadline; any line on the back-end's stderr
// fails the test. Without qemu-storage-daemon the tests are skipped, except under CI=true.
import fs from 'node:fs';
import { expect, it } from 'vitest';
import { VhostUserSubscriber, VirtioBlk, BLK_FEATURES, type VhostUserOptions } from '../clients/vhost-user/index.js';
import { constants, native } from '../native/index.js';
import { isMmbError } from '../protocol/index.js';
import { IoasOwner } from '../clients/ioas-owner.js';
import { patternSector, QSD, type Backend } from '../bench/vhost-user-backends.js';
import { defer, embeddedBroker, mappedBacking, ownerOf } from './helpers/embedded.js';
import { memfdMaps, waitFor } from './helpers/procs.js';
import { bridgeTo, ciRequires, patternSectors as sectors, realBackends, tool } from './helpers/vhost-user-real.js';

const MiB = 1 << 20;
const qsdTool = tool(QSD, 'vhost-user qemu-storage-daemon tests');
const describeQsd = qsdTool.describe;

const SECTORS = 8192; // a 4 MiB image

const backends = realBackends();

ciRequires('CI machines have qemu-storage-daemon', qsdTool);

/** A broker, its owner, a RAM backing mapped by the test, and a qsd serving a patterned image. */
async function setup(ramBytes = 16 * MiB) {
  const { dir, image, qsd } = await backends.qsd('mmb-vhu-', SECTORS);
  const broker = embeddedBroker();
  const owner = await ownerOf(broker);
  const ram = await mappedBacking(owner, ramBytes, 'ram');
  await owner.addRegion({ name: 'ram0', gpa: 0, size: ramBytes, backing: ram.backing });
  return { dir, image, qsd, broker, owner, ram, bytes: ram.bytes };
}

function frontend(broker: Parameters<typeof VhostUserSubscriber.attach>[0], qsd: Backend, opts: Partial<VhostUserOptions> = {}) {
  return bridgeTo(broker, qsd, { backendTimeoutMs: 3000, ...opts });
}

async function blkOf(sub: VhostUserSubscriber, gpa = 0x1000) {
  const blk = await VirtioBlk.start(sub, { gpa, timeoutMs: 3000 });
  defer(() => blk.close());
  return blk;
}

describeQsd('vhost-user front-end: qemu-storage-daemon (vhost-user-blk)', () => {
  it("negotiates REPLY_ACK and CONFIGURE_MEM_SLOTS, declares the back-end's 32 slots, and does READ / WRITE / FLUSH in broker memory", async () => {
    const { image, qsd, broker, bytes } = await setup();
    const sub = await frontend(broker, qsd);
    expect(sub.memMode).toBe('slots');
    expect(sub.maxSlots).toBe(32);
    expect(sub.negotiated.features & BLK_FEATURES).toBe(BLK_FEATURES);
    // The broker knows the limit: it would refuse a 33rd region before anything changes.
    const me = broker.status('vm0').spaces[0]!.clients.find((c) => c.name === 'vhost-user-blk0')!;
    expect(me.kind).toBe('vhost-user');
    expect(me.maxRegions).toBe(32);
    // The initial map went to the back-end, which maps the memfd itself.
    expect(sub.backendTable().map((e) => [e.name, e.gpa, e.size])).toEqual([['ram0', 0, 16 * MiB]]);
    expect(memfdMaps(qsd.pid, 'ram')).toHaveLength(1);

    const blk = await blkOf(sub);
    expect(blk.capacity).toBe(SECTORS);
    // READ: sectors 5..12 land in guest memory at 0x10000, seen through the owner's own mapping.
    await blk.read(5, 0x10000, 8 * 512);
    expect(Buffer.from(bytes.subarray(0x10000, 0x10000 + 8 * 512)).equals(sectors(5, 8))).toBe(true);
    // WRITE: bytes the owner put in guest memory reach the image file.
    const data = Buffer.alloc(3 * 512);
    for (let i = 0; i < data.length; i++) data[i] = (i * 7 + 3) & 0xff;
    bytes.set(data, 0x20000);
    await blk.write(100, 0x20000, data.length);
    await blk.flush();
    const onDisk = fs.readFileSync(image).subarray(100 * 512, 103 * 512);
    expect(onDisk.equals(data)).toBe(true);
    // Several requests in flight at once.
    await Promise.all([0, 1, 2, 3, 4].map((i) => blk.read(200 + i, 0x30000 + i * 512, 512)));
    expect(Buffer.from(bytes.subarray(0x30000, 0x30000 + 5 * 512)).equals(sectors(200, 5))).toBe(true);
    // GET_VRING_BASE stops the ring: the back-end took all 8 requests.
    expect(await blk.stop()).toBe(8);
  });

  it('in an I/O address space it is refused (MMB_ERR_UNSUPPORTED: qsd 7.2 offers no VIRTIO_F_ACCESS_PLATFORM) before anything is attached; without one it works', async () => {
    const { qsd, broker, owner, bytes } = await setup();
    await IoasOwner.create(owner, 'dma0');
    const err = await frontend(broker, qsd, { ioas: 'dma0' }).catch((e: unknown) => e);
    expect(isMmbError(err, 'MMB_ERR_UNSUPPORTED')).toBe(true);
    expect((err as Error).message).toMatch(/does not offer VIRTIO_F_ACCESS_PLATFORM/);
    expect((err as Error).message).toMatch(/attach it without an IOAS/);
    const st = broker.status('vm0').spaces[0]!;
    expect(st.clients.filter((c) => c.kind === 'vhost-user')).toEqual([]);
    expect(st.ioas!.find((x) => x.name === 'dma0')!.attached).toEqual([]);
    // qsd serves the next front-end (the refused one closed its connection): READ into broker memory.
    const sub = await frontend(broker, qsd);
    const blk = await blkOf(sub);
    await blk.read(7, 0x10000, 512);
    expect(Buffer.from(bytes.subarray(0x10000, 0x10000 + 512)).equals(sectors(7, 1))).toBe(true);
  });

  it('hotplug through the broker: the back-end maps the region before the add completes, does I/O into it, and no longer maps it once the removal completed', async () => {
    const { image, qsd, broker, owner } = await setup();
    const sub = await frontend(broker, qsd);
    const blk = await blkOf(sub);
    const hot = await mappedBacking(owner, 4 * MiB, 'hot');
    const hotBytes = hot.bytes;
    expect(memfdMaps(qsd.pid, 'hot')).toEqual([]);

    const gpa = 0x1_0000_0000;
    const adds = sub.stats.addMemReg;
    await owner.addRegion({ name: 'hot0', gpa, size: 4 * MiB, backing: hot.backing });
    expect(sub.stats.addMemReg).toBe(adds + 1);
    expect(memfdMaps(qsd.pid, 'hot')).toHaveLength(1);
    expect(sub.backendTable().map((e) => e.name)).toEqual(['ram0', 'hot0']);

    await blk.read(40, gpa + 0x3000, 4 * 512);
    expect(Buffer.from(hotBytes.subarray(0x3000, 0x3000 + 4 * 512)).equals(sectors(40, 4))).toBe(true);
    hotBytes.fill(0xa5, 0x8000, 0x8000 + 1024);
    await blk.write(300, gpa + 0x8000, 1024);
    await blk.flush();
    expect(
      fs
        .readFileSync(image)
        .subarray(300 * 512, 302 * 512)
        .every((b) => b === 0xa5),
    ).toBe(true);

    const rems = sub.stats.remMemReg;
    await owner.removeRegion('hot0');
    // Completed means: the back-end confirmed REM_MEM_REG and has unmapped the memfd, and so have we.
    expect(sub.stats.remMemReg).toBe(rems + 1);
    expect(memfdMaps(qsd.pid, 'hot')).toEqual([]);
    expect(sub.backendTable().map((e) => e.name)).toEqual(['ram0']);
    expect(sub.memory.regions().map((m) => m.region.name)).toEqual(['ram0']);
    // The device still works on what is left.
    await blk.read(7, 0x40000, 512);
  });

  it('a region moved to another GPA in one transaction: REM_MEM_REG before ADD_MEM_REG, I/O follows the new GPA', async () => {
    const { qsd, broker, owner } = await setup();
    const sub = await frontend(broker, qsd);
    const blk = await blkOf(sub);
    const hot = await mappedBacking(owner, 2 * MiB, 'mv', constants.PROT_READ);
    const { view } = hot;
    await owner.addRegion({ name: 'mv', gpa: 0x2000_0000, size: 2 * MiB, backing: hot.backing });
    await owner.commit([
      { op: 'remove', region: 'mv' },
      { op: 'add', name: 'mv2', gpa: 0x3000_0000, size: 2 * MiB, backing: hot.backing, offset: 0 },
    ]);
    expect(sub.backendTable().map((e) => [e.name, e.gpa])).toEqual([
      ['ram0', 0],
      ['mv2', 0x3000_0000],
    ]);
    expect(memfdMaps(qsd.pid, 'mv')).toHaveLength(1);
    await blk.read(9, 0x3000_0000 + 512, 512);
    expect(Buffer.from(new Uint8Array(view.buffer, 512, 512)).equals(patternSector(9))).toBe(true);
  });

  it("the slot limit is the front-end's: a 33rd region is refused before anything is sent, and the back-end keeps working", async () => {
    const { qsd, broker, owner } = await setup(4 * MiB);
    const sub = await frontend(broker, qsd);
    const blk = await blkOf(sub);
    const blocks = await mappedBacking(owner, 64 * MiB, 'slots', constants.PROT_READ);
    const { view } = blocks;
    // 31 more regions with holes between them (nothing to coalesce): 32 slots in use.
    for (let i = 0; i < 31; i++) {
      await owner.addRegion({ name: `s${i}`, gpa: 0x1_0000_0000 + i * 4 * MiB, size: 2 * MiB, backing: blocks.backing, offset: i * 2 * MiB });
    }
    expect(sub.backendTable()).toHaveLength(32);
    const sent = sub.frontend.stats.sent;
    const err = await owner
      .addRegion({ name: 's31', gpa: 0x1_0000_0000 + 31 * 4 * MiB, size: 2 * MiB, backing: blocks.backing, offset: 31 * 2 * MiB })
      .catch((e: unknown) => e);
    expect(isMmbError(err) && err.code).toBe('MMB_ERR_CLIENT_LIMIT');
    expect(isMmbError(err) && err.client?.name).toBe('vhost-user-blk0');
    expect(sub.frontend.stats.sent).toBe(sent); // nothing went to the back-end
    expect(sub.backendTable()).toHaveLength(32);
    // libvhost-user 7.2 would have acked a 33rd ADD_MEM_REG and stopped working: it still works.
    await blk.read(3, 0x10000, 512);
    // The back-end maps each region's memfd from offset 0 (mmap_offset + size), so removing s0 while s1..s30
    // stay would leave it s0's memory: refused before anything is sent, naming it.
    const exposed = await owner.removeRegion('s0').catch((e: unknown) => e);
    expect(isMmbError(exposed) && [exposed.code, exposed.client?.name]).toEqual(['MMB_ERR_BACKING_PREFIX', 'vhost-user-blk0']);
    expect(sub.frontend.stats.sent).toBe(sent);
    expect(memfdMaps(qsd.pid, 'slots')).toHaveLength(31);
    await owner.removeRegion('s30');
    await owner.addRegion({ name: 's31', gpa: 0x1_0000_0000 + 31 * 4 * MiB, size: 2 * MiB, backing: blocks.backing, offset: 30 * 2 * MiB });
    expect(sub.backendTable()).toHaveLength(32);
    // The data lands at the region's offset inside its memfd (mmap_offset), as the owner sees it.
    await blk.read(4, 0x1_0000_0000 + 31 * 4 * MiB + 0x200, 512);
    expect(Buffer.from(new Uint8Array(view.buffer, 30 * 2 * MiB + 0x200, 512)).equals(patternSector(4))).toBe(true);
  });

  it('200 contiguous 2 MiB blocks within 32 slots: new blocks stay separate until the slots run out, then the runs are merged with the rings stopped', async () => {
    const { qsd, broker, owner } = await setup(4 * MiB);
    const sub = await frontend(broker, qsd);
    const blk = await blkOf(sub);
    const blocks = await mappedBacking(owner, 400 * MiB, 'blocks');
    const { view } = blocks;
    const base = 0x1_0000_0000;
    let most = 0;
    for (let i = 0; i < 200; i++) {
      await owner.addRegion({ name: `blk${i}`, gpa: base + i * 2 * MiB, size: 2 * MiB, backing: blocks.backing, offset: i * 2 * MiB });
      most = Math.max(most, sub.backendTable().length);
      // ram0 holds the rings: never touched.
      expect(sub.backendTable()[0]).toMatchObject({ name: 'ram0', gpa: 0, size: 4 * MiB });
    }
    expect(broker.status('vm0').spaces[0]!.regions).toHaveLength(201);
    expect(most).toBe(32);
    // A block is a region of its own until the 32 slots are full; then everything contiguous is merged
    // (one reshape per 31 blocks), with the rings stopped around it and restarted.
    expect(sub.stats.reshapes).toBe(6);
    expect(sub.rings.stats.reshapeStops).toBe(6);
    expect(sub.rings.stats.restarts).toBe(6);
    expect(sub.backendTable().map((e) => [e.gpa - base, e.size / MiB])).toEqual([
      [-base, 4],
      [0, 187 * 2],
      ...Array.from({ length: 13 }, (_, k) => [(187 + k) * 2 * MiB, 2]),
    ]);
    expect(memfdMaps(qsd.pid, 'blocks')).toHaveLength(14);
    // I/O into block 150 (inside the merged run) and block 199 (a region of its own), seen by the owner.
    await blk.read(77, base + 150 * 2 * MiB + 0x1000, 2 * 512);
    expect(Buffer.from(new Uint8Array(view.buffer, 150 * 2 * MiB + 0x1000, 1024)).equals(sectors(77, 2))).toBe(true);
    await blk.read(78, base + 199 * 2 * MiB, 512);
    expect(Buffer.from(new Uint8Array(view.buffer, 199 * 2 * MiB, 512)).equals(sectors(78, 1))).toBe(true);
    // Unplugging a block in the middle of the memfd would leave the back-end that block's memory (it maps
    // the memfd from offset 0 through the end of each region): refused, naming it, nothing sent. Blocks
    // come out from the end of their memfd; the merged run stays as it is, I/O on both sides.
    const sent = sub.frontend.stats.sent;
    const exposed = await owner.removeRegion('blk100').catch((e: unknown) => e);
    expect(isMmbError(exposed) && [exposed.code, exposed.client?.name]).toEqual(['MMB_ERR_BACKING_PREFIX', 'vhost-user-blk0']);
    expect(sub.frontend.stats.sent).toBe(sent);
    await owner.commit([198, 199].map((i) => ({ op: 'remove' as const, region: `blk${i}` })));
    expect(sub.backendTable().map((e) => [e.gpa - base, e.size / MiB])).toEqual([
      [-base, 4],
      [0, 187 * 2],
      ...Array.from({ length: 11 }, (_, k) => [(187 + k) * 2 * MiB, 2]),
    ]);
    expect(memfdMaps(qsd.pid, 'blocks')).toHaveLength(12);
    await blk.read(1, base + 99 * 2 * MiB, 512);
    await blk.read(2, base + 197 * 2 * MiB, 512);
  });

  it('when the back-end dies, the client detaches instead of blocking hotplug for everyone', async () => {
    const { qsd, broker, owner } = await setup(4 * MiB);
    const sub = await frontend(broker, qsd);
    const errors: string[] = [];
    sub.on('error', (e) => errors.push(e.code));
    await qsd.stop();
    await waitFor('the client to detach', () => broker.status('vm0').spaces[0]!.clients.every((c) => c.name !== 'vhost-user-blk0'), 5000);
    expect(errors).toContain('MMB_ERR_DISCONNECTED');
    const hot = await owner.createBacking(2 * MiB, 'after');
    native.close(hot.fd);
    await owner.addRegion({ name: 'after', gpa: 0x1000_0000, size: 2 * MiB, backing: hot.backing });
  });
});
