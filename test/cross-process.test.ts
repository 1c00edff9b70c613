// The broker, the owner and the subscribers in separate OS processes, over the real socket with real
// fds. Every claim is checked through memory or through the kernel's view (/proc/PID/maps, /proc/PID/fd),
// not through the broker's own counters.
import path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { OwnerClient, fetchStatus } from '../clients/index.js';
import { constants, native, type Mapping } from '../native/index.js';
import {
  fdCount,
  memfdMaps,
  memfdStarts,
  spawnBroker,
  spawnSubscriber,
  stopProcess,
  tempDir,
  waitFor,
  type JsonProc,
  type BrokerProc,
} from './helpers/procs.js';

const MiB = 1 << 20;
let dir: string;
let socket: string;
let broker: BrokerProc;
let owner: OwnerClient;
const procs: JsonProc[] = [];
const cleanup: (() => void)[] = [];

async function subscriber(extra: string[] = []): Promise<JsonProc> {
  const p = await spawnSubscriber(socket, 'vm0', extra);
  procs.push(p);
  return p;
}

async function backing(size: number, name: string): Promise<{ backing: number; map: Mapping; bytes: Uint8Array }> {
  const b = await owner.createBacking(size, name);
  const map = native.mmap(b.fd, 0, size, constants.PROT_READ | constants.PROT_WRITE, constants.MAP_SHARED);
  native.close(b.fd);
  cleanup.push(() => native.munmap(map));
  return { backing: b.backing, map, bytes: new Uint8Array(map.buffer) };
}

const status = async () => (await fetchStatus(socket, 'vm0')).spaces[0]!;

beforeAll(async () => {
  dir = tempDir();
  socket = path.join(dir, 'broker.sock');
  broker = await spawnBroker(socket, ['--space', 'vm0', '--ack-timeout', '1500']);
  owner = await OwnerClient.attach(socket, { space: 'vm0', name: 'test-owner' });
});

afterEach(async () => {
  for (const p of procs.splice(0)) await p.stop();
  for (const c of cleanup.splice(0)) c();
  // Leave the map empty for the next test.
  const s = await status();
  if (s.regions.length > 0) await owner.commit(s.regions.map((r) => ({ op: 'remove' as const, region: r.id })));
});

afterAll(async () => {
  owner?.close();
  if (broker) expect(await stopProcess(broker)).toBe(0);
});

describe('memory is shared through the mappings, not through messages', () => {
  it('a subscriber process reads what the owner wrote and the owner sees what it writes back', async () => {
    const ram = await backing(16 * MiB, 'ram');
    const pattern = Buffer.from('the owner wrote this at gpa 0x103000', 'utf8');
    ram.bytes.set(pattern, 0x3000);
    await owner.addRegion({ name: 'ram', gpa: 0x10_0000, size: 16 * MiB, backing: ram.backing });
    const sub = await subscriber();
    const read = await sub.request({ cmd: 'read', gpa: 0x10_3000, len: pattern.length }, 'read');
    expect(Buffer.from(read.hex as string, 'hex').toString()).toBe(pattern.toString());

    expect(Buffer.from(ram.bytes.subarray(0x5000, 0x5004)).toString('hex')).toBe('00000000');
    await sub.request({ cmd: 'write', gpa: 0x10_5000, hex: 'deadbeef' }, 'wrote');
    expect(Buffer.from(ram.bytes.subarray(0x5000, 0x5004)).toString('hex')).toBe('deadbeef');
  });

  it('a read-only region is mapped without write permission in the subscriber', async () => {
    const rom = await backing(1 * MiB, 'rom');
    await owner.addRegion({ name: 'rom', gpa: 0xfff0_0000, size: 1 * MiB, backing: rom.backing, readonly: true });
    const sub = await subscriber();
    const [line] = memfdMaps(sub.pid, 'rom');
    expect(line?.split(' ')[1]).toBe('r--s');
    const failed = await sub.request({ cmd: 'write', gpa: 0xfff0_0000, hex: '00' }, 'failed');
    expect(failed.code).toBe('MMB_ERR_INVALID_ARG');
  });
});

describe('Invariant 1: nothing is freed while in use', () => {
  it('the subscriber maps the memfd while the region exists and not after the removal completed; the broker closes its fd', async () => {
    const sub = await subscriber();
    const before = fdCount(broker.pid!);
    const dimm = await backing(8 * MiB, 'dimm-a');
    await owner.addRegion({ name: 'dimm-a', gpa: 0x1_0000_0000, size: 8 * MiB, backing: dimm.backing });
    expect(await owner.dropBacking(dimm.backing)).toEqual({ released: false }); // a region still uses it
    await sub.next('committed');
    expect(memfdMaps(sub.pid, 'dimm-a')).toHaveLength(1);
    expect(fdCount(broker.pid!)).toBe(before + 1);

    const r = await owner.removeRegion('dimm-a');
    // The reply came after the subscriber acked its unmap: the kernel agrees.
    expect(memfdMaps(sub.pid, 'dimm-a')).toHaveLength(0);
    expect(r.unreferenced).toEqual([dimm.backing]);
    await waitFor('the broker to close the backing', () => fdCount(broker.pid!) === before);
  });

  it('a removal waits for a slow subscriber: the owner is answered only after it unmapped', async () => {
    const slow = await subscriber(['--ack-delay', '400']);
    const dimm = await backing(4 * MiB, 'dimm-slow');
    await owner.addRegion({ name: 'dimm-slow', gpa: 0x2_0000_0000, size: 4 * MiB, backing: dimm.backing });
    const t0 = Date.now();
    let done = false;
    const removal = owner.removeRegion('dimm-slow').then((r) => ((done = true), r));
    await slow.next('change', (e) => (e.removed as string[]).includes('dimm-slow'));
    // The slow subscriber has unmapped but not acked: the removal must not be complete yet.
    expect(done).toBe(false);
    await removal;
    expect(Date.now() - t0).toBeGreaterThanOrEqual(350);
    expect(memfdMaps(slow.pid, 'dimm-slow')).toHaveLength(0);
  });
});

describe('Invariant 2: all or nothing', () => {
  it('a nack rolls the transaction back everywhere and the owner gets one typed error naming the client', async () => {
    const plain = await subscriber(['--name', 'plain']);
    const picky = await subscriber(['--name', 'picky', '--nack', 'bad']);
    const gen = (await status()).generation;
    const bad = await backing(4 * MiB, 'bad0');
    const err = await owner.addRegion({ name: 'bad0', gpa: 0x3_0000_0000, size: 4 * MiB, backing: bad.backing }).catch((e) => e);
    expect(err.code).toBe('MMB_ERR_CLIENT_REFUSED');
    expect(err.client).toMatchObject({ name: 'picky', pid: picky.pid });
    expect(err.cause?.message).toContain('refusing region bad0');
    // The other subscriber had applied it, and rolled it back: the kernel shows no mapping left.
    await plain.next('rolledBack');
    expect(memfdMaps(plain.pid, 'bad0')).toHaveLength(0);
    expect(memfdMaps(picky.pid, 'bad0')).toHaveLength(0);
    const s = await status();
    expect(s.generation).toBe(gen);
    expect(s.regions.find((r) => r.name === 'bad0')).toBeUndefined();
  });

  it('a subscriber that never acks is evicted after the deadline, killed through its pidfd, and the change completes for the others', async () => {
    const good = await subscriber(['--name', 'good']);
    const stuck = await subscriber(['--name', 'stuck', '--no-reconnect']);
    const killed = new Promise<NodeJS.Signals | null>((r) => stuck.child.once('exit', (_code, signal) => r(signal)));
    stuck.child.kill('SIGSTOP');
    try {
      const dimm = await backing(4 * MiB, 'dimm-evict');
      const t0 = Date.now();
      const r = await owner.addRegion({ name: 'dimm-evict', gpa: 0x4_0000_0000, size: 4 * MiB, backing: dimm.backing });
      expect(Date.now() - t0).toBeGreaterThanOrEqual(1400); // the broker's --ack-timeout
      const s = await status();
      expect(s.clients.map((c) => c.name)).not.toContain('stuck');
      expect(s.clients.find((c) => c.name === 'good')?.ackedGeneration).toBe(r.generation);
      expect(memfdMaps(good.pid, 'dimm-evict')).toHaveLength(1);
    } finally {
      stuck.child.kill('SIGCONT');
    }
    // The default fence policy (kill): a client that stopped answering cannot keep memory it was given.
    expect(await killed).toBe('SIGKILL');
  });
});

describe('Invariant 3: converge, and resume without remapping', () => {
  it('a subscriber whose connection dies mid-transaction resumes by delta; unchanged regions keep their mappings', async () => {
    const ram = await backing(16 * MiB, 'ram-keep');
    await owner.addRegion({ name: 'ram-keep', gpa: 0, size: 16 * MiB, backing: ram.backing });
    const sub = await subscriber(['--ack-delay', '300', '--reconnect-delay', '800']);
    const keepAt = memfdStarts(sub.pid, 'ram-keep');
    expect(keepAt).toHaveLength(1);

    // Kill the link while the subscriber is in the middle of applying a transaction.
    const x = await backing(4 * MiB, 'x-mid');
    const adding = owner.addRegion({ name: 'x-mid', gpa: 0x5_0000_0000, size: 4 * MiB, backing: x.backing });
    await sub.next('change', (e) => (e.added as string[]).includes('x-mid'));
    sub.send({ cmd: 'drop' });
    await sub.next('disconnected');
    await adding; // the others (none) acked; the dropped client is simply gone

    // More changes while it is away. The removal of x-mid, which it still maps, waits until it is fenced:
    // here it reconnects (within the ack deadline it is given) and reconciles, then the removal goes on.
    const y = await backing(4 * MiB, 'y-later');
    await owner.addRegion({ name: 'y-later', gpa: 0x6_0000_0000, size: 4 * MiB, backing: y.backing });
    const removing = owner.removeRegion('x-mid');

    const synced = await sub.next('synced', () => true, 15_000);
    expect(synced.mode).toBe('delta');
    await sub.next('reconnected');
    await removing;
    // Judged the moment the removal completed: the process no longer maps it.
    expect(memfdMaps(sub.pid, 'x-mid')).toHaveLength(0);
    const s = await status();
    const view = await sub.request({ cmd: 'regions' }, 'regions');
    const norm = (rs: { name: string; gpa: number; size: number }[]) => rs.map(({ name, gpa, size }) => ({ name, gpa, size })).sort((a, b) => a.gpa - b.gpa);
    expect(norm(view.regions as never)).toEqual(norm(s.regions));
    expect(view.generation).toBe(s.generation);
    // The kernel's view: the unchanged region was not remapped, the removed one is gone.
    expect(memfdStarts(sub.pid, 'ram-keep')).toEqual(keepAt);
    expect(memfdMaps(sub.pid, 'x-mid')).toHaveLength(0);
    expect(memfdMaps(sub.pid, 'y-later')).toHaveLength(1);
    expect(synced.added).toEqual(['y-later']);
    expect(synced.removed).toEqual([]);
  });
});
