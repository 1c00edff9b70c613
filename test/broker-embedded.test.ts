// The broker embedded in the test process with in-process clients: the same semantics as over the socket
// (acks, deadlines, rollback), and every refusal with its typed error code, checked before anything
// changes.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import type { BrokerOptions } from '../broker/index.js';
import { MappingSubscriber, OwnerClient, createSealedMemfd } from '../clients/index.js';
import { constants, native } from '../native/index.js';
import { ClientRefusedError, Msg, isMmbError, type ErrorCode } from '../protocol/index.js';
import { Connection } from '../clients/connection.js';
import { fdCount, memfdMaps } from './helpers/procs.js';
import { codeOf, defer, embeddedBroker, ownerOf, runCleanups, subscriberOf } from './helpers/embedded.js';

const MiB = 1 << 20;
const makeBroker = (opts: BrokerOptions = {}) => embeddedBroker({ limits: { ackTimeoutMs: 2000 }, ...opts });
const sub = subscriberOf;

async function setup(opts: BrokerOptions = {}) {
  const broker = makeBroker(opts);
  const owner = await ownerOf(broker);
  const ram = await owner.createBacking(64 * MiB, 'ram');
  defer(() => native.close(ram.fd));
  return { broker, owner, ram };
}

afterEach(runCleanups);

describe('transactions', () => {
  it('every committed transaction advances the generation by one and every subscriber follows', async () => {
    const { broker, owner, ram } = await setup();
    const a = await sub(broker);
    const b = await sub(broker);
    const r1 = await owner.addRegion({ name: 'lo', gpa: 0, size: 16 * MiB, backing: ram.backing });
    const r2 = await owner.addRegion({ name: 'hi', gpa: 0x1_0000_0000, size: 16 * MiB, backing: ram.backing, offset: 16 * MiB });
    expect([r1.generation, r2.generation]).toEqual([1, 2]);
    const map = broker.status('vm0').spaces[0]!.regions.map((r) => r.name);
    for (const s of [a, b]) expect(s.regions().map((r) => r.name)).toEqual(map);
  });

  it('removes are applied before adds, so memory moves at the same GPA in one transaction', async () => {
    const { broker, owner, ram } = await setup();
    const s = await sub(broker);
    await owner.addRegion({ name: 'dimm', gpa: 0x4000_0000, size: 8 * MiB, backing: ram.backing });
    const fill = native.mmap(ram.fd, 0, 64 * MiB, constants.PROT_READ | constants.PROT_WRITE, constants.MAP_SHARED);
    new Uint8Array(fill.buffer)[32 * MiB] = 0xab;
    // Replace the memory at the same GPA with another slice, listing the add first on purpose.
    const r = await owner.commit([
      { op: 'add', name: 'dimm2', gpa: 0x4000_0000, size: 8 * MiB, backing: ram.backing, offset: 32 * MiB },
      { op: 'remove', region: 'dimm' },
    ]);
    expect(r.generation).toBe(2);
    expect(s.memory.read(0x4000_0000, 1)[0]).toBe(0xab);
    native.munmap(fill);
  });

  it('a transaction that changes nothing commits nothing', async () => {
    const { owner, ram } = await setup();
    await owner.addRegion({ name: 'lo', gpa: 0, size: 4 * MiB, backing: ram.backing });
    expect((await owner.commit([{ op: 'set', region: 'lo', readonly: false }])).generation).toBe(1);
  });

  it('flag-only changes update subscribers without remapping', async () => {
    const { broker, owner, ram } = await setup();
    const s = await sub(broker);
    await owner.addRegion({ name: 'lo', gpa: 0, size: 4 * MiB, backing: ram.backing });
    const before = s.memory.regions()[0]!.address;
    const changes: { added: number; removed: number; updated: number }[] = [];
    s.on('change', ({ change }) => changes.push({ added: change.added.length, removed: change.removed.length, updated: change.updated.length }));
    await owner.commit([{ op: 'set', region: 'lo', logDirty: true }]);
    expect(changes).toEqual([{ added: 0, removed: 0, updated: 1 }]);
    expect(s.memory.regions()[0]!.address).toBe(before);
    expect(s.regions()[0]!.logDirty).toBe(true);
  });

  it('commits wait their turn: pipelined commits complete in order', async () => {
    const { broker, owner, ram } = await setup();
    await sub(broker);
    const rs = await Promise.all(
      Array.from({ length: 16 }, (_, i) => owner.addRegion({ name: `b${i}`, gpa: i * 2 * MiB, size: 2 * MiB, backing: ram.backing, offset: i * 2 * MiB })),
    );
    expect(rs.map((r) => r.generation)).toEqual(Array.from({ length: 16 }, (_, i) => i + 1));
  });

  it('a subscriber attaching during a transaction is synced after it, and misses nothing', async () => {
    const { broker, owner, ram } = await setup();
    await sub(broker, { name: 'slow' }).then((s) => s.on('change', (e) => e.waitUntil(new Promise((r) => setTimeout(r, 200)))));
    const adding = owner.addRegion({ name: 'lo', gpa: 0, size: 4 * MiB, backing: ram.backing });
    await new Promise((r) => setTimeout(r, 50));
    const late = await sub(broker, { name: 'late' });
    await adding;
    expect(late.regions().map((r) => r.name)).toEqual(['lo']);
  });

  it('optimistic concurrency: expect must name the current generation', async () => {
    const { owner, ram } = await setup();
    await owner.addRegion({ name: 'lo', gpa: 0, size: 4 * MiB, backing: ram.backing });
    expect(await codeOf(owner.commit([{ op: 'remove', region: 'lo' }], { expect: 0 }))).toBe('MMB_ERR_STALE_GENERATION');
    expect((await owner.commit([{ op: 'remove', region: 'lo' }], { expect: 1 })).generation).toBe(2);
  });
});

describe('refusals before anything changes', () => {
  const cases: [string, ErrorCode, Record<string, unknown>][] = [
    ['overlap', 'MMB_ERR_OVERLAP', { name: 'x', gpa: 2 * MiB, size: 4 * MiB }],
    ['unaligned gpa', 'MMB_ERR_UNALIGNED', { name: 'x', gpa: 0x1_0000_0800, size: 4096 }],
    ['unaligned size', 'MMB_ERR_UNALIGNED', { name: 'x', gpa: 0x1_0000_0000, size: 100 }],
    ['unaligned offset', 'MMB_ERR_UNALIGNED', { name: 'x', gpa: 0x1_0000_0000, size: 4096, offset: 12 }],
    ['empty region', 'MMB_ERR_OUT_OF_RANGE', { name: 'x', gpa: 0x1_0000_0000, size: 0 }],
    ['beyond 52 bits', 'MMB_ERR_OUT_OF_RANGE', { name: 'x', gpa: 2 ** 52 - 4096, size: 8192 }],
    ['past the end of the backing', 'MMB_ERR_BACKING_TOO_SMALL', { name: 'x', gpa: 0x1_0000_0000, size: 8 * MiB, offset: 60 * MiB }],
    ['unknown backing', 'MMB_ERR_NO_BACKING', { name: 'x', gpa: 0x1_0000_0000, size: 4096, backing: 999 }],
    ['duplicate name', 'MMB_ERR_REGION_EXISTS', { name: 'lo', gpa: 0x1_0000_0000, size: 4096 }],
  ];
  for (const [what, code, op] of cases) {
    it(`${what}: ${code}`, async () => {
      const { broker, owner, ram } = await setup();
      const s = await sub(broker);
      await owner.addRegion({ name: 'lo', gpa: 0, size: 4 * MiB, backing: ram.backing });
      let events = 0;
      s.on('change', () => events++);
      expect(await codeOf(owner.commit([{ op: 'add', backing: ram.backing, offset: 0, ...op } as never]))).toBe(code);
      expect(events).toBe(0);
      expect(broker.status('vm0').spaces[0]!.generation).toBe(1);
    });
  }

  it('two adds in one transaction that overlap each other', async () => {
    const { owner, ram } = await setup();
    expect(
      await codeOf(
        owner.commit([
          { op: 'add', name: 'a', gpa: 0, size: 8 * MiB, backing: ram.backing, offset: 0 },
          { op: 'add', name: 'b', gpa: 4 * MiB, size: 8 * MiB, backing: ram.backing, offset: 0 },
        ]),
      ),
    ).toBe('MMB_ERR_OVERLAP');
  });

  it('removing or changing a region that does not exist', async () => {
    const { owner } = await setup();
    expect(await codeOf(owner.removeRegion('nope'))).toBe('MMB_ERR_NO_REGION');
    expect(await codeOf(owner.commit([{ op: 'set', region: 42, logDirty: true }]))).toBe('MMB_ERR_NO_REGION');
  });

  it('a subscriber declaring a region limit: a change beyond it is refused naming the client', async () => {
    const { broker, owner, ram } = await setup();
    const small = await sub(broker, { name: 'small', maxRegions: 1 });
    await owner.addRegion({ name: 'lo', gpa: 0, size: 4 * MiB, backing: ram.backing });
    const err = await owner.addRegion({ name: 'hi', gpa: 0x1_0000_0000, size: 4 * MiB, backing: ram.backing }).catch((e) => e);
    expect(err.code).toBe('MMB_ERR_CLIENT_LIMIT');
    expect(err.client.name).toBe('small');
    expect(small.regions()).toHaveLength(1);
    // And attaching with a limit below the current map is refused.
    expect(await codeOf(sub(broker, { maxRegions: 0, reconnect: false }))).toBe('MMB_ERR_CLIENT_LIMIT');
  });

  it('the space region limit', async () => {
    const { owner, ram } = await setup({ limits: { maxRegions: 2, ackTimeoutMs: 2000 } });
    await owner.commit([0, 1].map((i) => ({ op: 'add' as const, name: `r${i}`, gpa: i * MiB, size: MiB, backing: ram.backing, offset: 0 })));
    expect(await codeOf(owner.addRegion({ name: 'r2', gpa: 8 * MiB, size: MiB, backing: ram.backing }))).toBe('MMB_ERR_SPACE_LIMIT');
  });
});

describe('Invariant 7: fds are trustworthy', () => {
  it('refuses a memfd that is not sealed against shrinking', async () => {
    const { owner } = await setup();
    const fd = native.memfdCreate('unsealed', constants.MFD_CLOEXEC | constants.MFD_ALLOW_SEALING);
    native.ftruncate(fd, MiB);
    expect(await codeOf(owner.addBacking(fd))).toBe('MMB_ERR_BACKING_UNSEALED');
    native.close(fd);
  });

  it('refuses a pipe, a regular file and a read-only memfd, and closes what it received', async () => {
    const { owner } = await setup();
    const before = fdCount();
    const file = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'mmb-')), 'f');
    fs.writeFileSync(file, Buffer.alloc(4096));
    const regular = fs.openSync(file, 'r+');
    expect(await codeOf(owner.addBacking(regular))).toBe('MMB_ERR_BACKING_INVALID');
    fs.closeSync(regular);
    const good = createSealedMemfd('ro', MiB);
    const readonly = fs.openSync(`/proc/self/fd/${good}`, 'r');
    expect(await codeOf(owner.addBacking(readonly))).toBe('MMB_ERR_BACKING_INVALID');
    fs.closeSync(readonly);
    native.close(good);
    const [r, w] = native.socketPair();
    expect(await codeOf(owner.addBacking(r))).toBe('MMB_ERR_BACKING_INVALID');
    native.close(r);
    native.close(w);
    // The broker runs in this process: every dup it received was closed.
    expect(fdCount()).toBe(before);
  });

  it('a region must fit inside its backing', async () => {
    const { owner } = await setup();
    const b = await owner.createBacking(MiB, 'small');
    native.close(b.fd);
    expect(await codeOf(owner.addRegion({ name: 'big', gpa: 0, size: 2 * MiB, backing: b.backing }))).toBe('MMB_ERR_BACKING_TOO_SMALL');
  });
});

describe('roles', () => {
  it('one owner per space; a second is refused', async () => {
    const { broker } = await setup();
    expect(await codeOf(OwnerClient.attach(broker, { space: 'vm0' }))).toBe('MMB_ERR_OWNER_EXISTS');
  });

  it('a uid that is not allowed may not own a space', async () => {
    const broker = makeBroker({ ownerUids: [12345] });
    expect(await codeOf(OwnerClient.attach(broker, { space: 'vm0' }))).toBe('MMB_ERR_PERMISSION');
  });

  it('a subscriber may not change the map; requests out of state are refused', async () => {
    const { broker } = await setup();
    const conn = await Connection.open(broker);
    defer(() => conn.close());
    expect(await codeOf(conn.request({ t: Msg.COMMIT, ops: [] }))).toBe('MMB_ERR_STATE');
    await conn.request({ t: Msg.ATTACH, space: 'vm0', role: 'subscriber', kind: 'test' });
    expect(await codeOf(conn.request({ t: Msg.COMMIT, ops: [] }))).toBe('MMB_ERR_NOT_OWNER');
    expect(await codeOf(conn.request({ t: Msg.ATTACH, space: 'vm0', role: 'subscriber', kind: 'test' }))).toBe('MMB_ERR_STATE');
    expect(await codeOf(conn.request({ t: Msg.STATUS, space: 'nope' }))).toBe('MMB_ERR_NO_SPACE');
  });

  it('an unknown space', async () => {
    const broker = makeBroker();
    expect(await codeOf(MappingSubscriber.attach(broker, { space: 'nope', reconnect: false }))).toBe('MMB_ERR_NO_SPACE');
  });
});

describe('rollback and eviction (in-process: same semantics as over the socket)', () => {
  it('a nack rolls back every subscriber that applied the transaction', async () => {
    const { broker, owner, ram } = await setup();
    const good = await sub(broker, { name: 'good' });
    const picky = await sub(broker, { name: 'picky' });
    picky.on('change', (e) => {
      if (e.change.added.some((r) => r.name === 'bad')) e.waitUntil(Promise.reject(new ClientRefusedError('no')));
    });
    const rolledBack = new Promise((r) => good.once('rolledBack', r));
    const err = await owner.addRegion({ name: 'bad', gpa: 0, size: 4 * MiB, backing: ram.backing }).catch((e) => e);
    expect(err.code).toBe('MMB_ERR_CLIENT_REFUSED');
    expect(err.client.name).toBe('picky');
    expect(await rolledBack).toBe(1);
    expect(good.regions()).toHaveLength(0);
    expect(picky.regions()).toHaveLength(0);
    // The kernel agrees: nothing in this process maps the memfd any more.
    expect(memfdMaps(process.pid, 'ram')).toHaveLength(0);
  });

  it('fails fast: a refusal stops a subscriber that is still applying, and the owner hears at once', async () => {
    const { broker, owner, ram } = await setup({ limits: { ackTimeoutMs: 10_000 } });
    const slow = await sub(broker, { name: 'slow' });
    let aborted: unknown;
    slow.on('change', (e) => {
      e.signal.addEventListener('abort', () => (aborted = e.signal.reason));
      e.waitUntil(new Promise((r) => setTimeout(r, 5000)));
    });
    const picky = await sub(broker, { name: 'picky' });
    picky.on('change', (e) => e.waitUntil(Promise.reject(new ClientRefusedError('no'))));
    const t0 = Date.now();
    const err = await owner.addRegion({ name: 'x', gpa: 0, size: 4 * MiB, backing: ram.backing }).catch((e) => e);
    expect(Date.now() - t0).toBeLessThan(2000); // not the slow client's 5 s
    expect(err.code).toBe('MMB_ERR_CLIENT_REFUSED');
    expect(err.client.name).toBe('picky');
    expect(isMmbError(aborted, 'MMB_ERR_CANCELLED')).toBe(true);
    expect(slow.regions()).toHaveLength(0);
    expect(memfdMaps(process.pid, 'ram')).toHaveLength(0);
    // Nobody was evicted: stopping early is not a failure.
    expect(
      broker
        .status('vm0')
        .spaces[0]!.clients.map((c) => c.name)
        .sort(),
    ).toEqual(['owner', 'picky', 'slow']);
  });

  it('the next transaction after a rollback reuses the generation number', async () => {
    const { broker, owner, ram } = await setup();
    const picky = await sub(broker);
    picky.on('change', (e) => {
      if (e.change.added.some((r) => r.name === 'bad')) e.waitUntil(Promise.reject(new Error('no')));
    });
    expect(await codeOf(owner.addRegion({ name: 'bad', gpa: 0, size: 4 * MiB, backing: ram.backing }))).toBe('MMB_ERR_INTERNAL');
    expect((await owner.addRegion({ name: 'good', gpa: 0, size: 4 * MiB, backing: ram.backing })).generation).toBe(1);
  });

  it('a subscriber that does not ack in time is evicted and the others complete', async () => {
    const { broker, owner, ram } = await setup({ limits: { ackTimeoutMs: 300 } });
    const good = await sub(broker, { name: 'good' });
    const hung = await sub(broker, { name: 'hung', reconnect: false });
    hung.on('change', (e) => e.waitUntil(new Promise(() => undefined)));
    const goodbye = new Promise((r) => hung.once('goodbye', r));
    const r = await owner.addRegion({ name: 'lo', gpa: 0, size: 4 * MiB, backing: ram.backing });
    expect(r.generation).toBe(1);
    expect(((await goodbye) as { code: string }).code).toBe('MMB_ERR_CLIENT_TIMEOUT');
    expect(broker.status('vm0').spaces[0]!.clients.map((c) => c.name)).not.toContain('hung');
    expect(good.regions()).toHaveLength(1);
  });
});
