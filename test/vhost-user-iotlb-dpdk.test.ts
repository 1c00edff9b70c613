// The vhost-user bridge behind a guest IOMMU against a real, unmodified DPDK back-end: dpdk-testpmd's
// net_vhost with iommu-support=1, io forwarding. The bridge follows an IOAS as the device's IOTLB; its
// virtio-net driver gives the device IOVAs only (rings, headers, frames), which testpmd translates through
// its IOTLB, filled by the bridge's updates and by its answers to testpmd's misses.
//
//   - real I/O through IOVAs: a frame sent from a read-only IOVA mapping comes back into the page another
//     IOVA maps;
//   - an unmap completes only once testpmd dropped the entry: a receive buffer posted at that IOVA after
//     the unmap returned makes testpmd miss, the bridge answers with no entry, and the frame is delivered
//     nowhere in guest memory; once the owner maps the IOVA again (to another page), the same descriptor
//     takes the next frame there;
//   - the same for transmit: a frame posted at an unmapped IOVA stays untaken (testpmd misses, no entry)
//     until the IOVA is mapped again, and what goes out then is the new page's content, never the old;
//   - a memory hotplug remaps testpmd's whole table (SET_MEM_TABLE, the rings stopped around it), which
//     empties its IOTLB: the rings restart and frames move again, the entries refilled through misses
//     (the first frame after it is dropped by testpmd while it asks for the receive buffer's entry);
//   - testpmd stopped (SIGSTOP) during an unmap: the invalidation is never confirmed, the bridge drops it
//     and leaves, and the owner is told the unmap is committed but not fenced: testpmd is still a holder
//     of the IOAS until it is gone (SIGKILL).
//
// A fresh testpmd per test (its own --file-prefix), stopped by PID; every wait has a deadline; error lines
// on its stderr fail the test. Without dpdk-testpmd the tests are skipped, except under CI=true.
import fs from 'node:fs';
import { expect, it } from 'vitest';
import { Feature, IotlbPerm, NET_HDR_BYTES, VhostUserSubscriber, VirtioNet, bit, type IotlbReport } from '../clients/vhost-user/index.js';
import { IoasOwner } from '../clients/ioas-owner.js';
import { native } from '../native/index.js';
import { isMmbError } from '../protocol/index.js';
import { TESTPMD } from '../bench/vhost-user-backends.js';
import { defer, embeddedBroker, mappedBacking, ownerOf } from './helpers/embedded.js';
import { waitFor } from './helpers/procs.js';
import { bridgeTo, ciRequires, ethFrame as frame, NET_BRIDGE, realBackends, tool } from './helpers/vhost-user-real.js';

const MiB = 1 << 20;
const PAGE = 4096;
const pmdTool = tool(TESTPMD, 'vhost-user IOTLB DPDK tests');
const describeDpdk = pmdTool.describe;

const backends = realBackends();

ciRequires('CI machines have dpdk-testpmd', pmdTool);

// Guest-physical layout (one 4 MiB region at 0) and the IOVAs the "guest IOMMU" maps.
const AREA = 0x1000; // rings and transmit headers
const AREA_IOVA = 0x1_0000_0000;
const TX_GPA = 0x10000;
const TX_IOVA = 0x2_0000_0000;
const RX_GPA = 0x20000;
const RX_IOVA = 0x3_0000_0000;

async function setup(backendTimeoutMs = 5000) {
  const { pmd, linkUp } = await backends.testpmd('mmb-vhu-iotlb-', { iommu: true });
  const broker = embeddedBroker();
  const owner = await ownerOf(broker);
  const ram = await mappedBacking(owner, 4 * MiB, 'ram');
  await owner.addRegion({ name: 'ram0', gpa: 0, size: 4 * MiB, backing: ram.backing });
  const io = await IoasOwner.create(owner, 'net0');
  // What a guest's driver maps before it starts the device: its rings and headers.
  await io.map({ iova: AREA_IOVA, gpa: AREA, size: PAGE });
  const sub = await bridgeTo(broker, pmd, { ...NET_BRIDGE, ioas: 'net0', backendTimeoutMs });
  const net = await VirtioNet.start(sub, { gpa: AREA, iova: AREA_IOVA, timeoutMs: 10_000 });
  defer(() => net.close());
  const ramBytes = ram.bytes;
  const has = (gpa: number, f: Buffer) => Buffer.from(ramBytes.subarray(gpa, gpa + f.length)).equals(f);
  /** Every offset of guest memory where `f` lies. */
  const findAll = (f: Buffer) => {
    const all = Buffer.from(ramBytes.buffer, ramBytes.byteOffset, ramBytes.length);
    const at: number[] = [];
    for (let i = all.indexOf(f); i >= 0; i = all.indexOf(f, i + 1)) at.push(i);
    return at;
  };
  /** TX_IOVA mapped read-only to TX_GPA (the device only reads what it transmits), RX_IOVA to RX_GPA, in one transaction. */
  const mapTxRx = () =>
    io.commit([
      { op: 'map', iova: TX_IOVA, gpa: TX_GPA, size: PAGE, readonly: true },
      { op: 'map', iova: RX_IOVA, gpa: RX_GPA, size: PAGE },
    ]);
  /** The frame carrying `marker`, sent from TX_GPA through TX_IOVA: it comes back whole at RX_IOVA. */
  const roundTrip = async (marker: string) => {
    const f = frame(marker);
    ramBytes.set(f, TX_GPA);
    const received = net.receive(RX_IOVA, 2048);
    await net.transmit(TX_IOVA, f.length);
    expect(await received).toBe(f.length);
    return f;
  };
  return { pmd, linkUp, broker, owner, io, sub, net, ramBytes, has, findAll, mapTxRx, roundTrip };
}

/** The scheduler state (R, S, T, ...) of every thread of process `pid`, from /proc. */
const threadStates = (pid: number) =>
  fs.readdirSync(`/proc/${pid}/task`).map((t) => /\) (\S)/.exec(fs.readFileSync(`/proc/${pid}/task/${t}/stat`, 'utf8'))?.[1] ?? '?');

/** The next miss the bridge answered for `iova`. */
const missFor = (sub: VhostUserSubscriber, iova: number) =>
  new Promise<IotlbReport>((resolve) => {
    const on = (r: IotlbReport) => {
      if (r.iova !== iova) return;
      sub.iotlb!.off('miss', on);
      resolve(r);
    };
    sub.iotlb!.on('miss', on);
  });

describeDpdk('vhost-user bridge behind a guest IOMMU: dpdk-testpmd (net_vhost, iommu-support=1)', () => {
  it('frames move through IOVAs only; after an unmap a receive buffer at that IOVA takes nothing until it is mapped again', async () => {
    const { sub, io, net, ramBytes, has, findAll, mapTxRx, roundTrip } = await setup();
    // testpmd offers IOMMU_PLATFORM with iommu-support=1: negotiated, with its request channel.
    expect(sub.negotiated.iommu).toBe(true);
    expect(sub.negotiated.features & bit(Feature.ACCESS_PLATFORM)).not.toBe(0n);
    // The rings were given as IOVAs; testpmd asked for their translation (its IOTLB was empty: the
    // attach's update came before its queues existed) and the bridge answered.
    await waitFor("testpmd to ask for the rings' translation", () => sub.iotlb!.stats.missesAnswered > 0, 10_000);

    // The device only reads what it transmits: a read-only mapping is enough.
    await mapTxRx();
    const one = await roundTrip('mmb-iova-one');
    // Written by testpmd at RX_IOVA, which is the page at RX_GPA.
    expect(has(RX_GPA + NET_HDR_BYTES, one)).toBe(true);

    // The guest unmaps its receive page: done only once testpmd confirmed the invalidation.
    await io.unmap(RX_IOVA, PAGE);
    expect(sub.iotlb!.established().map((m) => m.iova)).toEqual([AREA_IOVA, TX_IOVA]);
    const lost = frame('mmb-iova-after-unmap');
    ramBytes.set(lost, TX_GPA);
    const missed = missFor(sub, RX_IOVA);
    const late = net.receive(RX_IOVA, 2048);
    late.catch(() => undefined);
    // testpmd takes the frame from TX, misses on the receive buffer's IOVA (its entry is gone), and the
    // bridge answers with no entry: the frame is dropped.
    await net.transmit(TX_IOVA, lost.length);
    const m = await missed;
    expect(m.answered).toBeUndefined();
    expect(m.perm & IotlbPerm.WO).not.toBe(0);
    expect(sub.iotlb!.stats.missesRefused).toBeGreaterThan(0);

    // The guest maps the IOVA again, to another page: the descriptor still posted takes the next frame
    // there. The dropped frame is nowhere in guest memory (only at TX_GPA, where the test wrote it).
    const NEW_RX = 0x30000;
    await io.map({ iova: RX_IOVA, gpa: NEW_RX, size: PAGE });
    const two = frame('mmb-iova-two');
    ramBytes.set(two, TX_GPA);
    await net.transmit(TX_IOVA, two.length);
    expect(await late).toBe(two.length);
    expect(has(NEW_RX + NET_HDR_BYTES, two)).toBe(true);
    expect(has(RX_GPA + NET_HDR_BYTES, one)).toBe(true); // the old page kept what it had
    expect(findAll(lost)).toEqual([]);
    expect(net.rx.stats.completed).toBe(2);
  });

  it('a frame posted at an unmapped IOVA is not transmitted until the IOVA is mapped again, and then from the new page', async () => {
    const { sub, io, net, ramBytes, has, roundTrip } = await setup();
    await io.map({ iova: RX_IOVA, gpa: RX_GPA, size: PAGE });
    await io.map({ iova: TX_IOVA, gpa: TX_GPA, size: PAGE, readonly: true });
    // The device runs both ways: one frame through the IOVAs first.
    await roundTrip('mmb-iova-warm');
    const old = frame('mmb-iova-old-page');
    ramBytes.set(old, TX_GPA);
    await io.unmap(TX_IOVA, PAGE);
    const received = net.receive(RX_IOVA, 2048);
    const missed = missFor(sub, TX_IOVA);
    const sent = net.transmit(TX_IOVA, old.length);
    sent.catch(() => undefined);
    const m = await missed;
    expect(m.answered).toBeUndefined();
    expect(net.tx.stats.completed).toBe(1);
    // Mapped again, to a page with another frame: that one goes out, never the old page's.
    const NEW_TX = 0x40000;
    const fresh = frame('mmb-iova-new-page');
    ramBytes.set(fresh, NEW_TX);
    await io.map({ iova: TX_IOVA, gpa: NEW_TX, size: PAGE, readonly: true });
    await sent;
    expect(await received).toBe(fresh.length);
    expect(has(RX_GPA + NET_HDR_BYTES, fresh)).toBe(true);
  });

  it("a hotplug empties testpmd's IOTLB (SET_MEM_TABLE): the restarted rings and the frames get their entries again through misses", async () => {
    const { sub, owner, net, ramBytes, has, findAll, mapTxRx, roundTrip, linkUp } = await setup();
    await mapTxRx();
    await roundTrip('mmb-iova-before-hotplug');
    const misses: string[] = [];
    sub.iotlb!.on('miss', (r) => misses.push(`${r.iova.toString(16)}:${r.perm}:${r.answered ? 'answered' : 'no entry'}`));
    // A region hotplugged elsewhere: DPDK takes a whole new table (a reshape: rings stopped, GET_VRING_BASE
    // and SET_MEM_TABLE both drop its IOTLB entries), then the rings are set up again at their IOVAs.
    const more = await owner.createBacking(2 * MiB, 'more');
    defer(() => native.close(more.fd));
    await owner.addRegion({ name: 'more', gpa: 0x4000_0000, size: 2 * MiB, backing: more.backing });
    expect(sub.rings.stats.reshapeStops).toBe(1);
    await linkUp(sub.rings.stats.restarts);
    // The next frame: testpmd asks for the transmit buffer's entry (and waits for it), takes the frame,
    // then asks for the receive buffer's entry; io forwarding does not wait for that one and usually drops
    // the frame, as a NIC drops a frame it cannot place (when the miss is answered first, it lands).
    const rxMiss = missFor(sub, RX_IOVA);
    const second = net.receive(RX_IOVA, 2048);
    let landed = false;
    void second.then(() => (landed = true));
    const two = frame('mmb-iova-after-hotplug');
    ramBytes.set(two, TX_GPA);
    await net.transmit(TX_IOVA, two.length);
    expect((await rxMiss).answered).toEqual({ iova: RX_IOVA, gpa: RX_GPA, size: PAGE, readonly: false });
    // Entries refilled: the next frame lands in the buffer still posted (unless `two` took it).
    const three = frame('mmb-iova-refilled');
    if (!landed) {
      ramBytes.set(three, TX_GPA);
      await net.transmit(TX_IOVA, three.length);
    }
    const got = await second;
    const delivered = got === three.length && has(RX_GPA + NET_HDR_BYTES, three) ? three : two;
    expect(got).toBe(delivered.length);
    expect(has(RX_GPA + NET_HDR_BYTES, delivered)).toBe(true);
    // A frame dropped for want of its entry is nowhere in guest memory (`two` was overwritten at TX_GPA).
    if (delivered === three) expect(findAll(two)).toEqual([]);
    // The rings' area (read and written by the device), the transmit buffer (read), the receive buffer.
    expect(misses).toEqual(
      expect.arrayContaining([`${AREA_IOVA.toString(16)}:3:answered`, `${TX_IOVA.toString(16)}:1:answered`, `${RX_IOVA.toString(16)}:3:answered`]),
    );
    expect(sub.iotlb!.stats.missesRefused).toBe(0);
  });

  it('testpmd stopped during an unmap: never "done"; the owner hears committed-unfenced and testpmd holds the IOAS until it is killed', async () => {
    const { pmd, broker, owner, io, sub } = await setup(3000);
    await io.map({ iova: RX_IOVA, gpa: RX_GPA, size: PAGE });
    process.kill(pmd.pid, 'SIGSTOP');
    let stopped = true;
    defer(() => {
      if (stopped) process.kill(pmd.pid, 'SIGCONT');
    });
    // SIGSTOP takes effect thread by thread: testpmd answers nothing only once every thread is stopped.
    await waitFor('every testpmd thread to be stopped', () => threadStates(pmd.pid).every((st) => st === 'T'), 5000);
    const err = await io.unmap(RX_IOVA, PAGE).catch((e: unknown) => e);
    expect(isMmbError(err, 'MMB_ERR_COMMITTED_UNFENCED')).toBe(true);
    await waitFor('the bridge to leave', () => !broker.status('vm0').spaces[0]!.clients.some((c) => c.name === 'vhost-user-net0'), 10_000);
    expect(sub.connected).toBe(false);
    const ioas = async () => (await owner.status()).spaces[0]!.ioas!.find((x) => x.name === 'net0')!;
    expect((await ioas()).holders.length).toBe(1);
    // testpmd gone: nothing can translate the IOVA any more, and the hold ends.
    process.kill(pmd.pid, 'SIGKILL');
    stopped = false;
    await waitFor('the hold to end', async () => (await ioas()).holders.length === 0, 10_000);
  });
});
