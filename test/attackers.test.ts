// Issue 14: a hostile local user against a broker run as root. Every attack runs as uid 65534 (nobody)
// through setpriv, from a copy of what it needs in a directory it may read (test/helpers/other-uid.ts), so
// this file passes from a checkout under a 0700 directory. The kernel is the judge: what the attacker
// could open, map and write, the broker's /proc/PID/fd, and what a legitimate owner gets done meanwhile.
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import type { Broker, BrokerOptions } from '../broker/index.js';
import { OwnerClient } from '../clients/index.js';
import { constants, isNativeError, native } from '../native/index.js';
import type { SocketTransport } from '../transport/index.js';
import { IN_CI } from './helpers/ci.js';
import { defer, embeddedBroker, ownerOf, runCleanups, subscriberOf } from './helpers/embedded.js';
import { NOBODY, canRunAsNobody, runAsNobody, stageForOtherUid } from './helpers/other-uid.js';
import { BrokerProc, fdCount, runCli, tempDir, waitFor } from './helpers/procs.js';

/** The pid a pidfd names (-1 once it exited), from the kernel's fdinfo. */
const pidOfPidfd = (fd: number): number => Number(/^Pid:\s*(-?\d+)$/m.exec(fs.readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8'))?.[1]);

const MiB = 1 << 20;
const PAGE = 4096;
const run = canRunAsNobody || IN_CI;
let staged = '';

beforeAll(() => {
  if (run) staged = stageForOtherUid();
});
afterAll(() => {
  if (staged) fs.rmSync(staged, { recursive: true, force: true });
});
afterEach(runCleanups);

/** A directory nobody can enter and a socket in it anyone may connect to (the allow-lists decide). */
function openDir(): string {
  const dir = tempDir('mmb-attack-');
  fs.chmodSync(dir, 0o755);
  defer(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

function openBroker(opts: BrokerOptions = {}): { b: Broker; socket: string; transports: SocketTransport[] } {
  const socket = path.join(openDir(), 'b.sock');
  const b = embeddedBroker(opts);
  const transports: SocketTransport[] = [];
  b.listen(socket, { mode: 0o666 }).on('connection', (t) => transports.push(t));
  return { b, socket, transports };
}

const subscribersToo = { access: { subscribers: { uids: [0, NOBODY] } } };

/** Runs the attacker probe with stdin held open; ends it after the test. */
function attack(args: string[], as: string[] = []): ReturnType<typeof runAsNobody> {
  const p = runAsNobody(staged, 'attacker.mjs', args, {}, as);
  defer(() => p.finish().catch(() => undefined));
  return p;
}

describe.runIf(run)('local attackers (uid 65534)', () => {
  describe('read-only that holds', () => {
    it('a subscriber given a read-only backing cannot reopen it read-write, chmod it, map it writable, or write it', async () => {
      const { b, socket } = openBroker(subscribersToo);
      const owner = await ownerOf(b);
      const rom = await owner.createBacking(4 * MiB, 'rom', { contents: Buffer.from('firmware') });
      defer(() => native.close(rom.fd));
      await owner.addRegion({ name: 'rom', gpa: 0, size: 4 * MiB, backing: rom.backing, readonly: true });
      const r = await attack(['ro', socket, 'vm0']).line((l) => l.done === 'ro');
      expect(r).toMatchObject({ uid: NOBODY, accmode: 0, mmapWritable: 'EACCES', reopen: 'EACCES', chmod: 'EPERM', wrote: false });
      expect(native.fstat(rom.fd).mode & 0o7777).toBe(0); // the inode, as the kernel sees it
      const view = native.mmap(rom.fd, 0, PAGE, constants.PROT_READ, constants.MAP_SHARED);
      expect(Buffer.from(view.buffer, 0, 13).toString()).toBe('firmware\0\0\0\0\0');
      native.munmap(view);
    });

    it("what holds against which uid: the memfd's own uid can chmod it back (documented); root keeps CAP_DAC_OVERRIDE; a write-sealed backing holds against root too", async () => {
      const { b, socket } = openBroker({ access: { subscribers: { uids: [0, NOBODY] } } });
      const owner = await ownerOf(b);
      const rom = await owner.createBacking(4 * MiB, 'rom');
      defer(() => native.close(rom.fd));
      await owner.addRegion({ name: 'rom', gpa: 0, size: 4 * MiB, backing: rom.backing, readonly: true });
      // uid 0 without capabilities is the inode's owner (this process, root, created the memfd): mode 0
      // stops its reopen, but it may change the mode back. Nothing protects a memfd from its creator's uid.
      const noCaps = await attack(
        ['ro', socket, 'vm0'],
        ['--reuid', '0', '--regid', '0', '--clear-groups', '--inh-caps', '-all', '--bounding-set', '-all'],
      ).line((l) => l.done === 'ro');
      expect(noCaps).toMatchObject({ uid: 0, reopen: 'EACCES', chmod: 'ok', reopenAfterChmod: 'ok', wrote: true });
      // Memory the owner sealed against writes stays unwritten even by root with every capability.
      const sealed = await owner.createBacking(4 * MiB, 'sealed-rom', { contents: Buffer.from('boot'), sealWrites: true });
      defer(() => native.close(sealed.fd));
      await owner.addRegion({ name: 'sealed', gpa: 4 * MiB, size: 4 * MiB, backing: sealed.backing, readonly: true });
      await owner.removeRegion('rom');
      const root = await attack(['ro', socket, 'vm0'], ['--reuid', '0', '--regid', '0', '--clear-groups']).line((l) => l.done === 'ro');
      expect(root).toMatchObject({ uid: 0, reopen: 'ok', mmapReopened: 'EPERM', writeReopened: 'EPERM', wrote: false });
      // A writable region over it cannot be mapped by anyone: the subscriber refuses it, nothing changes.
      const s = await subscriberOf(b, { reconnect: false });
      const err = await owner.addRegion({ name: 'rw', gpa: 8 * MiB, size: 4 * MiB, backing: sealed.backing }).catch((e: unknown) => e);
      expect((err as { code?: string }).code).toBe('MMB_ERR_MAP_FAILED');
      expect(s.regions().map((x) => x.name)).toEqual(['sealed']);
    });
  });

  describe('no denial of service before authentication', () => {
    it('a pre-HELLO descriptor flood (76 connections x 256 pending fds, then one-fd connections) leaves the broker its descriptors; an owner hotplugs throughout', async () => {
      const dir = openDir();
      const socket = path.join(dir, 'b.sock');
      // The broker in its own process with a small RLIMIT_NOFILE, so the flood would exhaust it quickly.
      const logs: string[] = [];
      const broker = await BrokerProc.start({
        socket,
        spaces: ['vm0'],
        args: ['--socket-mode', '666'],
        prefix: ['prlimit', '--nofile=1024:1024', '--'],
        onLine: (l) => logs.push(JSON.stringify(l)),
      });
      broker.child.stderr?.on('data', (d: string) => logs.push(d));
      defer(async () => void (await broker.stop('SIGTERM')));
      const baseline = fdCount(broker.pid);

      const flood = attack(['flood', socket, '76', '2000']);
      const owner = await OwnerClient.attach(socket, { space: 'vm0' });
      defer(() => owner.close());
      let hotplugs = 0;
      let flooded: Record<string, unknown> | undefined;
      void flood.line((l) => l.done === 'flood').then((l) => (flooded = l));
      // Hotplug while the flood runs, and a few times after it is done (its connections still held).
      for (let after = 0; after < 5; after += flooded ? 1 : 0) {
        const dimm = await owner.createBacking(2 * MiB, `dimm${hotplugs}`);
        await owner.addRegion({ name: `dimm${hotplugs}`, gpa: 0x1_0000_0000, size: 2 * MiB, backing: dimm.backing });
        await owner.removeRegion(`dimm${hotplugs}`);
        await owner.dropBacking(dimm.backing);
        native.close(dimm.fd);
        hotplugs++;
      }
      const f = flooded as { connections: number; fdsSent: number; codes: Record<string, number> };
      expect(f.fdsSent).toBeGreaterThan(0); // the attack did send descriptors...
      // ...and every connection that did was closed: the kernel discarded them (no room for SCM_RIGHTS).
      expect(Object.keys(f.codes).filter((c) => !['MMB_ERR_FDS_TRUNCATED', 'MMB_ERR_CONNECTION_LIMIT', 'ECONNRESET', 'EPIPE'].includes(c))).toEqual([]);
      expect(f.codes.MMB_ERR_FDS_TRUNCATED).toBeGreaterThan(0);
      // The broker never came near its limit and never failed an accept.
      expect(fdCount(broker.pid)).toBeLessThan(baseline + 40);
      expect(logs.join('')).not.toContain('accept failed');
      expect(broker.child.exitCode).toBeNull();
    });

    it('connections that do not say HELLO, or do not attach, are closed at their deadline; per uid only a few may wait; an owner still connects', async () => {
      const { b, socket } = openBroker({ connection: { helloTimeoutMs: 300, unattachedIdleMs: 300, maxUnattachedPerUid: 4 } });
      const silent = attack(['hold', socket, '6']);
      const closed = (p: typeof silent, n: number) =>
        waitFor(`${n} connections closed`, () => p.lines.filter((l) => (l as { closed?: number }).closed !== undefined).length >= n);
      await silent.line((l) => l.held === 6);
      await closed(silent, 6);
      const codes = silent.lines.flatMap((l) => (l as { codes?: string[] }).codes ?? []).sort();
      expect(codes).toEqual([
        'MMB_ERR_CONNECTION_LIMIT',
        'MMB_ERR_CONNECTION_LIMIT',
        'MMB_ERR_HANDSHAKE_TIMEOUT',
        'MMB_ERR_HANDSHAKE_TIMEOUT',
        'MMB_ERR_HANDSHAKE_TIMEOUT',
        'MMB_ERR_HANDSHAKE_TIMEOUT',
      ]);
      const idle = attack(['hold', socket, '2', 'hello']);
      await closed(idle, 2);
      expect(idle.lines.flatMap((l) => (l as { codes?: string[] }).codes ?? [])).toEqual([
        'reply',
        'MMB_ERR_HANDSHAKE_TIMEOUT',
        'reply',
        'MMB_ERR_HANDSHAKE_TIMEOUT',
      ]);
      // While four wait (the most one uid may), the owner connects and works.
      const waiting = attack(['hold', socket, '4']);
      await waiting.line((l) => l.held === 4);
      const owner = await ownerOf(socket);
      expect((await owner.status()).spaces[0]?.name).toBe('vm0');
      void b;
    });

    it('a subscriber may send only a few descriptors per message; more close its connection', async () => {
      const { socket } = openBroker(subscribersToo);
      const few = await attack(['subfds', socket, 'vm0', '4']).line((l) => l.done === 'subfds');
      expect(few).toMatchObject({ attached: ['reply', 'reply'], codes: ['MMB_ERR_FD_MISMATCH'], closed: false });
      const many = await attack(['subfds', socket, 'vm0', '64']).line((l) => l.done === 'subfds');
      expect(many).toMatchObject({ attached: ['reply', 'reply'], codes: ['MMB_ERR_FDS_TRUNCATED'], closed: true });
    });
  });

  describe('a socket directory nobody else controls', () => {
    /** A sticky, world-writable parent like /tmp, where uid 65534 plants `what` as NAME. */
    function planted(what: 'dir' | 'symlink'): string {
      const parent = openDir();
      fs.chmodSync(parent, 0o1777);
      const target = path.join(parent, 'vm0');
      const r = what === 'dir' ? asNobodyShell(['mkdir', '-m', '755', target]) : asNobodyShell(['ln', '-s', openDir(), target]);
      expect(r.status).toBe(0);
      return target;
    }

    it('a directory another user created in a sticky parent: the broker refuses to start (MMB_ERR_UNSAFE_PATH)', async () => {
      const dir = planted('dir');
      const r = await runCli(['serve', '--socket', path.join(dir, 'b.sock'), '--space', 'vm0']);
      expect(r.code).toBe(1);
      expect(r.stderr).toContain('MMB_ERR_UNSAFE_PATH');
      expect(r.stderr).toContain(`belongs to uid ${NOBODY}`);
      expect(fs.existsSync(path.join(dir, 'b.sock'))).toBe(false);
    });

    it('a symlink another user planted as the directory is not followed', async () => {
      const link = planted('symlink');
      const r = await runCli(['serve', '--socket', path.join(link, 'b.sock'), '--space', 'vm0']);
      expect(r.code).toBe(1);
      expect(r.stderr).toContain('MMB_ERR_UNSAFE_PATH');
      expect(fs.readdirSync(fs.realpathSync(link))).toEqual([]);
    });
  });

  describe('secrets', () => {
    it('a token file others can read is refused, with a hint', async () => {
      const dir = openDir();
      const token = path.join(dir, 'token');
      fs.writeFileSync(token, 'a-token-of-24-characters\n', { mode: 0o644 });
      fs.chmodSync(token, 0o644);
      expect(asNobodyShell(['cat', token]).stdout).toContain('a-token-of-24-characters'); // what the attacker gets
      const r = await runCli(['serve', '--socket', path.join(dir, 'b.sock'), '--space', 'vm0', '--token-file', token]);
      expect(r.code).toBe(1);
      expect(r.stderr).toContain('MMB_ERR_UNSAFE_PATH');
      expect(r.stderr).toContain('chmod 600');
    });

    it("a writer that scribbles on a dirty bitmap's header word neither breaks DIRTY_SYNC nor loses a bit", async () => {
      const { b, socket } = openBroker(subscribersToo);
      const owner = await ownerOf(b);
      const ram = await owner.createBacking(4 * MiB, 'ram');
      defer(() => native.close(ram.fd));
      await owner.addRegion({ name: 'ram', gpa: 0, size: 4 * MiB, backing: ram.backing, logDirty: true });
      const honest = await subscriberOf(b, { reconnect: false });
      await owner.dirtySync(); // start from a clean bitmap
      const pages = (snap: Awaited<ReturnType<OwnerClient['dirtySync']>>): number[] => {
        const out: number[] = [];
        for (const r of snap.regions) for (let p = 0; p < r.pages; p++) if ((r.bits[p >>> 3] as number) & (1 << (p & 7))) out.push(p);
        snap.release();
        return out;
      };
      // Garbage, then a valid but wrong half (two syncs later the broker's active half is 0 again, so 1 is
      // wrong): honest writes after each must all be reported.
      for (const [value, written] of [
        ['3735928559', [3, 77, 1000]],
        ['1', [5, 600]],
      ] as const) {
        const scribbler = attack(['dirty', socket, 'vm0', value]);
        expect(await scribbler.line((l) => l.done === 'dirty')).toMatchObject({ scribbled: 1 });
        for (const p of written) honest.memory.write(p * PAGE, Buffer.from('x'));
        const got = await owner.dirtySync();
        expect(pages(got)).toEqual(expect.arrayContaining([...written]));
        await scribbler.finish();
      }
    });
  });

  describe('fencing by pidfd, never by pid', () => {
    it('a client that hands its connection to another process and exits: the pidfd names the exited connector, so no signal can reach anyone else', async () => {
      const { socket, transports } = openBroker();
      const probe = attack(['handoff', socket]);
      const { connector, holder } = await probe.line<{ connector: number; holder: number }>((l) => l.done === 'handoff');
      await probe.finish(); // the connector has exited and been reaped; the holder keeps the connection
      const t = transports.find((x) => x.peer.pid === connector);
      expect(t).toBeDefined();
      expect(t!.closed).toBe(false);
      expect(t!.peer.pidfd).toBeTypeOf('number');
      expect(pidOfPidfd(t!.peer.pidfd!)).toBe(-1);
      let err: unknown;
      try {
        native.pidfdSendSignal(t!.peer.pidfd!, 0);
      } catch (e) {
        err = e;
      }
      expect(isNativeError(err, 'ESRCH')).toBe(true);
      expect(fs.existsSync(`/proc/${holder}`)).toBe(true); // the process that holds the connection lives on
    });
  });
});

/** A shell command run as uid 65534 (for planting files), to completion. */
function asNobodyShell(cmd: string[]): ReturnType<typeof spawnSync> & { stdout: string } {
  return spawnSync('setpriv', ['--reuid', String(NOBODY), '--regid', String(NOBODY), '--clear-groups', '--', ...cmd], { encoding: 'utf8' }) as ReturnType<
    typeof spawnSync
  > & { stdout: string };
}
