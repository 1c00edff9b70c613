// Dirty sync: get-and-clear of a 32 MiB bitmap (1 TiB of guest memory at 4 KiB pages) whose bits four
// writer processes set, against a plain memory copy of the same 32 MiB measured in the same run.
// Goal (issue: dirty logging): get-and-clear at least 0.5 of the copy's throughput.
//
// What a sync does: flip the active half, then collect the retired half (bitmapTake: plain loads and
// stores, one pass). For comparison, the single-buffer alternative: an atomic swap of every non-zero word
// (bitmapFetchClear), which needs no flip but pays a locked instruction per word.
//
//   npm run bench:dirty-sync -- [--mib N] [--json]   (BENCH_ITERATIONS sets the syncs per case, 40 by default;
//   --mib the bitmap, 32 by default: less is for a short run)
import { spawn } from 'node:child_process';
import readline from 'node:readline';
import { parseArgs } from 'node:util';
import { createSealedMemfd } from '../clients/memfd.js';
import { constants, native } from '../native/index.js';
import { bitmapLayout } from '../protocol/index.js';
import { iterations, report, runMain, summarize, type Measurement } from './lib.js';

const { values } = parseArgs({ options: { mib: { type: 'string', default: '32' }, json: { type: 'boolean', default: false } } });
const BYTES = Number(values.mib) * 2 ** 20;
const SIZE_NAME = `${Number(values.mib)} MiB`;
const WRITERS = 4;
const ITERATIONS = iterations(40);
const filler = new URL('../../bench/fixtures/bitmap-filler.mjs', import.meta.url).pathname;

const LAYOUT = bitmapLayout(BYTES * 8);

async function writers(fd: number, density: number) {
  const procs = Array.from({ length: WRITERS }, (_, k) =>
    spawn(process.execPath, [filler, String(k), String(WRITERS), String(BYTES), String(density), String(LAYOUT.size)], {
      stdio: ['pipe', 'pipe', 'inherit', fd],
    }),
  );
  const lines = procs.map((p) => readline.createInterface({ input: p.stdout! }));
  const fill = () =>
    Promise.all(
      procs.map((p, i) => {
        const done = new Promise<void>((r) => (lines[i] as readline.Interface).once('line', () => r()));
        p.stdin!.write('fill\n');
        return done;
      }),
    );
  const stop = () => Promise.all(procs.map((p) => new Promise((r) => (p.once('exit', r), p.kill()))));
  return { fill, stop };
}

async function main(): Promise<void> {
  const fd = createSealedMemfd('bench-bitmap', LAYOUT.size);
  const bitmap = native.mmap(fd, 0, LAYOUT.size, constants.PROT_READ | constants.PROT_WRITE, constants.MAP_SHARED);
  const header = new DataView(bitmap.buffer, 0, 8);
  const out = new Uint8Array(BYTES);
  out.fill(1); // touch it once: no page faults in the measurements
  const results: Measurement[] = [];
  const mbps = (ms: number) => BYTES / 2 ** 20 / (ms / 1000);
  // For each density: after each fill by the four writers, either copy the same 32 MiB of freshly written
  // bitmap (the peer: a plain memory copy of the same bytes, in the same cache state) or run the sync's
  // collection; the two alternate, so they see the same conditions.
  for (const [variant, density] of [
    ['flip + take', 0.01],
    ['flip + take', 0.1],
    ['flip + take', 1],
    ['atomic swap', 0.01],
    ['atomic swap', 1],
  ] as const) {
    const w = await writers(fd, density);
    const samples: number[] = [];
    const copies: number[] = [];
    let bits = 0;
    for (let i = 0; i < 2 * (ITERATIONS + 3); i++) {
      await w.fill();
      const active = Number(header.getBigUint64(0, true));
      const half = new Uint8Array(bitmap.buffer, LAYOUT.offset(active), BYTES);
      if (i % 2 === 1) out.fill(0);
      const t0 = performance.now();
      if (i % 2 === 0) {
        out.set(half);
        if (i >= 6) copies.push(performance.now() - t0);
        half.fill(0); // (not timed: back to empty for the next fill)
        continue;
      }
      if (variant === 'flip + take') {
        header.setBigUint64(0, BigInt(1 - active), true);
        // (A real sync waits here for every writer's flush ack; the writers are idle between fills.)
        bits = native.bitmapTake(bitmap, LAYOUT.offset(active), BYTES, out);
      } else {
        bits = native.bitmapFetchClear(bitmap, LAYOUT.offset(active), BYTES, out);
      }
      if (i >= 6) samples.push(performance.now() - t0);
    }
    await w.stop();
    const s = summarize(samples);
    const c = summarize(copies);
    const ratio = c.median / s.median;
    results.push({
      name: `${variant} ${SIZE_NAME}, ${density * 100}% dirty, 4 writers`,
      unit: 'ms',
      ...s,
      iterations: samples.length,
      peer: { name: `memcpy of the same ${SIZE_NAME}`, median: c.median },
      ratio,
      goal: '>= 0.5 of memcpy',
      met: ratio >= 0.5,
      note: `${bits} bits per sync, ${Math.round(mbps(s.median))} MiB/s; memcpy ${Math.round(mbps(c.median))} MiB/s${variant === 'atomic swap' ? ' (the alternative, not what a sync does)' : ''}`,
    });
    results.push({
      name: `${variant} ${SIZE_NAME}, ${density * 100}% dirty: peer, memcpy of the same ${SIZE_NAME}`,
      series: 'memcpy (peer)',
      unit: 'ms',
      ...c,
      iterations: copies.length,
    });
  }
  native.munmap(bitmap);
  native.close(fd);
  report('dirty-sync', results, { bitmapBytes: BYTES, guestBytes: BYTES * 8 * 4096, writers: WRITERS });
}

runMain(main);
