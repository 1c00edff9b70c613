// Issue: hostile input, access control and resource limits. One test per refusal, against a real broker
// over its real socket; the kernel's credentials (SO_PEERCRED) decide who is who.
import fs from 'node:fs';
import path from 'node:path';
import pino from 'pino';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import type { Broker, BrokerOptions } from '../broker/index.js';
import { Connection } from '../clients/connection.js';
import { DirtyObserver, MappingSubscriber, OwnerClient, createSealedMemfd } from '../clients/index.js';
import { constants, native } from '../native/index.js';
import { FrameDecoder, Msg, encodeFrame, isMmbError } from '../protocol/index.js';
import { IN_CI } from './helpers/ci.js';
import { codeOf, defer, embeddedBroker, ownerOf, runCleanups, subscriberOf } from './helpers/embedded.js';
import { NOBODY, canRunAsNobody as canSetpriv, runAsNobody, stageForOtherUid } from './helpers/other-uid.js';
import { runCli, spawnBroker, stopProcess, tempDir, waitFor } from './helpers/procs.js';

const MiB = 1 << 20;
afterEach(runCleanups);

// The probe runs as uid/gid 65534 (nobody) through setpriv, from a copy that uid can read (the checkout
// may sit under a 0700 directory), asynchronously: the broker under test runs in this process.
let staged = '';
beforeAll(() => {
  if (canSetpriv) staged = stageForOtherUid();
});
afterAll(() => {
  if (staged) fs.rmSync(staged, { recursive: true, force: true });
});

async function asNobody(socket: string, space: string, role: string, token?: string): Promise<{ ok: boolean; code?: string; errno?: string; uid: number }> {
  const probe = runAsNobody(staged, 'connect-as.mjs', [socket, space, role, ...(token ? [token] : [])]);
  const line = await probe.line((l) => typeof l.ok === 'boolean');
  await probe.finish();
  return line as { ok: boolean; code?: string; errno?: string; uid: number };
}

function broker(opts: BrokerOptions, listen?: { mode?: number; dirMode?: number }): { b: Broker; socket: string } {
  const dir = tempDir('mmb-sec-');
  defer(() => fs.rmSync(dir, { recursive: true, force: true })); // after the broker closed (cleanups run last first)
  const b = embeddedBroker(opts);
  fs.chmodSync(dir, 0o755); // the probe (nobody) must reach the socket's directory when the test wants it to
  const socket = path.join(dir, listen?.dirMode !== undefined ? 'private/b.sock' : 'b.sock');
  b.listen(socket, listen ?? {});
  return { b, socket };
}

/** Eventfds this process holds (the broker under test is embedded: its descriptors are ours too). */
const eventfdsOpen = () =>
  fs.readdirSync('/proc/self/fd').filter((f) => {
    try {
      return fs.readlinkSync(`/proc/self/fd/${f}`) === 'anon_inode:[eventfd]';
    } catch {
      return false;
    }
  }).length;

describe('who may connect, who may own, who may subscribe', () => {
  it.skipIf(!canSetpriv && !IN_CI)("by default only the broker's uid can even connect: the socket is 0600 in a 0700 directory", async () => {
    const { socket } = broker({}, { dirMode: 0o700 });
    expect(fs.statSync(socket).mode & 0o777).toBe(0o600);
    expect(fs.statSync(path.dirname(socket)).mode & 0o777).toBe(0o700);
    expect(await asNobody(socket, 'vm0', 'subscriber')).toMatchObject({ ok: false, code: 'MMB_ERR_CONNECT', errno: 'EACCES', uid: NOBODY });
  });

  it.skipIf(!canSetpriv && !IN_CI)('with the socket opened to everyone, roles still follow the allow-lists', async () => {
    const { socket } = broker({ access: { owners: { uids: [0] }, subscribers: { uids: [0, NOBODY] } } }, { mode: 0o666 });
    expect(await asNobody(socket, 'vm0', 'owner')).toMatchObject({ ok: false, code: 'MMB_ERR_PERMISSION' });
    expect(await asNobody(socket, 'vm0', 'subscriber')).toMatchObject({ ok: true, uid: NOBODY });
    const strict = broker({}, { mode: 0o666 });
    expect(await asNobody(strict.socket, 'vm0', 'subscriber')).toMatchObject({ ok: false, code: 'MMB_ERR_PERMISSION' });
    const byGroup = broker({ access: { subscribers: { gids: [NOBODY] } } }, { mode: 0o666 });
    expect(await asNobody(byGroup.socket, 'vm0', 'subscriber')).toMatchObject({ ok: true });
  });

  it.skipIf(!canSetpriv && !IN_CI)('STATUS shows a peer only the spaces it may own, or subscribe to without a token', async () => {
    const open = broker({ access: { subscribers: { uids: [NOBODY] } } }, { mode: 0o666 });
    expect(await asNobody(open.socket, 'vm0', 'status')).toMatchObject({ ok: true, named: ['vm0'], all: ['vm0'] });
    const strict = broker({}, { mode: 0o666 });
    expect(await asNobody(strict.socket, 'vm0', 'status')).toMatchObject({ ok: true, named: 'MMB_ERR_PERMISSION', all: [] });
    const tokened = broker({ access: { subscribers: { uids: [NOBODY] }, token: 't0ken' } }, { mode: 0o666 });
    expect(await asNobody(tokened.socket, 'vm0', 'status')).toMatchObject({ ok: true, named: 'MMB_ERR_PERMISSION', all: [] });
  });

  it.skipIf(!canSetpriv && !IN_CI)('mmbroker serve: --subscriber-uid, --socket-mode and --token-file set the same rules', async () => {
    const dir = tempDir('mmb-sec-cli-');
    fs.chmodSync(dir, 0o755);
    const socket = path.join(dir, 'b.sock');
    const tokenFile = path.join(dir, 'token');
    fs.writeFileSync(tokenFile, 'a-token-of-24-characters\n', { mode: 0o600 });
    const child = await spawnBroker(socket, ['--space', 'vm0', '--subscriber-uid', String(NOBODY), '--socket-mode', '666', '--token-file', tokenFile]);
    defer(async () => void (await stopProcess(child)));
    expect(fs.statSync(socket).mode & 0o777).toBe(0o666);
    expect(await asNobody(socket, 'vm0', 'subscriber', 'a-token-of-24-characters')).toMatchObject({ ok: true, uid: NOBODY });
    expect(await asNobody(socket, 'vm0', 'subscriber')).toMatchObject({ ok: false, code: 'MMB_ERR_PERMISSION' });
    expect(await asNobody(socket, 'vm0', 'owner')).toMatchObject({ ok: false, code: 'MMB_ERR_PERMISSION' });
    expect(fs.readFileSync(`/proc/${child.pid}/cmdline`, 'utf8')).not.toContain('a-token-of-24');
    // A short token or a loose mode is refused at start, with a typed error.
    fs.writeFileSync(tokenFile, 'short\n');
    const bad = await runCli(['serve', '--socket', path.join(dir, 'c.sock'), '--token-file', tokenFile]);
    expect(bad.code).not.toBe(0);
    expect(bad.stderr).toContain('MMB_ERR_INVALID_ARG');
    const badMode = await runCli(['serve', '--socket', path.join(dir, 'c.sock'), '--socket-mode', 'rw']);
    expect(badMode.stderr).toContain('MMB_ERR_INVALID_ARG');
  });

  it('a space with a token: subscribers without it, or with a wrong one, are refused', async () => {
    const b = embeddedBroker({ spaces: [] });
    b.createSpace('vm0', { access: { token: 's3cret-token' } });
    const conn = await Connection.open(b);
    defer(() => conn.close());
    expect(await codeOf(conn.request({ t: Msg.ATTACH, space: 'vm0', role: 'subscriber', kind: 'x' }))).toBe('MMB_ERR_PERMISSION');
    expect(await codeOf(conn.request({ t: Msg.ATTACH, space: 'vm0', role: 'subscriber', kind: 'x', token: 's3cret-tokem' }))).toBe('MMB_ERR_PERMISSION');
    expect(await codeOf(conn.request({ t: Msg.ATTACH, space: 'vm0', role: 'observer', kind: 'x', token: 'short' }))).toBe('MMB_ERR_PERMISSION');
    await conn.request({ t: Msg.ATTACH, space: 'vm0', role: 'subscriber', kind: 'x', token: 's3cret-token' });
    // The clients pass it through their options, and keep it for their reconnects.
    await subscriberOf(b, { token: 's3cret-token', reconnect: false });
    expect(await codeOf(MappingSubscriber.attach(b, { space: 'vm0', token: 'wrong-token!', reconnect: false }))).toBe('MMB_ERR_PERMISSION');
    const obs = await DirtyObserver.attach(b, { space: 'vm0', token: 's3cret-token' });
    obs.close();
    // The owner needs no token (its credentials decide).
    const owner = await OwnerClient.attach(b, { space: 'vm0' });
    owner.close();
  });

  it('a subscriber may not change the map (EPERM class), whatever it sends', async () => {
    const { b } = broker({});
    await subscriberOf(b, { reconnect: false });
    const conn = await Connection.open(b);
    defer(() => conn.close());
    await conn.request({ t: Msg.ATTACH, space: 'vm0', role: 'subscriber', kind: 'x' });
    for (const req of [
      { t: Msg.COMMIT, ops: [] },
      { t: Msg.BACKING_DROP, backing: 1 },
      { t: Msg.PAUSE, paused: true },
    ]) {
      const err = (await conn.request(req).catch((e: unknown) => e)) as { errno?: string };
      expect(err.errno, JSON.stringify(req)).toBe('EPERM');
    }
  });
});

describe('what the broker gives a subscriber', () => {
  it('a backing shown only read-only comes read-only: it cannot be mapped writable', async () => {
    const { b } = broker({});
    const owner = await ownerOf(b);
    const rom = await owner.createBacking(4 * MiB, 'rom');
    defer(() => native.close(rom.fd));
    await owner.addRegion({ name: 'rom', gpa: 0, size: 2 * MiB, backing: rom.backing, readonly: true });
    const s = await subscriberOf(b, { reconnect: false });
    const fd = s.backing(rom.backing)!.fd;
    const accmode = () => parseInt(/^flags:\s*([0-7]+)$/m.exec(fs.readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8'))![1]!, 8) & 3;
    expect(accmode()).toBe(0); // O_RDONLY
    let err: unknown;
    try {
      native.mmap(fd, 0, 4096, constants.PROT_READ | constants.PROT_WRITE, constants.MAP_SHARED);
    } catch (e) {
      err = e;
    }
    expect((err as { code?: string }).code).toBe('EACCES');
    // A writable region on the same backing brings the read-write descriptor.
    await owner.addRegion({ name: 'rw', gpa: 4 * MiB, size: 2 * MiB, backing: rom.backing, offset: 2 * MiB });
    const fd2 = s.backing(rom.backing)!.fd;
    expect(parseInt(/^flags:\s*([0-7]+)$/m.exec(fs.readFileSync(`/proc/self/fdinfo/${fd2}`, 'utf8'))![1]!, 8) & 3).toBe(2);
    s.memory.write(4 * MiB, Buffer.from('ok'));
    expect(() => s.memory.write(0, Buffer.from('no'))).toThrow(/read-only/);
  });
});

describe('what the broker does to a backing', () => {
  it('closes the inode to other uids (mode 0) at BACKING_ADD, for a memfd and a hugetlb memfd; a write-sealed one nobody can map writable, and subscribers get it read-only', async () => {
    const { b } = broker({});
    const owner = await ownerOf(b);
    // Memfds made as any VMM makes them (createSealedMemfd closes its own already); a hugetlb one needs
    // no huge page until it is mapped, and nothing here maps it.
    for (const huge of [false, true]) {
      const fd = native.memfdCreate(huge ? 'huge' : 'plain', constants.MFD_CLOEXEC | constants.MFD_ALLOW_SEALING | (huge ? constants.MFD_HUGETLB : 0));
      defer(() => native.close(fd));
      native.ftruncate(fd, 2 * MiB);
      native.addSeals(fd, constants.F_SEAL_SHRINK);
      expect(native.fstat(fd).mode & 0o777).toBe(0o777);
      await owner.addBacking(fd, huge ? 'huge' : 'plain');
      expect(native.fstat(fd).mode & 0o7777).toBe(0);
    }
    // Sealed against writes: even the broker's own descriptor cannot be mapped writable, so subscribers
    // only ever get the read-only one.
    const rom = createSealedMemfd('rom', 2 * MiB, { sealWrites: true });
    defer(() => native.close(rom));
    expect(() => native.mmap(rom, 0, 2 * MiB, constants.PROT_READ | constants.PROT_WRITE, constants.MAP_SHARED)).toThrow(/EPERM/);
    const { backing } = await owner.addBacking(rom, 'rom');
    await owner.addRegion({ name: 'rom', gpa: 0, size: 2 * MiB, backing, readonly: true });
    const s = await subscriberOf(b, { reconnect: false });
    const fd = s.backing(backing)!.fd;
    expect(parseInt(/^flags:\s*([0-7]+)$/m.exec(fs.readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8'))![1]!, 8) & 3).toBe(0);
  });
});

describe('limits', () => {
  it('backings per space: one more is refused (MMB_ERR_SPACE_LIMIT) and its descriptor closed', async () => {
    const { b } = broker({ limits: { maxBackings: 2 } });
    const owner = await ownerOf(b);
    for (const n of ['a', 'b']) native.close((await owner.createBacking(MiB, n)).fd);
    const fd = createSealedMemfd('third', MiB);
    const before = fs.readdirSync('/proc/self/fd').length;
    expect(await codeOf(owner.addBacking(fd))).toBe('MMB_ERR_SPACE_LIMIT');
    native.close(fd);
    // The broker's copy of the refused descriptor is gone too (it lives in this process: embedded).
    expect(fs.readdirSync('/proc/self/fd').length).toBe(before - 1);
  });

  it('transactions queued behind a running one: beyond the limit, MMB_ERR_TOO_BUSY; the queued ones complete', async () => {
    const { b } = broker({ limits: { maxQueuedCommits: 2 } });
    const owner = await ownerOf(b);
    const ram = await owner.createBacking(8 * MiB, 'ram');
    defer(() => native.close(ram.fd));
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    const slow = await subscriberOf(b, { reconnect: false });
    slow.on('change', (e) => e.waitUntil(gate));
    const first = owner.addRegion({ name: 'r0', gpa: 0, size: MiB, backing: ram.backing });
    const second = owner.addRegion({ name: 'r1', gpa: MiB, size: MiB, backing: ram.backing, offset: MiB });
    expect(await codeOf(owner.addRegion({ name: 'r2', gpa: 2 * MiB, size: MiB, backing: ram.backing, offset: 2 * MiB }))).toBe('MMB_ERR_TOO_BUSY');
    release();
    await Promise.all([first, second]);
    expect(
      slow
        .regions()
        .map((r) => r.name)
        .sort(),
    ).toEqual(['r0', 'r1']);
  });

  it('more descriptors than the broker allows: a header declaring 65 is MMB_ERR_TOO_MANY_FDS, 65 in one message MMB_ERR_FDS_TRUNCATED; all closed', async () => {
    const { b, socket } = broker({});
    const baseline = eventfdsOpen();
    const goodbye = async (declared: number, attached: number): Promise<string[]> => {
      const fd = native.socketConnect(socket);
      defer(() => native.close(fd));
      const fds = Array.from({ length: attached }, () => native.eventfd(0, constants.EFD_CLOEXEC));
      try {
        native.sendmsg(fd, encodeFrame({ t: Msg.HELLO, id: 1, version: 1, features: 0 }, declared, 1 << 20), fds);
      } finally {
        for (const x of fds) native.close(x);
      }
      const buf = new Uint8Array(65536);
      const decoder = new FrameDecoder({ maxFrameBytes: 1 << 20, maxFdsPerFrame: 64, maxPendingFds: 64 });
      const codes: string[] = [];
      await waitFor('the broker to hang up', () => {
        const r = native.recvmsg(fd, buf, 8);
        if (r === null) return false;
        if (r.bytes === 0) return true;
        decoder.push(buf.subarray(0, r.bytes), r.fds);
        for (let f = decoder.next(); f; f = decoder.next()) codes.push(((f.body.error ?? {}) as { code?: string }).code ?? '');
        return false;
      });
      return codes;
    };
    expect(await goodbye(65, 3)).toEqual(['MMB_ERR_TOO_MANY_FDS']);
    // The broker receives at most maxFdsPerFrame descriptors per message: the kernel drops (and closes)
    // the rest and says so (MSG_CTRUNC); the stream cannot be trusted after that.
    expect(await goodbye(65, 65)).toEqual(['MMB_ERR_FDS_TRUNCATED']);
    await waitFor('the sessions to be gone', () => b.status().spaces[0]!.clients.length === 0);
    await waitFor('every eventfd to be closed', () => eventfdsOpen() === baseline);
  });

  it('requests beyond the rate are refused (MMB_ERR_RATE_LIMIT) without closing the connection', async () => {
    const { b } = broker({ connection: { requestsPerSecond: 20, requestBurst: 10 } });
    const conn = await Connection.open(b);
    defer(() => conn.close());
    const results = await Promise.allSettled(Array.from({ length: 60 }, () => conn.request({ t: Msg.STATUS })));
    const limited = results.filter((r) => r.status === 'rejected' && isMmbError(r.reason, 'MMB_ERR_RATE_LIMIT')).length;
    expect(limited).toBeGreaterThan(40);
    expect(results.filter((r) => r.status === 'fulfilled').length).toBeGreaterThan(5);
    await new Promise((r) => setTimeout(r, 300));
    await conn.request({ t: Msg.STATUS }); // the bucket refilled
  });

  it('connections beyond the limit are greeted with MMB_ERR_CONNECTION_LIMIT and closed', async () => {
    // This process's uid is on the owner list, which may use ownerReserve more: none here.
    const { b, socket } = broker({ connection: { maxConnections: 3, ownerReserve: 0 } });
    const conns = await Promise.all([0, 1, 2].map(() => Connection.open(socket)));
    defer(() => conns.forEach((c) => c.close()));
    const err = await Connection.open(socket).catch((e) => e);
    expect(err.code).toBe('MMB_ERR_DISCONNECTED');
    expect(isMmbError(err.cause, 'MMB_ERR_CONNECTION_LIMIT')).toBe(true);
    conns[0]!.close();
    await waitFor('room for one more', async () =>
      Connection.open(socket).then(
        (c) => (c.close(), true),
        () => false,
      ),
    );
    void b;
  });

  it('a client that never reads is cut off when its queue passes the limit, and nobody else waits for it', async () => {
    const logged: string[] = [];
    const logger = pino({ level: 'warn' }, { write: (line: string) => void logged.push(line) });
    const { b, socket } = broker({ connection: { maxOutboundBytes: 256 * 1024 }, logger });
    const owner = await ownerOf(b);
    const ram = await owner.createBacking(4 * MiB, 'ram');
    defer(() => native.close(ram.fd));
    // A raw client: asks for status over and over, never reads a reply.
    const fd = native.socketConnect(socket);
    defer(() => native.close(fd));
    native.sendmsg(fd, encodeFrame({ t: Msg.HELLO, id: 1, version: 1, features: 0 }, 0, 1 << 20), []);
    let sent = 0;
    try {
      for (let i = 0; i < 4000; i++) {
        const r = native.sendmsg(fd, encodeFrame({ t: Msg.STATUS, id: i + 2 }, 0, 1 << 20), []);
        if (r === null) break;
        sent++;
        if (i % 100 === 0) await new Promise((r2) => setImmediate(r2));
      }
    } catch (err) {
      expect((err as { code?: string }).code).toBe('EPIPE'); // the broker hung up on it: expected
    }
    expect(sent).toBeGreaterThan(100);
    // The broker dropped it (its status replies went nowhere), and kept serving the others meanwhile.
    await waitFor('the slow reader to be dropped', () => b.status('vm0').spaces[0]!.clients.length === 1);
    expect(logged.some((l) => l.includes('"code":"MMB_ERR_SLOW_READER"'))).toBe(true);
    const s = await subscriberOf(b, { reconnect: false });
    await owner.addRegion({ name: 'ram', gpa: 0, size: 4 * MiB, backing: ram.backing });
    expect(s.regions()).toHaveLength(1);
  });
});
