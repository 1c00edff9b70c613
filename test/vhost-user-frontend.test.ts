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
import { constants, native, type PollHandle } from '../native/index.js';
import { isMmbError, type Region } from '../protocol/index.js';
import { codeOf, defer, embeddedBroker, ownerOf, runCleanups, subscriberOf } from './helpers/embedded.js';
import { memfdMaps, tempDir, waitFor } from './helpers/procs.js';

const MiB = 1 << 20;
afterEach(runCleanups);

interface Message {
  request: number;
  flags: number;
  payload: Buffer;
  fds: number;
  at: number;
}

const u64 = (n: bigint | number) => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(BigInt(n));
  return b;
};

/** A vhost-user back-end scripted by the test: records every message, answers through `handler`. */
class FakeBackend {
  readonly messages: Message[] = [];
  private readonly listenFd: number;
  private readonly polls: PollHandle[] = [];
  private readonly fds: number[] = [];
  private inbuf = Buffer.alloc(0);
  private pendingFds = 0;
  conn: number | undefined;
  features = bit(Feature.PROTOCOL_FEATURES) | bit(Feature.VERSION_1) | bit(Feature.BLK_FLUSH) | bit(Feature.RING_EVENT_IDX);
  protocolFeatures = bit(ProtocolFeature.MQ) | bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.CONFIGURE_MEM_SLOTS) | bit(ProtocolFeature.STATUS);
  maxSlots = 32;
  /** Answers (or swallows) a message instead of the default when it returns true. */
  override: ((m: Message, reply: (payload: Buffer) => void) => boolean) | undefined;

  constructor(readonly socket: string) {
    this.listenFd = native.socketListen(socket, 4, 0o600);
    this.fds.push(this.listenFd);
    this.polls.push(
      native.pollStart(this.listenFd, constants.POLL_READABLE, () => {
        const a = native.socketAccept(this.listenFd);
        if (!a) return;
        this.conn = a.fd;
        this.fds.push(a.fd);
        this.polls.push(native.pollStart(a.fd, constants.POLL_READABLE, () => this.onReadable(a.fd)));
      }),
    );
  }

  private onReadable(fd: number): void {
    const buf = Buffer.alloc(65536);
    for (;;) {
      let r;
      try {
        r = native.recvmsg(fd, buf, 16);
      } catch {
        return;
      }
      if (r === null || r.bytes === 0) return;
      for (const f of r.fds) native.close(f);
      this.pendingFds += r.fds.length;
      this.inbuf = Buffer.concat([this.inbuf, buf.subarray(0, r.bytes)]);
      while (this.inbuf.length >= 12) {
        const size = this.inbuf.readUInt32LE(8);
        if (this.inbuf.length < 12 + size) break;
        const m: Message = {
          request: this.inbuf.readUInt32LE(0),
          flags: this.inbuf.readUInt32LE(4),
          payload: Buffer.from(this.inbuf.subarray(12, 12 + size)),
          fds: this.pendingFds,
          at: performance.now(),
        };
        this.pendingFds = 0;
        this.inbuf = this.inbuf.subarray(12 + size);
        this.messages.push(m);
        this.dispatch(fd, m);
      }
    }
  }

  private dispatch(fd: number, m: Message): void {
    const reply = (payload: Buffer) => {
      const h = Buffer.alloc(12);
      h.writeUInt32LE(m.request, 0);
      h.writeUInt32LE(Flag.VERSION | Flag.REPLY, 4);
      h.writeUInt32LE(payload.length, 8);
      try {
        native.sendmsg(fd, Buffer.concat([h, payload]), []);
      } catch {
        // The front-end is gone.
      }
    };
    if (this.override?.(m, reply)) return;
    this.defaultReply(m, reply);
  }

  /** What a well-behaved back-end answers. */
  defaultReply(m: Message, reply: (payload: Buffer) => void): void {
    switch (m.request) {
      case Req.GET_FEATURES:
        return reply(u64(this.features));
      case Req.GET_PROTOCOL_FEATURES:
        return reply(u64(this.protocolFeatures));
      case Req.GET_QUEUE_NUM:
        return reply(u64(1));
      case Req.GET_MAX_MEM_SLOTS:
        return reply(u64(this.maxSlots));
      default:
        if (m.flags & Flag.NEED_REPLY) reply(u64(0));
    }
  }

  names(from = 0): string[] {
    const byId = new Map(Object.entries(Req).map(([k, v]) => [v as number, k]));
    return this.messages.slice(from).map((m) => byId.get(m.request) ?? String(m.request));
  }

  close(): void {
    for (const p of this.polls) native.pollClose(p);
    for (const fd of this.fds) {
      try {
        native.close(fd);
      } catch {
        // Closed already.
      }
    }
  }
}

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
  const sub = await VhostUserSubscriber.attach(broker, { space: 'vm0', name: 'vu-fake', backendSocket: b.socket, reconnect: false, backendTimeoutMs: 1000, ...opts });
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
  it('negotiates in QEMU\'s order: SET_PROTOCOL_FEATURES without NEED_REPLY, never STATUS; then NEED_REPLY on every message', async () => {
    const b = fake();
    const { owner, ram, sub } = await setup(b, { virtioFeatures: bit(Feature.VERSION_1) | bit(Feature.BLK_FLUSH) });
    expect(b.names()).toEqual(['GET_FEATURES', 'GET_PROTOCOL_FEATURES', 'SET_PROTOCOL_FEATURES', 'GET_QUEUE_NUM', 'GET_MAX_MEM_SLOTS', 'SET_OWNER', 'SET_FEATURES']);
    const [, , setPf, , , owner_, setF] = b.messages as Message[];
    expect(setPf!.flags).toBe(Flag.VERSION);
    expect(setPf!.payload.readBigUInt64LE(0)).toBe(bit(ProtocolFeature.MQ) | bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.CONFIGURE_MEM_SLOTS));
    expect(owner_!.flags).toBe(Flag.VERSION | Flag.NEED_REPLY);
    expect(setF!.flags).toBe(Flag.VERSION | Flag.NEED_REPLY);
    // Asked for VERSION_1 | FLUSH, offered without EVENT_IDX being asked: masked, PROTOCOL_FEATURES added.
    expect(setF!.payload.readBigUInt64LE(0)).toBe(bit(Feature.VERSION_1) | bit(Feature.BLK_FLUSH) | bit(Feature.PROTOCOL_FEATURES));
    expect(sub.maxSlots).toBe(32);

    // ADD_MEM_REG: { u64 padding, gpa, size, uaddr, mmap_offset } and exactly one fd.
    const from = b.messages.length;
    await owner.addRegion({ name: 'r', gpa: 0x1_0000_0000, size: 2 * MiB, backing: ram.backing, offset: 6 * MiB });
    expect(b.names(from)).toEqual(['ADD_MEM_REG']);
    const add = b.messages[from]!;
    expect(add.flags).toBe(Flag.VERSION | Flag.NEED_REPLY);
    expect(add.payload.length).toBe(40);
    expect(add.payload.readBigUInt64LE(0)).toBe(0n);
    expect(region(add.payload)).toEqual({ gpa: 0x1_0000_0000, size: 2 * MiB, uaddr: 0x7f00_0000_0000n + 0x1_0000_0000n, mmapOffset: 6 * MiB });
    expect(add.fds).toBe(1);
    // REM_MEM_REG: the same region description, no fd (as the spec says).
    await owner.removeRegion('r');
    const rem = b.messages[from + 1]!;
    expect(b.names(from + 1)).toEqual(['REM_MEM_REG']);
    expect(region(rem.payload)).toEqual(region(add.payload));
    expect(rem.fds).toBe(0);
  });

  it('the first table of up to 8 regions is one SET_MEM_TABLE with one fd per region, in order', async () => {
    const b = fake();
    const broker = embeddedBroker();
    const owner = await ownerOf(broker);
    const ram = await owner.createBacking(64 * MiB, 'fakeram');
    native.close(ram.fd);
    await owner.commit([0, 1, 2].map((i) => ({ op: 'add' as const, name: `r${i}`, gpa: i * 8 * MiB, size: 2 * MiB, backing: ram.backing, offset: i * 2 * MiB })));
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
    expect(b.names()).toEqual(['GET_FEATURES', 'GET_PROTOCOL_FEATURES', 'SET_PROTOCOL_FEATURES', 'GET_QUEUE_NUM', 'SET_OWNER', 'GET_FEATURES', 'SET_FEATURES', 'GET_FEATURES']);
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
    script(b, (m, reply) => {
      if (m.request !== Req.REM_MEM_REG) return false;
      setTimeout(() => {
        replied = performance.now();
        reply(u64(0));
      }, 300);
      return true;
    });
    const { owner, ram, sub } = await setup(b);
    await owner.addRegion({ name: 'r', gpa: 0, size: 2 * MiB, backing: ram.backing });
    expect(memfdMaps('self', 'fakeram')).toHaveLength(1);
    const removal = owner.removeRegion('r');
    await new Promise((r) => setTimeout(r, 150));
    // Asked, not confirmed: the region is still in the back-end's table and mapped here.
    expect(b.names().at(-1)).toBe('REM_MEM_REG');
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
    await owner.addRegion({ name: 'keep', gpa: 0x1000_0000, size: 2 * MiB, backing: ram.backing, offset: 8 * MiB });
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
        { op: 'remove', region: 'a' },
        { op: 'add', name: 'b', gpa: 0x20_0000, size: 2 * MiB, backing: ram.backing, offset: 2 * MiB },
        { op: 'add', name: 'c', gpa: 0x40_0000, size: 2 * MiB, backing: ram.backing, offset: 4 * MiB },
      ])
      .catch((e: unknown) => e);
    expect(isMmbError(err) && err.code).toBe('MMB_ERR_CLIENT_REFUSED');
    expect(isMmbError(err) && err.client?.name).toBe('vu-fake');
    // The vote (two-phase) only adds: ADD b, ADD c (refused); then undo: REM b. Region a, which the
    // transaction would have removed, was never taken from the back-end.
    const sent = b.messages.slice(from).filter((m) => m.request === Req.ADD_MEM_REG || m.request === Req.REM_MEM_REG);
    expect(sent.map((m) => [m.request === Req.ADD_MEM_REG ? 'ADD' : 'REM', region(m.payload).gpa])).toEqual([
      ['ADD', 0x20_0000],
      ['ADD', 0x40_0000],
      ['REM', 0x20_0000],
    ]);
    expect(sub.backendTable().map((e) => e.name)).toEqual(['a', 'keep']);
    expect(sub.memory.regions().map((m) => m.region.name)).toEqual(['a', 'keep']);
    expect(other.regions().map((r) => r.name)).toEqual(['a', 'keep']);
    expect(sub.stats.undone).toBe(1);
    // And the next change goes through.
    script(b, () => false);
    await owner.addRegion({ name: 'c', gpa: 0x40_0000, size: 2 * MiB, backing: ram.backing, offset: 4 * MiB });
    expect(sub.backendTable().map((e) => e.name)).toEqual(['a', 'c', 'keep']);
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
    // Changed while disconnected: only the difference goes to the back-end.
    sub.dropConnection();
    await owner.removeRegion('b');
    await owner.addRegion({ name: 'c', gpa: 0x2000_0000, size: 2 * MiB, backing: ram.backing, offset: 4 * MiB });
    await waitFor('the resumed client to follow', () => sub.backendTable().map((e) => e.name).join() === 'a,c', 3000);
    expect(b.names(from)).toEqual(['REM_MEM_REG', 'ADD_MEM_REG']);
    expect(sub.backendTable().map((e) => e.name)).toEqual(['a', 'c']);
  });

  it('a virtqueue whose rings were unplugged fails its pending requests with a typed error, without an uncaught exception', async () => {
    const b = fake();
    const { owner, ram, sub } = await setup(b);
    await owner.addRegion({ name: 'rings', gpa: 0, size: 2 * MiB, backing: ram.backing });
    const blk = await VirtioBlk.start(sub, { gpa: 0x1000, timeoutMs: 300 });
    defer(() => blk.close());
    expect(b.names().slice(-6)).toEqual(['SET_VRING_NUM', 'SET_VRING_BASE', 'SET_VRING_ADDR', 'SET_VRING_KICK', 'SET_VRING_CALL', 'SET_VRING_ENABLE']);
    const kick = b.messages.at(-3)!;
    expect(kick.fds).toBe(1);
    expect(kick.payload.readBigUInt64LE(0)).toBe(0n);
    // SET_VRING_ADDR: user addresses of desc, used, avail (used before avail).
    const addr = b.messages.at(-4)!.payload;
    expect([addr.readBigUInt64LE(8), addr.readBigUInt64LE(16), addr.readBigUInt64LE(24)]).toEqual([0x7f00_0000_1000n, 0x7f00_0000_1000n + 0x140n, 0x7f00_0000_1000n + 0x100n]);
    // This back-end never processes the ring; the rings' region goes away under the pending request.
    const pending = blk.read(0, 0x10000, 512).catch((e: unknown) => e);
    await owner.removeRegion('rings');
    const err = await pending;
    expect(isMmbError(err) && err.code).toBe('MMB_ERR_NO_REGION');
  });

  it('a back-end that never answers: after the deadline the connection is dropped, the client detaches and the change completes without it', async () => {
    const b = fake();
    script(b, (m) => m.request === Req.ADD_MEM_REG);
    const { broker, owner, ram, sub } = await setup(b, { backendTimeoutMs: 300 });
    const other = await subscriberOf(broker, { name: 'other', reconnect: false });
    const errors: string[] = [];
    sub.on('error', (e) => errors.push(e.code));
    await owner.addRegion({ name: 'r', gpa: 0, size: 2 * MiB, backing: ram.backing });
    expect(errors).toContain('MMB_ERR_TIMEOUT');
    expect(sub.frontend.closed).toBe(true);
    expect(broker.status('vm0').spaces[0]!.clients.map((c) => c.name)).not.toContain('vu-fake');
    expect(other.regions().map((r) => r.name)).toEqual(['r']);
    // Nothing of it stays mapped here.
    expect(memfdMaps('self', 'fakeram')).toHaveLength(1); // the other subscriber's
  });

  it('a reply to the wrong request is a protocol error: the connection is dropped and the client detaches', async () => {
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
    await owner.addRegion({ name: 'r', gpa: 0, size: 2 * MiB, backing: ram.backing });
    expect(errors).toContain('MMB_ERR_PROTOCOL');
    expect(sub.frontend.closed).toBe(true);
    expect(broker.status('vm0').spaces[0]!.clients.map((c) => c.name)).not.toContain('vu-fake');
  });
});

// --- the planner --------------------------------------------------------------------------------------

const backings = new Map<number, LocalBacking>([[1, { id: 1, name: 'm', size: 1 << 30, fd: -1, dev: 1, ino: 42 }]]);
let nextId = 1;
const view = (gpa: number, size: number, extra: Partial<Region> = {}): ViewRegion =>
  toView({ id: nextId++, name: `r${gpa.toString(16)}`, gpa, size, backing: 1, offset: gpa % (1 << 29), readonly: false, logDirty: false, ...extra }, backings);
const change = (removed: ViewRegion[], added: ViewRegion[], updated: Change['updated'] = []): Change => ({ generation: 1, cause: 'txn', removed, updated, added });
const tableOf = (rs: ViewRegion[]) => new Map<string, TableEntry>(rs.map((r) => [r.key, entryOf(r)]));

describe('vhost-user memory-table planner', () => {
  it('slots mode: removes before adds, one message per region', () => {
    const a = view(0, MiB);
    const b = view(4 * MiB, MiB);
    const c = view(8 * MiB, MiB);
    const p = planMemTable(tableOf([a, b]), change([b], [c]), 'slots', 32);
    expect(p.steps.map((s) => [s.op, s.op === 'table' ? s.entries.length : s.entry.gpa])).toEqual([['rem', 4 * MiB], ['add', 8 * MiB]]);
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
    const rs = Array.from({ length: 9 }, (_, i) => view(i * 4 * MiB, MiB));
    expect(() => planMemTable(tableOf(rs.slice(0, 4)), change([], [rs[4]!]), 'slots', 4)).toThrow(expect.objectContaining({ code: 'MMB_ERR_CLIENT_LIMIT' }));
    expect(() => planMemTable(tableOf(rs.slice(0, 8)), change([], [rs[8]!]), 'table', 32)).toThrow(expect.objectContaining({ code: 'MMB_ERR_CLIENT_LIMIT' }));
    // A replacement at the limit fits: the removal goes first.
    expect(planMemTable(tableOf(rs.slice(0, 4)), change([rs[0]!], [rs[4]!]), 'slots', 4).steps.map((s) => s.op)).toEqual(['rem', 'add']);
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
    expect(undoSteps(before2, q.steps, 'slots').map((s) => [s.op, s.op === 'table' ? -1 : s.entry.gpa])).toEqual([['rem', 4 * MiB], ['add', 0]]);
  });
});
