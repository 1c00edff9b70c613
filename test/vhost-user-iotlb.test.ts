// The vhost-user bridge behind a guest IOMMU, against a scripted back-end (test/helpers/vhost-user-fake.ts):
// the negotiation (VIRTIO_F_ACCESS_PLATFORM, BACKEND_REQ, the request channel handed over before
// SET_OWNER), the exact bytes of VHOST_USER_IOTLB_MSG for the IOAS's maps (uaddr in the memory table's
// coordinates) and unmaps, an unmap that completes only once the back-end confirmed its invalidation,
// misses answered on the request channel from the IOAS's mappings (or with no entry), access failures,
// a refused update rolled back, ring addresses as IOVAs, and a back-end that cannot translate refused
// with a typed error before anything is attached. The same against dpdk-testpmd: vhost-user-iotlb-dpdk.
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import {
  BackendReq,
  Feature,
  Flag,
  IOTLB_MSG_BYTES,
  IotlbPerm,
  IotlbType,
  ProtocolFeature,
  Req,
  VhostUserSubscriber,
  VirtioNet,
  bit,
  decodeIotlb,
  iotlbPayload,
  ringLayout,
  type IotlbReport,
  type VhostUserOptions,
} from '../clients/vhost-user/index.js';
import { IoasOwner } from '../clients/ioas-owner.js';
import { native } from '../native/index.js';
import { isMmbError } from '../protocol/index.js';
import { defer, embeddedBroker, ownerOf, runCleanups } from './helpers/embedded.js';
import { FakeBackend, u64, type Message } from './helpers/vhost-user-fake.js';
import { fdCount, tempDir, waitFor } from './helpers/procs.js';

const MiB = 1 << 20;
const PAGE = 4096;
const UADDR = 0x7f00_0000_0000n;
afterEach(runCleanups);

/** A back-end that can translate IOVAs: ACCESS_PLATFORM, BACKEND_REQ and REPLY_ACK offered. */
function fake(): FakeBackend {
  const b = new FakeBackend(path.join(tempDir('mmb-vhu-iotlb-'), 'fake.sock'));
  b.features |= bit(Feature.ACCESS_PLATFORM);
  b.protocolFeatures |= bit(ProtocolFeature.BACKEND_REQ);
  defer(() => b.close());
  return b;
}

async function setup(b: FakeBackend, opts: Partial<VhostUserOptions> = {}) {
  const broker = embeddedBroker();
  const owner = await ownerOf(broker);
  const ram = await owner.createBacking(64 * MiB, 'fakeram');
  defer(() => native.close(ram.fd));
  await owner.addRegion({ name: 'ram', gpa: 0, size: 32 * MiB, backing: ram.backing });
  const io = await IoasOwner.create(owner, 'dma0');
  const sub = await VhostUserSubscriber.attach(broker, {
    space: 'vm0',
    name: 'vu-iommu',
    backendSocket: b.socket,
    reconnect: false,
    backendTimeoutMs: 2000,
    ioas: 'dma0',
    ...opts,
  });
  defer(() => sub.close());
  return { broker, owner, ram, io, sub };
}

const iotlbs = (b: FakeBackend, from = 0) => b.messages.slice(from).filter((m) => m.request === Req.IOTLB_MSG);

/** The expected bytes of a struct vhost_iotlb_msg, written by hand (not by the encoder under test). */
function iotlbBytes(iova: number, size: number, uaddr: bigint, perm: number, type: number): Buffer {
  const p = Buffer.alloc(32);
  p.writeBigUInt64LE(BigInt(iova), 0);
  p.writeBigUInt64LE(BigInt(size), 8);
  p.writeBigUInt64LE(uaddr, 16);
  p[24] = perm;
  p[25] = type;
  return p;
}

function miss(b: FakeBackend, iova: number, perm: number, needReply = true): void {
  b.sendBackendRequest(
    BackendReq.IOTLB_MSG,
    iotlbPayload({ iova, size: 0, uaddr: 0n, perm, type: IotlbType.MISS }),
    Flag.VERSION | (needReply ? Flag.NEED_REPLY : 0),
  );
}

describe('vhost-user bridge behind a guest IOMMU (scripted back-end)', () => {
  it('negotiates ACCESS_PLATFORM and BACKEND_REQ, hands over the request channel before SET_OWNER, and attaches its device to the IOAS', async () => {
    const b = fake();
    const { broker, sub } = await setup(b);
    expect(b.names()).toEqual([
      'GET_FEATURES',
      'GET_PROTOCOL_FEATURES',
      'SET_PROTOCOL_FEATURES',
      'GET_QUEUE_NUM',
      'GET_MAX_MEM_SLOTS',
      'SET_BACKEND_REQ_FD',
      'SET_OWNER',
      'SET_FEATURES',
      'ADD_MEM_REG',
      'GET_FEATURES',
    ]);
    const [, , setPf, , , reqFd, , setF] = b.messages as Message[];
    expect(setPf!.payload.readBigUInt64LE(0)).toBe(
      bit(ProtocolFeature.MQ) | bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.BACKEND_REQ) | bit(ProtocolFeature.CONFIGURE_MEM_SLOTS),
    );
    // SET_BACKEND_REQ_FD: no payload, one fd (our socketpair's other end), confirmed.
    expect(reqFd!.flags).toBe(Flag.VERSION | Flag.NEED_REPLY);
    expect(reqFd!.payload.length).toBe(0);
    expect(reqFd!.fds).toBe(1);
    expect(setF!.payload.readBigUInt64LE(0)).toBe(bit(Feature.VERSION_1) | bit(Feature.ACCESS_PLATFORM) | bit(Feature.PROTOCOL_FEATURES));
    expect(sub.negotiated.iommu).toBe(true);
    expect(sub.ioasAttachments()).toEqual([{ ioas: 'dma0', devices: ['vu-iommu'], generation: 0, mappings: 0 }]);
    const st = broker.status('vm0').spaces[0]!.ioas!.find((x) => x.name === 'dma0')!;
    expect(st.attached.map((a) => a.client.name)).toEqual(['vu-iommu']);
  });

  it("a map sends VHOST_IOTLB_UPDATE (uaddr in the memory table's coordinates, RW or RO) confirmed before the owner is told; an unmap sends INVALIDATE", async () => {
    const b = fake();
    const { io, sub } = await setup(b);
    const from = b.messages.length;
    await io.commit([
      { op: 'map', iova: 0x1_0000_0000, gpa: 0x20_0000, size: 2 * PAGE },
      { op: 'map', iova: 0x1_0001_0000, gpa: 0x30_0000, size: PAGE, readonly: true },
    ]);
    const ups = iotlbs(b, from);
    expect(ups).toHaveLength(2);
    for (const m of ups) {
      expect(m.flags).toBe(Flag.VERSION | Flag.NEED_REPLY);
      expect(m.payload.length).toBe(IOTLB_MSG_BYTES);
      expect(m.fds).toBe(0);
    }
    // The region "ram" is at GPA 0 with userspace_addr 0x7f0000000000: uaddr = that + gpa (QEMU's rule:
    // reg->userspace_addr + gpa - reg->guest_phys_addr).
    expect(ups[0]!.payload.equals(iotlbBytes(0x1_0000_0000, 2 * PAGE, UADDR + 0x20_0000n, IotlbPerm.RW, IotlbType.UPDATE))).toBe(true);
    expect(ups[1]!.payload.equals(iotlbBytes(0x1_0001_0000, PAGE, UADDR + 0x30_0000n, IotlbPerm.RO, IotlbType.UPDATE))).toBe(true);
    // The updates are the vote: nothing behind them but the commit notice.
    expect(b.names(from)).toEqual(['IOTLB_MSG', 'IOTLB_MSG']);
    expect(sub.iotlb!.established().map((m) => m.iova)).toEqual([0x1_0000_0000, 0x1_0001_0000]);

    const at = b.messages.length;
    await io.unmap(0x1_0000_0000, 2 * PAGE);
    const inv = iotlbs(b, at);
    expect(inv).toHaveLength(1);
    expect(inv[0]!.flags).toBe(Flag.VERSION | Flag.NEED_REPLY);
    expect(inv[0]!.payload.equals(iotlbBytes(0x1_0000_0000, 2 * PAGE, 0n, 0, IotlbType.INVALIDATE))).toBe(true);
    expect(sub.iotlb!.established().map((m) => m.iova)).toEqual([0x1_0001_0000]);
    expect(sub.iotlb!.stats).toMatchObject({ updates: 2, invalidates: 1 });
  });

  it('uaddr is in the coordinates of the table region the GPA is in, whatever its offset in its memfd', async () => {
    const b = fake();
    const { owner, ram, io } = await setup(b, { coalesce: false });
    // A second region right after the first in GPA, from another offset of the memfd (behind a third, so
    // that the back-end's mapping from offset 0 reaches only the map): its own table entry.
    await owner.addRegion({ name: 'mid', gpa: 64 * MiB, size: 8 * MiB, backing: ram.backing, offset: 32 * MiB });
    await owner.addRegion({ name: 'hi', gpa: 32 * MiB, size: 2 * MiB, backing: ram.backing, offset: 40 * MiB });
    const from = b.messages.length;
    await io.map({ iova: 0x2_0000_0000, gpa: 32 * MiB + PAGE, size: PAGE });
    expect(iotlbs(b, from)[0]!.payload.equals(iotlbBytes(0x2_0000_0000, PAGE, UADDR + BigInt(32 * MiB + PAGE), IotlbPerm.RW, IotlbType.UPDATE))).toBe(true);
  });

  it('an unmap completes only after the back-end confirmed VHOST_IOTLB_INVALIDATE', async () => {
    const b = fake();
    const { owner, io } = await setup(b);
    await io.map({ iova: 0x1_0000_0000, gpa: 0x10_0000, size: PAGE });
    let held: (() => void) | undefined;
    b.override = (m, reply) => {
      if (m.request === Req.IOTLB_MSG && m.payload[25] === IotlbType.INVALIDATE) {
        held = () => reply(u64(0));
        return true;
      }
      return false;
    };
    let done = false;
    const unmap = io.unmap(0x1_0000_0000, PAGE).then(() => (done = true));
    await waitFor('the invalidation to reach the back-end', () => held !== undefined, 3000);
    // A round trip to the broker after the invalidation arrived: an unmap acked without waiting for the
    // back-end would have been answered to the owner before this status reply.
    await owner.status();
    expect(done).toBe(false);
    held!();
    await unmap;
    expect((await owner.status()).spaces[0]!.ioas!.find((x) => x.name === 'dma0')!.mappings).toBe(0);
  });

  it('a miss on the request channel is answered with an update for the whole mapping, then a reply of 0', async () => {
    const b = fake();
    const { io, sub } = await setup(b);
    await io.map({ iova: 0x1_0000_0000, gpa: 0x40_0000, size: 4 * PAGE });
    const from = b.messages.length;
    const reported = new Promise<IotlbReport>((r) => sub.iotlb!.once('miss', r));
    miss(b, 0x1_0000_2345, IotlbPerm.RW);
    await waitFor('the reply on the request channel', () => b.channelMessages.length === 1, 3000);
    // The update went out on the main connection, confirmed, before the reply came on the channel.
    const ups = iotlbs(b, from);
    expect(ups).toHaveLength(1);
    expect(ups[0]!.payload.equals(iotlbBytes(0x1_0000_0000, 4 * PAGE, UADDR + 0x40_0000n, IotlbPerm.RW, IotlbType.UPDATE))).toBe(true);
    expect(ups[0]!.at).toBeLessThan(b.channelMessages[0]!.at);
    // The reply: the request's id, VERSION | REPLY, a u64 0.
    const r = b.channelMessages[0]!;
    expect([r.request, r.flags, r.payload.length, r.payload.readBigUInt64LE(0)]).toEqual([BackendReq.IOTLB_MSG, Flag.VERSION | Flag.REPLY, 8, 0n]);
    expect((await reported).answered).toEqual({ iova: 0x1_0000_0000, gpa: 0x40_0000, size: 4 * PAGE, readonly: false });
    // DPDK sends its misses without NEED_REPLY: answered the same, with nothing on the channel.
    const at = b.messages.length;
    miss(b, 0x1_0000_0000, IotlbPerm.RO, false);
    await waitFor('the update for the second miss', () => iotlbs(b, at).length === 1, 3000);
    expect(b.channelMessages).toHaveLength(1);
    expect(sub.iotlb!.stats).toMatchObject({ misses: 2, missesAnswered: 2, missesRefused: 0 });
  });

  it('a miss for an IOVA the IOAS does not map, or a write through a read-only mapping, gets no entry and a non-zero reply', async () => {
    const b = fake();
    const { io, sub } = await setup(b);
    await io.map({ iova: 0x1_0000_0000, gpa: 0x40_0000, size: PAGE, readonly: true });
    await io.map({ iova: 0x1_0000_1000, gpa: 0x41_0000, size: PAGE });
    await io.unmap(0x1_0000_1000, PAGE);
    const from = b.messages.length;
    miss(b, 0x1_0000_1000, IotlbPerm.RW); // unmapped
    miss(b, 0x1_0000_0000, IotlbPerm.WO); // read-only
    miss(b, 0x9_0000_0000, IotlbPerm.RO); // never mapped
    await waitFor('three replies', () => b.channelMessages.length === 3, 3000);
    expect(b.channelMessages.map((m) => m.payload.readBigUInt64LE(0))).toEqual([1n, 1n, 1n]);
    expect(iotlbs(b, from)).toEqual([]);
    expect(sub.iotlb!.stats).toMatchObject({ misses: 3, missesAnswered: 0, missesRefused: 3 });
    // A read through the read-only mapping is answered, RO.
    miss(b, 0x1_0000_0000, IotlbPerm.RO);
    await waitFor('the fourth reply', () => b.channelMessages.length === 4, 3000);
    expect(b.channelMessages[3]!.payload.readBigUInt64LE(0)).toBe(0n);
    expect(iotlbs(b, from)[0]!.payload.equals(iotlbBytes(0x1_0000_0000, PAGE, UADDR + 0x40_0000n, IotlbPerm.RO, IotlbType.UPDATE))).toBe(true);
  });

  it('an access failure reported by the back-end is counted, emitted and acknowledged; an unknown request is refused', async () => {
    const b = fake();
    const { sub } = await setup(b);
    const reported = new Promise<IotlbReport>((r) => sub.iotlb!.once('access-fail', r));
    b.sendBackendRequest(
      BackendReq.IOTLB_MSG,
      iotlbPayload({ iova: 0x5000, size: 0, uaddr: 0n, perm: IotlbPerm.WO, type: IotlbType.ACCESS_FAIL }),
      Flag.VERSION | Flag.NEED_REPLY,
    );
    b.sendBackendRequest(BackendReq.CONFIG_CHANGE_MSG, Buffer.alloc(0), Flag.VERSION | Flag.NEED_REPLY);
    await waitFor('two replies', () => b.channelMessages.length === 2, 3000);
    expect(await reported).toMatchObject({ type: 'access-fail', iova: 0x5000, perm: IotlbPerm.WO });
    expect(b.channelMessages.map((m) => [m.request, m.payload.readBigUInt64LE(0)])).toEqual([
      [BackendReq.IOTLB_MSG, 0n],
      [BackendReq.CONFIG_CHANGE_MSG, 1n],
    ]);
    expect(sub.iotlb!.stats.accessFails).toBe(1);
  });

  it('a back-end that refuses an update: the transaction is rolled back everywhere and what was sent is invalidated', async () => {
    const b = fake();
    const { owner, io, sub } = await setup(b);
    b.override = (m, reply) => {
      if (m.request === Req.IOTLB_MSG && m.payload[25] === IotlbType.UPDATE && m.payload.readBigUInt64LE(0) === 0x1_0000_1000n) {
        reply(u64(1));
        return true;
      }
      return false;
    };
    const from = b.messages.length;
    const err = await io
      .commit([
        { op: 'map', iova: 0x1_0000_0000, gpa: 0x10_0000, size: PAGE },
        { op: 'map', iova: 0x1_0000_1000, gpa: 0x11_0000, size: PAGE },
      ])
      .catch((e: unknown) => e);
    expect(isMmbError(err, 'MMB_ERR_CLIENT_REFUSED') && err.client?.name).toBe('vu-iommu');
    const sent = iotlbs(b, from).map((m) => decodeIotlb(m.payload));
    expect(sent.map((m) => [m.type, m.iova])).toEqual([
      [IotlbType.UPDATE, 0x1_0000_0000],
      [IotlbType.UPDATE, 0x1_0000_1000],
      [IotlbType.INVALIDATE, 0x1_0000_0000],
      [IotlbType.INVALIDATE, 0x1_0000_1000],
    ]);
    expect(sub.iotlb!.established()).toEqual([]);
    const st = (await owner.status()).spaces[0]!.ioas!.find((x) => x.name === 'dma0')!;
    expect([st.generation, st.mappings]).toEqual([0, 0]);
  });

  it('a mapping into read-only memory (never given to a vhost-user back-end) is refused before anything is sent', async () => {
    const b = fake();
    const { owner, ram, io } = await setup(b);
    await owner.addRegion({ name: 'rom', gpa: 48 * MiB, size: 2 * MiB, backing: ram.backing, offset: 48 * MiB, readonly: true });
    const from = b.messages.length;
    const err = await io.map({ iova: 0x1_0000_0000, gpa: 48 * MiB, size: PAGE, readonly: true }).catch((e: unknown) => e);
    expect(isMmbError(err, 'MMB_ERR_CLIENT_REFUSED') && err.message).toMatch(/not given/);
    expect(iotlbs(b, from)).toEqual([]);
  });

  it("the virtio-net driver gives the device IOVAs: SET_VRING_ADDR carries the rings' IOVAs, descriptors the buffers'", async () => {
    const b = fake();
    const { io, sub } = await setup(b, { virtioFeatures: bit(Feature.VERSION_1) });
    const area = 0x10_0000;
    const iova = 0x1_0000_0000;
    await io.map({ iova, gpa: area, size: 4 * PAGE });
    const from = b.messages.length;
    const net = await VirtioNet.start(sub, { gpa: area, iova, timeoutMs: 1000 });
    defer(() => net.close());
    const addrs = b.messages.slice(from).filter((m) => m.request === Req.SET_VRING_ADDR);
    expect(addrs).toHaveLength(2);
    const l = ringLayout(16);
    // { u32 index, flags; u64 desc, used, avail, log }: IOVAs, and the log address too (DPDK translates it).
    const fields = (p: Buffer) => [8, 16, 24, 32].map((at) => Number(p.readBigUInt64LE(at)));
    expect(fields(addrs[0]!.payload)).toEqual([iova + l.desc, iova + l.used, iova + l.avail, iova + l.used]);
    const tx = iova + l.bytes;
    expect(fields(addrs[1]!.payload)).toEqual([tx + l.desc, tx + l.used, tx + l.avail, tx + l.used]);
    // A receive buffer at an IOVA: the descriptor carries it, as given.
    void net.receive(0x2_0000_0000, 2048).catch(() => undefined);
    const desc = sub.memory.slice(area, 16);
    expect(Buffer.from(desc).readBigUInt64LE(0)).toBe(0x2_0000_0000n);
  });

  it('a back-end without ACCESS_PLATFORM (qemu-storage-daemon 7.2) is refused with MMB_ERR_UNSUPPORTED naming it, before anything is attached; nothing leaks', async () => {
    for (const lack of ['feature', 'channel'] as const) {
      const b = fake();
      if (lack === 'feature') b.features &= ~bit(Feature.ACCESS_PLATFORM);
      else b.protocolFeatures &= ~bit(ProtocolFeature.BACKEND_REQ);
      const broker = embeddedBroker();
      await ownerOf(broker);
      const fds = fdCount(process.pid);
      const conns = b.connections;
      const err = await VhostUserSubscriber.attach(broker, { space: 'vm0', name: 'vu-iommu', backendSocket: b.socket, reconnect: false, ioas: 'dma0' }).catch(
        (e: unknown) => e,
      );
      expect(isMmbError(err, 'MMB_ERR_UNSUPPORTED')).toBe(true);
      expect((err as Error).message).toMatch(lack === 'feature' ? /VIRTIO_F_ACCESS_PLATFORM/ : /BACKEND_REQ/);
      expect((err as Error).message).toMatch(/without an IOAS/);
      // Nothing was set at the back-end, no client attached, no descriptor left open here.
      expect(b.names()).toEqual(['GET_FEATURES', 'GET_PROTOCOL_FEATURES']);
      expect(broker.status('vm0').spaces[0]!.clients.filter((c) => c.kind === 'vhost-user')).toEqual([]);
      await waitFor('the bridge to close its end of the back-end connection', () => b.peerClosed, 3000);
      // The only descriptor more than before: the scripted back-end's own end of that connection.
      expect(b.connections).toBe(conns + 1);
      expect(fdCount(process.pid)).toBe(fds + 1);
    }
  });
});

describe('vhost-user bridge behind a guest IOMMU: a back-end that stops answering', () => {
  it('an invalidation never confirmed: the bridge drops the back-end and leaves; the owner is told the unmap is committed but not fenced, the back-end still a holder', async () => {
    const b = fake();
    const { broker, owner, io, sub } = await setup(b, { backendTimeoutMs: 300 });
    await io.map({ iova: 0x1_0000_0000, gpa: 0x10_0000, size: PAGE });
    b.override = (m) => m.request === Req.IOTLB_MSG && m.payload[25] === IotlbType.INVALIDATE;
    const errors: string[] = [];
    sub.on('error', (e) => errors.push(e.code));
    const err = await io.unmap(0x1_0000_0000, PAGE).catch((e: unknown) => e);
    // Never "done": the back-end (named to the broker as this client's delegate, here this very process)
    // may still translate the IOVA, so the memory behind it stays held.
    expect(isMmbError(err, 'MMB_ERR_COMMITTED_UNFENCED')).toBe(true);
    expect(errors).toEqual(['MMB_ERR_TIMEOUT']);
    await waitFor('the bridge to close the back-end connection', () => b.peerClosed, 3000);
    await waitFor('the client to leave', () => !broker.status('vm0').spaces[0]!.clients.some((c) => c.name === 'vu-iommu'), 3000);
    const st = (await owner.status()).spaces[0]!.ioas!.find((x) => x.name === 'dma0')!;
    expect([st.mappings, st.attached]).toEqual([0, []]);
    expect(st.holders.length).toBe(1);
  });
});
