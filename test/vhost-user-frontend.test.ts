// The vhost-user front-end against a scripted back-end (a Unix socket served by this test through the
// addon, so descriptors are counted): the exact bytes and flags of negotiation and memory-table messages,
// the GET_FEATURES barrier without REPLY_ACK, a back-end's nack rolled back on every subscriber with the
// confirmed steps undone in reverse, a back-end that never answers, and a removal that completes only
// after the back-end confirmed it. Plus the planner's rules, without any back-end.
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import {
  Feature,
  Flag,
  ProtocolFeature,
  Req,
  VhostUserSubscriber,
  VirtioBlk,
  bit,
  entryOf,
  planMemTable,
  undoSteps,
  type TableEntry,
  type VhostUserOptions,
} from '../clients/vhost-user/index.js';
import { toView, type Change, type LocalBacking, type ViewRegion } from '../clients/view.js';
import { native } from '../native/index.js';
import { asGpa, asOffset, isMmbError, type Region } from '../protocol/index.js';
import { defer, embeddedBroker, ownerOf, runCleanups, subscriberOf } from './helpers/embedded.js';
import { FakeBackend, u64, type Message } from './helpers/vhost-user-fake.js';
import { memfdMaps, tempDir, waitFor } from './helpers/procs.js';

const MiB = 1 << 20;
afterEach(runCleanups);

/** A back-end whose answers the test overrides per message. */
function fake(): FakeBackend {
  const b = new FakeBackend(path.join(tempDir('mmb-vhu-fake-'), 'fake.sock'));
  defer(() => b.close());
  return b;
}

/** Routes messages: `script` returns true when it answered (or chose not to). */
function script(b: FakeBackend, fn: (m: Message, reply: (p: Buffer) => void) => boolean): void {
  b.override = fn;
}

async function setup(b: FakeBackend, opts: Partial<VhostUserOptions> = {}) {
  const broker = embeddedBroker();
  const owner = await ownerOf(broker);
  const ram = await owner.createBacking(64 * MiB, 'fakeram');
  defer(() => native.close(ram.fd));
  const sub = await VhostUserSubscriber.attach(broker, {
    space: 'vm0',
    name: 'vu-fake',
    backendSocket: b.socket,
    reconnect: false,
    backendTimeoutMs: 1000,
    ...opts,
  });
  defer(() => sub.close());
  return { broker, owner, ram, sub };
}

const region = (p: Buffer, at = 8) => ({
  gpa: Number(p.readBigUInt64LE(at)),
  size: Number(p.readBigUInt64LE(at + 8)),
  uaddr: p.readBigUInt64LE(at + 16),
  mmapOffset: Number(p.readBigUInt64LE(at + 24)),
});

describe('vhost-user front-end: wire format and acks (scripted back-end)', () => {
  it("negotiates in QEMU's order: SET_PROTOCOL_FEATURES without NEED_REPLY, never STATUS; then NEED_REPLY on every message", async () => {
    const b = fake();
    const { owner, ram, sub } = await setup(b, { virtioFeatures: bit(Feature.VERSION_1) | bit(Feature.BLK_FLUSH) });
    expect(b.names()).toEqual([
      'GET_FEATURES',
      'GET_PROTOCOL_FEATURES',
      'SET_PROTOCOL_FEATURES',
      'GET_QUEUE_NUM',
      'GET_MAX_MEM_SLOTS',
      'SET_OWNER',
      'SET_FEATURES',
    ]);
    const [, , setPf, , , owner_, setF] = b.messages as Message[];
    expect(setPf!.flags).toBe(Flag.VERSION);
    expect(setPf!.payload.readBigUInt64LE(0)).toBe(bit(ProtocolFeature.MQ) | bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.CONFIGURE_MEM_SLOTS));
    expect(owner_!.flags).toBe(Flag.VERSION | Flag.NEED_REPLY);
    expect(setF!.flags).toBe(Flag.VERSION | Flag.NEED_REPLY);
    // Asked for VERSION_1 | FLUSH, offered without EVENT_IDX being asked: masked, PROTOCOL_FEATURES added.
    expect(setF!.payload.readBigUInt64LE(0)).toBe(bit(Feature.VERSION_1) | bit(Feature.BLK_FLUSH) | bit(Feature.PROTOCOL_FEATURES));
    expect(sub.maxSlots).toBe(32);

    // ADD_MEM_REG: { u64 padding, gpa, size, uaddr, mmap_offset } and exactly one fd. The region lies
    // right behind another of its memfd, so the back-end's mapping from offset 0 reaches only the map.
    await owner.addRegion({ name: 'low', gpa: 0, size: 6 * MiB, backing: ram.backing });
    const from = b.messages.length;
    await owner.addRegion({ name: 'r', gpa: 0x1_0000_0000, size: 2 * MiB, backing: ram.backing, offset: 6 * MiB });
    // The change's last message is followed by a round trip: a back-end that acked it and then broke
    // (libvhost-user closes the connection after a panic) fails the change instead of passing it.
    expect(b.names(from)).toEqual(['ADD_MEM_REG', 'GET_FEATURES']);
    const add = b.messages[from]!;
    expect(add.flags).toBe(Flag.VERSION | Flag.NEED_REPLY);
    expect(add.payload.length).toBe(40);
    expect(add.payload.readBigUInt64LE(0)).toBe(0n);
    expect(region(add.payload)).toEqual({ gpa: 0x1_0000_0000, size: 2 * MiB, uaddr: 0x7f00_0000_0000n + 0x1_0000_0000n, mmapOffset: 6 * MiB });
    expect(add.fds).toBe(1);
    // REM_MEM_REG: the same region description, no fd (as the spec says).
    await owner.removeRegion('r');
    const rem = b.messages[from + 2]!;
    expect(b.names(from + 2)).toEqual(['REM_MEM_REG', 'GET_FEATURES']);
    expect(region(rem.payload)).toEqual(region(add.payload));
    expect(rem.fds).toBe(0);
  });

  it('the first table of up to 8 regions is one SET_MEM_TABLE with one fd per region, in order', async () => {
    const b = fake();
    const broker = embeddedBroker();
    const owner = await ownerOf(broker);
    const ram = await owner.createBacking(64 * MiB, 'fakeram');
    native.close(ram.fd);
    await owner.commit(
      [0, 1, 2].map((i) => ({ op: 'add' as const, name: `r${i}`, gpa: i * 8 * MiB, size: 2 * MiB, backing: ram.backing, offset: i * 2 * MiB })),
    );
    const sub = await VhostUserSubscriber.attach(broker, { space: 'vm0', backendSocket: b.socket, reconnect: false, coalesce: false });
    defer(() => sub.close());
    const table = b.messages.find((m) => m.request === Req.SET_MEM_TABLE)!;
    expect(table.fds).toBe(3);
    expect(table.payload.readUInt32LE(0)).toBe(3);
    expect(table.payload.length).toBe(8 + 3 * 32);
    expect([0, 1, 2].map((i) => region(table.payload, 8 + i * 32))).toEqual(
      [0, 1, 2].map((i) => ({ gpa: i * 8 * MiB, size: 2 * MiB, uaddr: 0x7f00_0000_0000n + BigInt(i * 8 * MiB), mmapOffset: i * 2 * MiB })),
    );
  });

  it('without REPLY_ACK every confirmed message is followed by a GET_FEATURES barrier, and nothing completes before its reply', async () => {
    const b = fake();
    b.protocolFeatures = bit(ProtocolFeature.MQ); // no REPLY_ACK, no CONFIGURE_MEM_SLOTS
    let hold = false;
    const held: (() => void)[] = [];
    script(b, (m, reply) => {
      if (m.request === Req.GET_FEATURES && hold) {
        held.push(() => reply(u64(b.features)));
        return true;
      }
      return false;
    });
    const { owner, ram, sub } = await setup(b);
    expect(sub.memMode).toBe('table');
    expect(sub.maxSlots).toBe(8);
    expect(b.names()).toEqual([
      'GET_FEATURES',
      'GET_PROTOCOL_FEATURES',
      'SET_PROTOCOL_FEATURES',
      'GET_QUEUE_NUM',
      'SET_OWNER',
      'GET_FEATURES',
      'SET_FEATURES',
      'GET_FEATURES',
    ]);
    expect(b.messages.every((m) => (m.flags & Flag.NEED_REPLY) === 0)).toBe(true);
    const from = b.messages.length;
    hold = true;
    let done = false;
    const add = owner.addRegion({ name: 'r', gpa: 0, size: 2 * MiB, backing: ram.backing }).then(() => (done = true));
    await waitFor('the barrier', () => held.length === 1, 2000);
    expect(b.names(from)).toEqual(['SET_MEM_TABLE', 'GET_FEATURES']);
    await new Promise((r) => setTimeout(r, 100));
    expect(done).toBe(false);
    held[0]!();
    await add;
    expect(sub.backendTable().map((e) => e.name)).toEqual(['r']);
  });

  it('a removal completes only after the back-end confirmed REM_MEM_REG, and our own mapping goes only then', async () => {
    const b = fake();
    let replied = 0;
    // A slow REM_MEM_REG: it answers 300 ms late, and what follows it (the round trip) after it, in order.
    let slow: Promise<void> | undefined;
    script(b, (m, reply) => {
      if (m.request === Req.REM_MEM_REG) {
        slow = new Promise<void>((r) => setTimeout(r, 300)).then(() => {
          replied = performance.now();
          reply(u64(0));
        });
        return true;
      }
      if (slow && m.request === Req.GET_FEATURES) {
        void slow.then(() => reply(u64(b.features)));
        return true;
      }
      return false;
    });
    const { owner, ram, sub } = await setup(b);
    await owner.addRegion({ name: 'r', gpa: 0, size: 2 * MiB, backing: ram.backing });
    expect(memfdMaps('self', 'fakeram')).toHaveLength(1);
    const removal = owner.removeRegion('r');
    await new Promise((r) => setTimeout(r, 150));
    // Asked, not confirmed: the region is still in the back-end's table and mapped here.
    expect(b.names().slice(-2)).toEqual(['REM_MEM_REG', 'GET_FEATURES']);
    expect(sub.backendTable()).toHaveLength(1);
    expect(memfdMaps('self', 'fakeram')).toHaveLength(1);
    await removal;
    expect(replied).toBeGreaterThan(0);
    expect(sub.backendTable()).toHaveLength(0);
    expect(memfdMaps('self', 'fakeram')).toHaveLength(0);
  });

  it('a back-end nack rolls the transaction back everywhere; the steps it had confirmed are undone in reverse', async () => {
    const b = fake();
    const { broker, owner, ram, sub } = await setup(b, { coalesce: false });
    const other = await subscriberOf(broker, { name: 'other', reconnect: false });
    await owner.addRegion({ name: 'a', gpa: 0, size: 2 * MiB, backing: ram.backing });
    await owner.addRegion({ name: 'gone', gpa: 0x1000_0000, size: 2 * MiB, backing: ram.backing, offset: 2 * MiB });
    script(b, (m, reply) => {
      if (m.request === Req.ADD_MEM_REG && region(m.payload).gpa === 0x20_0000 * 2) {
        reply(u64(1));
        return true;
      }
      return false;
    });
    const from = b.messages.length;
    const err = await owner
      .commit([
        { op: 'remove', region: 'gone' },
        { op: 'add', name: 'b', gpa: 0x20_0000, size: 2 * MiB, backing: ram.backing, offset: 2 * MiB },
        { op: 'add', name: 'c', gpa: 0x40_0000, size: 2 * MiB, backing: ram.backing, offset: 4 * MiB },
      ])
      .catch((e: unknown) => e);
    expect(isMmbError(err) && err.code).toBe('MMB_ERR_CLIENT_REFUSED');
    expect(isMmbError(err) && err.client?.name).toBe('vu-fake');
    // The vote (two-phase) only adds: ADD b, ADD c (refused); then undo: REM b. Region gone, which the
    // transaction would have removed, was never taken from the back-end.
    const sent = b.messages.slice(from).filter((m) => m.request === Req.ADD_MEM_REG || m.request === Req.REM_MEM_REG);
    expect(sent.map((m) => [m.request === Req.ADD_MEM_REG ? 'ADD' : 'REM', region(m.payload).gpa])).toEqual([
      ['ADD', 0x20_0000],
      ['ADD', 0x40_0000],
      ['REM', 0x20_0000],
    ]);
    expect(sub.backendTable().map((e) => e.name)).toEqual(['a', 'gone']);
    expect(sub.memory.regions().map((m) => m.region.name)).toEqual(['a', 'gone']);
    expect(other.regions().map((r) => r.name)).toEqual(['a', 'gone']);
    expect(sub.stats.undone).toBe(1);
    // And the next change goes through.
    script(b, () => false);
    await owner.addRegion({ name: 'c', gpa: 0x40_0000, size: 2 * MiB, backing: ram.backing, offset: 4 * MiB });
    expect(sub.backendTable().map((e) => e.name)).toEqual(['a', 'c', 'gone']);
  });

  it('after the broker connection drops and resumes, the back-end is sent only what changed meanwhile', async () => {
    const b = fake();
    const { owner, ram, sub } = await setup(b, { reconnect: true, reconnectDelayMs: 10, coalesce: false });
    await owner.addRegion({ name: 'a', gpa: 0, size: 2 * MiB, backing: ram.backing });
    await owner.addRegion({ name: 'b', gpa: 0x1000_0000, size: 2 * MiB, backing: ram.backing, offset: 2 * MiB });
    const from = b.messages.length;
    sub.dropConnection();
    await new Promise<void>((r) => sub.once('reconnected', () => r()));
    await waitFor('the resume to settle', () => sub.connected, 2000);
    expect(b.names(from)).toEqual([]);
    // Changed while disconnected: only the difference goes to the back-end. The removal of b, which the
    // dropped bridge still holds, waits until it reconnected and reconciled (nothing to send), then goes
    // out as a transaction of its own (its commit: REM and the round trip behind it), then the add of c.
    sub.dropConnection();
    await owner.removeRegion('b');
    await owner.addRegion({ name: 'c', gpa: 0x2000_0000, size: 2 * MiB, backing: ram.backing, offset: 2 * MiB });
    await waitFor(
      'the resumed client to follow',
      () =>
        sub
          .backendTable()
          .map((e) => e.name)
          .join() === 'a,c',
      3000,
    );
    expect(b.names(from)).toEqual(['REM_MEM_REG', 'GET_FEATURES', 'ADD_MEM_REG', 'GET_FEATURES']);
    expect(sub.backendTable().map((e) => e.name)).toEqual(['a', 'c']);
  });

  it('removing the memory of a running vring is refused before anything is sent; the queue keeps working', async () => {
    const b = fake();
    const { owner, ram, sub } = await setup(b);
    await owner.addRegion({ name: 'rings', gpa: 0, size: 2 * MiB, backing: ram.backing });
    const blk = await VirtioBlk.start(sub, { gpa: 0x1000, timeoutMs: 300 });
    defer(() => blk.close());
    expect(b.names().slice(-6)).toEqual(['SET_VRING_NUM', 'SET_VRING_BASE', 'SET_VRING_ADDR', 'SET_VRING_KICK', 'SET_VRING_CALL', 'SET_VRING_ENABLE']);
    const kick = b.messages.at(-3)!;
    expect(kick.fds).toBe(1);
    expect(kick.payload.readBigUInt64LE(0)).toBe(0n);
    // SET_VRING_ADDR: user addresses of desc, used, avail (used before avail), then the used ring's GPA
    // for logging (VHOST_VRING_F_LOG is off: nothing logs dirty pages).
    const addr = b.messages.at(-4)!.payload;
    expect(addr.readUInt32LE(4)).toBe(0);
    expect([addr.readBigUInt64LE(8), addr.readBigUInt64LE(16), addr.readBigUInt64LE(24), addr.readBigUInt64LE(32)]).toEqual([
      0x7f00_0000_1000n,
      0x7f00_0000_1000n + 0x140n,
      0x7f00_0000_1000n + 0x100n,
      0x1000n + 0x140n,
    ]);
    const from = b.messages.length;
    const err = await owner.removeRegion('rings').catch((e: unknown) => e);
    expect(isMmbError(err) && err.code).toBe('MMB_ERR_CLIENT_REFUSED');
    expect(isMmbError(err) && err.client?.name).toBe('vu-fake');
    expect(b.names(from)).toEqual([]);
    expect(sub.backendTable().map((e) => e.name)).toEqual(['rings']);
    // Once the device is stopped, its memory can go.
    expect(await blk.stop()).toBe(0);
    await owner.removeRegion('rings');
    expect(b.names(from)).toEqual(['GET_VRING_BASE', 'REM_MEM_REG', 'GET_FEATURES']);
  });

  it('a back-end that never answers: after the deadline the change is refused naming the client, rolled back everywhere, and the client detaches', async () => {
    const b = fake();
    // From the first ADD_MEM_REG on it answers nothing (a hung back-end).
    let hung = false;
    script(b, (m) => (hung ||= m.request === Req.ADD_MEM_REG));
    const { broker, owner, ram, sub } = await setup(b, { backendTimeoutMs: 300 });
    const other = await subscriberOf(broker, { name: 'other', reconnect: false });
    const errors: string[] = [];
    sub.on('error', (e) => errors.push(e.code));
    const err = await owner.addRegion({ name: 'r', gpa: 0, size: 2 * MiB, backing: ram.backing }).catch((e: unknown) => e);
    // Never "done" without the back-end: the transaction failed, and nothing of it stays anywhere.
    expect(isMmbError(err) && err.code).toBe('MMB_ERR_CLIENT_REFUSED');
    expect(isMmbError(err) && err.cause && (err.cause as { code?: string }).code).toBe('MMB_ERR_TIMEOUT');
    expect(isMmbError(err) && err.client?.name).toBe('vu-fake');
    expect(broker.status('vm0').spaces[0]!.regions).toEqual([]);
    expect(other.regions()).toEqual([]);
    expect(errors).toContain('MMB_ERR_TIMEOUT');
    expect(sub.frontend.closed).toBe(true);
    await waitFor('the client to detach', () => !broker.status('vm0').spaces[0]!.clients.some((c) => c.name === 'vu-fake'), 3000);
    expect(memfdMaps('self', 'fakeram')).toHaveLength(0);
    // A dead device does not block hotplug for everyone: the next change goes through without it.
    await owner.addRegion({ name: 'r', gpa: 0, size: 2 * MiB, backing: ram.backing });
    expect(other.regions().map((r) => r.name)).toEqual(['r']);
  });

  it('a back-end that acks a change and then drops the connection (libvhost-user after a panic) fails that change', async () => {
    const b = fake();
    script(b, (m, reply) => {
      if (m.request !== Req.ADD_MEM_REG) return false;
      reply(u64(0));
      // As libvhost-user does after a vu_panic: the reply-ack went out, then the connection closes.
      native.shutdown(b.conn!, 2);
      return true;
    });
    const { broker, owner, ram } = await setup(b);
    const err = await owner.addRegion({ name: 'r', gpa: 0, size: 2 * MiB, backing: ram.backing }).catch((e: unknown) => e);
    expect(isMmbError(err) && err.code).toBe('MMB_ERR_CLIENT_REFUSED');
    expect(isMmbError(err) && err.cause && (err.cause as { code?: string }).code).toBe('MMB_ERR_DISCONNECTED');
    expect(isMmbError(err) && err.client?.name).toBe('vu-fake');
    expect(broker.status('vm0').spaces[0]!.regions).toEqual([]);
  });

  it('a reply to the wrong request is a protocol error: the change is refused, the connection dropped, and the client detaches', async () => {
    const b = fake();
    script(b, (m) => {
      if (m.request !== Req.ADD_MEM_REG) return false;
      const h = Buffer.alloc(20);
      h.writeUInt32LE(Req.REM_MEM_REG, 0);
      h.writeUInt32LE(Flag.VERSION | Flag.REPLY, 4);
      h.writeUInt32LE(8, 8);
      native.sendmsg(b.conn!, h, []);
      return true;
    });
    const { broker, owner, ram, sub } = await setup(b);
    const errors: string[] = [];
    sub.on('error', (e) => errors.push(e.code));
    const err = await owner.addRegion({ name: 'r', gpa: 0, size: 2 * MiB, backing: ram.backing }).catch((e: unknown) => e);
    expect(isMmbError(err) && err.code).toBe('MMB_ERR_PROTOCOL');
    expect(isMmbError(err) && err.client?.name).toBe('vu-fake');
    expect(errors).toContain('MMB_ERR_PROTOCOL');
    expect(sub.frontend.closed).toBe(true);
    await waitFor('the client to detach', () => !broker.status('vm0').spaces[0]!.clients.some((c) => c.name === 'vu-fake'), 3000);
  });
});

// --- the planner --------------------------------------------------------------------------------------

const backings = new Map<number, LocalBacking>([[1, { id: 1, name: 'm', size: 1 << 30, fd: -1, dev: 1, ino: 42 }]]);
let nextId = 1;
const view = (gpa: number, size: number, extra: Partial<Region> = {}): ViewRegion =>
  toView(
    {
      id: nextId++,
      name: `r${gpa.toString(16)}`,
      gpa: asGpa(gpa),
      size,
      backing: 1,
      offset: asOffset(gpa % (1 << 29)),
      readonly: false,
      logDirty: false,
      ...extra,
    },
    backings,
  );
const change = (removed: ViewRegion[], added: ViewRegion[], updated: Change['updated'] = []): Change => ({
  generation: 1,
  cause: 'txn',
  removed,
  updated,
  added,
});
const tableOf = (rs: ViewRegion[]) => new Map<string, TableEntry>(rs.map((r) => [r.key, entryOf(r)]));

describe('vhost-user memory-table planner', () => {
  it('slots mode: removes before adds, one message per region', () => {
    const a = view(0, MiB);
    const b = view(4 * MiB, MiB);
    const c = view(8 * MiB, MiB);
    const p = planMemTable(tableOf([a, b]), change([b], [c]), 'slots', 32);
    expect(p.steps.map((s) => [s.op, s.op === 'table' ? s.entries.length : s.entry.gpa])).toEqual([
      ['rem', 4 * MiB],
      ['add', 8 * MiB],
    ]);
    expect([...p.after.values()].map((e) => e.gpa).sort((x, y) => x - y)).toEqual([0, 8 * MiB]);
  });

  it('slots mode: a first table of 2..8 regions is one SET_MEM_TABLE; more is one ADD each', () => {
    const rs = Array.from({ length: 9 }, (_, i) => view(i * 4 * MiB, MiB));
    expect(planMemTable(new Map(), change([], rs.slice(0, 8)), 'slots', 32).steps.map((s) => s.op)).toEqual(['table']);
    expect(planMemTable(new Map(), change([], rs.slice(0, 1)), 'slots', 32).steps.map((s) => s.op)).toEqual(['add']);
    expect(planMemTable(new Map(), change([], rs), 'slots', 32).steps.map((s) => s.op)).toEqual(Array(9).fill('add'));
  });

  it('table mode: every change is one SET_MEM_TABLE with the whole new table, sorted by gpa', () => {
    const a = view(8 * MiB, MiB);
    const b = view(0, MiB);
    const p = planMemTable(tableOf([a]), change([], [b]), 'table', 8);
    expect(p.steps).toHaveLength(1);
    expect(p.steps[0]!.op === 'table' && p.steps[0]!.entries.map((e) => e.gpa)).toEqual([0, 8 * MiB]);
    // Removing the last region is an empty table.
    const q = planMemTable(tableOf([a]), change([a], []), 'table', 8);
    expect(q.steps[0]!.op === 'table' && q.steps[0]!.entries).toEqual([]);
  });

  it('refuses, before any step, a table beyond the slots (and beyond 8 in table mode)', () => {
    const rs = Array.from({ length: 10 }, (_, i) => view(i * 4 * MiB, MiB));
    expect(() => planMemTable(tableOf(rs.slice(0, 4)), change([rs[0]!], [rs[4]!, rs[5]!]), 'slots', 4)).toThrow(
      expect.objectContaining({ code: 'MMB_ERR_CLIENT_LIMIT' }),
    );
    expect(() => planMemTable(tableOf(rs.slice(0, 8)), change([rs[0]!], [rs[8]!, rs[9]!]), 'table', 32)).toThrow(
      expect.objectContaining({ code: 'MMB_ERR_CLIENT_LIMIT' }),
    );
    // A replacement at the limit fits: the removal goes first.
    expect(planMemTable(tableOf(rs.slice(0, 4)), change([rs[0]!], [rs[4]!]), 'slots', 4).steps.map((s) => s.op)).toEqual(['rem', 'add']);
  });

  it('a change that only adds beyond the slots (a two-phase vote) sends what fits and defers the rest to the change with the removals', () => {
    const rs = Array.from({ length: 9 }, (_, i) => view(i * 4 * MiB, MiB));
    const vote = planMemTable(tableOf(rs.slice(0, 4)), change([], [rs[4]!, rs[5]!]), 'slots', 5);
    expect(vote.steps.map((s) => s.op === 'add' && s.entry.gpa)).toEqual([rs[4]!.gpa]);
    expect([...vote.deferred.values()].map((e) => e.gpa)).toEqual([rs[5]!.gpa]);
    expect(vote.after.size).toBe(5);
    // The switch: removals first, then what was deferred; the slot count never exceeds 5.
    const swap = planMemTable(vote.after, change([rs[0]!], []), 'slots', 5, { deferred: vote.deferred });
    expect(swap.steps.map((s) => [s.op, s.op === 'table' ? -1 : s.entry.gpa])).toEqual([
      ['rem', rs[0]!.gpa],
      ['add', rs[5]!.gpa],
    ]);
    expect(swap.deferred.size).toBe(0);
    // A rollback of the vote drops the deferred region without a message.
    const undo = planMemTable(vote.after, change([rs[4]!, rs[5]!], []), 'slots', 5, { deferred: vote.deferred });
    expect(undo.steps.map((s) => s.op === 'rem' && s.entry.gpa)).toEqual([rs[4]!.gpa]);
    // Still no room after the next change: refused, nothing sent.
    expect(() =>
      planMemTable(vote.after, change([], [], [{ before: rs[1]!, after: { ...rs[1]!, name: 'x' } }]), 'slots', 5, { deferred: vote.deferred }),
    ).toThrow(expect.objectContaining({ code: 'MMB_ERR_CLIENT_LIMIT' }));
  });

  it("a reshape of memory the back-end keeps is flagged; one that takes a running vring's region is a rebuilt table", () => {
    const small = view(0, 2 * MiB);
    const other = view(64 * MiB, MiB);
    const grown = view(0, 4 * MiB);
    const far = view(128 * MiB, MiB);
    const before = tableOf([small, other]);
    // Growing a run the back-end has: a reshape (the rings must stop around it).
    const plain = planMemTable(before, change([small], [grown]), 'slots', 32);
    expect(plain.reshape).toBe(true);
    expect(plain.steps.map((s) => s.op)).toEqual(['rem', 'add']);
    // An unrelated add or a plain removal is not.
    expect(planMemTable(before, change([], [far]), 'slots', 32).reshape).toBe(false);
    expect(planMemTable(before, change([other], []), 'slots', 32).reshape).toBe(false);
    // The grown run holds the vrings: never REM + ADD of it (libvhost-user 7.2 panics); one SET_MEM_TABLE
    // with the whole table, the ring's region first when more than 8 regions must be rebuilt.
    const rings = [{ gpa: asGpa(0x1000), bytes: 0x200 }];
    const ringPlan = planMemTable(before, change([small], [grown]), 'slots', 32, { rings });
    expect(ringPlan.reshape).toBe(true);
    expect(ringPlan.steps.map((s) => (s.op === 'table' ? s.entries.map((e) => [e.gpa, e.size]) : s.op))).toEqual([
      [
        [0, 4 * MiB],
        [64 * MiB, MiB],
      ],
    ]);
    const many = Array.from({ length: 12 }, (_, i) => view(256 * MiB + i * 4 * MiB, MiB));
    const big = planMemTable(tableOf([small, ...many]), change([small], [grown]), 'slots', 32, { rings });
    expect(big.steps.map((s) => s.op)).toEqual(['table', ...Array(5).fill('add')]);
    expect(big.steps[0]!.op === 'table' && big.steps[0]!.entries.some((e) => e.gpa === 0 && e.size === 4 * MiB)).toBe(true);
    // Its undo rebuilds the old table the same way, never REM of the ring's region.
    const undo = undoSteps(tableOf([small, ...many]), big.steps.slice(0, 2), 'slots', rings);
    expect(undo.map((s) => s.op)).toEqual(['table', ...Array(5).fill('add')]);
    // The memory of a running vring removed and not given back: refused before any step.
    expect(() => planMemTable(before, change([small], []), 'slots', 32, { rings })).toThrow(expect.objectContaining({ code: 'MMB_ERR_CLIENT_REFUSED' }));
    // Table mode: every later table remaps what the back-end has; a table without a running vring's
    // memory is refused the same way.
    expect(planMemTable(tableOf([other]), change([], [far]), 'table', 8).reshape).toBe(true);
    expect(() => planMemTable(before, change([small], []), 'table', 8, { rings })).toThrow(expect.objectContaining({ code: 'MMB_ERR_CLIENT_REFUSED' }));
    expect(planMemTable(new Map(), change([], [far]), 'table', 8).reshape).toBe(false);
  });

  it('read-only regions never reach the back-end; metadata-only changes send nothing', () => {
    const rom = view(0xfff0_0000, MiB, { readonly: true });
    const a = view(0, MiB);
    const p = planMemTable(new Map(), change([], [rom, a]), 'slots', 32);
    expect(p.steps.map((s) => s.op === 'add' && s.entry.gpa)).toEqual([0]);
    const renamed = { ...a, name: 'renamed', logDirty: true };
    const q = planMemTable(tableOf([a]), change([], [], [{ before: a, after: renamed }]), 'slots', 32);
    expect(q.steps).toEqual([]);
    expect(q.after.get(a.key)!.name).toBe('renamed');
    expect(planMemTable(tableOf([a]), change([rom], []), 'slots', 32).steps).toEqual([]);
  });

  it('undo runs the confirmed steps backwards, and restores a replaced table', () => {
    const a = view(0, MiB);
    const b = view(4 * MiB, MiB);
    const before = tableOf([a]);
    const p = planMemTable(before, change([a], [b, view(8 * MiB, MiB)]), 'slots', 32);
    // A full replacement by <= 8 regions is one table; its undo is the old table.
    expect(p.steps.map((s) => s.op)).toEqual(['table']);
    expect(undoSteps(before, p.steps, 'slots').map((s) => (s.op === 'table' ? s.entries.map((e) => e.gpa) : s.op))).toEqual([[0]]);
    const big = Array.from({ length: 10 }, (_, i) => view(64 * MiB + i * 4 * MiB, MiB));
    const before2 = tableOf([a, ...big]);
    const q = planMemTable(before2, change([a], [b]), 'slots', 32);
    expect(undoSteps(before2, q.steps, 'slots').map((s) => [s.op, s.op === 'table' ? -1 : s.entry.gpa])).toEqual([
      ['rem', 4 * MiB],
      ['add', 0],
    ]);
  });
});
