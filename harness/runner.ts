// The harness loop: start a broker process, the owner (this process, through the relay that holds every
// commit's answer until the judge looked) and the client processes; then, for each step, one operation or
// fault chosen by the seeded generator, and every invariant checked against the kernel, at the moment of
// each answer and after the step settled; finally every client leaves (checked too) and the owner takes
// the map down.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { allOrNothing, convergence, data, iovaPins, leaks, leftClean, noStaleMapping, outcome, pins, Tally } from './invariants.js';
import { observe, observeNow } from './observe.js';
import { runOperation, type StepResult } from './operations.js';
import { runFault, type FaultName } from './faults.js';
import { checkOptions, DEFAULT_OPTIONS, type ClientKind, type HarnessOptions } from './options.js';
import { plantedModes } from './procs.js';
import { replayCommand, type Report } from './report.js';
import { Rng } from '../testkit/rng.js';
import { World } from './world.js';

/** --self-test: a broker restart every this many steps, whatever --faults says (a broken client only shows in its window). */
export const SELF_TEST_RESTART_EVERY = 15;

/** Counts what the world recorded meanwhile (checks at held answers, in restart windows) and returns the rest. */
function tallyDrained(w: World, t: Tally): ReturnType<World['drain']> {
  const d = w.drain();
  for (const j of d.judged) t.check(j.invariant, j.problems);
  return d;
}

/** Every check of a step: those made during it (at held answers, in restart windows, while a vote was held), then after it. */
async function checkStep(w: World, t: Tally, res: StepResult): Promise<void> {
  for (const j of res.judged ?? []) t.check(j.invariant, j.problems);
  if (res.risky) allOrNothing(w, await observeNow(w), t);
  // Long enough for an evicted client to come back and for every client to find a restarted broker.
  const snap = await observe(w, 2 * w.opts.ackTimeoutMs + 15_000);
  // Deaths found while settling (accounted for, the client replaced) belong to this step's outcome.
  const late = tallyDrained(w, t);
  convergence(w, snap, t);
  noStaleMapping(w, snap, t);
  pins(w, snap, t);
  await iovaPins(w, snap, t);
  leaks(w, snap, t);
  outcome({ ...res, surprises: [...res.surprises, ...late.surprises] }, t);
  await data(w, snap, t);
  if (late.notes.length > 0) w.opts.onStep?.(`step ${t.step}: then ${late.notes.join('; ')}`);
}

/** Runs the step's operation or fault; what the world recorded meanwhile (held answers, deaths) joins its result. */
async function step(w: World, forced?: FaultName): Promise<{ res: StepResult; fault: boolean }> {
  const fault = forced !== undefined || w.rng.chance(w.opts.faultRate);
  let res: StepResult;
  let f: StepResult | undefined;
  try {
    f = fault ? await runFault(w, forced) : undefined;
    res = f ?? (await runOperation(w));
  } catch (err) {
    res = { op: 'error', detail: (err as Error).message, risky: true, surprises: [`the step failed: ${(err as Error).stack ?? String(err)}`] };
  }
  try {
    await w.replaceDead();
  } catch (err) {
    w.surprises.push(`replacing a dead client failed: ${(err as Error).message}`);
  }
  const d = w.drain();
  const detail = d.notes.length > 0 ? `${res.detail}; ${d.notes.join('; ')}` : res.detail;
  return {
    res: { ...res, detail, surprises: [...res.surprises, ...d.surprises], judged: [...(res.judged ?? []), ...d.judged], moments: d.moments },
    fault: f !== undefined,
  };
}

/** Takes everything down through the front door, checking after each client leaves. */
async function teardown(w: World, t: Tally): Promise<void> {
  while (w.clients.length > 0) {
    const c = w.clients[w.clients.length - 1]!;
    const code = await w.leave(c);
    leftClean(c, code, t);
    const snap = await observe(w, 15_000);
    t.check('outcome', tallyDrained(w, t).surprises);
    convergence(w, snap, t);
    leaks(w, snap, t);
  }
  // The IOASes go first: RAM an IOVA mapping points into cannot be removed (MMB_ERR_RAM_MAPPED).
  for (const [name, maps] of [...w.model.ioas]) {
    const u =
      maps.length > 0
        ? await w.ioasCommit(
            name,
            maps.map((m) => ({ op: 'unmap', iova: m.iova, size: m.size })),
          )
        : undefined;
    const d = await w.ioasDestroy(name);
    const failed = [
      ...(u && !u.ok ? [`unmapping everything in ${name} failed: ${u.err.code} ${u.err.message}`] : []),
      ...(d.ok ? [] : [`destroying ${name} failed: ${d.err.code} ${d.err.message}`]),
    ];
    outcome({ op: 'teardown', detail: '', risky: false, surprises: failed }, t);
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
  tallyDrained(w, t);
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
  let hugePages: Report['hugePages'];
  try {
    await w.start();
    hugePages = w.hugePages;
    for (const [kind, n] of Object.entries(opts.clients) as [ClientKind, number][]) for (let i = 0; i < n; i++) await w.join(kind);
    if (opts.selfTest) for (const mode of plantedModes(opts)) await w.joinBroken(mode);
    w.drain();
    let failedInARow = 0;
    for (let i = 1; i <= opts.steps; i++) {
      t.step = i;
      const { res, fault } = await step(w, opts.selfTest && i % SELF_TEST_RESTART_EVERY === 0 ? 'broker-restart' : undefined);
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
        t.check('outcome', [`checking step ${i} failed: ${(err as Error).message}`]);
        await w.replaceDead().catch(() => false);
        tallyDrained(w, t);
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
    planted: opts.selfTest ? plantedModes(opts) : [],
    ...(hugePages ? { hugePages } : {}),
  };
}
