// The benchmark pipeline runs on this machine, so none of the benchmarks rots: a short run of every one of
// them (seconds each, against its peer where it has one), its JSON's shape, every figure that names a peer
// standing beside that peer's own row of the same run, and the report rendered from all of them; the
// translation benchmark's rows in detail; and the committed docs/performance.md is what bench:report makes
// of the committed results. The figures themselves are not asserted: speed is the benchmarks' business.
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { have, QSD, TESTPMD } from '../bench/vhost-user-backends.js';
import { BENCHES } from '../bench/list.js';
import { defer, runCleanups } from './helpers/embedded.js';
import { IN_CI } from './helpers/ci.js';

const root = path.resolve(import.meta.dirname, '..');
const node = (script: string, args: string[], env: Record<string, string> = {}) =>
  execFileSync(process.execPath, [path.join(root, 'dist', 'bench', script), ...args], {
    cwd: root,
    encoding: 'utf8',
    env: { ...process.env, ...env },
    timeout: 240_000,
    maxBuffer: 1 << 26,
  });

interface Measurement {
  name: string;
  median: number;
  p99: number;
  iterations: number;
  unit: string;
  series?: string;
  peer?: { name: string; median: number };
  ratio?: number;
  goal?: string;
  met?: boolean;
  note?: string;
}
interface Result {
  bench: string;
  date: string;
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

/**
 * A short run of each benchmark: the arguments that make it take seconds, and the tools it drives (a
 * missing one skips it, except under CI=true, where it fails).
 */
const SHORT: Record<(typeof BENCHES)[number], { args: string[]; tools: string[] }> = {
  fanout: { args: ['--clients', '1,4', '--iterations', '20', '--rounds', '1', '--warmup', '20'], tools: ['cc', QSD] },
  throughput: { args: ['--rounds', '1', '--transactions', '100'], tools: ['cc', QSD] },
  translate: { args: ['--regions', '8,512', '--rounds', '1', '--passes', '1'], tools: ['cc'] },
  scale: { args: ['--regions', '4096', '--snapshots', '1', '--restarts', '1', '--iterations', '6', '--warmup', '20'], tools: [] },
  pinning: { args: ['--gib', '0.25', '--rounds', '1'], tools: ['cc'] },
  'dirty-sync': { args: ['--mib', '1'], tools: [] },
  ioas: { args: ['--rounds', '1', '--pairs', '100', '--txns', '4', '--batch', '32', '--warmup', '50'], tools: ['cc'] },
  'ioas-vhost-user': { args: ['--rounds', '1', '--pairs', '50', '--txns', '4', '--batch', '16', '--warmup', '50'], tools: ['cc', TESTPMD] },
  migration: { args: ['--mib', '64', '--runs', '1'], tools: ['cc'] },
  'vhost-user': { args: ['--iterations', '20', '--rounds', '1', '--warmup', '10', '--fanout', '1,4'], tools: ['cc', QSD] },
  // Three guest boots under TCG (no back-end, one, two): the longest of the short runs.
  'qemu-hotplug': { args: ['--backends', '0,1,2', '--iterations', '3', '--warmup', '1', '--rounds', '1'], tools: ['qemu-system-x86_64', QSD, 'busybox'] },
};

/** The JSON of every short run, for the report rendered from all of them. */
const shortRuns = fs.mkdtempSync(path.join(os.tmpdir(), 'mmb-bench-short-'));
afterAll(() => fs.rmSync(shortRuns, { recursive: true, force: true }));

/**
 * What every benchmark's JSON must be: its name, when and where, rows with a name (each once), a unit and
 * finite figures over at least one iteration; a goal with its verdict; and every figure that names a peer
 * standing beside that peer's own row of the same run (the same median) with the ratio of the two.
 */
function checkShape(r: Result, bench: string): void {
  expect(r.bench).toBe(bench);
  expect(Number.isNaN(Date.parse(r.date))).toBe(false);
  expect(r.machine.cpus).toBe(os.cpus().length);
  expect(r.results.length).toBeGreaterThan(0);
  const names = new Set<string>();
  for (const m of r.results) {
    expect(typeof m.name, JSON.stringify(m)).toBe('string');
    expect(names.has(m.name), `${bench}: two rows named ${m.name}`).toBe(false);
    names.add(m.name);
    expect(typeof m.unit, m.name).toBe('string');
    expect(Number.isFinite(m.median), `${m.name}: median ${m.median}`).toBe(true);
    expect(Number.isFinite(m.p99), `${m.name}: p99 ${m.p99}`).toBe(true);
    expect(m.iterations, m.name).toBeGreaterThanOrEqual(1);
    if (m.goal !== undefined) expect(typeof m.met, `${m.name}: the goal's verdict`).toBe('boolean');
    if (!m.peer) continue;
    const peer = r.results.find((x) => x !== m && x.median === m.peer!.median);
    expect(peer, `${bench}: ${m.name} names a peer (${m.peer.name}) that is no row of the same run`).toBeDefined();
    if (m.ratio !== undefined) {
      const ratios = [m.median / m.peer.median, m.peer.median / m.median];
      // (Within 1%: a benchmark may round its figures for display and compute the ratio from the unrounded.)
      // (A short run under load can fit a negative slope: the tolerance is on the magnitude.)
      expect(
        ratios.some((x) => Math.abs(x - m.ratio!) <= 0.01 * Math.abs(x)),
        `${m.name}: ratio ${m.ratio} of ${m.median} and ${m.peer.median}`,
      ).toBe(true);
    }
  }
}

describe('a short run of every benchmark', () => {
  it('covers every benchmark npm run bench runs', () => {
    expect(Object.keys(SHORT).sort()).toEqual([...BENCHES].sort());
  });

  for (const bench of BENCHES) {
    const { args, tools } = SHORT[bench];
    const missing = tools.filter((t) => !have(t));
    if (missing.length > 0 && !IN_CI) console.warn(`bench ${bench}: short run skipped, ${missing.join(', ')} not installed (CI=true makes this a failure)`);
    it.skipIf(missing.length > 0 && !IN_CI)(`${bench}: its JSON has the shape the report reads, each peer of the same run beside`, { timeout: 300_000 }, () => {
      expect(missing, `tools the ${bench} benchmark drives`).toEqual([]);
      const out = node(`${bench}.js`, [...args, '--json'], { BENCH_ITERATIONS: '1' });
      const r = JSON.parse(out) as Result;
      checkShape(r, bench);
      fs.writeFileSync(path.join(shortRuns, `${bench}.json`), out);
    });
  }

  it('the report renders every short run: a section each, every goal in the table with its verdict', { timeout: 60_000 }, () => {
    const runs = fs.readdirSync(shortRuns).filter((f) => f.endsWith('.json'));
    expect(runs.length, 'short runs').toBeGreaterThan(0);
    const { md } = render(shortRuns);
    const results = runs.map((f) => JSON.parse(fs.readFileSync(path.join(shortRuns, f), 'utf8')) as Result);
    for (const r of results) expect(md, `the section of ${r.bench}`).toContain(`\`bench/${r.bench}.ts\`, \`npm run bench:${r.bench}\`.`);
    const goals = results.filter((r) => r.bench !== 'vhost-user').flatMap((r) => r.results.filter((m) => m.goal && !m.note?.includes('not what a sync does')));
    const table = goalRows(md);
    expect(table.length).toBe(goals.length);
    expect(new Set(table.map((row) => row[1]))).toEqual(new Set(goals.map((m) => m.name)));
    const met = goals.filter((m) => m.met).length;
    expect(md).toContain(`**${met} of ${goals.length} goals met.**`);
    const why = md.split('## Why the missed goals were missed\n\n')[1]!;
    if (met < goals.length) expect(why.startsWith('- **')).toBe(true);
    else expect(why.startsWith('Every goal was met')).toBe(true);
  });
});

describe('the translation benchmark and the committed report', () => {
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
    // Committed: bench/results/ is git-ignored, so a new benchmark's file must be added with -f, or a
    // clean clone renders another report than this checkout.
    const results = fs.readdirSync(path.join(root, 'bench', 'results')).filter((f) => f.endsWith('.json'));
    const tracked = execFileSync('git', ['ls-files', 'bench/results'], { cwd: root, encoding: 'utf8' }).split('\n').filter(Boolean);
    expect(results.map((f) => `bench/results/${f}`).filter((f) => !tracked.includes(f))).toEqual([]);
    const { dir, md } = render(path.join(root, 'bench', 'results'));
    expect(md).toBe(fs.readFileSync(path.join(root, 'docs', 'performance.md'), 'utf8'));
    // The same charts (docs/performance-*.svg are the report's), then the same contents.
    const svgs = fs
      .readdirSync(dir)
      .filter((x) => x.endsWith('.svg'))
      .sort();
    expect(svgs.length).toBeGreaterThan(0);
    expect(svgs).toEqual(
      fs
        .readdirSync(path.join(root, 'docs'))
        .filter((x) => x.startsWith('performance-') && x.endsWith('.svg'))
        .sort(),
    );
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
