// `mmbroker watch`, `history` and `map add --json`, through the real CLI against `mmbroker serve`: the live
// stream (transactions, outcomes, joins, evictions, holders, fencing), the recorded outcomes, the clients
// evicted and fenced during a transaction; and a SIGSTOPped watcher that hotplug does not wait for and that
// the broker cuts off once too much is queued for it.
import { spawn, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { MappingSubscriber, OwnerClient } from '../clients/index.js';
import { native } from '../native/index.js';
import type { StatusResult } from '../protocol/index.js';
import { CLI, JsonProc, runCli, spawnBroker, stopProcess, tempDir, waitFor } from './helpers/procs.js';
import type { BrokerProc } from '../testkit/broker.js';
import { startClient } from '../testkit/clients.js';

const MiB = 2 ** 20;
let socket: string;
let broker: BrokerProc;
const children: ChildProcess[] = [];

/** `mmbroker watch` in its own process, resolved once it says it is watching. */
async function startWatch(args: string[]): Promise<{ child: ChildProcess; out: string[]; err: string[] }> {
  const child = spawn(process.execPath, [CLI, 'watch', '--socket', socket, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  children.push(child);
  const out: string[] = [];
  const err: string[] = [];
  child.stdout?.setEncoding('utf8').on('data', (d: string) => out.push(d));
  child.stderr?.setEncoding('utf8').on('data', (d: string) => err.push(d));
  await waitFor(
    'the watcher to start',
    () =>
      err.join('').includes('watching') ||
      (child.exitCode !== null
        ? (() => {
            throw new Error(err.join(''));
          })()
        : false),
  );
  return { child, out, err };
}

const events = (out: string[]) =>
  out
    .join('')
    .split('\n')
    .filter(Boolean)
    .map((l) => JSON.parse(l) as { space: string; seq: number; event: Record<string, unknown> & { kind: string } });

beforeAll(async () => {
  socket = path.join(tempDir('mmb-watch-'), 'run', 'b.sock');
  // A short ack deadline, so that a held transaction evicts quickly; a small outbound limit, so that a
  // stopped watcher is cut off after a bounded number of events.
  broker = await spawnBroker(socket, ['--space', 'w', '--space', 'slow', '--ack-timeout', '1500', '--max-outbound', '256K']);
});

afterAll(async () => {
  for (const c of children) {
    if (c.exitCode === null && c.signalCode === null) {
      c.kill('SIGCONT');
      await stopProcess(c, 'SIGKILL');
    }
  }
  if (broker) expect(await stopProcess(broker)).toBe(0);
});

describe('mmbroker watch and history', () => {
  it('streams transactions, outcomes, joins, evictions and fencing; history and map add --json agree', async () => {
    const w = await startWatch(['--space', 'w', '--json']);
    const add = (args: string[]) => runCli(['map', 'add', '--socket', socket, '--space', 'w', ...args]);
    expect((await add(['--gpa', '0', '--size', '4m', '--name', 'ram'])).code).toBe(0);
    const refused = await add(['--gpa', '0x200000', '--size', '2m', '--name', 'clash']);
    expect(refused.code).toBe(1);
    expect(refused.stderr).toContain('MMB_ERR_OVERLAP');

    // A subscriber that will not ack the next hotplug: it is evicted at the deadline (and killed, the
    // default fence policy), and the transaction commits without it.
    // The testkit's scripted client: fault commands are test tooling, not `mmbroker attach`'s.
    const held = await startClient({ socket, space: 'w', args: ['--name', 'stuck'] });
    children.push(held.child);
    await held.request({ cmd: 'hold-next' }, 'armed');
    const r = await add(['--gpa', '1G', '--size', '2m', '--name', 'dimm0', '--json']);
    expect(r.code, r.stderr).toBe(0);
    const result = JSON.parse(r.stdout) as {
      outcome: string;
      generation: number;
      evicted: { client: { name: string; pid: number }; error: { code: string } }[];
      holders: { client: { name: string }; state: string }[];
      fenced: { client: { name: string }; how: string }[];
    };
    expect(result.outcome, r.stdout).toBe('committed');
    expect(result.evicted, r.stdout).toHaveLength(1);
    expect(result.generation).toBe(2);
    expect(result.evicted).toEqual([
      expect.objectContaining({
        client: expect.objectContaining({ name: 'stuck', pid: held.pid }),
        error: expect.objectContaining({ code: 'MMB_ERR_CLIENT_TIMEOUT' }),
      }),
    ]);
    expect(result.holders).toEqual([expect.objectContaining({ client: expect.objectContaining({ name: 'stuck' }), state: 'signalled' })]);
    // The kernel agrees: the evicted process is gone (killed through its pidfd).
    await waitFor('the stuck subscriber to be reaped', () => held.child.exitCode !== null || held.child.signalCode !== null);

    // A removal waits until every client that may still reach the memory is fenced: a stopped subscriber
    // is evicted at the deadline, killed, and the removal completes once it exited.
    const stopped = new JsonProc(
      spawn(process.execPath, [CLI, 'attach', '--socket', socket, '--space', 'w', '--name', 'stopped', '--json'], { stdio: ['pipe', 'pipe', 'pipe'] }),
    );
    children.push(stopped.child);
    await stopped.next('attached');
    process.kill(stopped.pid, 'SIGSTOP');
    const rm = await runCli(['map', 'remove', '--socket', socket, '--space', 'w', '--name', 'dimm0', '--json']);
    expect(rm.code, rm.stderr).toBe(0);
    const removed = JSON.parse(rm.stdout) as typeof result;
    expect(removed).toMatchObject({ outcome: 'committed', generation: 3 });
    expect(removed.evicted).toEqual([
      expect.objectContaining({
        client: expect.objectContaining({ name: 'stopped', pid: stopped.pid }),
        error: expect.objectContaining({ code: 'MMB_ERR_CLIENT_TIMEOUT' }),
      }),
    ]);
    expect(removed.fenced).toEqual([expect.objectContaining({ client: expect.objectContaining({ name: 'stopped' }), how: 'exited' })]);
    expect(stopped.child.signalCode ?? (await new Promise((res) => stopped.child.once('exit', (_c, sig) => res(sig))))).toBe('SIGKILL');

    // The watcher saw the same, in order.
    await waitFor('the watcher to see the last outcome', () =>
      events(w.out).some((e) => e.event.kind === 'outcome' && (e.event.entry as { generation: number }).generation === 3),
    );
    const seen = events(w.out);
    expect(seen.every((e, i) => i === 0 || e.seq > (seen[i - 1] as { seq: number }).seq)).toBe(true);
    const kinds = seen.map((e) => (e.event.kind === 'outcome' ? `outcome:${(e.event.entry as { outcome: string }).outcome}` : e.event.kind));
    const order = [
      'txn',
      'outcome:committed',
      'outcome:refused',
      'joined',
      'txn',
      'evicted',
      'left',
      'holder',
      'outcome:committed',
      'joined',
      'txn',
      'evicted',
      'holder',
      'fenced',
      'outcome:committed',
    ];
    let at = 0;
    for (const k of kinds) if (k === order[at]) at++;
    expect(kinds, 'these kinds, in this order').toSatisfy(() => at === order.length);
    const txn = seen.find((e) => e.event.kind === 'txn')?.event as unknown as {
      generation: number;
      owner: { name: string };
      ops: { op: string; region: { name: string; gpa: number; size: number } }[];
    };
    expect(txn).toMatchObject({ generation: 1, owner: { name: 'mmbroker map add' }, ops: [{ op: 'add', region: { name: 'ram', gpa: 0, size: 4 * MiB } }] });

    // History: the same three transactions with their outcomes, oldest first.
    const h = await runCli(['history', '--socket', socket, '--space', 'w', '--json']);
    expect(h.code, h.stderr).toBe(0);
    const entries = (
      JSON.parse(h.stdout) as {
        entries: { seq: number; generation: number; outcome: string; owner: { name: string }; ops: unknown[]; request?: unknown[]; error?: { code: string } }[];
      }
    ).entries;
    expect(entries.map((e) => [e.generation, e.outcome, e.error?.code])).toEqual([
      [1, 'committed', undefined],
      [2, 'refused', 'MMB_ERR_OVERLAP'],
      [2, 'committed', undefined],
      [3, 'committed', undefined],
    ]);
    expect(entries[1]).toMatchObject({ ops: [], request: [{ op: 'add', name: 'clash', gpa: 0x200000, size: 2 * MiB }] });
    const text = await runCli(['history', '--socket', socket, '--space', 'w', '--limit', '3']);
    expect(text.stdout.split('\n').filter((l) => /^ {2}\d+ /.test(l))).toHaveLength(3);
    expect(text.stdout).toMatch(/why: MMB_ERR_OVERLAP by|why: MMB_ERR_OVERLAP:/);
    w.child.kill('SIGINT');
    expect(await new Promise((res) => w.child.once('exit', res))).toBe(0);
  });

  it('a SIGSTOPped watcher holds up no hotplug and is cut off once too much is queued for it', async () => {
    const w = await startWatch(['--space', 'slow']);
    const logsBefore = broker.text().length;
    const sub = await MappingSubscriber.attach(socket, { space: 'slow', name: 'follower' });
    const owner = await OwnerClient.attach(socket, { space: 'slow', name: 'hotplug' });
    const backing = await owner.createBacking(2 * MiB, 'blk');
    native.close(backing.fd);
    const watchers = async () => ((await owner.status('slow')) as StatusResult).spaces[0]!.clients.filter((c) => c.role === 'observer');
    expect(await watchers()).toHaveLength(1);
    process.kill(w.child.pid as number, 'SIGSTOP');
    // Every transaction completes while the watcher reads nothing: the broker never waits for it (a
    // waited-for client that never reads would hold each one until the 1.5 s deadline and be evicted).
    let generation = 0;
    let cutAt: number | undefined;
    for (let i = 0; i < 1500 && cutAt === undefined; i++) {
      generation = (await owner.addRegion({ name: 'blk', gpa: 2 ** 32, size: 2 * MiB, backing: backing.backing })).generation;
      generation = (await owner.removeRegion('blk')).generation;
      if (i % 50 === 49 && (await watchers()).length === 0) cutAt = generation;
    }
    expect(cutAt, 'the stopped watcher was disconnected (MMB_ERR_SLOW_READER) after a bounded backlog').toBeDefined();
    // The subscriber that does read followed every one of them; nobody was evicted.
    await waitFor('the follower to ack the last generation', () => sub.generation === generation);
    const logs = broker.text().slice(logsBefore);
    expect(logs).not.toContain('evicting client');
    expect(logs).toContain('MMB_ERR_SLOW_READER');
    // Once it runs again it reads what was queued and says the broker ended the watch.
    process.kill(w.child.pid as number, 'SIGCONT');
    const code = await new Promise((res) => w.child.once('exit', res));
    expect(code).toBe(1);
    expect(w.err.join('')).toMatch(/the broker ended the watch of "slow"/);
    expect(w.out.join('')).toMatch(/slow committed +generation 1 committed/);
    await sub.close();
    owner.close();
  });
});
