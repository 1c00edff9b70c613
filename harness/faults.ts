// Faults a step may inject, each with the outcome the design promises (docs/harness.md): a client killed
// mid-transaction is simply gone (the others commit); a client that stops acking is evicted at the
// deadline and killed through its pidfd, before a removal it holds is done; a nack rolls the change back
// everywhere, and while others hold it voted they took nothing away; a restarted broker is repopulated by
// the owner (at once, or after seconds away) while its clients keep everything; a slow reader is cut off;
// an owner that disconnects loses only its holds.
import { waitFor } from '../testkit/wait.js';
import { native } from '../native/index.js';
import { Msg, encodeFrame, isMmbError } from '../protocol/index.js';
import type { CommitOp } from '../protocol/index.js';
import { startTime } from './kernel.js';
import { layout } from './moment.js';
import { keepsPrefix, planAdd, planIovaMap, removableRegions, runOperation, type StepResult } from './operations.js';
import { delegateView, type ClientProc } from './procs.js';
import { restartBroker } from './restart.js';
import { SPACE, type World } from './world.js';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function result(fault: string, detail: string, surprises: string[], risky = true): StepResult {
  return { op: `fault:${fault}`, detail, risky, surprises };
}

/** Whether the broker logged evicting `pid` (MMB_ERR_CLIENT_TIMEOUT) since warning `mark`. */
function evictionLogged(w: World, mark: number, pid: number): Promise<boolean> {
  // The broker's log line may trail the commit's reply by a few milliseconds.
  return waitFor('the eviction to be logged', () => w.broker.warned('evicting client', pid, { since: mark, code: 'MMB_ERR_CLIENT_TIMEOUT' }), 5000).catch(
    () => false,
  );
}

/**
 * Waits until `c`, armed with hold-next, holds the change. Undefined once it does; else why not: a client
 * that applying took past the ack deadline (pinning under load) is evicted and killed before it can hold,
 * which is documented when the broker logged it (then 'evicted').
 */
async function holding(w: World, c: ClientProc): Promise<string | undefined> {
  try {
    await c.event('holding', 60_000);
    return undefined;
  } catch (err) {
    await c.exitSignal(5000);
    return c.gone && w.evictedAndKilled(c) ? 'evicted' : `${c.describe()} never held the change: ${(err as Error).message}`;
  }
}

/** kill -9 a client that has applied a change and not acked it yet; the others commit without it. */
async function killMidTxn(w: World): Promise<StepResult | undefined> {
  const a = await planAdd(w);
  if (!a) return undefined;
  const victim = w.rng.pick(w.healthy());
  await victim.request({ cmd: 'hold-next' }, 'armed');
  const commit = w.commit([a]);
  const held = await holding(w, victim);
  await w.leave(victim, 'SIGKILL');
  const r = await commit;
  const replacement = await w.tryJoin(victim.kind);
  const how = held === 'evicted' ? 'evicted and killed by the broker before it held' : 'killed holding';
  return result(
    'kill-mid-txn',
    `${victim.describe()} ${how} ${a.name}; ${r.ok ? `committed at ${r.result.generation}` : r.err.code}; ${replacement?.describe() ?? 'no replacement'} joined`,
    [
      ...(r.ok ? [] : [`the commit of ${a.name} failed after ${victim.describe()} was killed: ${r.err.code} ${r.err.message}`]),
      ...(held && held !== 'evicted' ? [held] : []),
    ],
  );
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
  await w.stopBackend(victim);
  const replacement = await w.tryJoin(victim.kind);
  const surprises = [
    ...(r.ok ? [] : [`the commit of ${a.name} failed while ${victim.describe()} was stopped: ${r.err.code} ${r.err.message}`]),
    ...(evicted ? [] : [`the broker did not evict ${victim.describe()} (MMB_ERR_CLIENT_TIMEOUT) although it never acked`]),
    ...(signal === 'SIGKILL'
      ? []
      : [
          `the broker did not fence ${victim.describe()} after evicting it: it ${signal === undefined ? 'is still alive' : `ended with ${signal}`} (expected SIGKILL through its pidfd)`,
        ]),
  ];
  return result(
    'stall',
    `${victim.describe()} stopped during ${a.name}; ${r.ok ? `committed at ${r.result.generation}` : r.err.code}; evicted ${evicted}, ended by ${signal ?? 'nothing'}; ${replacement?.describe() ?? 'no replacement'} joined`,
    surprises,
  );
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
  return result(
    'nack',
    `${victim.describe()} refused ${a.name}: ${r.ok ? `committed${evicted ? ' (it was evicted first)' : ''}` : `${r.err.code} by pid ${r.err.client?.pid}`}`,
    refused || evicted
      ? []
      : [
          `expected MMB_ERR_CLIENT_REFUSED naming pid ${victim.pid} for ${a.name}, got ${r.ok ? 'a commit' : `${r.err.code} naming ${JSON.stringify(r.err.client)}`}; the client's last events: ${JSON.stringify(victim.kept.slice(-5)).slice(0, 600)}`,
        ],
  );
}

/** The broker crashes (kill -9) and restarts; the owner reattaches at once and republishes its backings and regions. */
async function brokerRestart(w: World): Promise<StepResult> {
  const r = await restartBroker(w, 0);
  return result('broker-restart', r.detail, r.surprises);
}

/**
 * The same, with the owner away for 2 to 3 ack deadlines: the clients wait on an unpublished space that
 * nobody publishes, and keep everything they had all along (the restart window is looked at throughout).
 */
async function restartOwnerAway(w: World): Promise<StepResult> {
  const r = await restartBroker(w, w.rng.int(2 * w.opts.ackTimeoutMs, 3 * w.opts.ackTimeoutMs));
  return result('restart-owner-away', r.detail, r.surprises);
}

/**
 * A client stops (SIGSTOP) while it maps a region the owner then removes, sometimes after handing that
 * region's memory to a process of its own (hand-on, named to the broker with DELEGATE). The broker evicts
 * it at the ack deadline and, under the default fence policy (kill), kills it and its delegate through
 * their pidfds; the removal is done only after both exited. At the moment of "done" (the answer held by
 * the relay) both are dead and nothing maps the removed memory (moment.ts checks the latter for every
 * process; this checks that the stopped ones are among the dead). A replacement joins.
 */
async function stopAcrossRemoval(w: World): Promise<StepResult | undefined> {
  const list = removableRegions(w);
  const healthy = w.healthy();
  if (list.length === 0 || healthy.length < 3) return undefined;
  const r = w.rng.pick(list);
  const victim = w.rng.pick(healthy);
  const surprises: string[] = [];
  if (w.rng.chance(0.5)) {
    const reply = await victim.request({ cmd: 'hand-on', region: r.name }, 'delegated', 30_000);
    if (reply.event === 'delegated') victim.delegates.push({ pid: Number(reply.pid), start: startTime(Number(reply.pid)) });
    else surprises.push(`${victim.describe()} could not hand ${r.name} on: ${String(reply.message)}`);
  }
  const mark = w.broker.warnings.length;
  victim.signal('SIGSTOP');
  const res = await w.commit([{ op: 'remove', region: r.name }]);
  const at = res.ok ? w.moments.at(-1) : undefined;
  const evicted = await evictionLogged(w, mark, victim.pid);
  const signal = await victim.exitSignal(5000);
  w.clients = w.clients.filter((x) => x !== victim);
  // A bridge named its back-end to the broker (DELEGATE): it is fenced with the bridge.
  const backend = victim.backend?.pid;
  const stopped = [victim.pid, ...victim.delegates.map((d) => d.pid), ...(backend !== undefined ? [backend] : [])];
  const whom = (pid: number) =>
    pid === victim.pid ? victim.describe() : pid === backend ? `the back-end of ${victim.describe()}` : `which ${victim.describe()} handed ${r.name} to`;
  if (at)
    w.judged.push({
      invariant: 'done-means-done',
      problems: stopped
        .filter((pid) => !at.dead.includes(pid))
        .map((pid) => `at done (${at.outcome}) pid ${pid} (${whom(pid)}), stopped across the removal, was alive`),
    });
  await w.stopBackend(victim);
  for (const d of victim.delegates) {
    if (!delegateView(d).alive) continue;
    surprises.push(`pid ${d.pid}, which ${victim.describe()} handed ${r.name} to, outlived its fencing`);
    process.kill(d.pid, 'SIGKILL');
  }
  const replacement = await w.tryJoin(victim.kind);
  surprises.push(
    ...(res.ok ? [] : [`the removal of ${r.name} failed while ${victim.describe()} was stopped: ${res.err.code} ${res.err.message}`]),
    ...(evicted ? [] : [`the broker did not evict ${victim.describe()} (MMB_ERR_CLIENT_TIMEOUT) although it never acked`]),
    ...(signal === 'SIGKILL'
      ? []
      : [
          `the broker did not fence ${victim.describe()} after evicting it: it ${signal === undefined ? 'is still alive' : `ended with ${signal}`} (expected SIGKILL through its pidfd)`,
        ]),
  );
  const handed = victim.delegates.length > 0 ? ` after handing it to pid ${victim.delegates.map((d) => d.pid).join(', ')}` : '';
  return result(
    'stop-across-removal',
    `${victim.describe()} stopped holding ${r.name}${handed}; ${res.ok ? `removed at ${res.result.generation}` : res.err.code}; evicted ${evicted}, ended by ${signal ?? 'nothing'}; ${replacement?.describe() ?? 'no replacement'} joined`,
    surprises,
  );
}

/** Mappings (and locked bytes) a process had in `before` and no longer has; nothing once it died (its death is accounted for). */
function takenAway(c: ClientProc, before: ReturnType<ClientProc['view']>): string[] {
  const now = c.view();
  if (!now.alive) return [];
  const is = new Set(layout(now));
  const gone = layout(before).filter((l) => !is.has(l));
  return [
    ...(gone.length > 0 ? [`${c.describe()} no longer maps ${gone.slice(0, 4).join(', ')}${gone.length > 4 ? ` and ${gone.length - 4} more` : ''}`] : []),
    ...(now.lockedBytes < before.lockedBytes ? [`${c.describe()} has ${now.lockedBytes} bytes locked, ${before.lockedBytes} before the vote`] : []),
  ];
}

/**
 * A nack while others hold the change prepared. One client holds its vote (hold-next: applied, never
 * acked), another is armed to refuse (nack-next) and stopped before the transaction reaches it; the owner
 * commits a removal together with an add. While the hold lasts every other client has voted, and two
 * phases promise a vote only adds: every client still maps, at the same addresses, everything it mapped
 * before, and locks at least as much (vote-disturbs-nobody). Then the refuser runs on and nacks: the owner
 * gets MMB_ERR_CLIENT_REFUSED naming it, and at that moment every process is exactly as before (moment.ts).
 * Also documented: the hold outlasted the ack deadline on a loaded machine, and the broker evicted and
 * killed the holder (or the refuser) and committed without it (the evictions must be in its log).
 */
async function nackWhilePrepared(w: World): Promise<StepResult | undefined> {
  const healthy = w.healthy();
  if (healthy.length < 3) return undefined;
  const a = await planAdd(w);
  if (!a) return undefined;
  const list = removableRegions(w);
  const pick = list.length > 0 ? w.rng.pick(list) : undefined;
  // Removed in the same transaction as the add: the add may lie right behind it (keepsPrefix).
  const removed = pick && keepsPrefix(w, [{ op: 'remove', region: pick.name }, a]) ? pick : undefined;
  const holder = w.rng.pick(healthy);
  const refuser = w.rng.pick(healthy.filter((c) => c !== holder));
  await holder.request({ cmd: 'hold-next' }, 'armed');
  await refuser.request({ cmd: 'nack-next' }, 'armed');
  const before = new Map(w.clients.map((c) => [c, c.view()]));
  const mark = w.broker.warnings.length;
  const surprises: string[] = [];
  let stopped = true;
  const resume = () => {
    if (stopped) refuser.signal('SIGCONT');
    stopped = false;
  };
  refuser.signal('SIGSTOP');
  let r: Awaited<ReturnType<World['commit']>>;
  try {
    const committing = w.commit([...(removed ? [{ op: 'remove', region: removed.name } as CommitOp] : []), a]);
    const held = await holding(w, holder);
    if (held && held !== 'evicted') surprises.push(held);
    // Every client but these two acked its vote (STATUS: no longer applying).
    let pending = '';
    await waitFor(
      'the others to vote',
      async () => {
        const st = (await w.owner.status(SPACE)).spaces[0];
        pending = (st?.clients ?? [])
          .filter((c) => c.role === 'subscriber' && c.state === 'applying' && c.pid !== holder.pid && c.pid !== refuser.pid)
          .map((c) => `${c.name} (pid ${c.pid})`)
          .join(', ');
        return pending === '';
        // Bounded by half the ack deadline, so that the hold does not outlast it. A client still applying
        // then (pinning a large region on a loaded machine) is no failure of anyone's: it is noted, and
        // judged below like the others (while it applies it may not take anything away either).
      },
      w.opts.ackTimeoutMs / 2,
    ).catch(() => w.notes.push(`with ${holder.describe()} holding, ${pending} had not voted on ${a.name} yet after ${w.opts.ackTimeoutMs / 2} ms`));
    for (const c of w.clients) {
      const b = before.get(c);
      if (c === refuser || !b?.alive || c.gone) continue;
      w.judged.push({
        invariant: 'vote-disturbs-nobody',
        problems: takenAway(c, b).map((p) => `while ${holder.describe()} held the vote${removed ? ` on removing ${removed.name}` : ''}, ${p}`),
      });
    }
    resume();
    r = await committing;
  } finally {
    resume();
  }
  const refused = !r.ok && r.err.code === 'MMB_ERR_CLIENT_REFUSED' && r.err.client?.pid === refuser.pid;
  const evicted = !refused && r.ok && ((await evictionLogged(w, mark, holder.pid)) || (await evictionLogged(w, mark, refuser.pid)));
  if (!refused && !evicted) {
    surprises.push(
      `expected MMB_ERR_CLIENT_REFUSED naming pid ${refuser.pid} for ${a.name}, got ${r.ok ? 'a commit' : `${r.err.code} naming ${JSON.stringify(r.err.client)}`}; the refuser's last events: ${JSON.stringify(refuser.kept.slice(-5)).slice(0, 600)}`,
    );
  }
  const what = `${removed ? `remove ${removed.name} + ` : ''}add ${a.name}`;
  return result(
    'nack-while-prepared',
    `${holder.describe()} held its vote on ${what}, ${refuser.describe()} refused it: ${r.ok ? `committed${evicted ? ' (the broker evicted first)' : ''}` : `${r.err.code} by pid ${r.err.client?.pid}`}`,
    surprises,
  );
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
  const logged = await waitFor('the slow reader to be logged', () => w.broker.warnings.slice(mark).some((l) => l.includes('MMB_ERR_SLOW_READER')), 5000).catch(
    () => false,
  );
  const warned = w.broker.warnings.slice(mark);
  const surprises =
    cut && logged
      ? []
      : [
          `a peer that never read ${sent} status replies was ${cut ? `cut (${cut})` : 'not cut off'}, ${logged ? '' : 'and no '}MMB_ERR_SLOW_READER logged (the broker warned: ${warned.join(' ').slice(0, 600)})`,
        ];
  const after = await runOperation(w);
  return {
    op: 'fault:slow-reader',
    detail: `cut off after ${sent} unread requests (${cut}); then ${after.op}: ${after.detail}`,
    risky: after.risky,
    surprises: [...surprises, ...after.surprises],
  };
}

/** The owner disconnects, idle or right after sending a commit; it reattaches and reads the outcome back. */
async function ownerDisconnect(w: World): Promise<StepResult> {
  const m = w.model;
  const a = w.rng.chance(0.5) ? await planAdd(w) : undefined;
  const before = m.generation;
  const sent = a
    ? w.owner.commit([a]).then(
        () => 'committed',
        (err: unknown) => (isMmbError(err) ? err.code : String(err)),
      )
    : Promise.resolve('idle');
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
  return result(
    'owner-disconnect',
    `owner disconnected ${a ? `after sending ${a.name} (it heard ${answer})` : 'while idle'}; ${outcome}`,
    surprises,
    a !== undefined,
  );
}

/**
 * A shadow-mode client stops (SIGSTOP) while its device is in an IOAS whose mapping the owner then unmaps
 * (the guest's invalidation). The broker evicts it at the ack deadline and kills it through its pidfd; the
 * unmap is done only after it exited: at the moment of "done" (the held answer) it is among the dead, and
 * every other shadow client pins and maps exactly what the IOASes still map (iova-pins). A replacement joins.
 */
async function stopAcrossUnmap(w: World): Promise<StepResult | undefined> {
  const candidates = w.of('shadow').filter((c) => [...c.deviceIoas.values()].some((io) => (w.model.ioas.get(io) ?? []).length > 0));
  if (candidates.length === 0) return undefined;
  const victim = w.rng.pick(candidates);
  const name = w.rng.pick([...new Set(victim.deviceIoas.values())].filter((io) => (w.model.ioas.get(io) ?? []).length > 0).sort());
  const m = w.rng.pick(w.model.ioas.get(name) ?? []);
  const mark = w.broker.warnings.length;
  victim.signal('SIGSTOP');
  const res = await w.ioasCommit(name, [{ op: 'unmap', iova: m.iova, size: m.size }]);
  const at = res.ok ? w.moments.at(-1) : undefined;
  const evicted = await evictionLogged(w, mark, victim.pid);
  const signal = await victim.exitSignal(5000);
  w.clients = w.clients.filter((x) => x !== victim);
  if (at)
    w.judged.push({
      invariant: 'iova-pins',
      problems: at.dead.includes(victim.pid) ? [] : [`at done (${at.outcome}) ${victim.describe()}, stopped across the unmap, was alive`],
    });
  const replacement = await w.tryJoin('shadow');
  const surprises = [
    ...(res.ok ? [] : [`the unmap of ${m.iova.toString(16)} in ${name} failed while ${victim.describe()} was stopped: ${res.err.code} ${res.err.message}`]),
    ...(evicted ? [] : [`the broker did not evict ${victim.describe()} (MMB_ERR_CLIENT_TIMEOUT) although it never acked the unmap`]),
    ...(signal === 'SIGKILL'
      ? []
      : [
          `the broker did not fence ${victim.describe()} after evicting it: it ${signal === undefined ? 'is still alive' : `ended with ${signal}`} (expected SIGKILL through its pidfd)`,
        ]),
  ];
  return result(
    'stop-across-unmap',
    `${victim.describe()} stopped in ${name} while 0x${m.iova.toString(16)}+0x${m.size.toString(16)} was unmapped; ${res.ok ? `done at generation ${res.result.generation}` : res.err.code}; evicted ${evicted}, ended by ${signal ?? 'nothing'}; ${replacement?.describe() ?? 'no replacement'} joined`,
    surprises,
  );
}

/**
 * A nack of an IOAS map. A new IOAS; a shadow client already running attaches a device to it, and a new
 * shadow client joins it with a pin budget of one byte; the owner maps a range there: the first pins it
 * and votes, the second refuses (MMB_ERR_PIN_BUDGET, naming it) and everyone rolls back: at the moment of
 * the refusal every process is exactly as it was when the request went out (all-or-nothing). Then the
 * refuser leaves, the voter's device is detached and the IOAS destroyed: it exists only for the fault (so
 * the fault can be drawn whatever number of IOASes the operations keep).
 */
async function ioasNack(w: World): Promise<StepResult | undefined> {
  const voters = w.of('shadow').filter((c) => c.deviceIoas.size < 3);
  if (voters.length === 0) return undefined;
  let i = 0;
  while (w.model.ioas.has(`io${i}`)) i++;
  const name = `io${i}`;
  const created = await w.ioasCreate(name);
  if (!created.ok) return result('ioas-nack', `create ${name}: ${created.err.code}`, [`creating ${name}: ${created.err.code} ${created.err.message}`]);
  const surprises: string[] = [];
  const voter = w.rng.pick(voters);
  const dev = `${voter.name}-d${w.rng.int(0, 999)}`;
  const att = await voter.request({ cmd: 'attach-device', device: dev, ioas: name }, 'domain', 60_000);
  if (att.event === 'domain') {
    voter.deviceIoas.set(dev, name);
    voter.devices = [...voter.deviceIoas.keys()];
  } else surprises.push(`attaching ${dev} to ${name} on ${voter.describe()}: ${String(att.message)}`);
  const refuser = await w.tryJoin('shadow', { ioas: name, pinLimit: 1 });
  const m = planIovaMap(w, name);
  if (!refuser || !m) {
    if (refuser) await w.leave(refuser);
    await dropIoas(w, name, voter, dev, surprises);
    return result('ioas-nack', `${name}: ${refuser ? 'no range to map' : 'the refuser could not join'}`, surprises, false);
  }
  const mark = w.broker.warnings.length;
  const r = await w.ioasCommit(name, [m]);
  const refused = !r.ok && r.err.code === 'MMB_ERR_PIN_BUDGET' && r.err.client?.pid === refuser.pid;
  // Also as documented: the voter pinned past the ack deadline on a loaded machine and was evicted first.
  const evicted = !refused && r.ok && (await evictionLogged(w, mark, refuser.pid));
  if (!refused && !evicted)
    surprises.push(
      `expected MMB_ERR_PIN_BUDGET naming pid ${refuser.pid} for the map in ${name}, got ${r.ok ? 'a commit' : `${r.err.code} naming ${JSON.stringify(r.err.client)}`}`,
    );
  const code = await w.leave(refuser);
  if (code !== 0) surprises.push(`${refuser.describe()} exited ${code ?? refuser.child.signalCode} after SIGTERM (expected a clean detach, 0)`);
  await dropIoas(w, name, voter, dev, surprises);
  return result(
    'ioas-nack',
    `${voter.describe()} voted on 0x${m.iova.toString(16)}+0x${m.size.toString(16)} in ${name}, ${refuser.describe()} (pin budget 1 byte) refused it: ${r.ok ? 'committed' : `${r.err.code} by pid ${r.err.client?.pid}`}`,
    surprises,
  );
}

/** The fault's IOAS goes: the voter's device detached, then the IOAS destroyed (unmapped first if the map went through). */
async function dropIoas(w: World, name: string, voter: ClientProc, dev: string, surprises: string[]): Promise<void> {
  if (!voter.gone && voter.deviceIoas.get(dev) === name) {
    const d = await voter.request({ cmd: 'detach-device', device: dev }, 'domain', 60_000);
    if (d.event === 'domain') {
      voter.deviceIoas.delete(dev);
      voter.devices = [...voter.deviceIoas.keys()];
    } else surprises.push(`detaching ${dev} from ${name} on ${voter.describe()}: ${String(d.message)}`);
  }
  const maps = w.model.ioas.get(name) ?? [];
  if (maps.length > 0)
    await w.ioasCommit(
      name,
      maps.map((x) => ({ op: 'unmap', iova: x.iova, size: x.size })),
    );
  const r = await w.ioasDestroy(name);
  if (!r.ok) surprises.push(`destroying ${name} after the fault: ${r.err.code} ${r.err.message}`);
}

export const FAULTS = {
  'kill-mid-txn': { weight: 2, run: killMidTxn },
  stall: { weight: 1, run: stall },
  'stop-across-removal': { weight: 1, run: stopAcrossRemoval },
  nack: { weight: 2, run: nack },
  'nack-while-prepared': { weight: 2, run: nackWhilePrepared },
  'broker-restart': { weight: 1, run: brokerRestart },
  'restart-owner-away': { weight: 1, run: restartOwnerAway },
  'slow-reader': { weight: 1, run: slowReader },
  'owner-disconnect': { weight: 1, run: ownerDisconnect },
} as const;

/** With --ioas only (a run without it draws exactly what it drew before they existed). */
export const IOAS_FAULTS = {
  'stop-across-unmap': { weight: 2, run: stopAcrossUnmap },
  'ioas-nack': { weight: 2, run: ioasNack },
} as const;

export type FaultName = keyof typeof FAULTS | keyof typeof IOAS_FAULTS;

/**
 * Runs one fault chosen by the generator (or `forced`); undefined when it could not be carried (no room
 * for an add, no region to remove, too few clients): the step runs an operation instead.
 */
export function runFault(w: World, forced?: FaultName): Promise<StepResult | undefined> {
  const faults: Record<string, { weight: number; run: (w: World) => Promise<StepResult | undefined> }> = { ...FAULTS, ...(w.opts.ioas ? IOAS_FAULTS : {}) };
  const name = forced ?? w.rng.weighted(Object.fromEntries(Object.entries(faults).map(([k, v]) => [k, v.weight])));
  return faults[name]!.run(w);
}
