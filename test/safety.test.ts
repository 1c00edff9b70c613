// The promise "a change is done only when every user of guest memory applied it; a refusal changes
// nothing; nothing is lost", tried against stalled and crashing clients in their own processes, and
// judged by the kernel (/proc/PID/maps, VmLck, KVM's memslots) at the moment the owner is told "done":
//   - eviction is not enough: a stopped client is fenced (killed through its pidfd, or waited for) before
//     a removal completes; where it cannot be, the removal fails and the memory stays;
//   - a broker restart tears no memory out of running clients: they keep everything until the owner
//     republished, then reconcile without remapping;
//   - a vote disturbs nobody: while a transaction is voted on, no client removes anything, and a refusal
//     leaves every client exactly as it was.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { OwnerClient, fetchStatus } from '../clients/index.js';
import { native } from '../native/index.js';
import type { StatusSpace } from '../protocol/index.js';
import { have, makeImage, startQsd, QSD } from '../bench/vhost-user-backends.js';
import { IN_CI } from './helpers/ci.js';
import { spawnClient } from '../testkit/clients.js';
import { CLI, JsonProc, memfdStarts, spawnBroker, spawnSubscriber, stopProcess, tempDir, waitFor, type BrokerProc } from './helpers/procs.js';
import { rejection } from './helpers/throws.js';

const MiB = 2 ** 20;
// Without /dev/kvm the memslot cases cannot run; under CI that is a failure, not a skip.
const HAVE_KVM = fs.existsSync('/dev/kvm') || IN_CI;
const HAVE_QSD = have(QSD) || IN_CI;
const cleanups: (() => unknown)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

/** What a process can still reach of memfd `name`, per the kernel; a dead (or zombie) process reaches nothing. */
function reach(pid: number, name: string): { alive: boolean; mappings: number; lockedKiB: number } {
  let status: string;
  try {
    status = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  } catch {
    return { alive: false, mappings: 0, lockedKiB: 0 };
  }
  if (/^State:\s+Z/m.test(status)) return { alive: false, mappings: 0, lockedKiB: 0 };
  const maps = fs
    .readFileSync(`/proc/${pid}/maps`, 'utf8')
    .split('\n')
    .filter((l) => / \/memfd:(.*?)(?: \(deleted\))?$/.exec(l)?.[1] === name);
  return { alive: true, mappings: maps.length, lockedKiB: Number(/^VmLck:\s+(\d+) kB$/m.exec(status)?.[1] ?? 0) };
}

/** `mmbroker serve` on a new socket, or on `at` (a restart in place of a broker that died). */
async function broker(args: string[], opts: { published?: boolean; at?: string } = {}): Promise<{ socket: string; proc: BrokerProc }> {
  let socket = opts.at;
  if (socket === undefined) {
    const dir = tempDir('mmb-safety-');
    socket = path.join(dir, 'broker.sock');
    cleanups.push(() => fs.rmSync(dir, { recursive: true, force: true }));
  }
  const proc = await spawnBroker(socket, ['--space', 'vm0', ...args], opts);
  cleanups.push(() => stopProcess(proc, 'SIGKILL'));
  return { socket, proc };
}

async function owner(socket: string, publish = true): Promise<OwnerClient> {
  const o = await OwnerClient.attach(socket, { space: 'vm0', name: 'safety-owner', publish });
  cleanups.push(() => o.close());
  return o;
}

/** A backing the test keeps its own fd of (to republish it after a restart). */
async function backing(o: OwnerClient, size: number, name: string): Promise<{ backing: number; fd: number }> {
  const b = await o.createBacking(size, name);
  cleanups.push(() => native.close(b.fd));
  return b;
}

/** The vfio-like client with the soft backend (real mlock pinning), in its own process (the testkit's scripted client). */
async function vfio(socket: string, name: string): Promise<JsonProc> {
  const p = spawnClient({ socket, space: 'vm0', kind: 'vfio', args: ['--name', name, '--device', 'dev0'] });
  cleanups.push(() => p.stop());
  await p.next('ready', () => true, 30_000);
  return p;
}

/** A kvm-like client (a real KVM VM's memslots) in its own process. */
async function kvm(socket: string, name: string): Promise<JsonProc> {
  const child = spawn(process.execPath, [CLI, 'attach', 'kvm', '--socket', socket, '--space', 'vm0', '--name', name, '--json', '--control'], {
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  const p = new JsonProc(child);
  cleanups.push(() => p.stop());
  await p.next('attached', () => true, 30_000);
  return p;
}

async function plain(socket: string, extra: string[]): Promise<JsonProc> {
  const p = await spawnSubscriber(socket, 'vm0', extra);
  cleanups.push(() => p.stop());
  return p;
}

const slots = async (p: JsonProc) =>
  ((await p.request({ cmd: 'slots' }, 'slots')).slots as { gpa: number; size: number; hva: number; name: string }[]).map(({ gpa, size, hva }) => ({
    gpa,
    size,
    hva,
  }));
const space = async (socket: string): Promise<StatusSpace> => (await fetchStatus(socket, 'vm0')).spaces[0] as StatusSpace;
const exited = (p: JsonProc) =>
  new Promise<NodeJS.Signals | null>((r) =>
    p.child.exitCode !== null || p.child.signalCode !== null ? r(p.child.signalCode) : p.child.once('exit', (_c, sig) => r(sig)),
  );

describe('Invariant 1: eviction is not fencing', () => {
  it('a stopped vfio client that pins a region is killed through its pidfd before the removal is done; at that moment it maps and pins nothing', async () => {
    const { socket } = await broker(['--ack-timeout', '500']);
    const o = await owner(socket);
    const dimm = await backing(o, 64 * MiB, 'safety-evict');
    await o.addRegion({ name: 'dimm', gpa: 0x1_0000_0000, size: 64 * MiB, backing: dimm.backing });
    const good = await plain(socket, ['--name', 'good']);
    const stuck = await vfio(socket, 'stuck-vfio');
    const before = reach(stuck.pid, 'safety-evict');
    expect(before.mappings).toBeGreaterThan(0);
    expect(before.lockedKiB).toBeGreaterThanOrEqual(64 * 1024);
    const ended = exited(stuck);
    stuck.child.kill('SIGSTOP');

    const r = await o.removeRegion('dimm');
    // Judged the moment the owner is told "done".
    const at = reach(stuck.pid, 'safety-evict');
    expect(at).toEqual({ alive: false, mappings: 0, lockedKiB: 0 });
    expect(memfdStarts(good.pid, 'safety-evict')).toEqual([]);
    expect(r.unreferenced).toEqual([dimm.backing]);
    expect(await ended).toBe('SIGKILL');
    expect((await space(socket)).holders ?? []).toEqual([]);
  });

  it('a client that handed memory to another process (DELEGATE) is fenced with it: both are dead before the removal is done', async () => {
    const { socket } = await broker(['--ack-timeout', '500']);
    const o = await owner(socket);
    const dimm = await backing(o, 16 * MiB, 'safety-delegate');
    await o.addRegion({ name: 'dimm', gpa: 0x1_0000_0000, size: 16 * MiB, backing: dimm.backing });
    const bridge = await plain(socket, ['--name', 'bridge']);
    const { pid: helper } = (await bridge.request({ cmd: 'hand-on', region: 'dimm' }, 'delegated')) as unknown as { pid: number };
    cleanups.push(() => {
      try {
        process.kill(helper, 'SIGKILL');
      } catch {
        // Already gone, as it should be.
      }
    });
    expect(reach(helper, 'safety-delegate').mappings).toBe(1);
    bridge.child.kill('SIGSTOP');

    await o.removeRegion('dimm');
    // At that moment neither the stopped client nor the process it handed the memory to can reach it.
    expect(reach(bridge.pid, 'safety-delegate')).toEqual({ alive: false, mappings: 0, lockedKiB: 0 });
    expect(reach(helper, 'safety-delegate')).toEqual({ alive: false, mappings: 0, lockedKiB: 0 });
  });

  it.runIf(HAVE_QSD)(
    'a vhost-user bridge names its back-end (DELEGATE of its SO_PEERPIDFD): stopped, the bridge and qemu-storage-daemon are both dead before the removal is done',
    async () => {
      const { socket } = await broker(['--ack-timeout', '500']);
      const o = await owner(socket);
      const dir = tempDir('mmb-safety-qsd-');
      cleanups.push(() => fs.rmSync(dir, { recursive: true, force: true }));
      const image = path.join(dir, 'disk.img');
      makeImage(image, 2048);
      const qsd = await startQsd(dir, image);
      cleanups.push(() => qsd.stop());
      const child = spawn(
        process.execPath,
        [CLI, 'attach', 'vhost-user', '--socket', socket, '--space', 'vm0', '--backend-socket', qsd.socket, '--name', 'blk0', '--json'],
        { stdio: ['ignore', 'pipe', 'pipe'] },
      );
      const bridge = new JsonProc(child);
      cleanups.push(() => bridge.stop());
      await bridge.next('attached', () => true, 20_000);
      const dimm = await backing(o, 16 * MiB, 'safety-qsd');
      await o.addRegion({ name: 'dimm', gpa: 0x1_0000_0000, size: 16 * MiB, backing: dimm.backing });
      expect(reach(qsd.pid, 'safety-qsd').mappings).toBe(1);
      bridge.child.kill('SIGSTOP');

      await o.removeRegion('dimm');
      expect(reach(bridge.pid, 'safety-qsd')).toEqual({ alive: false, mappings: 0, lockedKiB: 0 });
      expect(reach(qsd.pid, 'safety-qsd')).toEqual({ alive: false, mappings: 0, lockedKiB: 0 });
    },
  );

  it('with --fence wait, a stopped client makes the removal fail (MMB_ERR_NOT_FENCED, naming it) and the memory stays; once it exits the removal goes through', async () => {
    const { socket } = await broker(['--ack-timeout', '500', '--fence', 'wait', '--fence-timeout', '800']);
    const o = await owner(socket);
    const dimm = await backing(o, 16 * MiB, 'safety-wait');
    await o.addRegion({ name: 'dimm', gpa: 0x1_0000_0000, size: 16 * MiB, backing: dimm.backing });
    const good = await plain(socket, ['--name', 'good']);
    const stuck = await vfio(socket, 'stuck-vfio');
    stuck.child.kill('SIGSTOP');
    cleanups.push(() => stuck.child.kill('SIGCONT'));

    const err = await rejection(o.removeRegion('dimm'));
    expect(err.code).toBe('MMB_ERR_NOT_FENCED');
    expect(err.client?.pid).toBe(stuck.pid);
    const st = await space(socket);
    expect(st.regions.map((x) => x.name)).toEqual(['dimm']);
    expect(st.holders?.map((h) => [h.client.pid, h.reason])).toEqual([[stuck.pid, 'evicted']]);
    // Nothing was taken from anyone: the good client still maps it, the stopped one still pins it.
    expect(memfdStarts(good.pid, 'safety-wait')).toHaveLength(1);
    expect(reach(stuck.pid, 'safety-wait').lockedKiB).toBeGreaterThanOrEqual(16 * 1024);

    stuck.child.kill('SIGKILL');
    await exited(stuck);
    await waitFor('the holder to be fenced by its exit', async () => ((await space(socket)).holders ?? []).length === 0);
    const r = await o.removeRegion('dimm');
    expect(r.unreferenced).toEqual([dimm.backing]);
    expect(memfdStarts(good.pid, 'safety-wait')).toEqual([]);
  });

  it('a client stopped while others roll back is fenced before the owner hears the refusal', async () => {
    const { socket } = await broker(['--ack-timeout', '1000']);
    const o = await owner(socket);
    const extra = await backing(o, 16 * MiB, 'safety-rb');
    const voter = await vfio(socket, 'voter');
    const refuser = await plain(socket, ['--name', 'refuser', '--nack', 'new', '--nack-delay', '600']);
    const ended = exited(voter);
    const adding = rejection(o.addRegion({ name: 'new', gpa: 0x2_0000_0000, size: 16 * MiB, backing: extra.backing }));
    await refuser.next('refusing');
    // The voter applied (pinned) the add and voted; stopped now, it cannot undo it when the refusal comes.
    await waitFor(
      'the voter to vote',
      () => reach(voter.pid, 'safety-rb').lockedKiB >= 16 * 1024 && voter.lines.some((e) => e.event === 'change' && (e.added as string[]).includes('new')),
    );
    voter.child.kill('SIGSTOP');
    const err = await adding;
    const at = reach(voter.pid, 'safety-rb');
    expect(err.code).toBe('MMB_ERR_CLIENT_REFUSED');
    expect(err.client?.name).toBe('refuser');
    expect(at).toEqual({ alive: false, mappings: 0, lockedKiB: 0 });
    expect(await ended).toBe('SIGKILL');
    expect((await space(socket)).regions).toEqual([]);
  });
});

describe('Invariant 1: a holder that comes back within the grace is reconciled, not killed', () => {
  it('a client that drops its connection while it holds its vote and reconnects at once is synced in the fence window: alive, and at the moment of done it maps and pins nothing removed', async () => {
    const { socket } = await broker(['--ack-timeout', '3000']);
    const o = await owner(socket);
    const old = await backing(o, 16 * MiB, 'safety-resume-old');
    const neu = await backing(o, 16 * MiB, 'safety-resume-new');
    await o.addRegion({ name: 'old', gpa: 0x1_0000_0000, size: 16 * MiB, backing: old.backing });
    const c = await vfio(socket, 'dropper');
    expect(reach(c.pid, 'safety-resume-old').mappings).toBeGreaterThan(0);
    await c.request({ cmd: 'hold-next' }, 'armed');
    const committing = o.commit([
      { op: 'remove', region: 'old' },
      { op: 'add', name: 'new', gpa: 0x2_0000_0000, size: 16 * MiB, backing: neu.backing, offset: 0 },
    ]);
    // It applied the add and holds its vote; its connection drops and it reconnects at once (resume.client),
    // while the broker rolls that vote back: before the fix it waited in the queue behind the transaction,
    // which waited the grace for its reconcile and then killed it.
    await c.next('holding');
    await c.request({ cmd: 'drop' }, 'dropped');
    const r = await committing;
    const at = reach(c.pid, 'safety-resume-old');
    expect(at.alive).toBe(true);
    expect(at.mappings).toBe(0);
    expect(reach(c.pid, 'safety-resume-new').mappings).toBeGreaterThan(0);
    expect(at.lockedKiB).toBeGreaterThanOrEqual(16 * 1024);
    expect(at.lockedKiB).toBeLessThan(32 * 1024);
    expect(r.unreferenced).toEqual([old.backing]);
    const st = await space(socket);
    expect(st.holders ?? []).toEqual([]);
    expect(st.clients.filter((x) => x.name === 'dropper').map((x) => x.ackedGeneration)).toEqual([r.generation]);
    expect(c.child.exitCode).toBeNull();
  });

  it("a holder that reconnects while the broker rolls the vote back (another client is slow to ack the rollback) is synced in the retry's fence window, not queued behind the transaction and killed", async () => {
    const { socket, proc } = await broker(['--ack-timeout', '3000']);
    const o = await owner(socket);
    const old = await backing(o, 16 * MiB, 'safety-resume2-old');
    const neu = await backing(o, 16 * MiB, 'safety-resume2-new');
    await o.addRegion({ name: 'old', gpa: 0x1_0000_0000, size: 16 * MiB, backing: old.backing });
    const c = await vfio(socket, 'dropper');
    const slow = spawnClient({ socket, space: 'vm0', kind: 'vhost', args: ['--name', 'slow'] });
    cleanups.push(() => (slow.signal('SIGCONT'), slow.stop()));
    await slow.next('ready', () => true, 30_000);
    await c.request({ cmd: 'hold-next' }, 'armed');
    const committing = o.commit([
      { op: 'remove', region: 'old' },
      { op: 'add', name: 'new', gpa: 0x2_0000_0000, size: 16 * MiB, backing: neu.backing, offset: 0 },
    ]);
    await Promise.all([c.next('holding'), slow.next('change', (e) => (e.added as string[]).includes('new'))]);
    // The other client voted; stopped, it answers the rollback only when continued, so the dropper's
    // reconnect certainly arrives while the broker rolls the first vote back.
    slow.signal('SIGSTOP');
    await c.request({ cmd: 'drop' }, 'dropped');
    await waitFor('the broker to hold the returning dropper', () =>
      proc.lines.some((l) => typeof l.msg === 'string' && l.msg.startsWith('a holder came back while a transaction runs')),
    );
    slow.signal('SIGCONT');
    const r = await committing;
    const at = reach(c.pid, 'safety-resume2-old');
    expect(at.alive).toBe(true);
    expect(at.mappings).toBe(0);
    expect(reach(c.pid, 'safety-resume2-new').mappings).toBeGreaterThan(0);
    expect(memfdStarts(slow.pid, 'safety-resume2-old')).toEqual([]);
    expect(r.unreferenced).toEqual([old.backing]);
    expect((await space(socket)).holders ?? []).toEqual([]);
    expect(c.child.exitCode).toBeNull();
  });
});

describe('Invariant 3: a broker restart tears no memory out of running clients', () => {
  it.runIf(HAVE_KVM)(
    'SIGKILL the broker, start another: the vfio client keeps its pins and the kvm client its memslots until the owner republished, then nothing is remapped',
    async () => {
      const first = await broker([], { published: false });
      const o1 = await OwnerClient.attach(first.socket, { space: 'vm0', name: 'vmm' });
      expect(o1.published).toBe(false);
      const ram = await o1.createBacking(64 * MiB, 'safety-restart');
      cleanups.push(() => native.close(ram.fd));
      await o1.addRegion({ name: 'ram', gpa: 0x1_0000_0000, size: 64 * MiB, backing: ram.backing });
      await o1.publish();
      const pinner = await vfio(first.socket, 'pinner');
      const slotter = await kvm(first.socket, 'slotter');
      const pinned = reach(pinner.pid, 'safety-restart');
      const mapsBefore = memfdStarts(pinner.pid, 'safety-restart');
      const slotsBefore = await slots(slotter);
      expect(pinned.lockedKiB).toBeGreaterThanOrEqual(64 * 1024);
      expect(slotsBefore).toHaveLength(1);

      await stopProcess(first.proc, 'SIGKILL');
      o1.close();
      const second = await broker([], { published: false, at: first.socket });
      // Both reattach to the restarted, unpublished space and wait; nothing is taken from them meanwhile.
      await waitFor(
        'both clients to wait on the restarted broker',
        async () => {
          const st = await space(second.socket);
          return st.published === false && st.clients.filter((c) => c.state === 'waiting').length === 2;
        },
        20_000,
      );
      expect(reach(pinner.pid, 'safety-restart').lockedKiB).toBe(pinned.lockedKiB);
      expect(memfdStarts(pinner.pid, 'safety-restart')).toEqual(mapsBefore);
      expect(await slots(slotter)).toEqual(slotsBefore);

      // The owner comes back, rebuilds the map from the same memfd (a new backing id), and publishes it.
      const o2 = await owner(second.socket, false);
      expect(o2.published).toBe(false);
      const { backing } = await o2.addBacking(ram.fd, 'safety-restart');
      await o2.addRegion({ name: 'ram', gpa: 0x1_0000_0000, size: 64 * MiB, backing });
      // Still unpublished: a map being rebuilt is never applied.
      expect((await space(second.socket)).clients.filter((c) => c.state === 'waiting')).toHaveLength(2);
      const generation = await o2.publish();
      await waitFor(
        'both clients to reconcile',
        async () =>
          (await space(second.socket)).clients.filter((c) => c.role === 'subscriber' && c.state === 'ready' && c.ackedGeneration === generation).length === 2,
        20_000,
      );
      // Reconciled by key: the same mapping, the same pins, the same memslot.
      expect(reach(pinner.pid, 'safety-restart').lockedKiB).toBe(pinned.lockedKiB);
      expect(memfdStarts(pinner.pid, 'safety-restart')).toEqual(mapsBefore);
      expect(await slots(slotter)).toEqual(slotsBefore);
    },
  );

  it('an operator publishes a space whose owner never came back: `mmbroker publish`', async () => {
    const { socket } = await broker([], { published: false });
    const sub = spawn(process.execPath, [CLI, 'attach', '--socket', socket, '--space', 'vm0', '--json'], { stdio: ['ignore', 'pipe', 'pipe'] });
    const p = new JsonProc(sub);
    cleanups.push(() => p.stop());
    await waitFor('the subscriber to wait', async () => (await space(socket)).clients.some((c) => c.state === 'waiting'));
    const out = await new Promise<{ code: number | null; stdout: string }>((resolve) => {
      const c = spawn(process.execPath, [CLI, 'publish', '--socket', socket, '--space', 'vm0'], { stdio: ['ignore', 'pipe', 'pipe'] });
      let stdout = '';
      c.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
      c.on('exit', (code) => resolve({ code, stdout }));
    });
    expect(out.code).toBe(0);
    expect(out.stdout).toContain('published "vm0" at generation 0');
    await p.next('attached');
    expect((await space(socket)).published).toBe(true);
  });
});

describe('Invariant 2: a vote disturbs nobody', () => {
  it.runIf(HAVE_KVM)(
    'while a replacement is voted on, every client that voted still maps, pins and slots the memory it replaces; the refusal leaves them exactly as they were',
    async () => {
      const { socket } = await broker(['--ack-timeout', '5000']);
      const o = await owner(socket);
      const a = await backing(o, 8 * MiB, 'safety-vote-a');
      const b = await backing(o, 8 * MiB, 'safety-vote-b');
      await o.addRegion({ name: 'a', gpa: 0x1_0000_0000, size: 8 * MiB, backing: a.backing });
      const pinner = await vfio(socket, 'pinner');
      const slotter = await kvm(socket, 'slotter');
      const mapper = await plain(socket, ['--name', 'mapper']);
      const refuser = await plain(socket, ['--name', 'refuser', '--nack', 'new', '--nack-delay', '1500']);
      const before = {
        pinner: [memfdStarts(pinner.pid, 'safety-vote-a'), reach(pinner.pid, 'safety-vote-a').lockedKiB],
        slotter: await slots(slotter),
        mapper: memfdStarts(mapper.pid, 'safety-vote-a'),
      };

      // Replace a by new at the same GPA, from another memfd: KVM needs a's slot deleted before new's.
      const replacing = rejection(
        o.commit([
          { op: 'remove', region: 'a' },
          { op: 'add', name: 'new', gpa: 0x1_0000_0000, size: 8 * MiB, backing: b.backing, offset: 0 },
        ]),
      );
      await refuser.next('refusing');
      await waitFor(
        'the others to vote',
        async () =>
          (await space(socket)).clients
            .filter((c) => c.role === 'subscriber' && c.state === 'applying')
            .map((c) => c.name)
            .join() === 'refuser',
      );
      // The vote is in: nothing of `a` was taken from anyone.
      expect([memfdStarts(pinner.pid, 'safety-vote-a'), reach(pinner.pid, 'safety-vote-a').lockedKiB]).toEqual(before.pinner);
      expect(await slots(slotter)).toEqual(before.slotter);
      expect(memfdStarts(mapper.pid, 'safety-vote-a')).toEqual(before.mapper);

      const err = await replacing;
      expect(err.code).toBe('MMB_ERR_CLIENT_REFUSED');
      expect(err.client?.name).toBe('refuser');
      expect([memfdStarts(pinner.pid, 'safety-vote-a'), reach(pinner.pid, 'safety-vote-a').lockedKiB]).toEqual(before.pinner);
      expect(await slots(slotter)).toEqual(before.slotter);
      expect(memfdStarts(mapper.pid, 'safety-vote-a')).toEqual(before.mapper);
      for (const p of [pinner, mapper]) expect(memfdStarts(p.pid, 'safety-vote-b')).toEqual([]);

      // And the same replacement, accepted, goes through (the commit phase switches it).
      await refuser.stop();
      await o.commit([
        { op: 'remove', region: 'a' },
        { op: 'add', name: 'next', gpa: 0x1_0000_0000, size: 8 * MiB, backing: b.backing, offset: 0 },
      ]);
      expect(memfdStarts(mapper.pid, 'safety-vote-a')).toEqual([]);
      expect(memfdStarts(mapper.pid, 'safety-vote-b')).toHaveLength(1);
      expect((await slots(slotter)).map((s) => s.gpa)).toEqual([0x1_0000_0000]);
    },
  );
});
