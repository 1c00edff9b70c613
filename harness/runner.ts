// The harness loop: start a broker process, the owner (this process) and the client processes; then, for
// each step, one operation or fault chosen by the seeded generator, and every invariant checked against
// the kernel; finally every client leaves (checked too) and the owner takes the map down.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { allOrNothing, convergence, data, leaks, leftClean, noStaleMapping, outcome, pins, Tally } from './invariants.js';
import { observe, observeNow } from './observe.js';
import { runOperation, type StepResult } from './operations.js';
import { runFault } from './faults.js';
import { checkOptions, DEFAULT_OPTIONS, type ClientKind, type HarnessOptions } from './options.js';
import { replayCommand, type Report } from './report.js';
import { Rng } from '../testkit/rng.js';
import { World } from './world.js';

async function checkStep(w: World, t: Tally, res: StepResult): Promise<void> {
  if (res.risky) allOrNothing(w, await observeNow(w), t);
  // Long enough for an evicted client to come back and for every client to find a restarted broker.
  const snap = await observe(w, 2 * w.opts.ackTimeoutMs + 15_000);
  convergence(w, snap, t);
  noStaleMapping(w, snap, t);
  pins(w, snap, t);
  leaks(w, snap, t);
  outcome(res, t);
  await data(w, snap, t);
}

/** Client processes that died without the harness asking: reported, and forgotten. */
function reapDead(w: World): string[] {
  const dead = w.clients.filter((c) => c.gone);
  w.clients = w.clients.filter((c) => !c.gone);
  return dead.map((c) => `${c.describe()} died (${c.child.exitCode ?? c.child.signalCode}): ${c.stderr.join('').slice(-400)}`);
}

async function step(w: World): Promise<{ res: StepResult; fault: boolean }> {
  const fault = w.rng.chance(w.opts.faultRate);
  try {
    const f = fault ? await runFault(w) : undefined;
    const res = f ?? (await runOperation(w));
    return { res: { ...res, surprises: [...res.surprises, ...reapDead(w)] }, fault: f !== undefined };
  } catch (err) {
    return { res: { op: 'error', detail: (err as Error).message, risky: true, surprises: [`the step failed: ${(err as Error).stack ?? String(err)}`, ...reapDead(w)] }, fault };
  }
}

/** Takes everything down through the front door, checking after each client leaves. */
async function teardown(w: World, t: Tally): Promise<void> {
  while (w.clients.length > 0) {
    const c = w.clients[w.clients.length - 1]!;
    const code = await w.leave(c);
    leftClean(c, code, t);
    const snap = await observe(w, 15_000);
    convergence(w, snap, t);
    leaks(w, snap, t);
  }
  const names = w.model.list().map((r) => r.name);
  if (names.length > 0) {
    const r = await w.commit(names.map((region) => ({ op: 'remove', region })));
    outcome({ op: 'teardown', detail: '', risky: false, surprises: r.ok ? [] : [`removing every region failed: ${r.err.code} ${r.err.message}`] }, t);
  }
  for (const b of [...w.model.backings.values()]) {
    if (!b.held) continue;
    await w.owner.dropBacking(b.id);
    b.held = false;
  }
  w.releaseUnused();
  // Nothing left: the broker is back to its own baseline (plus the owner's connection).
  leaks(w, await observe(w, 15_000), t);
}

export async function runHarness(input: Partial<HarnessOptions> = {}, replayArgs = ''): Promise<Report> {
  const opts: HarnessOptions = { ...DEFAULT_OPTIONS, ...input };
  checkOptions(opts);
  const rng = new Rng(opts.seed);
  const w = new World(opts, rng, fs.mkdtempSync(path.join(os.tmpdir(), 'mmb-harness-')));
  const t = new Tally();
  const faultsByKind: Record<string, number> = {};
  const operations: Record<string, number> = {};
  const started = performance.now();
  let faults = 0;
  let steps = 0;
  try {
    await w.start();
    for (const [kind, n] of Object.entries(opts.clients) as [ClientKind, number][]) for (let i = 0; i < n; i++) await w.join(kind);
    if (opts.selfTest) {
      await w.join('plain', 'skip-unmap');
      await w.join('vfio', 'pin-twice');
    }
    let failedInARow = 0;
    for (let i = 1; i <= opts.steps; i++) {
      t.step = i;
      const { res, fault } = await step(w);
      steps = i;
      if (fault) {
        faults++;
        faultsByKind[res.op.slice('fault:'.length)] = (faultsByKind[res.op.slice('fault:'.length)] ?? 0) + 1;
      } else operations[res.op] = (operations[res.op] ?? 0) + 1;
      opts.onStep?.(`step ${i}: ${res.op}: ${res.detail}`);
      const seen = t.violations.length;
      try {
        await checkStep(w, t, res);
      } catch (err) {
        // A process that stopped answering while it was being checked: reported, and the run goes on.
        t.check('outcome', [`checking step ${i} failed: ${(err as Error).message}`, ...reapDead(w)]);
      }
      // A long soak shows a violation when it happens, not only in the summary at the end.
      for (const v of t.violations.slice(seen)) opts.onStep?.(`step ${i}: VIOLATION ${v.invariant}: ${v.detail}`);
      failedInARow = res.op === 'error' ? failedInARow + 1 : 0;
      if (failedInARow >= 5) {
        t.check('outcome', [`stopped after five failed steps in a row`]);
        break;
      }
    }
    t.step = steps + 1;
    await teardown(w, t);
  } finally {
    await w.close();
  }
  const replay = (step: number) => replayCommand(opts.seed, step, replayArgs);
  return {
    seed: opts.seed,
    steps,
    faults,
    faultsByKind,
    operations,
    checks: t.checks,
    violations: t.violations.map((v) => ({ ...v, replay: replay(Math.min(v.step, steps)) })),
    durationMs: Math.round(performance.now() - started),
    selfTest: opts.selfTest,
  };
}
