// The hotplug harness (harness/): a short seeded run with faults must hold every invariant, each checked
// at least once; the self-test's deliberately broken clients must be caught, by name. Both run the CLI
// against real processes (a broker process, client processes), judged by /proc.
import { describe, expect, it } from 'vitest';
import { INVARIANTS } from '../harness/index.js';
import { runCli } from './helpers/procs.js';

interface Summary {
  steps: number;
  faults: number;
  checks: Record<string, number>;
  violations: { step: number; invariant: string; detail: string; replay: string }[];
  faultsByKind: Record<string, number>;
}

describe('mmbroker harness', () => {
  it('a seeded run with faults: no violation, every invariant checked', async () => {
    // The acceptance run.
    // About a minute on an idle machine; the bound is for a loaded one (vfio clients evicted and replaced).
    const r = await runCli(['harness', '--seed', '1', '--steps', '300', '--faults', '0.1', '--json'], 480_000);
    const s = JSON.parse(r.stdout) as Summary;
    expect(s.violations.map((v) => `step ${v.step} ${v.invariant}: ${v.detail.slice(0, 400)}`)).toEqual([]);
    expect(r.code).toBe(0);
    expect(s.steps).toBe(300);
    expect(s.faults).toBeGreaterThan(0);
    for (const name of INVARIANTS) expect(s.checks[name], name).toBeGreaterThan(0);
  }, 540_000);

  it('--self-test: the planted bugs are reported as the invariants they break', async () => {
    const r = await runCli(['harness', '--self-test', '--seed', '3', '--steps', '40', '--faults', '0', '--json'], 120_000);
    const s = JSON.parse(r.stdout) as Summary;
    // Each broken client is caught by name, by the invariant it breaks.
    const caught = (invariant: string, mode: string) => s.violations.some((v) => v.invariant === invariant && v.detail.includes(`broken (${mode})`));
    expect(caught('no-stale-mapping', 'skip-unmap')).toBe(true);
    expect(caught('pins', 'pin-twice')).toBe(true);
    // Drops its connection in the vote of a removal, resumes (the broker counts it reconciled) and keeps a
    // mapping: only the look at the moment the owner is told "done" sees it before anything settles.
    expect(caught('done-means-done', 'ignore-eviction')).toBe(true);
    // Unmaps everything when it reattaches to the restarted, unpublished space (the self-test restarts the broker).
    expect(caught('restart-keeps-memory', 'teardown-on-wait')).toBe(true);
    expect(s.faultsByKind['broker-restart']).toBeGreaterThan(0);
    // Nothing else is blamed on the clients that work.
    const blamed = s.violations.filter((v) => !/broken \((skip-unmap|pin-twice|ignore-eviction|teardown-on-wait)\)/.test(v.detail));
    expect(blamed.map((v) => `step ${v.step} ${v.invariant}: ${v.detail.slice(0, 300)}`)).toEqual([]);
    expect(s.violations[0]?.replay).toMatch(/^mmbroker harness --seed 3 --steps \d+ --self-test/);
    expect(r.code).toBe(0);
  }, 150_000);

  it('bad arguments are typed errors: one line, exit 2 (a usage error)', async () => {
    const r = await runCli(['harness', '--clients', 'kvm:1,gpu:2']);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/MMB_ERR_INVALID_ARG.*unknown kind "gpu"/);
    const f = await runCli(['harness', '--faults', '1.5']);
    expect(f.stderr).toMatch(/MMB_ERR_INVALID_ARG/);
  });
});
