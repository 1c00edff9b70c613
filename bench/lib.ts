// Shared by the benchmarks: repeat a measurement, summarize (median, p99), print a table and write JSON
// (bench/results/<name>.json, or stdout with --json). Timings on these 2-core machines are noisy and
// bimodal: every figure is a median over many iterations, next to a peer measured in the same run.
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export interface Measurement {
  name: string;
  unit: string;
  median: number;
  p99: number;
  iterations: number;
  /** The peer's median in the same run, when there is one. */
  peer?: { name: string; median: number };
  /** How this compares with the peer, in the direction the goal is stated. */
  ratio?: number;
  goal?: string;
  met?: boolean;
  note?: string;
}

export function summarize(samples: readonly number[]): { median: number; p99: number } {
  const s = [...samples].sort((a, b) => a - b);
  const at = (q: number) => s[Math.min(s.length - 1, Math.floor(q * s.length))] as number;
  return { median: at(0.5), p99: at(0.99) };
}

/** Runs `fn` `iterations` times after `warmup` runs; returns per-run milliseconds. */
export async function time(fn: () => unknown | Promise<unknown>, iterations: number, warmup = 3): Promise<number[]> {
  for (let i = 0; i < warmup; i++) await fn();
  const out: number[] = [];
  for (let i = 0; i < iterations; i++) {
    const t0 = performance.now();
    await fn();
    out.push(performance.now() - t0);
  }
  return out;
}

const round = (n: number) => (Math.abs(n) >= 100 ? Math.round(n) : +n.toPrecision(3));

export function report(bench: string, results: Measurement[], context: Record<string, unknown> = {}): void {
  const json = process.argv.includes('--json');
  const doc = { bench, date: new Date().toISOString(), node: process.version, ...context, results };
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
  }
  const dir = path.join(fileURLToPath(new URL('../..', import.meta.url)), 'bench', 'results');
  fs.mkdirSync(dir, { recursive: true });
  fs.writeFileSync(path.join(dir, `${bench}.json`), JSON.stringify(doc, null, 2) + '\n');
}
