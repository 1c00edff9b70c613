// Invariant 3 (converge): resume by delta or snapshot, across a restarted broker, with snapshots split
// over several frames; reconciliation never remaps what did not change.
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { Broker } from '../broker/index.js';
import { Connection } from '../clients/connection.js';
import { CHUNK_BYTES, MappingSubscriber, OwnerClient, createSealedMemfd } from '../clients/index.js';
import { native } from '../native/index.js';
import { Msg } from '../protocol/index.js';
import { memfdMaps, tempDir, waitFor } from './helpers/procs.js';
import { defer, runCleanups } from './helpers/embedded.js';

const MiB = 1 << 20;
afterEach(runCleanups);

function broker(opts: ConstructorParameters<typeof Broker>[0] = {}): Broker {
  const b = new Broker({ spaces: ['vm0'], limits: { ackTimeoutMs: 3000 }, ...opts });
  defer(() => b.close());
  return b;
}

const addresses = (s: MappingSubscriber) => Object.fromEntries(s.memory.regions().map((m) => [m.region.name, m.address]));

describe('Invariant 3: converge', () => {
  it('after every commit of a random sequence, every subscriber view equals the broker map', async () => {
    const b = broker();
    const owner = await OwnerClient.attach(b, { space: 'vm0' });
    defer(() => owner.close());
    const ram = await owner.createBacking(64 * MiB, 'ram');
    defer(() => native.close(ram.fd));
    const subs = await Promise.all([1, 2, 3].map((i) => MappingSubscriber.attach(b, { space: 'vm0', name: `s${i}` })));
    defer(() => Promise.all(subs.map((s) => s.close())));
    let seed = 7;
    const rnd = (n: number) => ((seed = (seed * 1103515245 + 12345) % 2 ** 31), seed % n);
    const present = new Set<number>();
    for (let step = 0; step < 60; step++) {
      const slot = rnd(16);
      if (present.has(slot) && rnd(3) > 0) {
        await owner.removeRegion(`r${slot}`);
        present.delete(slot);
      } else if (!present.has(slot)) {
        await owner.addRegion({
          name: `r${slot}`,
          gpa: slot * 4 * MiB,
          size: 4 * MiB,
          backing: ram.backing,
          offset: rnd(16) * 4 * MiB,
          readonly: rnd(2) === 1,
        });
        present.add(slot);
      } else {
        await owner.commit([{ op: 'set', region: `r${slot}`, logDirty: rnd(2) === 1 }]);
      }
      const map = b.status('vm0').spaces[0]!;
      const want = map.regions.map(({ id, name, gpa, size, offset, readonly, logDirty }) => ({ id, name, gpa, size, offset, readonly, logDirty }));
      for (const s of subs) {
        expect(s.regions().map(({ id, name, gpa, size, offset, readonly, logDirty }) => ({ id, name, gpa, size, offset, readonly, logDirty }))).toEqual(want);
        expect(s.generation).toBe(map.generation);
      }
    }
  });

  it('a snapshot larger than one frame is split into parts and arrives whole', async () => {
    const b = broker({ protocol: { maxFrameBytes: 4096 } });
    const owner = await OwnerClient.attach(b, { space: 'vm0' });
    defer(() => owner.close());
    const ram = await owner.createBacking(64 * MiB, 'ram');
    defer(() => native.close(ram.fd));
    for (let i = 0; i < 10; i++) {
      await owner.commit(
        Array.from({ length: 10 }, (_, j) => ({
          op: 'add' as const,
          name: `r${i * 10 + j}`,
          gpa: (i * 10 + j) * 64 * 1024,
          size: 64 * 1024,
          backing: ram.backing,
          offset: 0,
        })),
      );
    }
    const conn = await Connection.open(b);
    defer(() => conn.close());
    const parts: { part: number; last: boolean; n: number }[] = [];
    conn.on('event', (m, fds) => {
      for (const fd of fds) native.close(fd);
      if (m.t === Msg.EV_SYNC) parts.push({ part: m.part, last: m.last, n: m.regions.length + (m.columns?.length ?? 0) });
    });
    await conn.request({ t: Msg.ATTACH, space: 'vm0', role: 'subscriber', kind: 'test' });
    await waitFor('the last part', () => parts.at(-1)?.last);
    expect(parts.length).toBeGreaterThan(1);
    expect(parts.map((p) => p.part)).toEqual(parts.map((_, i) => i));
    expect(parts.reduce((n, p) => n + p.n, 0)).toBe(100);
    // And a real subscriber reassembles them.
    const s = await MappingSubscriber.attach(b, { space: 'vm0' });
    defer(() => s.close());
    expect(s.regions()).toHaveLength(100);
  });

  it('resume after the history moved on gets a snapshot, and still does not remap unchanged regions', async () => {
    const b = broker({ limits: { historyLength: 2, ackTimeoutMs: 3000 } });
    const dir = tempDir();
    const socket = path.join(dir, 'b.sock');
    b.listen(socket);
    const owner = await OwnerClient.attach(b, { space: 'vm0' });
    defer(() => owner.close());
    const ram = await owner.createBacking(64 * MiB, 'ram');
    defer(() => native.close(ram.fd));
    await owner.addRegion({ name: 'keep', gpa: 0, size: 8 * MiB, backing: ram.backing });
    await owner.addRegion({ name: 'gone', gpa: 16 * MiB, size: 8 * MiB, backing: ram.backing, offset: 8 * MiB });
    const s = await MappingSubscriber.attach(socket, { space: 'vm0', reconnectDelayMs: 400 });
    defer(() => s.close());
    const before = addresses(s);
    const synced = new Promise<{ mode: string; change: { added: unknown[]; removed: { name: string }[] } }>((r) => s.once('synced', r));
    s.dropConnection();
    for (let i = 0; i < 4; i++) await owner.addRegion({ name: `n${i}`, gpa: (32 + i * 8) * MiB, size: 8 * MiB, backing: ram.backing, offset: 16 * MiB });
    // The disconnected subscriber still maps 'gone': the removal waits until it reconnected and reconciled
    // (it is in this process, so nothing but its reconcile can fence it), then removes it like any other.
    let removed = false;
    const removing = owner.removeRegion('gone').then(() => (removed = true));
    const sync = await synced;
    expect(removed).toBe(false);
    expect(
      s
        .regions()
        .map((r) => r.name)
        .sort(),
    ).toEqual(['gone', 'keep', 'n0', 'n1', 'n2', 'n3']);
    await removing;
    expect(sync.mode).toBe('snapshot');
    expect(sync.change.added).toHaveLength(4);
    expect(sync.change.removed).toEqual([]);
    expect(addresses(s).keep).toBe(before.keep);
    expect(
      s
        .regions()
        .map((r) => r.name)
        .sort(),
    ).toEqual(['keep', 'n0', 'n1', 'n2', 'n3']);
  });

  it('a restarted broker (new epoch) with the same memfd republished: the subscriber keeps its mapping', async () => {
    const dir = tempDir();
    const socket = path.join(dir, 'b.sock');
    const memfd = createSealedMemfd('guest-ram', 16 * MiB);
    defer(() => native.close(memfd));
    const publish = async (b: Broker, extraBacking: boolean) => {
      const o = await OwnerClient.attach(b, { space: 'vm0' });
      // The restarted broker numbers backings differently: only the inode says it is the same memory.
      if (extraBacking) native.close((await o.createBacking(MiB, 'other')).fd);
      const { backing } = await o.addBacking(memfd, 'guest-ram');
      await o.addRegion({ name: 'ram', gpa: 0, size: 16 * MiB, backing });
      o.close();
    };
    const first = new Broker({ spaces: ['vm0'] });
    first.listen(socket);
    await publish(first, false);
    const s = await MappingSubscriber.attach(socket, { space: 'vm0', reconnectDelayMs: 50 });
    defer(() => s.close());
    const before = addresses(s).ram;
    const epochBefore = first.status('vm0').spaces[0]!.epoch;
    await first.close();

    const second = broker();
    second.listen(socket);
    await publish(second, true);
    const synced = await new Promise<{ mode: string; epoch: string; change: { added: unknown[]; removed: unknown[]; updated: unknown[] } }>((r) =>
      s.once('synced', r),
    );
    expect(synced.epoch).not.toBe(epochBefore);
    expect(synced.mode).toBe('snapshot');
    expect(synced.change.added).toHaveLength(0);
    expect(synced.change.removed).toHaveLength(0);
    expect(synced.change.updated).toHaveLength(1); // same mapping, new backing id
    expect(addresses(s).ram).toBe(before);
    expect(memfdMaps(process.pid, 'guest-ram')).toHaveLength(1);
  });
});

describe('large regions', () => {
  it('a region larger than the 4 GiB ArrayBuffer limit is mapped in 1 GiB chunks and read and written across them', async () => {
    const b = broker();
    const owner = await OwnerClient.attach(b, { space: 'vm0' });
    defer(() => owner.close());
    const size = 6 * 2 ** 30;
    const big = await owner.createBacking(size, 'big');
    defer(() => native.close(big.fd));
    await owner.addRegion({ name: 'big', gpa: 2 ** 32, size, backing: big.backing });
    const s = await MappingSubscriber.attach(b, { space: 'vm0' });
    defer(() => s.close());
    const total = memfdMaps(process.pid, 'big')
      .map((l) =>
        l
          .split(' ')[0]!
          .split('-')
          .map((h) => parseInt(h, 16)),
      )
      .reduce((n, [lo, hi]) => n + ((hi as number) - (lo as number)), 0);
    expect(total).toBe(size);
    const across = 2 ** 32 + 5 * CHUNK_BYTES - 3;
    s.memory.write(across, Buffer.from('0123456789'));
    expect(Buffer.from(s.memory.read(across, 10)).toString()).toBe('0123456789');
    expect(() => s.memory.slice(across, 10)).toThrow(/crosses/);
    expect(Buffer.from(s.memory.slice(across + 3, 7)).toString()).toBe('3456789');
  });
});
