// Pipelined transactions (feature PIPELINE, docs/protocol.md "Pipelined transactions"), with every
// subscriber in its own process and the kernel (/proc/PID/maps) as the judge, looked at the moment the
// owner is answered:
//   - transaction N+1 reaches the subscribers before N is committed, and every one applies them in order;
//   - a refusal in the middle of a window rolls it and everything after it back, newest first, with one
//     typed error per owner call, and when those errors are answered every client maps exactly what it
//     mapped before them;
//   - a client stopped mid-window is evicted and fenced (killed) before memory it maps is taken away;
//   - a client that did not negotiate PIPELINE (the C subscriber) gets transactions one at a time, and so
//     does everyone while it is attached;
//   - STATUS shows the committed map only.
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterEach, describe, expect, it } from 'vitest';
import { Broker } from '../broker/index.js';
import { Connection, MappingSubscriber, OwnerClient, type CreatedBacking } from '../clients/index.js';
import { native } from '../native/index.js';
import { ALL_FEATURES, ClientRefusedError, Feature, isMmbError, type CommitOp, type CommitResult, type MmbError } from '../protocol/index.js';
import { startClient } from '../testkit/clients.js';
import { Rng } from '../testkit/rng.js';
import type { JsonProc, Line } from '../testkit/jsonproc.js';
import { memfdMappings, processState } from '../testkit/procfs.js';
import { IN_CI } from './helpers/ci.js';
import { LineProc, buildCExample, missingCToolchain } from './helpers/examples.js';
import { tempDir, waitFor } from './helpers/procs.js';

const MiB = 2 ** 20;
const GPA = 0x1_0000_0000;
const C_DIR = path.join(fileURLToPath(new URL('..', import.meta.url)), 'examples/c-subscriber');
const cMissing = missingCToolchain();

const cleanups: (() => unknown)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

interface Space {
  broker: Broker;
  socket: string;
  owner: OwnerClient;
  /** A 2 MiB backing named `name` (its memfd's name too). */
  backing(name: string): Promise<CreatedBacking>;
}

async function space(opts: { pipeline: number; ackTimeoutMs?: number }): Promise<Space> {
  const dir = tempDir('mmb-pipeline-');
  const socket = path.join(dir, 'broker.sock');
  const broker = new Broker({ spaces: ['vm0'], pipeline: opts.pipeline, limits: { ackTimeoutMs: opts.ackTimeoutMs ?? 10_000 } });
  broker.listen(socket);
  const owner = await OwnerClient.attach(broker, { space: 'vm0', name: 'pipeline-owner' });
  const fds: number[] = [];
  cleanups.push(async () => {
    owner.close();
    await broker.close();
    for (const fd of fds) native.close(fd);
    fs.rmSync(dir, { recursive: true, force: true });
  });
  return {
    broker,
    socket,
    owner,
    backing: async (name) => {
      const b = await owner.createBacking(2 * MiB, name);
      fds.push(b.fd);
      return b;
    },
  };
}

/** A scripted plain subscriber process (testkit/client.ts) whose event lines are all kept, in order. */
async function subscriber(s: Space, name: string, args: string[] = []): Promise<{ p: JsonProc; events: Line[] }> {
  const events: Line[] = [];
  const p = await startClient({ socket: s.socket, space: 'vm0', args: ['--name', name, ...args] }, { onLine: (l) => events.push(l), name });
  cleanups.push(() => p.stop('SIGKILL'));
  return { p, events };
}

/** Names of the memfds `pid` maps, per the kernel. */
const mapped = (pid: number): string[] => [...new Set(memfdMappings(pid).map((m) => m.memfd))].sort();

const add = (name: string, b: CreatedBacking, slot: number): CommitOp => ({
  op: 'add',
  name,
  gpa: GPA + slot * 2 * MiB,
  size: 2 * MiB,
  backing: b.backing,
  offset: 0,
});
const remove = (name: string): CommitOp => ({ op: 'remove', region: name });

/** The generations a process's lines show as `event` (`change` events: those with `cause`). */
const gens = (events: readonly Line[], event: string, cause?: string) =>
  events.filter((l) => l.event === event && (cause === undefined || l.cause === cause)).map((l) => l.generation as number);

/** Whether a transaction after generation `from` reached the client (its vote applied) before the one before it was committed. */
function overlapped(events: readonly Line[], from: number): boolean {
  const committed = new Set<number>();
  for (const l of events) {
    const g = l.generation as number;
    if (l.event === 'committed') committed.add(g);
    if (l.event === 'change' && l.cause === 'txn' && g - 1 > from && !committed.has(g - 1)) return true;
  }
  return false;
}

describe('pipelined transactions (feature PIPELINE)', () => {
  it('sends transaction N+1 before N is acked, and every subscriber process applies them in order', async () => {
    const s = await space({ pipeline: 16 });
    const subs = await Promise.all(['a', 'b', 'c'].map((n) => subscriber(s, n, ['--ack-delay', '25'])));
    const bs = await Promise.all(['p0', 'p1', 'p2', 'p3'].map((n) => s.backing(n)));
    const g0 = s.broker.status('vm0').spaces[0]?.generation as number;
    // Adds, removals and a replacement at addresses a removal earlier in the window frees (slot 0).
    const txns: CommitOp[][] = [[add('r0', bs[0]!, 0)], [add('r1', bs[1]!, 1)], [remove('r0')], [add('r2', bs[2]!, 0)], [remove('r1')], [add('r3', bs[3]!, 1)]];
    const answered: number[] = [];
    const results = await Promise.all(txns.map((ops, i) => s.owner.commit(ops).then((r) => (answered.push(i), r))));
    expect(results.map((r) => r.generation)).toEqual(txns.map((_, i) => g0 + 1 + i));
    expect(answered).toEqual(txns.map((_, i) => i));
    // The last reply came after every client established the last transaction: the kernel shows it now.
    for (const { p } of subs) expect(mapped(p.pid)).toEqual(['p2', 'p3']);
    for (const { events } of subs) {
      // (Their event lines may trail the acks the broker waited for.)
      await waitFor('the last committed event', () => gens(events, 'committed').includes(g0 + txns.length));
      // Committed in order, each once; votes and commits each applied in order; and at least once a later
      // vote arrived before the earlier transaction was committed.
      expect(gens(events, 'committed').filter((g) => g > g0)).toEqual(txns.map((_, i) => g0 + 1 + i));
      for (const cause of ['txn', 'commit']) {
        const g = gens(events, 'change', cause).filter((x) => x > g0);
        expect(g.length).toBeGreaterThan(0);
        expect(g).toEqual([...g].sort((x, y) => x - y));
        expect(new Set(g).size).toBe(g.length);
      }
      expect(overlapped(events, g0)).toBe(true);
    }
    const st = s.broker.status('vm0').spaces[0]!;
    expect(st.generation).toBe(g0 + txns.length);
    expect(st.regions.map((r) => r.name).sort()).toEqual(['r2', 'r3']);
    expect(st.clients.filter((c) => c.role === 'subscriber').map((c) => c.ackedGeneration)).toEqual([g0 + 6, g0 + 6, g0 + 6]);
  });

  it('rolls back a refused transaction and every later one of the window, newest first, each owner call with its typed error, every client as before', async () => {
    const s = await space({ pipeline: 16 });
    const a = await subscriber(s, 'refuser', ['--nack', 'bad']);
    const others = await Promise.all(['b', 'c'].map((n) => subscriber(s, n, ['--ack-delay', '40'])));
    const all = [a, ...others];
    const bs = await Promise.all(['q0', 'q1', 'q2', 'q3', 'q4', 'q5'].map((n) => s.backing(n)));
    await s.owner.commit([add('base', bs[0]!, 0)]);
    const g0 = s.broker.status('vm0').spaces[0]?.generation as number;
    const txns: CommitOp[][] = [[add('ok1', bs[1]!, 1)], [add('ok2', bs[2]!, 2)], [add('bad3', bs[3]!, 3)], [add('ok4', bs[4]!, 4)], [add('ok5', bs[5]!, 5)]];
    // What every client maps at the moment each answer arrives (the owner is in the broker's process).
    const seen: { i: number; error?: MmbError; result?: CommitResult; maps: string[][] }[] = [];
    const look = () => all.map(({ p }) => mapped(p.pid));
    await Promise.all(
      txns.map((ops, i) =>
        s.owner.commit(ops).then(
          (result) => void seen.push({ i, result, maps: look() }),
          (error: MmbError) => void seen.push({ i, error, maps: look() }),
        ),
      ),
    );
    expect(seen.map((x) => x.i)).toEqual([0, 1, 2, 3, 4]);
    expect(seen[0]?.result?.generation).toBe(g0 + 1);
    expect(seen[1]?.result?.generation).toBe(g0 + 2);
    const [refused, after4, after5] = seen.slice(2).map((x) => x.error as MmbError);
    expect(isMmbError(refused, 'MMB_ERR_CLIENT_REFUSED')).toBe(true);
    expect(refused?.client?.name).toBe('refuser');
    expect(refused?.generation).toBe(g0 + 3);
    for (const [e, g] of [
      [after4, g0 + 4],
      [after5, g0 + 5],
    ] as const) {
      expect(isMmbError(e, 'MMB_ERR_CANCELLED')).toBe(true);
      expect(e?.generation).toBe(g);
      expect(e?.message).toContain(`generation ${g0 + 3}`);
    }
    // Exactly as before the refused transaction, in every process, when each error was answered.
    for (const x of seen.slice(2)) for (const m of x.maps) expect(m).toEqual(['q0', 'q1', 'q2']);
    // Rolled back newest first where the votes were applied; the refuser established none of them.
    // (Their event lines may trail the acks the broker waited for.)
    for (const { events } of others) {
      await waitFor('the rollback events', () => gens(events, 'rolledBack').length === 3);
      expect(gens(events, 'rolledBack')).toEqual([g0 + 5, g0 + 4, g0 + 3]);
    }
    expect(gens(a.events, 'change', 'txn').filter((g) => g > g0 + 3)).toEqual([]);
    const st = s.broker.status('vm0').spaces[0]!;
    expect(st.generation).toBe(g0 + 2);
    expect(st.regions.map((r) => r.name).sort()).toEqual(['base', 'ok1', 'ok2']);
    // The window is usable again: the same numbers are reused, in order.
    const again = await s.owner.commit([add('ok4', bs[4]!, 4)]);
    expect(again.generation).toBe(g0 + 3);
    for (const { p } of all) expect(mapped(p.pid)).toEqual(['q0', 'q1', 'q2', 'q4']);
  });

  it('fences a client stopped mid-window (SIGSTOP) before memory it maps is taken away, as without pipelining', async () => {
    const s = await space({ pipeline: 16, ackTimeoutMs: 1500 });
    const stopped = await subscriber(s, 'stopped');
    const other = await subscriber(s, 'other');
    const bs = await Promise.all(['s0', 's1', 's2'].map((n) => s.backing(n)));
    await s.owner.commit([add('r0', bs[0]!, 0)]);
    expect(mapped(stopped.p.pid)).toEqual(['s0']);
    stopped.p.signal('SIGSTOP');
    const looks: { i: number; stoppedState: string | undefined; stoppedMaps: string[]; otherMaps: string[]; result: CommitResult }[] = [];
    const txns: CommitOp[][] = [[remove('r0')], [add('r1', bs[1]!, 1)], [add('r2', bs[2]!, 2)]];
    await Promise.all(
      txns.map((ops, i) =>
        s.owner.commit(ops).then((result) => {
          const state = processState(stopped.p.pid);
          looks.push({
            i,
            stoppedState: state,
            stoppedMaps: state === undefined || state.startsWith('Z') ? [] : mapped(stopped.p.pid),
            otherMaps: mapped(other.p.pid),
            result,
          });
        }),
      ),
    );
    expect(looks.map((l) => l.i)).toEqual([0, 1, 2]);
    // When the removal was answered, the stopped client had been killed (a zombie, or gone): it maps nothing.
    const removal = looks[0]!;
    expect(removal.stoppedState === undefined || removal.stoppedState.startsWith('Z')).toBe(true);
    expect(removal.stoppedMaps).toEqual([]);
    expect(removal.otherMaps).not.toContain('s0');
    expect(looks[2]?.otherMaps).toEqual(['s1', 's2']);
    const st = s.broker.status('vm0').spaces[0]!;
    expect(st.clients.some((c) => c.name === 'stopped')).toBe(false);
    expect((st.holders ?? []).every((h) => h.state === 'fenced')).toBe(true);
  });

  it('shows only the committed map in STATUS while transactions are in flight', async () => {
    const s = await space({ pipeline: 16 });
    const slow = await subscriber(s, 'slow', ['--ack-delay', '300']);
    const bs = await Promise.all(['t0', 't1', 't2'].map((n) => s.backing(n)));
    const g0 = s.broker.status('vm0').spaces[0]?.generation as number;
    const commits = Promise.all(bs.map((b, i) => s.owner.commit([add(`t${i}`, b, i)])));
    // Its vote of the third is applied: all three are in flight, none is committed (its acks are late).
    await slow.p.next('change', (l) => l.cause === 'txn' && l.generation === g0 + 3, 20_000);
    const st = s.broker.status('vm0').spaces[0]!;
    expect(st.generation).toBeLessThan(g0 + 3);
    expect(st.regions.map((r) => r.name)).not.toContain('t2');
    expect(st.regions.length).toBe(st.generation - g0);
    await commits;
    expect(s.broker.status('vm0').spaces[0]?.regions.map((r) => r.name)).toEqual(['t0', 't1', 't2']);
  });

  it.runIf(cMissing === undefined || IN_CI)(
    'gives a client that did not negotiate it (the C subscriber) transactions one at a time, and everyone while it is attached',
    async () => {
      buildCExample(C_DIR);
      const s = await space({ pipeline: 16 });
      const node = await subscriber(s, 'node', ['--ack-delay', '25']);
      const c = new LineProc(path.join(C_DIR, 'c-subscriber'), ['--socket', s.socket, '--space', 'vm0', '--name', 'c']);
      cleanups.push(async () => {
        if (!c.exit) c.child.kill('SIGKILL');
        await c.closed;
      });
      await c.waitFor(/^synced gen=\d+ regions=0$/);
      expect(c.lines.find((l) => l.startsWith('hello '))).toMatch(/features=0x0 /);
      const cClient = s.broker.status('vm0').spaces[0]?.clients.find((x) => x.name === 'c');
      expect(cClient).toBeDefined();
      const bs = await Promise.all(['c0', 'c1', 'c2'].map((n) => s.backing(n)));
      const g0 = s.broker.status('vm0').spaces[0]?.generation as number;
      const txns: CommitOp[][] = [[add('r0', bs[0]!, 0)], [add('r1', bs[1]!, 1)], [remove('r0')], [add('r2', bs[2]!, 0)]];
      const results = await Promise.all(txns.map((ops) => s.owner.commit(ops)));
      expect(results.map((r) => r.generation)).toEqual([g0 + 1, g0 + 2, g0 + 3, g0 + 4]);
      expect(mapped(c.pid)).toEqual(['c1', 'c2']);
      // The C client's own account: each transaction committed before the next one arrived.
      await c.waitFor(new RegExp(`^committed gen=${g0 + 4}$`));
      const seq = c.lines.filter((l) => /^(txn|committed|rolledback) gen=/.test(l)).map((l) => l.split(' ').slice(0, 2).join(' '));
      expect(seq).toEqual(txns.flatMap((_, i) => [`txn gen=${g0 + 1 + i}`, `committed gen=${g0 + 1 + i}`]));
      // And the Node client, which negotiated PIPELINE, got them one at a time too while the C client was there.
      await waitFor("the Node client's last committed event", () => gens(node.events, 'committed').includes(g0 + 4));
      expect(overlapped(node.events, g0)).toBe(false);
      expect(gens(node.events, 'committed').filter((g) => g > g0)).toEqual([g0 + 1, g0 + 2, g0 + 3, g0 + 4]);

      // Once the C client left, the space pipelines again.
      c.child.kill('SIGTERM');
      await c.closed;
      await waitFor('the C client gone', () => !s.broker.status('vm0').spaces[0]?.clients.some((x) => x.name === 'c'), 10_000);
      const more = await Promise.all(
        [[remove('r1')], [remove('r2')], [add('r0', bs[0]!, 0)], [add('r1', bs[1]!, 1)]].map((ops) => s.owner.commit(ops as CommitOp[])),
      );
      expect(more.map((r) => r.generation)).toEqual([g0 + 5, g0 + 6, g0 + 7, g0 + 8]);
      await waitFor("the Node client's last committed event", () => gens(node.events, 'committed').includes(g0 + 8));
      expect(overlapped(node.events, g0 + 4)).toBe(true);
      expect(mapped(node.p.pid)).toEqual(['c0', 'c1']);
    },
  );

  it('converges under random bursts of commits with refusals, two-phase and one-phase subscribers alike', async () => {
    // In-process subscribers (their mappings are real; what varies is the interleaving): one refuses every
    // region named x*, the others ack at random moments; after each burst every one holds the broker's map.
    const s = await space({ pipeline: 8 });
    const rng = new Rng(18);
    const SLOTS = 12;
    const ram = await s.owner.createBacking(SLOTS * 2 * MiB, 'ram');
    cleanups.push(() => native.close(ram.fd));
    const subs: MappingSubscriber[] = [];
    for (const [i, features] of [ALL_FEATURES, ALL_FEATURES, ALL_FEATURES & ~Feature.TWO_PHASE].entries()) {
      const sub = await MappingSubscriber.attach(s.broker, { space: 'vm0', name: `m${i}`, features });
      cleanups.push(() => sub.close());
      sub.on('change', (ev) => {
        const refuses = i === 1 && ev.change.cause === 'txn' && [...ev.change.added, ...(ev.change.staged ?? [])].some((r) => r.name.startsWith('x'));
        if (refuses) ev.waitUntil(Promise.reject(new ClientRefusedError('x is refused')));
        else if (rng.chance(0.5)) ev.waitUntil(new Promise((r) => setTimeout(r, rng.below(4))));
      });
      subs.push(sub);
    }
    const outcomes = new Map<string, number>();
    let n = 0;
    for (let round = 0; round < 60; round++) {
      const st = s.broker.status('vm0').spaces[0]!;
      const bySlot = new Map(st.regions.map((r) => [(r.gpa - GPA) / (2 * MiB), r.name]));
      const burst = Array.from({ length: 1 + rng.below(8) }, () => {
        const slot = rng.below(SLOTS);
        const name = `${rng.chance(0.08) ? 'x' : 'r'}${n++}`;
        const a: CommitOp = { op: 'add', name, gpa: GPA + slot * 2 * MiB, size: 2 * MiB, backing: ram.backing, offset: slot * 2 * MiB };
        const there = bySlot.get(slot);
        const ops: CommitOp[] = there === undefined ? [a] : rng.chance(0.5) ? [remove(there)] : [remove(there), a];
        if (ops.at(-1)?.op === 'add') bySlot.set(slot, name);
        else bySlot.delete(slot);
        return s.owner.commit(ops).then(
          () => 'ok',
          (e: MmbError) => e.code,
        );
      });
      for (const o of await Promise.all(burst)) outcomes.set(o, (outcomes.get(o) ?? 0) + 1);
      const want = s.broker
        .status('vm0')
        .spaces[0]!.regions.map((r) => `${r.name}@${r.gpa}`)
        .sort();
      for (const sub of subs)
        expect(
          sub
            .regions()
            .map((r) => `${r.name}@${r.gpa}`)
            .sort(),
          `round ${round}, ${sub.id}`,
        ).toEqual(want);
    }
    // Every outcome is a commit, the refusal, a cancellation behind it, or a plan that no longer fits.
    expect(
      [...outcomes.keys()].every((k) => ['ok', 'MMB_ERR_CLIENT_REFUSED', 'MMB_ERR_CANCELLED', 'MMB_ERR_NO_REGION', 'MMB_ERR_OVERLAP'].includes(k)),
      JSON.stringify([...outcomes]),
    ).toBe(true);
    expect(outcomes.get('MMB_ERR_CLIENT_REFUSED')).toBeGreaterThan(0);
    expect(outcomes.get('MMB_ERR_CANCELLED')).toBeGreaterThan(0);
  });

  it('is offered only by a broker with a window above 1', async () => {
    for (const [pipeline, offered] of [
      [1, false],
      [2, true],
    ] as const) {
      const s = await space({ pipeline });
      const conn = await Connection.open(s.socket, { name: 'probe' });
      cleanups.push(() => conn.close());
      expect((conn.features & Feature.PIPELINE) !== 0).toBe(offered);
      expect(conn.features & Feature.TWO_PHASE).toBe(Feature.TWO_PHASE);
    }
    expect(() => new Broker({ pipeline: 0 })).toThrow(/pipeline window/);
  });
});
