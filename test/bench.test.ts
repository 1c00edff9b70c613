// The benchmark pipeline runs on this machine: a short translation benchmark against its C peer (built
// here with cc), its JSON, and the report rendered from it and from the committed results, checked against
// the JSON it came from. The figures themselves are not asserted: speed is the benchmarks' business.
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { defer, runCleanups } from './helpers/embedded.js';

const root = path.resolve(import.meta.dirname, '..');
const node = (script: string, args: string[], env: Record<string, string> = {}) =>
  execFileSync(process.execPath, [path.join(root, 'dist', 'bench', script), ...args], { cwd: root, encoding: 'utf8', env: { ...process.env, ...env }, timeout: 120_000 });

interface Measurement {
  name: string;
  median: number;
  p99: number;
  iterations: number;
  unit: string;
  peer?: { name: string; median: number };
  ratio?: number;
  goal?: string;
  met?: boolean;
}
interface Result {
  bench: string;
  machine: { cpus: number };
  results: Measurement[];
}

afterEach(runCleanups);

/** A new temporary directory, removed after the test. */
function temp(): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'mmb-bench-test-'));
  defer(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** Renders a report from `results` into a new directory; returns its performance.md. */
function render(results: string): { dir: string; md: string } {
  const dir = temp();
  node('report.js', [], { MMB_BENCH_RESULTS: results, MMB_BENCH_OUT: dir });
  return { dir, md: fs.readFileSync(path.join(dir, 'performance.md'), 'utf8') };
}

/** The goals table's rows: [benchmark, measurement, ..., status]. */
const goalRows = (md: string) =>
  md
    .split('## Goals')[1]!
    .split('\n## ')[0]!
    .split('\n')
    .filter((l) => l.startsWith('| ') && !l.startsWith('| benchmark'))
    .map((l) => l.split(' | ').map((c) => c.replace(/^\| |\|$/g, '').trim()));

describe('benchmarks', () => {
  it('translate: every lookup side by side with the C peer of the same run, and a report made of exactly that JSON', () => {
    const out = node('translate.js', ['--regions', '8,512', '--rounds', '1', '--passes', '1', '--json'], { BENCH_ITERATIONS: '1' });
    const r = JSON.parse(out) as Result;
    expect(r.bench).toBe('translate');
    expect(r.machine.cpus).toBe(os.cpus().length);
    for (const count of [8, 512]) {
      for (const pattern of ['random', 'local']) {
        const rows = r.results.filter((m) => m.name.startsWith(`${count} regions, ${pattern}:`));
        const c = rows.find((m) => m.name.includes('peer, C lookup'));
        const resolve = rows.find((m) => m.name.includes('resolve()'));
        expect(c, `${count} ${pattern}: the C peer`).toBeDefined();
        expect(resolve, `${count} ${pattern}: resolve()`).toBeDefined();
        expect(rows.length).toBe(4); // C, resolve(), translate(), slice()
        for (const m of rows) {
          expect(m.median).toBeGreaterThan(0);
          expect(m.p99).toBeGreaterThan(0);
          expect(m.iterations).toBeGreaterThanOrEqual(1);
          expect(m.unit).toBe('lookups/s');
        }
        // Each of ours stands beside the C figure of the same run, with the ratio computed from the two.
        for (const m of rows.filter((x) => x !== c)) {
          expect(m.peer?.median).toBe(c!.median);
          expect(m.ratio).toBeCloseTo(c!.median / m.median, 9);
        }
        expect(resolve!.goal).toBe('within 3x of C');
        expect(resolve!.met).toBe((resolve!.ratio as number) <= 3);
      }
    }
    const results = temp();
    fs.writeFileSync(path.join(results, 'translate.json'), out);
    const { dir, md } = render(results);
    const goals = r.results.filter((m) => m.goal);
    const met = goals.filter((m) => m.met).length;
    expect(md).toContain(`**${met} of ${goals.length} goals met.**`);
    const table = goalRows(md);
    expect(table.map((row) => row[1])).toEqual(goals.map((m) => m.name));
    expect(table.map((row) => row[6])).toEqual(goals.map((m) => (m.met ? 'met' : '**MISSED**')));
    // A missed goal is explained in the page, not only marked.
    if (met < goals.length) expect(md).toMatch(/## Why the missed goals were missed\n\n- \*\*Translation\*\*/);
    const svg = fs.readFileSync(path.join(dir, 'performance-translate.svg'), 'utf8');
    expect(svg.startsWith('<svg')).toBe(true);
    expect(svg).toContain('resolve(), random regions');
    expect(md).toContain('![3. Translation: guest-physical lookups per second](performance-translate.svg)');
  });

  it('the committed docs/performance.md is what bench:report makes of the committed results', () => {
    const { dir, md } = render(path.join(root, 'bench', 'results'));
    expect(md).toBe(fs.readFileSync(path.join(root, 'docs', 'performance.md'), 'utf8'));
    // The same charts (docs/performance-*.svg are the report's), then the same contents.
    const svgs = fs.readdirSync(dir).filter((x) => x.endsWith('.svg')).sort();
    expect(svgs.length).toBeGreaterThan(0);
    expect(svgs).toEqual(fs.readdirSync(path.join(root, 'docs')).filter((x) => x.startsWith('performance-') && x.endsWith('.svg')).sort());
    for (const f of svgs) {
      expect(fs.readFileSync(path.join(dir, f), 'utf8'), f).toBe(fs.readFileSync(path.join(root, 'docs', f), 'utf8'));
    }
    // Every goal of every committed result is in the table, with its status.
    const all = fs
      .readdirSync(path.join(root, 'bench', 'results'))
      .filter((f) => f.endsWith('.json') && f !== 'vhost-user.json')
      .flatMap((f) => (JSON.parse(fs.readFileSync(path.join(root, 'bench', 'results', f), 'utf8')) as Result).results)
      .filter((m) => m.goal && !(m as { note?: string }).note?.includes('not what a sync does'));
    expect(goalRows(md).length).toBe(all.length);
    // The README quotes the same headline, written there by the same run of bench:report.
    const headline = md.split('## Headline\n\n')[1]!.split('\n\n')[0]!.split('\n');
    expect(headline.length).toBeGreaterThan(3);
    const readme = fs.readFileSync(path.join(root, 'README.md'), 'utf8');
    for (const line of headline) expect(readme).toContain(line);
  });
});
