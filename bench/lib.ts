// Shared by the benchmarks: repeat a measurement, summarize (median, p99), print a table and write JSON
// (bench/results/<name>.json, or stdout with --json), pin to a CPU, build a C peer, describe the machine.
// Timings on these 2-core machines are noisy and bimodal: every figure is a median over many iterations,
// next to a peer measured in the same run.
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { have } from '../testkit/backends.js';

export { have };

export interface Measurement {
  name: string;
  unit: string;
  median: number;
  /**
   * The 99th percentile of the samples. For a rate (`higherIsBetter`), the slow tail instead: the 1st
   * percentile, so that 99% of the samples were at least this fast.
   */
  p99: number;
  iterations: number;
  /** A rate or a count where more is better (the tail is then the low end). */
  higherIsBetter?: boolean;
  /** The peer's median in the same run, when there is one. */
  peer?: { name: string; median: number };
  /** How this compares with the peer, in the direction the goal is stated. */
  ratio?: number;
  goal?: string;
  met?: boolean;
  note?: string;
  /** Where this figure sits on a chart: its series and its x value (e.g. the number of subscribers). */
  series?: string;
  x?: number;
}

/** Median and 99th percentile (or, for rates, the 1st percentile: the slow tail). */
export function summarize(samples: readonly number[], higherIsBetter = false): { median: number; p99: number } {
  if (samples.length === 0) throw new Error('no samples');
  const s = [...samples].sort((a, b) => a - b);
  const at = (q: number) => s[Math.min(s.length - 1, Math.floor(q * s.length))] as number;
  return { median: at(0.5), p99: higherIsBetter ? at(0.01) : at(0.99) };
}

export const median = (samples: readonly number[]): number => summarize(samples).median;

/** BENCH_ITERATIONS, or the script's default. */
export function iterations(fallback: number): number {
  const v = process.env.BENCH_ITERATIONS;
  if (v === undefined || v === '') return fallback;
  const n = Number(v);
  if (!Number.isSafeInteger(n) || n < 1) throw new Error(`BENCH_ITERATIONS must be a positive integer, not ${JSON.stringify(v)}`);
  return n;
}

/** The repository's root (where package.json is), from dist/bench or bench. */
export function rootDir(): string {
  let d = path.dirname(fileURLToPath(import.meta.url));
  while (!fs.existsSync(path.join(d, 'package.json'))) d = path.dirname(d);
  return d;
}

/** Pins every thread of this process to `cpus` (a taskset list: "0", "0-1"). */
export function pinSelf(cpus: string): void {
  execFileSync('taskset', ['-a', '-cp', cpus, String(process.pid)], { stdio: 'ignore' });
}

/** All CPUs of this machine as a taskset list. */
export const allCpus = (): string => `0-${os.cpus().length - 1}`;

/**
 * Builds bench/c/NAME.c with the system C compiler (cc -O2) into `dir` and returns the binary's path.
 * The flags are printed in each result's context, so the peer's build is on record.
 */
export function buildC(name: string, dir: string, extra: readonly string[] = []): string {
  if (!have('cc')) throw new Error('a C compiler (cc) is needed: apt-get install gcc');
  const bin = path.join(dir, name);
  execFileSync('cc', [...C_FLAGS, ...extra, '-o', bin, path.join(rootDir(), 'bench', 'c', `${name}.c`)], { stdio: ['ignore', 'ignore', 'inherit'] });
  return bin;
}
export const C_FLAGS: readonly string[] = ['-O2', '-Wall', '-Wextra'];

/** `cc --version`'s first line. */
export function ccVersion(): string {
  return spawnSync('cc', ['--version'], { encoding: 'utf8' }).stdout.split('\n')[0] ?? 'unknown';
}

const load = () => os.loadavg().map((l) => +l.toFixed(2));
const loadAtStart = load();
const startedAt = Date.now();

/** What the figures were measured on, and how busy it was. */
export function machine(): Record<string, unknown> {
  const cpuinfo = fs.readFileSync('/proc/cpuinfo', 'utf8');
  const model = /^model name\s*:\s*(.*)$/m.exec(cpuinfo)?.[1] ?? os.cpus()[0]?.model ?? 'unknown';
  return {
    cpu: model,
    cpus: os.cpus().length,
    memoryGiB: +(os.totalmem() / 2 ** 30).toFixed(1),
    kernel: `${os.type()} ${os.release()}`,
    node: process.version,
    // Load averages (1, 5, 15 minutes) when the script started and when it reported: anything else
    // running on the two CPUs shows here.
    loadAtStart,
    loadAtEnd: load(),
  };
}

const round = (n: number) => (Math.abs(n) >= 100 ? Math.round(n) : +n.toPrecision(3));

export function report(bench: string, results: Measurement[], context: Record<string, unknown> = {}): void {
  const json = process.argv.includes('--json');
  const doc = {
    bench,
    date: new Date().toISOString(),
    seconds: Math.round((Date.now() - startedAt) / 1000),
    command: process.env.npm_lifecycle_event ? `npm run ${process.env.npm_lifecycle_event}` : `node ${path.relative(rootDir(), process.argv[1] ?? '')}`,
    iterationsFromEnv: process.env.BENCH_ITERATIONS ?? null,
    machine: machine(),
    ...context,
    results,
  };
  if (json) {
    console.log(JSON.stringify(doc, null, 2));
  } else {
    const rows = results.map((r) => [
      r.name,
      `${round(r.median)} ${r.unit}`,
      `${round(r.p99)} ${r.unit}`,
      String(r.iterations),
      r.peer ? `${r.peer.name}: ${round(r.peer.median)} ${r.unit}` : '',
      r.ratio !== undefined ? String(round(r.ratio)) : '',
      r.goal ? `${r.goal} ${r.met ? 'met' : 'MISSED'}` : '',
    ]);
    const head = ['measurement', 'median', 'p99', 'n', 'peer (same run)', 'ratio', 'goal'];
    const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] as string).length)));
    const line = (r: string[]) => r.map((c, i) => c.padEnd(widths[i] as number)).join('  ');
    console.log(`\n${bench}`);
    console.log(line(head));
    console.log(widths.map((w) => '-'.repeat(w)).join('  '));
    for (const r of rows) console.log(line(r));
    for (const r of results) if (r.note) console.log(`  ${r.name}: ${r.note}`);
    if (results.some((r) => r.higherIsBetter)) console.log('  (for rates, "p99" is the slow tail: 99% of the samples were at least this fast)');
  }
  if (json) return; // to stdout instead: a run with --json leaves bench/results (and the report) as they are
  const dir = path.join(rootDir(), 'bench', 'results');
  fs.mkdirSync(dir, { recursive: true });
  fs.writeFileSync(path.join(dir, `${bench}.json`), JSON.stringify(doc, null, 2) + '\n');
}

/** Runs a benchmark's main(): exit 0 when it resolves (helper processes must not keep it alive), 1 when it throws. */
export function runMain(main: () => Promise<void>): void {
  main().then(
    () => process.exit(0),
    (err: unknown) => {
      console.error(err);
      process.exit(1);
    },
  );
}
