// A run's figures, for people and as JSON: steps, faults by kind, checks per invariant, violations with
// the seed that replays them.
import type { InvariantName, Violation } from './invariants.js';
import { BROKEN_MODES, type BrokenMode } from './procs.js';

export interface Report {
  seed: number;
  steps: number;
  faults: number;
  faultsByKind: Record<string, number>;
  operations: Record<string, number>;
  checks: Record<InvariantName, number>;
  violations: (Violation & { replay: string })[];
  durationMs: number;
  selfTest: boolean;
  /** --self-test: the broken clients it planted. */
  planted: BrokenMode[];
  /** --hugetlb: the pages the run added to the kernel's pool (and gave back at its end). */
  hugePages?: { size: number; added: number; missing?: string };
}

export function replayCommand(seed: number, steps: number, args: string): string {
  return `mmbroker harness --seed ${seed} --steps ${steps}${args ? ` ${args}` : ''}`;
}

export function formatReport(r: Report): string {
  const lines = [
    `mmbroker harness${r.selfTest ? ' --self-test' : ''}: seed ${r.seed}, ${r.steps} steps, ${r.faults} faults, ${(r.durationMs / 1000).toFixed(1)} s`,
    ...(r.hugePages
      ? [
          `hugetlb: ${r.hugePages.added} pages of ${r.hugePages.size / 2 ** 20} MiB reserved for the run and given back${r.hugePages.missing ? ` (${r.hugePages.missing})` : ''}`,
        ]
      : []),
    '',
    'faults:',
    ...Object.entries(r.faultsByKind)
      .sort()
      .map(([k, n]) => `  ${k.padEnd(18)} ${n}`),
    'operations:',
    ...Object.entries(r.operations)
      .sort()
      .map(([k, n]) => `  ${k.padEnd(18)} ${n}`),
    'checks (per invariant):',
    ...Object.entries(r.checks).map(([k, n]) => `  ${k.padEnd(22)} ${String(n).padStart(7)}  ${r.violations.filter((v) => v.invariant === k).length} violated`),
    '',
  ];
  if (r.violations.length === 0) lines.push('no violations');
  else {
    lines.push(`${r.violations.length} violation(s); the first of each invariant (--json lists all):`);
    for (const name of new Set(r.violations.map((v) => v.invariant))) {
      const mine = r.violations.filter((v) => v.invariant === name);
      const first = mine[0] as Report['violations'][number];
      lines.push(`  ${name}: ${mine.length} violation(s), first at step ${first.step}`, `    ${first.detail.slice(0, 600)}`, `    replay: ${first.replay}`);
    }
  }
  if (r.selfTest) {
    lines.push('', 'broken clients, each where the invariant that must catch it first named it:');
    for (const mode of r.planted) {
      const { caughtBy } = BROKEN_MODES[mode];
      const v = r.violations.find((x) => x.invariant === caughtBy && x.detail.includes(`broken (${mode})`));
      const mine = v?.detail.split('; ').find((d) => d.includes(`broken (${mode})`));
      lines.push(v ? `  ${mode}: ${caughtBy} at step ${v.step}: ${mine?.slice(0, 400)}` : `  ${mode}: NOT caught by ${caughtBy}`);
    }
  }
  return lines.join('\n');
}

/** The --json form: the issue's fields first, then the detail. */
export function jsonReport(r: Report): object {
  return {
    steps: r.steps,
    faults: r.faults,
    checks: r.checks,
    violations: r.violations,
    seed: r.seed,
    faultsByKind: r.faultsByKind,
    operations: r.operations,
    durationMs: r.durationMs,
    selfTest: r.selfTest,
    ...(r.selfTest ? { planted: r.planted } : {}),
    ...(r.hugePages ? { hugePages: r.hugePages } : {}),
  };
}

/** --self-test: the broken clients no violation of the invariant that must catch them named ("mode: invariant"). */
export function missedPlanted(r: Report): string[] {
  return r.planted
    .filter((mode) => !r.violations.some((v) => v.invariant === BROKEN_MODES[mode].caughtBy && v.detail.includes(`broken (${mode})`)))
    .map((mode) => `${mode}: ${BROKEN_MODES[mode].caughtBy}`);
}

/** --self-test: each broken client it planted and the invariant that must catch it ("mode: invariant"). */
export function planted(r: Report): string[] {
  return r.planted.map((mode) => `${mode}: ${BROKEN_MODES[mode].caughtBy}`);
}
