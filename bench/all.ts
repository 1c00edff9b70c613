// `npm run bench`: every benchmark, one after the other, each in its own process (what one leaves behind
// in the JIT or the heap cannot help or hurt the next), then the report (bench/report.ts renders
// bench/results/*.json into docs/performance.md and its charts). A benchmark that fails is named at the end
// and makes the exit status 1; the others still run and the report still renders what exists (a result
// left from an earlier run says its date there).
//
//   npm run bench [-- name ...]     e.g. npm run bench -- fanout scale
import { spawnSync } from 'node:child_process';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { BENCHES } from './list.js';

const here = path.dirname(fileURLToPath(import.meta.url));
const wanted = process.argv.slice(2).filter((a) => !a.startsWith('-'));
const unknown = wanted.filter((w) => !(BENCHES as readonly string[]).includes(w));
if (unknown.length > 0) {
  console.error(`unknown benchmark(s) ${unknown.join(', ')}; known: ${BENCHES.join(', ')}`);
  process.exit(2);
}
const list = wanted.length > 0 ? wanted : [...BENCHES];
const load = os.loadavg()[0] as number;
console.log(
  `npm run bench: ${list.join(', ')}; load average ${os
    .loadavg()
    .map((l) => l.toFixed(2))
    .join(' ')} on ${os.cpus().length} CPUs`,
);
if (load > 0.5) console.log(`  (the machine is busy: timings will be noisier than on a quiet one)`);
const started = Date.now();
const failed: string[] = [];
for (const name of list) {
  const t0 = Date.now();
  console.log(`\n=== ${name} ===`);
  const r = spawnSync(process.execPath, [path.join(here, `${name}.js`)], { stdio: 'inherit' });
  const s = Math.round((Date.now() - t0) / 1000);
  if (r.status !== 0) failed.push(name);
  console.log(`=== ${name}: ${r.status === 0 ? 'done' : `FAILED (${r.status ?? r.signal})`} in ${s} s ===`);
}
console.log('\n=== report ===');
const rep = spawnSync(process.execPath, [path.join(here, 'report.js')], { stdio: 'inherit' });
if (rep.status !== 0) failed.push('report');
console.log(`\nnpm run bench: ${Math.round((Date.now() - started) / 1000)} s${failed.length > 0 ? `; FAILED: ${failed.join(', ')}` : ''}`);
process.exit(failed.length > 0 ? 1 : 0);
