// I/O address spaces (feature IOAS, docs/ioas.md) across real processes: an embedded broker on a socket,
// the owner in-process (a VMM's emulated IOMMU), a shadow-mode vfio-like client (soft backend) in its own
// process, whose pins the kernel's VmLck judges at the moment the broker says a change is done, and a
// device client translating IOVAs. Then refusals, rollback, fencing of clients whose connection ended,
// and the protocol's gates.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { Broker, type BrokerOptions } from '../broker/index.js';
import { Connection, GuestMemory, MappingSubscriber, OwnerClient, DeviceSubscriber, type SubscriberOptions } from '../clients/index.js';
import { IoasOwner } from '../clients/ioas-owner.js';
import type { IoasChange } from '../clients/ioas-view.js';
import type { BrokerTarget } from '../clients/connection.js';
import { native } from '../native/index.js';
import { ALL_FEATURES, ClientRefusedError, Feature, Msg } from '../protocol/index.js';
import { JsonProc, ROOT, tempDir, vmLckKiB, waitFor } from './helpers/procs.js';
import { rejection } from './helpers/throws.js';

const PAGE = 4096;
const MiB = 2 ** 20;
const DRIVER = path.join(ROOT, 'test/fixtures/ioas-proc.mjs');

let broker: Broker | undefined;
let socket = '';
let owner: OwnerClient;
const procs: JsonProc[] = [];
const closers: (() => unknown)[] = [];

afterEach(async () => {
  for (const p of procs.splice(0)) await p.stop();
  for (const c of closers.splice(0).reverse()) await Promise.resolve(c()).catch(() => undefined);
  owner?.close();
  await broker?.close();
  broker = undefined;
});

/** A broker on a socket with one space holding 16 MiB of RAM at gpa 0 (region "ram"), and its owner. */
async function setup(opts: BrokerOptions = {}): Promise<void> {
  broker = new Broker({ spaces: ['vm0'], ...opts });
  socket = path.join(tempDir('mmb-ioas-'), 'broker.sock');
  broker.listen(socket);
  owner = await OwnerClient.attach(broker, { space: 'vm0' });
  const b = await owner.createBacking(16 * MiB, 'ram');
  native.close(b.fd);
  await owner.addRegion({ name: 'ram', gpa: 0, size: 16 * MiB, backing: b.backing });
}

/** The shadow-mode vfio client in its own process, attached to `ioas` with one device. */
async function vfioProc(ioas: string, extra: string[] = []): Promise<JsonProc> {
  const child = spawn(process.execPath, [DRIVER, '--socket', socket, '--space', 'vm0', '--ioas', ioas, ...extra], { stdio: ['pipe', 'pipe', 'pipe'] });
  const p = new JsonProc(child);
  procs.push(p);
  await p.next('ready', () => true, 30_000);
  return p;
}

async function vhost(name = 'vhost0'): Promise<DeviceSubscriber> {
  const v = await DeviceSubscriber.attach(socket, { space: 'vm0', name, reconnect: false });
  closers.push(() => v.close());
  return v;
}

/** The kernel's state letter of a process (R, S, T, Z...), or 'gone'. */
function processState(pid: number): string {
  try {
    return /^State:\s+(\S)/m.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1] ?? '?';
  } catch {
    return 'gone';
  }
}

const ioasStatus = async (name: string) => (await owner.status('vm0')).spaces[0]?.ioas?.find((x) => x.name === name);
const page = (i: number) => ({ op: 'map' as const, iova: 0x1000_0000 + i * PAGE, gpa: 0x10_0000 + i * PAGE, size: PAGE });
const unpage = (i: number) => ({ op: 'unmap' as const, iova: 0x1000_0000 + i * PAGE, size: PAGE });

/** An in-process subscriber that follows IOASes through `applyIoas` (a test's IoasApplier). */
class Follower extends MappingSubscriber {
  static async make(target: BrokerTarget, opts: SubscriberOptions, applyIoas: (c: IoasChange) => void | Promise<void>): Promise<Follower> {
    const s = new Follower(target, new GuestMemory(), { kind: 'plain', reconnect: false, ...opts });
    s.followIoas({ applyIoas });
    await s.start();
    return s;
  }
}

describe('I/O address spaces', () => {
  it('a shadow-mode vfio client pins exactly what the IOAS maps, and an unmap returns only once its process unlocked the pages; a device client translates the same IOVAs', async () => {
    await setup();
    const io = await IoasOwner.create(owner, 'gpu0');
    const vf = await vfioProc('gpu0', ['--name', 'vfio-gpu']);
    // 16 MiB of RAM, nothing of it pinned: shadow mode pins no RAM by itself.
    expect(vmLckKiB(vf.pid)).toBe(0);
    const vh = await vhost();
    await vh.attachIoas('gpu0', ['virtio-net0']);

    // 8 pages, one transaction: both clients map them in the vote; the vfio process has locked 32 KiB.
    const r = await io.commit(Array.from({ length: 8 }, (_, i) => page(i)));
    expect(r).toEqual({ generation: 1, mapped: 8 * PAGE, unmapped: 0 });
    expect(vmLckKiB(vf.pid) * 1024).toBe(8 * PAGE);

    // The device client reaches guest memory through an IOVA, allocation-free, and only where mapped.
    const table = vh.iova('gpu0');
    const ptr = { bytes: new Uint8Array(0), offset: 0 };
    vh.write(0x10_0000 + 3 * PAGE + 5, new Uint8Array([0xab, 0xcd]));
    expect(table.resolve(0x1000_0000 + 3 * PAGE + 5, 2, ptr)).toBe(true);
    expect([ptr.bytes[ptr.offset], ptr.bytes[ptr.offset + 1]]).toEqual([0xab, 0xcd]);
    expect(table.resolve(0x1000_0000 + 8 * PAGE, 1, ptr)).toBe(false);
    expect(table.translate(0x1000_0000, 8 * PAGE).reduce((n, v) => n + v.length, 0)).toBe(8 * PAGE);

    // An alias (a second IOVA for a page already mapped) pins nothing more: VmLck counts pages, once.
    await io.map({ iova: 0x2000_0000, gpa: 0x10_0000, size: PAGE, readonly: true });
    expect(vmLckKiB(vf.pid) * 1024).toBe(8 * PAGE);
    expect(table.resolve(0x2000_0000, 1, ptr, true)).toBe(false); // read-only for the device
    expect(table.resolve(0x2000_0000, 1, ptr)).toBe(true);

    // The guest's invalidation: judged at the moment the owner is told it is done.
    const u = await io.commit([unpage(0), unpage(1), unpage(2), unpage(3)]);
    expect(u).toMatchObject({ generation: 3, unmapped: 4 * PAGE });
    // Page 0 is still mapped at 0x2000_0000: 5 pages stay locked, the other three were unlocked before the reply.
    expect(vmLckKiB(vf.pid) * 1024).toBe(5 * PAGE);
    expect(table.resolve(0x1000_0000 + PAGE, 1, ptr)).toBe(false);
    // What the vfio process saw, in order: the vote mapped, the unmap (one final round) unmapped.
    await vf.next('ioas', (e) => e.generation === 3);
    const seen = vf.lines.filter((e) => e.event === 'ioas').map((e) => [e.cause, e.generation, e.mapped, e.unmapped, e.vmLck]);
    expect(seen).toEqual([
      ['txn', 1, 8, 0, 8 * PAGE],
      ['txn', 2, 1, 0, 8 * PAGE],
      ['final', 3, 0, 4, 5 * PAGE],
    ]);

    const st = await ioasStatus('gpu0');
    expect(st).toMatchObject({ generation: 3, mappings: 5, bytes: 5 * PAGE, holders: [] });
    expect(st?.attached.map((a) => [a.client.name, a.devices])).toEqual([
      ['vfio-gpu', ['dev0']],
      ['vhost0', ['virtio-net0']],
    ]);
    // The vfio client reports what it pins (throttled to one report per 20 ms): the broker shows it.
    await waitFor(
      'the vfio client to report its pins',
      async () => (await ioasStatus('gpu0'))?.attached.find((a) => a.client.name === 'vfio-gpu')?.pinned === 5 * PAGE,
    );
    // It declared no whole-map pinning: the broker predicts nothing for it.
    expect((await owner.status('vm0')).spaces[0]?.clients.find((c) => c.name === 'vfio-gpu')?.pin).toBeUndefined();
  });

  it('a vote one client refuses changes nothing: the other client unlocks what it locked, the generation stays, the owner is told who refused', async () => {
    await setup();
    const io = await IoasOwner.create(owner, 'gpu0');
    await io.map({ iova: 0x4000_0000, gpa: 0, size: PAGE });
    const vf = await vfioProc('gpu0');
    expect(vmLckKiB(vf.pid) * 1024).toBe(PAGE);
    const refuser = await Follower.make(broker as Broker, { space: 'vm0', name: 'refuser' }, (c) => {
      if (c.cause === 'txn' && c.mapped.length > 1) throw new ClientRefusedError('refusing big batches');
    });
    closers.push(() => refuser.close());
    await refuser.attachIoas('gpu0', ['dev-r']);

    const err = await rejection(io.commit(Array.from({ length: 16 }, (_, i) => page(i))));
    expect(err.code).toBe('MMB_ERR_CLIENT_REFUSED');
    expect(err.client?.name).toBe('refuser');
    expect(vmLckKiB(vf.pid) * 1024).toBe(PAGE);
    expect(await ioasStatus('gpu0')).toMatchObject({ generation: 1, mappings: 1 });
    // Its own account (printed before it acked; read from its stdout, which may lag the ack).
    const voted = await vf.next('ioas', (e) => e.cause === 'txn' && e.generation === 2);
    const undone = await vf.next('ioas', (e) => e.cause === 'rollback');
    expect([voted.mapped, undone.generation, undone.unmapped]).toEqual([16, 2, 16]);
    // The refusal left nothing behind: the next transaction reuses the generation.
    expect(await io.map({ iova: 0x3000_0000, gpa: PAGE, size: PAGE })).toMatchObject({ generation: 2 });
  });

  it('refuses before anything is sent: unaligned, not RAM, overlap, a partial unmap, a reserved IOVA, the DMA budget; and RAM an IOAS maps cannot be removed or made read-only', async () => {
    await setup();
    const io = await IoasOwner.create(owner, 'gpu0');
    const seen: IoasChange[] = [];
    const f = await Follower.make(broker as Broker, { space: 'vm0', name: 'watcher' }, (c) => void seen.push(c));
    closers.push(() => f.close());
    await f.attachIoas('gpu0', ['d0']);
    await f.report({ reserved: [{ start: 0xfee0_0000, last: 0xfeef_ffff }], dmaAvailable: 3 });
    await io.map({ iova: 0x10_0000, gpa: 0x4000, size: 2 * PAGE });
    const before = seen.length;

    const codes = async (p: Promise<unknown>) => (await rejection(p)).code;
    expect(await codes(io.map({ iova: 0x800, gpa: 0, size: PAGE }))).toBe('MMB_ERR_UNALIGNED');
    expect(await codes(io.map({ iova: 0, gpa: 0, size: 0 }))).toBe('MMB_ERR_OUT_OF_RANGE');
    expect(await codes(io.map({ iova: 0, gpa: 32 * MiB, size: PAGE }))).toBe('MMB_ERR_NOT_RAM');
    expect(await codes(io.map({ iova: 0, gpa: 16 * MiB - PAGE, size: 2 * PAGE }))).toBe('MMB_ERR_NOT_RAM');
    expect(await codes(io.map({ iova: 0x10_1000, gpa: 0, size: PAGE }))).toBe('MMB_ERR_IOVA_OVERLAP');
    expect(await codes(io.commit([page(0), { ...page(1), iova: page(0).iova }]))).toBe('MMB_ERR_IOVA_OVERLAP');
    expect(await codes(io.unmap(0x10_1000, PAGE))).toBe('MMB_ERR_IOVA_PARTIAL');
    const reserved = await rejection(io.map({ iova: 0xfee0_0000, gpa: 0, size: PAGE }));
    expect([reserved.code, reserved.client?.name]).toEqual(['MMB_ERR_RESERVED_RANGE', 'watcher']);
    const budget = await rejection(io.commit([page(0), page(1), page(2), page(3)]));
    expect([budget.code, budget.client?.name]).toEqual(['MMB_ERR_CLIENT_LIMIT', 'watcher']);
    expect(await codes(new IoasOwner(owner, 'nope').map({ iova: 0, gpa: 0, size: PAGE }))).toBe('MMB_ERR_NO_IOAS');
    expect(await codes(IoasOwner.create(owner, 'gpu0'))).toBe('MMB_ERR_IOAS_EXISTS');

    // The guest-physical map: the region under the mapping cannot go, nor change its access.
    const gone = await rejection(owner.removeRegion('ram'));
    expect(gone.code).toBe('MMB_ERR_RAM_MAPPED');
    expect(gone.message).toMatch(/IOAS "gpu0" maps IOVA \[0x100000, 0x102000\)/);
    expect(await codes(owner.commit([{ op: 'set', region: 'ram', readonly: true }]))).toBe('MMB_ERR_RAM_MAPPED');
    // logDirty changes nothing a device sees: allowed.
    await owner.commit([{ op: 'set', region: 'ram', logDirty: true }]);

    expect(seen.length).toBe(before);
    expect(await ioasStatus('gpu0')).toMatchObject({ generation: 1, mappings: 1 });
    // Unmapped first, the region goes.
    await io.unmap(0, 2 ** 40);
    expect((await owner.removeRegion('ram')).generation).toBeGreaterThan(0);
  });

  it('remaps an IOVA in one transaction: the vote leaves the old mapping alone, the commit unmaps it and maps the new one', async () => {
    await setup();
    const io = await IoasOwner.create(owner, 'gpu0');
    const vf = await vfioProc('gpu0');
    const vh = await vhost();
    await vh.attachIoas('gpu0', ['v0']);
    await io.map({ iova: 0x10_0000, gpa: 0, size: 2 * PAGE });
    vh.write(0, new Uint8Array([1]));
    vh.write(8 * PAGE, new Uint8Array([2]));
    const r = await io.commit([
      { op: 'unmap', iova: 0x10_0000, size: 2 * PAGE },
      { op: 'map', iova: 0x10_0000, gpa: 8 * PAGE, size: PAGE },
    ]);
    expect(r).toMatchObject({ generation: 2, mapped: PAGE, unmapped: 2 * PAGE });
    // The vote had nothing it could do without disturbing the mapping in place; the commit switched
    // (its own account, printed before it acked; its stdout may lag the ack).
    const last = await vf.next('ioas', (e) => e.generation === 2);
    expect([last.cause, last.mapped, last.unmapped, last.vmLck]).toEqual(['commit', 1, 1, PAGE]);
    expect(vmLckKiB(vf.pid) * 1024).toBe(PAGE);
    expect(vh.iova('gpu0').translate(0x10_0000, 1)[0]?.[0]).toBe(2);
  });

  it('a client stopped while attached misses the unmap deadline: it is evicted and killed before the unmap completes', async () => {
    await setup({ limits: { ackTimeoutMs: 500 }, fence: { policy: 'kill', timeoutMs: 5000 } });
    const io = await IoasOwner.create(owner, 'gpu0');
    await io.map({ iova: 0x10_0000, gpa: 0, size: PAGE });
    const vf = await vfioProc('gpu0', ['--name', 'stopped']);
    vf.child.kill('SIGSTOP');
    const r = await io.unmap(0x10_0000, PAGE);
    // By the time the owner heard "done", the process that may have mapped the IOVA was gone: the kernel
    // shows it dead (a zombie not reaped yet, or no longer there).
    expect(processState(vf.pid)).toMatch(/^(Z|gone)$/);
    expect(r).toMatchObject({ generation: 2, unmapped: PAGE });
    expect((await ioasStatus('gpu0'))?.attached).toEqual([]);
    expect(vf.child.signalCode ?? (await new Promise((resolve) => vf.child.once('exit', (_c, sig) => resolve(sig))))).toBe('SIGKILL');
  });

  it('a client whose connection dropped holds the IOAS until fenced: under the wait policy an unmap fails MMB_ERR_NOT_FENCED and changes nothing, and goes through once it exited', async () => {
    await setup({ limits: { ackTimeoutMs: 400 }, fence: { policy: 'wait', timeoutMs: 400 } });
    const io = await IoasOwner.create(owner, 'gpu0');
    await io.map({ iova: 0x10_0000, gpa: 0, size: PAGE });
    // Without reconnect: it drops and stays away, alive, with the page still locked.
    const stray = await vfioProc('gpu0', ['--name', 'stray']);
    await stray.request({ cmd: 'drop' }, 'dropped');
    await waitFor('the broker to list it as a holder of the IOAS', async () => ((await ioasStatus('gpu0'))?.holders.length ?? 0) > 0);
    const err = await rejection(io.unmap(0x10_0000, PAGE));
    expect([err.code, err.client?.name]).toEqual(['MMB_ERR_NOT_FENCED', 'stray']);
    expect(await ioasStatus('gpu0')).toMatchObject({ generation: 1, mappings: 1 });
    expect(vmLckKiB(stray.pid) * 1024).toBe(PAGE);
    expect((await rejection(io.destroy())).code).toBe('MMB_ERR_IOAS_BUSY');
    // It exits: fenced; the unmap goes through.
    await stray.stop();
    await waitFor('the holder to be fenced', async () => (await ioasStatus('gpu0'))?.holders.length === 0);
    expect(await io.unmap(0x10_0000, PAGE)).toMatchObject({ generation: 2, unmapped: PAGE });
  });

  it('an unmap issued while an attached client is away waits for it to come back: it is fenced only once it re-synced the map and re-attached to the IOAS, and then it unmaps too, alive', async () => {
    await setup({ limits: { ackTimeoutMs: 3000 }, fence: { policy: 'wait', timeoutMs: 3000 } });
    const io = await IoasOwner.create(owner, 'gpu0');
    await io.map({ iova: 0x20_0000, gpa: PAGE, size: PAGE });
    const back = await vfioProc('gpu0', ['--name', 'back', '--reconnect', '--reconnect-delay', '300']);
    expect(vmLckKiB(back.pid) * 1024).toBe(PAGE);
    await back.request({ cmd: 'drop' }, 'dropped');
    await waitFor('the broker to list it as a holder of the IOAS', async () => ((await ioasStatus('gpu0'))?.holders.length ?? 0) > 0);
    // Its connection is gone, its host IOMMU (VmLck) still maps the page: the unmap waits for it.
    const r = await io.unmap(0x20_0000, PAGE);
    expect(r).toMatchObject({ generation: 2, unmapped: PAGE });
    // Judged at the moment "done" is said: it came back, re-attached, and no longer maps the page.
    expect(vmLckKiB(back.pid)).toBe(0);
    expect(processState(back.pid)).not.toMatch(/^(Z|gone)$/);
    const rec = await back.next('reconnected');
    expect(rec.attachments).toMatchObject([{ ioas: 'gpu0', devices: ['dev0'] }]);
    // The re-sync kept the mapping (unchanged, nothing to do); the unmap then reached the new connection.
    const fin = await back.next('ioas', (e) => e.cause === 'final');
    expect([fin.generation, fin.unmapped, fin.vmLck]).toEqual([2, 1, 0]);
  });

  it('a client whose connection ends during an unmap, before it unmapped, is waited for even when the IOAS is left empty: not fenced, the owner is told', async () => {
    await setup({ limits: { ackTimeoutMs: 300 }, fence: { policy: 'wait', timeoutMs: 300 } });
    const io = await IoasOwner.create(owner, 'gpu0');
    await io.map({ iova: 0x10_0000, gpa: 0, size: PAGE });
    let dropper: Follower | undefined = undefined;
    dropper = await Follower.make(broker as Broker, { space: 'vm0', name: 'dropper' }, (c) => {
      // It gets the guest's invalidation and drops its connection before it let go of anything.
      if (c.cause === 'final') {
        dropper?.dropConnection();
        throw new Error('dropped before unmapping');
      }
    });
    closers.push(() => dropper?.close());
    await dropper.attachIoas('gpu0', ['d0']);
    const err = await rejection(io.unmap(0x10_0000, PAGE));
    // Committed (the IOAS is empty now), but the client that may still map the IOVA could not be fenced
    // (it lives in this process): the owner is not told "done".
    expect([err.code, err.client?.name]).toEqual(['MMB_ERR_COMMITTED_UNFENCED', 'dropper']);
    expect(await ioasStatus('gpu0')).toMatchObject({ generation: 2, mappings: 0, holders: [expect.any(Number)] });
  });

  it('devices: one IOAS per device, several clients and devices per IOAS, a client in two IOASes; the last device out unmaps everything; destroy waits for the devices', async () => {
    await setup();
    const a = await IoasOwner.create(owner, 'a');
    const b = await IoasOwner.create(owner, 'b');
    await a.map({ iova: 0x10_0000, gpa: 0, size: 4 * PAGE });
    await b.map({ iova: 0x10_0000, gpa: 2 * PAGE, size: 4 * PAGE });
    const vf = await vfioProc('a', ['--devices', 'nic0,nic1']);
    expect(vmLckKiB(vf.pid) * 1024).toBe(4 * PAGE);
    // A second IOAS in the same client: its own host domain; the overlapping pages are locked once.
    const att = await vf.request({ cmd: 'attachDevice', name: 'gpu0', ioas: 'b' }, 'attached');
    expect(att.vmLck).toBe(6 * PAGE);
    expect((att.domain as { ioas: unknown[] }).ioas).toHaveLength(2);
    // A device is in one IOAS at a time (the broker says so; the client's own domain refuses it first).
    const other = await Follower.make(broker as Broker, { space: 'vm0', name: 'other' }, () => undefined);
    closers.push(() => other.close());
    await other.attachIoas('a', ['x']);
    expect((await rejection(other.attachIoas('b', ['x']))).code).toBe('MMB_ERR_IOAS_BUSY');
    await other.detachIoas('a', ['x']);

    expect((await rejection(b.destroy())).code).toBe('MMB_ERR_IOAS_BUSY');
    // The last device of b leaves: everything of b is unmapped before the client is out.
    const det = await vf.request({ cmd: 'detachDevice', name: 'gpu0' }, 'detached');
    expect(det.vmLck).toBe(4 * PAGE);
    await b.destroy();
    expect((await owner.status('vm0')).spaces[0]?.ioas?.map((x) => x.name)).toEqual(['a']);
    // One of two devices of a leaves: nothing changes.
    expect((await vf.request({ cmd: 'detachDevice', name: 'nic0' }, 'detached')).vmLck).toBe(4 * PAGE);
    expect((await ioasStatus('a'))?.attached.find((x) => x.client.kind === 'vfio')?.devices).toEqual(['nic1']);
  });

  it('gates: IOAS needs its feature, attaching needs TWO_PHASE, only the owner changes an IOAS', async () => {
    await setup();
    await IoasOwner.create(owner, 'gpu0');
    const old = await Connection.open(socket, { name: 'old', features: ALL_FEATURES & ~Feature.IOAS });
    closers.push(() => old.close());
    await old.request({ t: Msg.ATTACH, space: 'vm0', role: 'subscriber', kind: 'plain' });
    expect((await rejection(old.request({ t: Msg.IOAS, op: 'attach', ioas: 'gpu0', devices: ['d'] }))).code).toBe('MMB_ERR_FEATURE');
    const onePhase = await Connection.open(socket, { name: 'one-phase', features: ALL_FEATURES & ~Feature.TWO_PHASE });
    closers.push(() => onePhase.close());
    await onePhase.request({ t: Msg.ATTACH, space: 'vm0', role: 'subscriber', kind: 'plain' });
    expect((await rejection(onePhase.request({ t: Msg.IOAS, op: 'attach', ioas: 'gpu0', devices: ['d'] }))).code).toBe('MMB_ERR_FEATURE');
    expect((await rejection(onePhase.request({ t: Msg.IOAS, op: 'commit', ioas: 'gpu0', ops: [] }))).code).toBe('MMB_ERR_NOT_OWNER');
    const f = await Follower.make(broker as Broker, { space: 'vm0', name: 'f' }, () => undefined);
    closers.push(() => f.close());
    expect((await rejection(f.detachIoas('gpu0', ['never-attached']))).code).toBe('MMB_ERR_NO_DEVICE');
  });
});
