// The vhost-user front-end against a real, unmodified DPDK back-end: dpdk-testpmd with a net_vhost vdev in
// io forwarding mode. DPDK 22.11 offers no CONFIGURE_MEM_SLOTS, so every map change is one SET_MEM_TABLE
// (at most 8 regions). A frame sent on the TX queue from one region comes back on the RX queue into a
// second region that was hotplugged through the broker while the device was running; unplugging that
// region takes it out of testpmd's /proc/PID/maps before the removal completes.
//
// A fresh testpmd per test (its own --file-prefix), stopped by PID; every wait has a deadline; error lines
// on its stderr fail the test. Without dpdk-testpmd the tests are skipped, except under CI=true.
import { expect, it } from 'vitest';
import { VirtioNet, NET_HDR_BYTES } from '../clients/vhost-user/index.js';
import { constants, native } from '../native/index.js';
import { isMmbError } from '../protocol/index.js';
import { TESTPMD } from '../bench/vhost-user-backends.js';
import { defer, embeddedBroker, mappedBacking, ownerOf } from './helpers/embedded.js';
import { memfdMaps } from './helpers/procs.js';
import { bridgeTo, ciRequires, ethFrame as frame, NET_BRIDGE, realBackends, tool } from './helpers/vhost-user-real.js';

const MiB = 1 << 20;
const pmdTool = tool(TESTPMD, 'vhost-user DPDK tests');
const describeDpdk = pmdTool.describe;

const backends = realBackends();

ciRequires('CI machines have dpdk-testpmd', pmdTool);

describeDpdk('vhost-user front-end: dpdk-testpmd (net_vhost)', () => {
  it('a frame sent on TX from one region comes back on RX into a second region hotplugged through the broker', async () => {
    const { pmd, linkUp } = await backends.testpmd('mmb-vhu-dpdk-');
    const broker = embeddedBroker();
    const owner = await ownerOf(broker);
    const { view: ramView, backing } = await mappedBacking(owner, 4 * MiB, 'ram');
    await owner.addRegion({ name: 'ram0', gpa: 0, size: 4 * MiB, backing });

    const sub = await bridgeTo(broker, pmd, NET_BRIDGE);
    // DPDK 22.11: no CONFIGURE_MEM_SLOTS, so SET_MEM_TABLE only, 8 regions, declared to the broker.
    expect(sub.memMode).toBe('table');
    expect(sub.maxSlots).toBe(8);
    expect(memfdMaps(pmd.pid, 'ram')).toHaveLength(1);
    const net = await VirtioNet.start(sub, { gpa: 0x1000, timeoutMs: 5000 });
    defer(() => net.close());

    // Hotplug the RX memory while the device runs: a 1 MiB region at offset 1 MiB of its memfd. DPDK maps
    // the memfd from offset 0 through the region's end, so alone it would reach [0, 1 MiB), memory in no
    // region: refused before anything is sent, naming the bridge. With the memfd's first MiB as a region
    // of its own (at another GPA) it goes in.
    const rx = await mappedBacking(owner, 4 * MiB, 'rxmem', constants.PROT_READ);
    const rxView = rx.view;
    const tables = sub.stats.setMemTable;
    const rxGpa = 0x4000_0000;
    const rx0 = { op: 'add' as const, name: 'rx0', gpa: rxGpa, size: 1 * MiB, backing: rx.backing, offset: 1 * MiB };
    const exposed = await owner.commit([rx0]).catch((e: unknown) => e);
    expect(isMmbError(exposed) && [exposed.code, exposed.client?.name]).toEqual(['MMB_ERR_BACKING_PREFIX', NET_BRIDGE.name]);
    expect(sub.stats.setMemTable).toBe(tables);
    expect(memfdMaps(pmd.pid, 'rxmem')).toEqual([]);
    await owner.commit([rx0, { op: 'add', name: 'rxlow', gpa: 0x5000_0000, size: 1 * MiB, backing: rx.backing, offset: 0 }]);
    expect(sub.stats.setMemTable).toBe(tables + 1);
    // A table after the first remaps what DPDK has: the rings were stopped around it and restarted.
    expect(sub.rings.stats.reshapeStops).toBe(1);
    expect([net.rx.stats.restarts, net.tx.stats.restarts]).toEqual([1, 1]);
    expect(sub.backendTable().map((e) => [e.name, e.mmapOffset])).toEqual([
      ['ram0', 0],
      ['rx0', 1 * MiB],
      ['rxlow', 0],
    ]);
    expect(memfdMaps(pmd.pid, 'rxmem')).toHaveLength(2);
    await linkUp(sub.rings.stats.restarts);

    for (const [i, marker] of ['mmb-frame-one', 'mmb-frame-two'].entries()) {
      const buf = rxGpa + 0x1000 + i * 0x1000;
      const received = net.receive(buf, 2048);
      const f = frame(marker);
      new Uint8Array(ramView.buffer).set(f, 0x10000);
      await net.transmit(0x10000, f.length);
      const len = await received;
      expect(len).toBe(f.length);
      // Read back through the owner's own mapping of the second memfd: the back-end wrote it there.
      const off = 1 * MiB + 0x1000 + i * 0x1000 + NET_HDR_BYTES;
      expect(Buffer.from(new Uint8Array(rxView.buffer, off, f.length)).equals(f)).toBe(true);
    }

    // Unplug: one SET_MEM_TABLE without the regions, confirmed before the removal completes.
    await owner.commit([
      { op: 'remove', region: 'rx0' },
      { op: 'remove', region: 'rxlow' },
    ]);
    expect(sub.backendTable().map((e) => e.name)).toEqual(['ram0']);
    expect(memfdMaps(pmd.pid, 'rxmem')).toEqual([]);
    // Still working on what is left: a frame back into the first region.
    const received = net.receive(0x20000, 2048);
    const f = frame('mmb-frame-three');
    new Uint8Array(ramView.buffer).set(f, 0x10000);
    await net.transmit(0x10000, f.length);
    expect(await received).toBe(f.length);
    expect(Buffer.from(new Uint8Array(ramView.buffer, 0x20000 + NET_HDR_BYTES, f.length)).equals(f)).toBe(true);

    // A 9th region would not fit SET_MEM_TABLE: refused by the broker before anything changes.
    const more = await owner.createBacking(16 * MiB, 'more');
    native.close(more.fd);
    for (let i = 0; i < 7; i++)
      await owner.addRegion({ name: `m${i}`, gpa: 0x8000_0000 + i * 4 * MiB, size: 2 * MiB, backing: more.backing, offset: i * 2 * MiB });
    const err = await owner
      .addRegion({ name: 'm7', gpa: 0x8000_0000 + 7 * 4 * MiB, size: 2 * MiB, backing: more.backing, offset: 7 * 2 * MiB })
      .catch((e: unknown) => e);
    expect(isMmbError(err) && err.code).toBe('MMB_ERR_CLIENT_LIMIT');
    expect(sub.backendTable()).toHaveLength(8);
  });
  it('other memory at the same GPA and size (a replace) is remapped by DPDK, which ignores a table that looks the same', async () => {
    const { pmd, linkUp } = await backends.testpmd('mmb-vhu-dpdk-replace-');
    const broker = embeddedBroker();
    const owner = await ownerOf(broker);
    const { view: ramView, backing } = await mappedBacking(owner, 4 * MiB, 'ram');
    await owner.addRegion({ name: 'ram0', gpa: 0, size: 4 * MiB, backing });
    const sub = await bridgeTo(broker, pmd, NET_BRIDGE);
    const net = await VirtioNet.start(sub, { gpa: 0x1000, timeoutMs: 5000 });
    defer(() => net.close());
    const first = await mappedBacking(owner, 1 * MiB, 'rx-first');
    const second = await mappedBacking(owner, 1 * MiB, 'rx-second', constants.PROT_READ);
    const rxGpa = 0x4000_0000;
    const loop = async (marker: string, into: Uint8Array) => {
      await linkUp(sub.rings.stats.restarts);
      const received = net.receive(rxGpa + 0x1000, 2048);
      const f = frame(marker);
      new Uint8Array(ramView.buffer).set(f, 0x10000);
      await net.transmit(0x10000, f.length);
      expect(await received).toBe(f.length);
      expect(Buffer.from(into.subarray(0x1000 + NET_HDR_BYTES, 0x1000 + NET_HDR_BYTES + f.length)).equals(f)).toBe(true);
    };
    await owner.addRegion({ name: 'rx', gpa: rxGpa, size: 1 * MiB, backing: first.backing });
    await loop('mmb-frame-first', new Uint8Array(first.view.buffer));
    // The same GPA range, now the second memfd: one transaction. DPDK 22.11 compares tables by gpa, size
    // and uaddr only, so the bridge sends an empty table before the new one, and testpmd remaps.
    const tables = sub.stats.setMemTable;
    await owner.commit([
      { op: 'remove', region: 'rx' },
      { op: 'add', name: 'rx-2', gpa: rxGpa, size: 1 * MiB, backing: second.backing, offset: 0 },
    ]);
    // At the moment the replace is done, testpmd maps the second memfd and no longer the first.
    expect(memfdMaps(pmd.pid, 'rx-first')).toEqual([]);
    expect(memfdMaps(pmd.pid, 'rx-second')).toHaveLength(1);
    expect(sub.stats.setMemTable).toBe(tables + 2);
    new Uint8Array(first.view.buffer).fill(0);
    await loop('mmb-frame-second', new Uint8Array(second.view.buffer));
    expect(new Uint8Array(first.view.buffer).every((b) => b === 0)).toBe(true);
  });
});
