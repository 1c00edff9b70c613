// Faults a step may inject, each with the outcome the design promises: a client killed mid-transaction
// is simply gone (the others commit); a client that stops acking is evicted at the deadline and resumes
// when it runs again; a nack rolls the change back everywhere; a restarted broker is repopulated by the
// owner and its clients resume; a slow reader is cut off; an owner that disconnects loses only its holds.
import { waitFor } from '../testkit/wait.js';
import { native } from '../native/index.js';
import { Msg, encodeFrame, isMmbError } from '../protocol/index.js';
import type { CommitOp } from '../protocol/index.js';
import { planAdd, runOperation, type StepResult } from './operations.js';
import { BrokerProc } from './procs.js';
import { SPACE, type World } from './world.js';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));


function result(fault: string, detail: string, surprises: string[], risky = true): StepResult {
  return { op: `fault:${fault}`, detail, risky, surprises };
}

/** Whether the broker logged evicting `pid` (MMB_ERR_CLIENT_TIMEOUT) since warning `mark`. */
function evictionLogged(w: World, mark: number, pid: number): Promise<boolean> {
  // The broker's log line may trail the commit's reply by a few milliseconds.
  return waitFor('the eviction to be logged', () => w.broker.warnings.slice(mark).some((l) => l.includes('MMB_ERR_CLIENT_TIMEOUT') && l.includes(`"pid":${pid}`)), 5000).catch(() => false);
}

/** kill -9 a client that has applied a change and not acked it yet; the others commit without it. */
async function killMidTxn(w: World): Promise<StepResult | undefined> {
  const a = await planAdd(w);
  if (!a) return undefined;
  const victim = w.rng.pick(w.healthy());
  await victim.request({ cmd: 'hold-next' }, 'armed');
  const commit = w.commit([a]);
  await victim.event('holding');
  await w.leave(victim, 'SIGKILL');
  const r = await commit;
  const replacement = await w.join(victim.kind);
  return result('kill-mid-txn', `${victim.describe()} killed holding ${a.name}; ${r.ok ? `committed at ${r.result.generation}` : r.err.code}; ${replacement.describe()} joined`,
    r.ok ? [] : [`the commit of ${a.name} failed after ${victim.describe()} was killed: ${r.err.code} ${r.err.message}`]);
}

/**
 * A client that stops (SIGSTOP): it neither reads nor acks; the broker evicts it at the deadline and,
 * under its default fence policy (kill), kills it through its pidfd. A replacement joins.
 */
async function stall(w: World): Promise<StepResult | undefined> {
  const a = await planAdd(w);
  if (!a) return undefined;
  const victim = w.rng.pick(w.healthy());
  const mark = w.broker.warnings.length;
  victim.signal('SIGSTOP');
  const r = await w.commit([a]);
  const evicted = await evictionLogged(w, mark, victim.pid);
  const signal = await victim.exitSignal(5000);
  w.clients = w.clients.filter((x) => x !== victim);
  const replacement = await w.join(victim.kind);
  const surprises = [
    ...(r.ok ? [] : [`the commit of ${a.name} failed while ${victim.describe()} was stopped: ${r.err.code} ${r.err.message}`]),
    ...(evicted ? [] : [`the broker did not evict ${victim.describe()} (MMB_ERR_CLIENT_TIMEOUT) although it never acked`]),
    ...(signal === 'SIGKILL' ? [] : [`the broker did not fence ${victim.describe()} after evicting it: it ${signal === undefined ? 'is still alive' : `ended with ${signal}`} (expected SIGKILL through its pidfd)`]),
  ];
  return result('stall', `${victim.describe()} stopped during ${a.name}; ${r.ok ? `committed at ${r.result.generation}` : r.err.code}; evicted ${evicted}, ended by ${signal ?? 'nothing'}; ${replacement.describe()} joined`, surprises);
}

/** A client refuses a change after applying it: the owner gets its error, everyone rolls back. */
async function nack(w: World): Promise<StepResult | undefined> {
  const a = await planAdd(w);
  if (!a) return undefined;
  const victim = w.rng.pick(w.healthy());
  await victim.request({ cmd: 'nack-next' }, 'armed');
  const mark = w.broker.warnings.length;
  const r = await w.commit([a]);
  const refused = !r.ok && r.err.code === 'MMB_ERR_CLIENT_REFUSED' && r.err.client?.pid === victim.pid;
  // Also as documented: applying the change (pinning a large region on a loaded machine) took the victim
  // past the deadline, so the broker evicted it and committed without it before its nack could count.
  const evicted = !refused && r.ok && (await evictionLogged(w, mark, victim.pid));
  return result('nack', `${victim.describe()} refused ${a.name}: ${r.ok ? `committed${evicted ? ' (it was evicted first)' : ''}` : `${r.err.code} by pid ${r.err.client?.pid}`}`,
    refused || evicted ? [] : [`expected MMB_ERR_CLIENT_REFUSED naming pid ${victim.pid} for ${a.name}, got ${r.ok ? 'a commit' : `${r.err.code} naming ${JSON.stringify(r.err.client)}`}; the client's last events: ${JSON.stringify(victim.kept.slice(-5)).slice(0, 600)}`]);
}

/** The broker crashes (kill -9) and restarts; the owner republishes its backings and regions. */
async function brokerRestart(w: World): Promise<StepResult> {
  const m = w.model;
  await w.broker.stop('SIGKILL');
  w.owner.close();
  w.broker = await BrokerProc.start(w.socket, SPACE, w.opts.ackTimeoutMs, w.broker.baseline);
  await w.reattachOwner();
  const old = [...m.backings.values()];
  m.backings.clear();
  const ids = new Map<number, number>();
  for (const b of old) ids.set(b.id, (await w.register(b.memfd)).id);
  const regions = m.list();
  m.regions.clear();
  m.generation = 0;
  const ops: CommitOp[] = regions.map((r) => ({ op: 'add', name: r.name, gpa: r.gpa, size: r.size, backing: ids.get(r.backing) as number, offset: r.offset, readonly: r.readonly, logDirty: r.logDirty }));
  const surprises: string[] = [];
  if (!w.owner.published) {
    // Unpublished until now: clients that reconnected kept everything and waited; the map is rebuilt
    // first and published whole, so they reconcile against it and never see a half map.
    if (ops.length > 0) {
      const r = await w.commit(ops);
      if (!r.ok) surprises.push(`republishing ${ops.length} regions into the restarted broker failed: ${r.err.code} ${r.err.message}`);
    }
    m.generation = await w.owner.publish();
  } else surprises.push('the restarted broker\'s space was already published before its owner republished it');
  // Holds as before the crash: what the owner had dropped it drops again (regions still use them).
  for (const b of old) {
    if (b.held) continue;
    const id = ids.get(b.id) as number;
    await w.owner.dropBacking(id);
    const nb = m.backings.get(id);
    if (nb) nb.held = false;
  }
  w.releaseUnused();
  return result('broker-restart', `broker killed and restarted as pid ${w.broker.pid}; ${old.length} backings and ${regions.length} regions republished`, surprises);
}

/** A peer asks for status over and over and never reads a reply: the broker must cut it off. */
async function slowReader(w: World): Promise<StepResult> {
  const mark = w.broker.warnings.length;
  const fd = native.socketConnect(w.socket);
  let sent = 0;
  let cut = '';
  try {
    native.sendmsg(fd, encodeFrame({ t: Msg.HELLO, id: 1, version: 1, features: 0 }, 0, 1 << 20), []);
    for (let i = 0; i < 100_000 && !cut; i++) {
      try {
        if (native.sendmsg(fd, encodeFrame({ t: Msg.STATUS, id: i + 2 }, 0, 1 << 20), []) === null) await sleep(2);
        else sent++;
      } catch (err) {
        cut = (err as { code?: string }).code ?? String(err);
      }
      if (i % 64 === 0) await new Promise((r) => setImmediate(r));
    }
  } finally {
    native.close(fd);
  }
  // The broker's log line may trail the hang-up by a few milliseconds.
  const logged = await waitFor('the slow reader to be logged', () => w.broker.warnings.slice(mark).some((l) => l.includes('MMB_ERR_SLOW_READER')), 5000).catch(() => false);
  const warned = w.broker.warnings.slice(mark);
  const surprises = cut && logged ? [] : [`a peer that never read ${sent} status replies was ${cut ? `cut (${cut})` : 'not cut off'}, ${logged ? '' : 'and no '}MMB_ERR_SLOW_READER logged (the broker warned: ${warned.join(' ').slice(0, 600)})`];
  const after = await runOperation(w);
  return { op: 'fault:slow-reader', detail: `cut off after ${sent} unread requests (${cut}); then ${after.op}: ${after.detail}`, risky: after.risky, surprises: [...surprises, ...after.surprises] };
}

/** The owner disconnects, idle or right after sending a commit; it reattaches and reads the outcome back. */
async function ownerDisconnect(w: World): Promise<StepResult> {
  const m = w.model;
  const a = w.rng.chance(0.5) ? await planAdd(w) : undefined;
  const before = m.generation;
  const sent = a ? w.owner.commit([a]).then(() => 'committed', (err: unknown) => (isMmbError(err) ? err.code : String(err))) : Promise.resolve('idle');
  w.owner.close();
  const answer = await sent;
  await w.reattachOwner();
  const st = (await w.owner.status(SPACE)).spaces[0];
  const surprises: string[] = [];
  let outcome = 'nothing in flight';
  if (a && st?.generation === before + 1) {
    w.applyToModel([a], before + 1);
    outcome = `${a.name} committed`;
  } else if (a && st?.generation === before) {
    outcome = `${a.name} not committed`;
  } else if (st?.generation !== before) {
    surprises.push(`after the owner reconnected the broker is at generation ${st?.generation}, expected ${before}${a ? ` or ${before + 1}` : ''}`);
  }
  for (const b of m.backings.values()) b.held = false;
  w.releaseUnused();
  return result('owner-disconnect', `owner disconnected ${a ? `after sending ${a.name} (it heard ${answer})` : 'while idle'}; ${outcome}`, surprises, a !== undefined);
}

export const FAULTS = {
  'kill-mid-txn': { weight: 2, run: killMidTxn },
  stall: { weight: 1, run: stall },
  nack: { weight: 2, run: nack },
  'broker-restart': { weight: 1, run: brokerRestart },
  'slow-reader': { weight: 1, run: slowReader },
  'owner-disconnect': { weight: 1, run: ownerDisconnect },
} as const;

export type FaultName = keyof typeof FAULTS;

/** Runs one fault chosen by the generator; undefined when it could not be carried (no room for an add). */
export function runFault(w: World): Promise<StepResult | undefined> {
  const name = w.rng.weighted(Object.fromEntries(Object.entries(FAULTS).map(([k, v]) => [k, v.weight])) as Record<FaultName, number>);
  return FAULTS[name].run(w);
}
