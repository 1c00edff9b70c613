// The vfio-like client with the soft backend (this machine has no IOMMU), in its own process against a
// broker in another, checked with the kernel's view: VmLck in /proc/PID/status (mlock'ed bytes) and
// /proc/PID/maps, not the client's own counters.
import path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { MappingSubscriber, OwnerClient, fetchStatus } from '../clients/index.js';
import { native } from '../native/index.js';
import { spawnClient } from '../testkit/clients.js';
import { JsonProc, memfdMaps, spawnBroker, spawnSubscriber, stopProcess, tempDir, vmLckKiB, waitFor, type Event, type BrokerProc } from './helpers/procs.js';
import { rejection } from './helpers/throws.js';

const MiB = 2 ** 20;
const KiB = 1024;
let dir: string;
let socket: string;
let broker: BrokerProc;
let owner: OwnerClient;
const procs: JsonProc[] = [];
const cleanup: (() => void | Promise<void>)[] = [];
const backings: number[] = [];

/** Starts a scripted vfio client (testkit/client.ts) that prints its library's log lines as `log` events. */
function startVfio(name: string, extra: string[] = []): JsonProc {
  const p = spawnClient({ socket, space: 'vm0', kind: 'vfio', args: ['--name', name, '--no-reconnect', '--log', ...extra] });
  procs.push(p);
  return p;
}

async function vfio(name: string, extra: string[] = []): Promise<JsonProc> {
  const p = startVfio(name, extra);
  await p.next('ready', () => true, 30_000);
  return p;
}

async function backing(size: number, name: string): Promise<number> {
  const b = await owner.createBacking(size, name);
  native.close(b.fd);
  backings.push(b.backing);
  return b.backing;
}

const status = async () => (await fetchStatus(socket, 'vm0')).spaces[0]!;
const client = async (name: string) => (await status()).clients.find((c) => c.name === name);
const lockedMiB = (pid: number) => vmLckKiB(pid) / KiB;

beforeAll(async () => {
  dir = tempDir('mmb-vfio-');
  socket = path.join(dir, 'broker.sock');
  broker = await spawnBroker(socket, ['--space', 'vm0']);
  owner = await OwnerClient.attach(socket, { space: 'vm0', name: 'test-owner' });
});

afterEach(async () => {
  for (const p of procs.splice(0)) await p.stop();
  for (const c of cleanup.splice(0)) await c();
  const s = await status();
  if (s.regions.length > 0) await owner.commit(s.regions.map((r) => ({ op: 'remove' as const, region: r.id })));
  for (const b of backings.splice(0)) await owner.dropBacking(b).catch(() => undefined);
});

afterAll(async () => {
  owner?.close();
  if (broker) expect(await stopProcess(broker)).toBe(0);
});

describe('soft backend: real pinning, checked in /proc/PID/status', () => {
  it("following a 128 MiB region raises the client's VmLck by at least 128 MiB; the removal drops it back", async () => {
    const p = await vfio('vfio-a', ['--device', 'dev0']);
    const base = lockedMiB(p.pid);
    const ram = await backing(128 * MiB, 'pin128');
    await owner.addRegion({ name: 'pin128', gpa: 0x1_0000_0000, size: 128 * MiB, backing: ram });
    // The commit completed: every subscriber acked, so the pages are locked now.
    expect(lockedMiB(p.pid) - base).toBeGreaterThanOrEqual(128);
    expect(memfdMaps(p.pid, 'pin128')).toHaveLength(1);

    // The broker shows what the client reported next to its prediction.
    const c = await waitFor('the pinned report', async () => {
      const x = await client('vfio-a');
      return x?.pin?.actual === 128 * MiB ? x : undefined;
    });
    expect(c).toMatchObject({ kind: 'vfio', backend: 'soft', devices: ['dev0'], coherent: true, pin: { predicted: 128 * MiB, actual: 128 * MiB } });

    // Every log line names the backend as the software stand-in.
    const logs = p.lines.filter((e) => e.event === 'log');
    expect(logs.length).toBeGreaterThanOrEqual(2);
    for (const l of logs) expect(l).toMatchObject({ backend: 'soft', software: true, kind: 'vfio' });
    expect(logs[0]!.msg).toMatch(/soft backend \(software stand-in, no IOMMU\)/);

    await owner.removeRegion('pin128');
    // Removal completes only after the client acked: unpinned and unmapped by then.
    expect(lockedMiB(p.pid) - base).toBeLessThan(1);
    expect(memfdMaps(p.pid, 'pin128')).toHaveLength(0);
    await waitFor('pinned 0 reported', async () => (await client('vfio-a'))?.pin?.actual === 0);
  });

  it('two devices share one domain: the memory is pinned once; hot-add and hot-remove while mapped', async () => {
    const p = await vfio('vfio-two', ['--device', 'dev0', '--device', 'dev1']);
    const base = lockedMiB(p.pid);
    const ram = await backing(128 * MiB, 'shared');
    await owner.addRegion({ name: 'shared', gpa: 0x2_0000_0000, size: 128 * MiB, backing: ram });
    const once = lockedMiB(p.pid) - base;
    expect(once).toBeGreaterThanOrEqual(128);
    expect(once).toBeLessThan(2 * 128);
    expect(memfdMaps(p.pid, 'shared')).toHaveLength(1);
    let d = (await p.request({ cmd: 'domain' }, 'domain')) as Event & { pinnedBytes: number; devices: string[]; mappings: unknown[] };
    expect(d).toMatchObject({ backend: 'soft', software: true, active: true, devices: ['dev0', 'dev1'], pinnedBytes: 128 * MiB });
    expect(d.mappings).toEqual([expect.objectContaining({ region: 'shared', gpa: 0x2_0000_0000, iova: 0x2_0000_0000, size: 128 * MiB })]);

    // A third device joins the same domain: nothing more is pinned.
    await p.request({ cmd: 'attach-device', device: 'dev2' }, 'domain');
    expect(lockedMiB(p.pid) - base).toBeCloseTo(once, 0);
    await waitFor('three devices reported', async () => (await client('vfio-two'))?.devices?.length === 3);

    // The domain dies with its last device: everything is unpinned (but still mapped).
    for (const dev of ['dev0', 'dev1']) await p.request({ cmd: 'detach-device', device: dev }, 'domain');
    expect(lockedMiB(p.pid) - base).toBeCloseTo(once, 0);
    d = (await p.request({ cmd: 'detach-device', device: 'dev2' }, 'domain')) as typeof d;
    expect(d).toMatchObject({ active: false, devices: [], pinnedBytes: 0, mappedBytes: 128 * MiB });
    expect(lockedMiB(p.pid) - base).toBeLessThan(1);
    expect(memfdMaps(p.pid, 'shared')).toHaveLength(1);
    await waitFor('0 pinned, no devices reported', async () => {
      const c = await client('vfio-two');
      return c?.pin?.actual === 0 && (c.devices ?? []).length === 0; // status leaves out an empty list
    });

    // A new first device creates the domain again and pins what is mapped.
    d = (await p.request({ cmd: 'attach-device', device: 'dev9' }, 'domain')) as typeof d;
    expect(d).toMatchObject({ active: true, devices: ['dev9'], pinnedBytes: 128 * MiB });
    expect(lockedMiB(p.pid) - base).toBeGreaterThanOrEqual(128);
    await waitFor('128 MiB pinned reported again', async () => (await client('vfio-two'))?.pin?.actual === 128 * MiB);
  });

  it("pinLimit below a new region: the owner's add fails with MMB_ERR_PIN_BUDGET naming the client, nobody maps it, the generation stays", async () => {
    const p = await vfio('vfio-small', ['--device', 'dev0', '--pin-limit', String(64 * MiB)]);
    const plain = await spawnSubscriber(socket, 'vm0', ['--name', 'plain-watcher']);
    procs.push(plain);
    const c = await client('vfio-small');
    expect(c?.pin?.limit).toBe(64 * MiB);
    const before = (await status()).generation;
    const ram = await backing(128 * MiB, 'toolarge');
    const err = await rejection(owner.addRegion({ name: 'toolarge', gpa: 0x3_0000_0000, size: 128 * MiB, backing: ram }));
    expect(err.code).toBe('MMB_ERR_PIN_BUDGET');
    expect(err.client).toMatchObject({ name: 'vfio-small', kind: 'vfio', pid: p.pid });
    expect((await status()).generation).toBe(before);
    expect(memfdMaps(p.pid, 'toolarge')).toEqual([]);
    expect(memfdMaps(plain.pid, 'toolarge')).toEqual([]);
    // Refused before anything changed: no subscriber was even sent the transaction.
    await plain.request({ cmd: 'regions' }, 'regions');
    expect(plain.lines.filter((e) => e.event === 'change' && (e.added as string[]).includes('toolarge'))).toEqual([]);
    expect(p.lines.filter((e) => e.event === 'pinProgress' && e.region === 'toolarge')).toEqual([]);
    expect(lockedMiB(p.pid)).toBeLessThan(1);

    // Within the limit it goes through.
    const ok = await backing(32 * MiB, 'fits');
    await owner.addRegion({ name: 'fits', gpa: 0x3_0000_0000, size: 32 * MiB, backing: ok });
    expect(lockedMiB(p.pid)).toBeGreaterThanOrEqual(32);
  });

  it('pins a region in chunks with progress events (done rising to total)', async () => {
    const p = await vfio('vfio-progress', ['--device', 'dev0', '--pin-chunk', String(32 * MiB)]);
    const ram = await backing(160 * MiB, 'chunky');
    await owner.addRegion({ name: 'chunky', gpa: 0x4_0000_0000, size: 160 * MiB, backing: ram });
    const events = p.lines.filter((e) => e.event === 'pinProgress' && e.region === 'chunky');
    expect(events.map((e) => e.done)).toEqual([32, 64, 96, 128, 160].map((n) => n * MiB));
    expect(new Set(events.map((e) => e.total))).toEqual(new Set([160 * MiB]));
    expect(events.every((e) => e.backend === 'soft' && e.gpa === 0x4_0000_0000)).toBe(true);
  });
});

describe('soft backend: cancellation undoes what was pinned', () => {
  const BIG = 1024 * MiB;
  const CHUNK = String(4 * MiB);

  it('a region removed while the initial sync is still pinning it: pinning stops, nothing stays pinned or mapped', async () => {
    const ram = await backing(BIG, 'big-sync');
    await owner.addRegion({ name: 'big-sync', gpa: 0x10_0000_0000, size: BIG, backing: ram });
    const p = startVfio('vfio-cancel', ['--device', 'dev0', '--pin-chunk', CHUNK]);
    await p.next('pinProgress', (e) => e.region === 'big-sync', 30_000);
    await owner.removeRegion('big-sync');
    await p.next('ready', () => true, 30_000);
    const progress = p.lines.filter((e) => e.event === 'pinProgress' && e.region === 'big-sync');
    const last = progress[progress.length - 1]!;
    expect(last.done as number).toBeLessThan(BIG); // it stopped before the end
    expect(lockedMiB(p.pid)).toBeLessThan(1);
    expect(memfdMaps(p.pid, 'big-sync')).toEqual([]);
    const d = await p.request({ cmd: 'domain' }, 'domain');
    expect(d).toMatchObject({ pinnedBytes: 0, mappedBytes: 0, mappings: [] });
    await waitFor('0 pinned reported', async () => (await client('vfio-cancel'))?.pin?.actual === 0);
  });

  it('an add rolled back (another client refused) while it is being pinned: pinning stops, back to baseline', async () => {
    const p = await vfio('vfio-rollback', ['--device', 'dev0', '--pin-chunk', CHUNK]);
    const base = lockedMiB(p.pid);
    // A subscriber in this process refuses the add, but only once the vfio client is pinning it.
    const nacker = await MappingSubscriber.attach(socket, { space: 'vm0', name: 'nacker', reconnect: false });
    cleanup.push(() => nacker.close());
    nacker.on('change', (ev) => {
      if (!ev.change.added.some((r) => r.name === 'big-rb')) return;
      ev.waitUntil(
        p
          .next('pinProgress', (e) => e.region === 'big-rb', 30_000)
          .then(() => {
            throw new Error('nacker refuses big-rb');
          }),
      );
    });
    const before = (await status()).generation;
    const ram = await backing(BIG, 'big-rb');
    const err = await rejection(owner.addRegion({ name: 'big-rb', gpa: 0x20_0000_0000, size: BIG, backing: ram }));
    expect(err.client?.name).toBe('nacker');
    expect((await status()).generation).toBe(before);
    // The vfio client acked the rollback only after undoing: its pins are gone now.
    expect(lockedMiB(p.pid) - base).toBeLessThan(1);
    expect(memfdMaps(p.pid, 'big-rb')).toEqual([]);
    const progress = p.lines.filter((e) => e.event === 'pinProgress' && e.region === 'big-rb');
    expect(progress.length).toBeGreaterThan(0);
    expect(progress[progress.length - 1]!.done as number).toBeLessThan(BIG);
    const d = await p.request({ cmd: 'domain' }, 'domain');
    expect(d).toMatchObject({ pinnedBytes: 0, mappedBytes: 0 });
  });
});

describe('reserved IOVA ranges', () => {
  it('soft reports the x86 MSI window by default: visible in status, enforced by the broker, avoided by findFree', async () => {
    await vfio('vfio-msi', ['--device', 'dev0']);
    const c = await client('vfio-msi');
    expect(c?.reserved).toEqual([{ start: 0xfee0_0000, last: 0xfeef_ffff }]);
    expect(c?.dmaAvailable).toBe(65_535);
    const before = (await status()).generation;
    const ram = await backing(2 * MiB, 'msi-clash');
    const err = await rejection(owner.addRegion({ name: 'msi-clash', gpa: 0xfee0_0000, size: 2 * MiB, backing: ram }));
    expect(err.code).toBe('MMB_ERR_RESERVED_RANGE');
    expect(err.client).toMatchObject({ name: 'vfio-msi', kind: 'vfio' });
    expect((await status()).generation).toBe(before);
    const gpa = await owner.findFree(32 * MiB, { min: 0xfed0_0000, align: MiB });
    expect(gpa).toBe(0xfef0_0000); // the first aligned range past the window
    await owner.addRegion({ name: 'msi-clash', gpa, size: 2 * MiB, backing: ram });
    await waitFor('one DMA mapping used', async () => (await client('vfio-msi'))?.dmaAvailable === 65_534);
  });

  it('the reserved list can be set: the MSI window is then allowed and the given range refused', async () => {
    await vfio('vfio-custom', ['--device', 'dev0', '--reserved', '0x40000000-0x7fffffff']);
    expect((await client('vfio-custom'))?.reserved).toEqual([{ start: 0x4000_0000, last: 0x7fff_ffff }]);
    const ram = await backing(2 * MiB, 'custom');
    const err = await rejection(owner.addRegion({ name: 'custom', gpa: 0x5000_0000, size: 2 * MiB, backing: ram }));
    expect(err.code).toBe('MMB_ERR_RESERVED_RANGE');
    await owner.addRegion({ name: 'custom', gpa: 0xfee0_0000, size: 2 * MiB, backing: ram });
  });
});

describe('hardware backends on a machine without an IOMMU', () => {
  it('type1 fails at attach with MMB_ERR_UNSUPPORTED naming /dev/vfio/vfio; iommufd naming /dev/iommu; nothing stays attached', async () => {
    for (const [backend, node] of [
      ['type1', '/dev/vfio/vfio'],
      ['iommufd', '/dev/iommu'],
    ] as const) {
      const p = startVfio(`vfio-${backend}`, ['--backend', backend, '--device', '0000:00:01.0']);
      const e = await p.next('attachFailed');
      expect(e.code, backend).toBe('MMB_ERR_UNSUPPORTED');
      expect(e.message).toContain(node);
      expect(await client(`vfio-${backend}`)).toBeUndefined();
    }
  });
});
