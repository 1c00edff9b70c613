// Translation: how many guest-physical-address lookups per second a device client does with 8, 512
// and 32,764 regions (32,764: KVM's slot limit), against the same lookup in C, built here with the system
// cc and run in the same run on the same CPU (bench/c/translate.c). Goal: within 3x of C.
//
// Both sides use one algorithm on one table: sorted region starts and ends in two flat arrays, the region
// of the last hit tried first, else a binary search; the whole range [gpa, gpa + 256) must lie inside the
// region found. Both draw the same addresses (xorshift32, the same seed; the C program's checksum of the
// addresses is compared with ours):
//   - random: each lookup in a random region (the last-hit cache rarely helps);
//   - local: 16 lookups in a row in one region (the buffers of one descriptor chain), then another.
// What each side returns:
//   - TypeScript, DeviceSubscriber.resolve(gpa, 256, out): the hot-path lookup, allocation-free: it points a
//     reused object at the region's mapping and the offset of gpa in it, the JavaScript form of a host
//     pointer. The goal is judged on it: it is the same lookup as C's;
//   - TypeScript, DeviceSubscriber.translate(gpa, 256): an iovec (an array of Uint8Array views into its own
//     MAP_SHARED mappings), which may span regions: what allocating the views costs on top, shown beside;
//   - TypeScript, GuestMemory.slice(gpa, 256): one new view, for a range known to lie in one region;
//   - C: a pointer (host address of gpa), from a computed table: nothing is mapped on the C side, and
//     neither side touches guest memory, so this measures the lookup, not the memory.
// The TypeScript regions are real: an embedded broker, an owner that adds the regions (64 KiB each, one
// every 128 KiB from 4 GiB, slices of one memfd) and a DeviceSubscriber in this process that mapped them.
//
// Each table size and pattern is measured in a fresh Node process, as the C peer runs each in a fresh
// process: V8 compiles the lookup loop for the pattern it has seen (profile-guided), and code compiled for
// random lookups, where the search is the common path, is slower for runs of 16 in one region (7 ns
// against 4 at 8 regions, on this machine) than code compiled for those runs. A back-end whose traffic
// changes pattern sees that until V8 recompiles; the C compiler's code has no profile to be wrong about.
//
// Every process is pinned to CPU 1 with taskset (CPU 0 takes the interrupts on these VMs). Each round runs
// both sides, C first; each pass looks up 1,048,576 addresses; the figure is lookups per second of CPU time
// (the C thread's CLOCK_THREAD_CPUTIME_ID, this process's getrusage), which a quiet machine makes equal to
// wall time and a busy one does not inflate for the longer passes.
//
//   npm run bench:translate -- [--rounds N] [--passes N] [--regions 8,512,32764] [--json]
//   (BENCH_ITERATIONS sets the default of --rounds)
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { Broker } from '../broker/index.js';
import { OwnerClient, DeviceSubscriber, type GuestPointer } from '../clients/index.js';
import { native } from '../native/index.js';
import { allCpus, buildC, C_FLAGS, ccVersion, iterations, pinSelf, report, runMain, summarize, type Measurement } from './lib.js';

const { values } = parseArgs({
  options: {
    rounds: { type: 'string', default: String(iterations(5)) },
    passes: { type: 'string', default: '4' },
    regions: { type: 'string', default: '8,512,32764' },
    json: { type: 'boolean', default: false },
    /** Internal: measure one table size and pattern ("COUNT:PATTERN") with the C peer at --c-bin, print its rows. */
    one: { type: 'string' },
    'c-bin': { type: 'string' },
  },
});
const ROUNDS = Number(values.rounds);
const PASSES = Number(values.passes);
const COUNTS = String(values.regions).split(',').map(Number);
const LOOKUPS = 1 << 20;
const SIZE = 64 << 10;
const STRIDE = 128 << 10;
const LEN = 256;
const BASE = 0x1_0000_0000;
const SEED = 0x2545f491;
const CPU = os.cpus().length > 1 ? '1' : '0';
const GOAL = 3;
const log = (s: string) => {
  if (!values.json) console.error(s);
};

type Pattern = 'random' | 'local';

/** The addresses bench/c/translate.c draws, drawn the same way, and its checksum of them. */
function addresses(count: number, pattern: Pattern): { gpas: Float64Array; checksum: bigint } {
  let seed = SEED;
  const next = () => {
    seed ^= seed << 13;
    seed >>>= 0;
    seed ^= seed >>> 17;
    seed ^= seed << 5;
    seed >>>= 0;
    return seed;
  };
  const slots = (SIZE - LEN) / 8;
  const gpas = new Float64Array(LOOKUPS);
  let region = 0;
  let checksum = 0n;
  for (let k = 0; k < LOOKUPS; k++) {
    if (pattern === 'random' || k % 16 === 0) region = next() % count;
    const gpa = BASE + region * STRIDE + (next() % slots) * 8;
    gpas[k] = gpa;
    checksum += BigInt(Math.floor(gpa / 8));
  }
  return { gpas, checksum };
}

function runC(bin: string, count: number, pattern: Pattern): { ns: number[]; gpa_checksum: number | bigint; misses: number } {
  const args = [String(count), String(SIZE), String(STRIDE), String(LOOKUPS), pattern, String(SEED), String(PASSES), String(LEN)];
  const r = spawnSync('taskset', ['-c', CPU, bin, ...args], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`translate (C) failed: ${r.stderr}`);
  // gpa_checksum may exceed 2^53: keep it exact.
  const j = JSON.parse(r.stdout.replace(/"gpa_checksum":(\d+)/, '"gpa_checksum":"$1"')) as { ns: number[]; gpa_checksum: string; misses: number };
  return { ...j, gpa_checksum: BigInt(j.gpa_checksum) };
}

/** CPU time of this process in nanoseconds (getrusage: every thread, accurate to the microsecond). */
function cpuNow(): number {
  const u = process.cpuUsage();
  return (u.user + u.system) * 1000;
}

/**
 * Times one pass of lookups (`loop` runs them all and returns a checksum); returns nanoseconds of CPU
 * time. The C peer times its passes in its thread's CPU time as well: on a shared machine a pass that is
 * preempted does not count the other process's turn against either side. After the warm-up nothing else
 * in this process runs during a pass (the loop allocates nothing, so no collector thread wakes up).
 */
function pass(gpas: Float64Array, loop: (gpas: Float64Array) => number): { ns: number; sum: number } {
  const t0 = cpuNow();
  const sum = loop(gpas);
  return { ns: cpuNow() - t0, sum };
}

interface Space {
  broker: Broker;
  owner: OwnerClient;
  vhost: DeviceSubscriber;
  fd: number;
}

/** An embedded broker whose owner added `count` regions, and a DeviceSubscriber that mapped them. */
async function space(count: number): Promise<Space> {
  const broker = new Broker({ spaces: ['vm0'], limits: { ackTimeoutMs: 120_000 } });
  const owner = await OwnerClient.attach(broker, { space: 'vm0', requestTimeoutMs: 120_000 });
  const b = await owner.createBacking(count * SIZE, 'bench-translate');
  const vhost = await DeviceSubscriber.attach(broker, { space: 'vm0', name: 'vhost', requestTimeoutMs: 120_000 });
  for (let i = 0; i < count; i += 4096) {
    const ops = [];
    for (let j = i; j < Math.min(count, i + 4096); j++)
      ops.push({ op: 'add' as const, name: `r${j}`, gpa: BASE + j * STRIDE, size: SIZE, backing: b.backing, offset: j * SIZE });
    await owner.commit(ops);
  }
  if (vhost.memory.regions().length !== count) throw new Error(`the vhost client mapped ${vhost.memory.regions().length} regions, not ${count}`);
  return { broker, owner, vhost, fd: b.fd };
}

async function close(s: Space): Promise<void> {
  await s.vhost.close();
  s.owner.close();
  native.close(s.fd);
  await s.broker.close();
}

/** The rows of one table size and pattern, measured in this process (a fresh one: see the top). */
async function measure(bin: string, count: number, pattern: Pattern): Promise<Measurement[]> {
  const rows: Measurement[] = [];
  const s = await space(count);
  try {
    pinSelf(CPU);
    const { gpas, checksum } = addresses(count, pattern);
    const mem = s.vhost.memory;
    const vhost = s.vhost;
    const out: GuestPointer = { bytes: new Uint8Array(0), offset: 0 };
    // Each contender has its own loop, as the C program's lookup is compiled into its loop: one loop
    // calling three different functions would make its call site megamorphic, and V8 would inline none.
    const contenders = {
      // The C loop's body: a hit adds to a checksum, a miss is counted (a miss makes the result NaN). Not
      // `sum += hit ? out.offset : NaN`: V8 compiles that select into the loop as work C's loop does not
      // do, about 0.7 ns a lookup at 8 regions in the local pattern (a quarter of the lookup), measured.
      resolve: (a: Float64Array) => {
        let sum = 0;
        let misses = 0;
        for (let k = 0; k < a.length; k++) {
          if (vhost.resolve(a[k] as number, LEN, out)) sum += out.offset;
          else misses++;
        }
        return misses === 0 ? sum : NaN;
      },
      translate: (a: Float64Array) => {
        let sum = 0;
        for (let k = 0; k < a.length; k++) sum += (vhost.translate(a[k] as number, LEN)[0] as Uint8Array).byteOffset;
        return sum;
      },
      slice: (a: Float64Array) => {
        let sum = 0;
        for (let k = 0; k < a.length; k++) sum += mem.slice(a[k] as number, LEN).byteOffset;
        return sum;
      },
    };
    const samples = { c: [] as number[], resolve: [] as number[], translate: [] as number[], slice: [] as number[] };
    // Warm-up: V8 compiles the lookup path.
    for (const fn of Object.values(contenders)) for (let i = 0; i < 3; i++) pass(gpas, fn);
    for (let r = 0; r < ROUNDS; r++) {
      const c = runC(bin, count, pattern);
      if (c.gpa_checksum !== checksum) throw new Error(`the C program looked up other addresses (checksum ${c.gpa_checksum}, ours ${checksum})`);
      if (c.misses !== 0) throw new Error(`the C program missed ${c.misses} lookups`);
      samples.c.push(...c.ns.map((ns) => LOOKUPS / (ns / 1e9)));
      for (const [name, fn] of Object.entries(contenders) as [keyof typeof contenders, (a: Float64Array) => number][]) {
        for (let p = 0; p < PASSES; p++) {
          const r = pass(gpas, fn);
          // Every lookup found its region (one false from resolve() makes the sum NaN): no fast failures.
          if (Number.isNaN(r.sum)) throw new Error(`${name}() missed a lookup`);
          samples[name].push(LOOKUPS / (r.ns / 1e9));
        }
      }
    }
    const c = summarize(samples.c, true);
    rows.push({
      name: `${count} regions, ${pattern}: peer, C lookup`,
      series: `C (peer), ${pattern}`,
      x: count,
      unit: 'lookups/s',
      higherIsBetter: true,
      ...c,
      iterations: samples.c.length,
    });
    const LABEL = {
      resolve: 'DeviceSubscriber.resolve() (no allocation)',
      translate: 'DeviceSubscriber.translate() (iovec)',
      slice: 'GuestMemory.slice() (one view)',
    } as const;
    for (const name of ['resolve', 'translate', 'slice'] as const) {
      const s2 = summarize(samples[name], true);
      const ratio = c.median / s2.median;
      rows.push({
        name: `${count} regions, ${pattern}: ${LABEL[name]}`,
        series: `${name}(), ${pattern}`,
        x: count,
        unit: 'lookups/s',
        higherIsBetter: true,
        ...s2,
        iterations: samples[name].length,
        peer: { name: 'C lookup, same table and addresses', median: c.median },
        ratio,
        // The goal is judged on the lookup that returns what C's returns (where the bytes are), without
        // allocating; translate() and slice() show what building views costs on top.
        ...(name === 'resolve' ? { goal: `within ${GOAL}x of C`, met: ratio <= GOAL } : {}),
        note: `C is ${ratio.toFixed(2)}x as fast`,
      });
    }
  } finally {
    pinSelf(allCpus());
    await close(s);
  }
  return rows;
}

/** `measure()` in a fresh Node process (this script with --one). */
function measureApart(bin: string, count: number, pattern: Pattern): Measurement[] {
  const r = spawnSync(
    process.execPath,
    [process.argv[1] as string, '--one', `${count}:${pattern}`, '--c-bin', bin, '--rounds', String(ROUNDS), '--passes', String(PASSES)],
    {
      encoding: 'utf8',
      stdio: ['ignore', 'pipe', 'inherit'],
      maxBuffer: 1 << 24,
    },
  );
  if (r.status !== 0) throw new Error(`measuring ${count} regions, ${pattern} failed (${r.status ?? r.signal})`);
  return JSON.parse(r.stdout) as Measurement[];
}

async function main(): Promise<void> {
  if (values.one !== undefined) {
    const [count, pattern] = values.one.split(':');
    process.stdout.write(JSON.stringify(await measure(values['c-bin'] as string, Number(count), pattern as Pattern)));
    return;
  }
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'mmb-bench-translate-'));
  const bin = buildC('translate', dir);
  const rows: Measurement[] = [];
  try {
    for (const count of COUNTS) {
      for (const pattern of ['random', 'local'] as const) {
        const got = measureApart(bin, count, pattern);
        const M = (name: string) => `${((got.find((m) => m.series === name)?.median ?? NaN) / 1e6).toFixed(1)}M`;
        log(
          `${count} regions, ${pattern}: C ${M(`C (peer), ${pattern}`)}/s, resolve() ${M(`resolve(), ${pattern}`)}/s, translate() ${M(`translate(), ${pattern}`)}/s, slice() ${M(`slice(), ${pattern}`)}/s`,
        );
        rows.push(...got);
      }
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
  report('translate', rows, {
    lookupsPerPass: LOOKUPS,
    passesPerRound: PASSES,
    rounds: ROUNDS,
    regionLayout: `${SIZE >> 10} KiB regions, one every ${STRIDE >> 10} KiB from 0x${BASE.toString(16)}, slices of one memfd`,
    lookupLength: LEN,
    pinning: `every process on CPU ${CPU} (taskset)`,
    processes:
      'each table size and pattern in a fresh Node process (the C peer: a fresh process per pass set), so V8 compiles the loop for the pattern it measures',
    clock: 'CPU time of each pass (C: CLOCK_THREAD_CPUTIME_ID; TypeScript: getrusage of its process, nothing else running in it during a pass)',
    ratio: 'C lookups per second / ours (the goal: at most 3)',
    cSide: 'bench/c/translate.c: the same last-hit + binary search over flat start/end arrays, returning a pointer; nothing mapped or dereferenced',
    goalJudgedOn:
      'resolve(): the same lookup as C, returning where the bytes are (view + offset) without allocating; translate() (an iovec of new views) and slice() (one new view) are shown beside it',
    cc: `${ccVersion()} ${C_FLAGS.join(' ')}`,
  });
}

runMain(main);
