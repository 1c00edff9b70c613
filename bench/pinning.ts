// Pinning: the vfio-like client's software backend ('soft': an IOVA table plus real mlock(2) pinning, for
// machines without an IOMMU) pinning a 4 GiB region, against a C program that mlocks the same memfd in the
// same run. Goals: at least 0.8 of C's rate, and the broker's event loop responsive meanwhile (its largest
// delay under 20 ms, measured with perf_hooks.monitorEventLoopDelay).
//
//   - ours: an embedded broker, an owner and a VfioSubscriber (backend soft, one device) in this one
//     process, so the subscriber's pinning shares the broker's event loop: the worst case. The time is
//     owner.addRegion() of 4 GiB at 4 GiB until its commit: the subscriber maps the region (four 1 GiB
//     mappings), pins it with mlock in 128 MiB pieces on libuv worker threads (its default), reports
//     progress, acks; then removeRegion() (munlock, munmap), timed apart.
//   - peer: bench/c/mlock.c, built here with the system cc, inheriting the same memfd: one mmap of 4 GiB
//     and one mlock of all of it (C's best case: one call, no pieces); then munlock + munmap.
// The memfd's pages are allocated once, by a first untimed C pass, so every timed pass populates page
// tables and locks, and none allocates. Rounds alternate C and ours. The kernel's view checks both: VmLck
// of this process after each add (and after each removal), and of the C process while it held the lock.
//
//   npm run bench:pinning -- [--rounds N] [--gib N] [--json]   (BENCH_ITERATIONS sets the default of --rounds;
//   --gib, 4 by default, the size pinned: a fraction such as 0.25 is for a short run)
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import { Broker } from '../broker/index.js';
import { OwnerClient, VfioSubscriber } from '../clients/index.js';
import { native } from '../native/index.js';
import { buildC, C_FLAGS, ccVersion, iterations, report, runMain, summarize, type Measurement } from './lib.js';
import { vmLckKiB } from '../testkit/procfs.js';

const { values } = parseArgs({
  options: {
    rounds: { type: 'string', default: String(iterations(5)) },
    gib: { type: 'string', default: '4' },
    json: { type: 'boolean', default: false },
  },
});
const ROUNDS = Number(values.rounds);
const GiB = 2 ** 30;
const SIZE = Number(values.gib) * GiB;
const SIZE_NAME = `${Number(values.gib)} GiB`;
const GPA = 4 * GiB;
const RATE_GOAL = 0.8;
const DELAY_GOAL_MS = 20;
const log = (s: string) => {
  if (!values.json) console.error(s);
};
const gibps = (ns: number) => SIZE / GiB / (ns / 1e9);

function runC(bin: string, fd: number, passes: number): { pin_ns: number[]; unpin_ns: number[]; vmlck_kb: number } {
  const r = spawnSync(bin, [String(SIZE), String(passes)], { stdio: ['ignore', 'pipe', 'pipe', fd], encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`mlock (C) failed: ${r.stderr}`);
  return JSON.parse(r.stdout) as { pin_ns: number[]; unpin_ns: number[]; vmlck_kb: number };
}

async function main(): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'mmb-bench-pinning-'));
  const bin = buildC('mlock', dir);
  const broker = new Broker({ spaces: ['vm0'], limits: { ackTimeoutMs: 120_000 } });
  const owner = await OwnerClient.attach(broker, { space: 'vm0', requestTimeoutMs: 120_000 });
  const b = await owner.createBacking(SIZE, 'bench-pin');
  const vfio = await VfioSubscriber.attach(broker, { space: 'vm0', name: 'vfio', backend: 'soft', devices: ['dev0'], requestTimeoutMs: 120_000 });
  const samples = {
    cPin: [] as number[],
    cUnpin: [] as number[],
    pin: [] as number[],
    unpin: [] as number[],
    delayMax: [] as number[],
    delayP99: [] as number[],
  };
  const checks: string[] = [];
  try {
    log(`allocating the ${SIZE_NAME} memfd's pages (an untimed C pass)`);
    runC(bin, b.fd, 1);
    const baseLck = vmLckKiB();
    for (let r = 0; r < ROUNDS; r++) {
      const c = runC(bin, b.fd, 1);
      if (c.vmlck_kb < SIZE / 1024) throw new Error(`the C program's VmLck was ${c.vmlck_kb} kB while it held ${SIZE_NAME} locked`);
      samples.cPin.push(...c.pin_ns);
      samples.cUnpin.push(...c.unpin_ns);

      const h = monitorEventLoopDelay({ resolution: 1 });
      h.enable();
      const t0 = process.hrtime.bigint();
      await owner.addRegion({ name: 'pinned', gpa: GPA, size: SIZE, backing: b.backing });
      const t1 = process.hrtime.bigint();
      h.disable();
      const locked = vmLckKiB() - baseLck;
      if (locked < SIZE / 1024) throw new Error(`VmLck grew by ${locked} kB after pinning ${SIZE_NAME}`);
      if (vfio.domain.pinnedBytes !== SIZE) throw new Error(`the vfio client says it pinned ${vfio.domain.pinnedBytes} bytes`);
      const t2 = process.hrtime.bigint();
      await owner.removeRegion('pinned');
      const t3 = process.hrtime.bigint();
      if (vmLckKiB() - baseLck > 0) throw new Error('VmLck did not fall back after the removal');
      samples.pin.push(Number(t1 - t0));
      samples.unpin.push(Number(t3 - t2));
      samples.delayMax.push(h.max / 1e6);
      samples.delayP99.push(h.percentile(99) / 1e6);
      log(
        `  round ${r + 1}: C ${gibps(c.pin_ns[0] as number).toFixed(2)} GiB/s, ours ${gibps(Number(t1 - t0)).toFixed(2)} GiB/s, event-loop delay max ${(h.max / 1e6).toFixed(1)} ms`,
      );
    }
    checks.push(
      `VmLck of this process grew by at least ${SIZE_NAME} after each add and fell back after each removal; the C program read VmLck >= ${SIZE_NAME} while it held the lock; the client reported ${SIZE_NAME} pinned`,
    );
  } finally {
    await vfio.close();
    owner.close();
    native.close(b.fd);
    await broker.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }

  const rate = (ns: number[]) => ns.map(gibps);
  const cRate = summarize(rate(samples.cPin), true);
  const ours = summarize(rate(samples.pin), true);
  const cUn = summarize(rate(samples.cUnpin), true);
  const un = summarize(rate(samples.unpin), true);
  const delay = summarize(samples.delayMax);
  const results: Measurement[] = [
    {
      name: `pin ${SIZE_NAME}: vfio-like client (soft backend), add to commit`,
      series: 'vfio-like client (soft)',
      unit: 'GiB/s',
      higherIsBetter: true,
      ...ours,
      iterations: samples.pin.length,
      peer: { name: 'C: mmap + one mlock of the same memfd', median: cRate.median },
      ratio: ours.median / cRate.median,
      goal: `>= ${RATE_GOAL} of C`,
      met: ours.median / cRate.median >= RATE_GOAL,
      note: `${((SIZE / GiB / ours.median) * 1000).toFixed(0)} ms per ${SIZE_NAME} (C: ${((SIZE / GiB / cRate.median) * 1000).toFixed(0)} ms); mlock in 128 MiB pieces on worker threads, plus the transaction`,
    },
    { name: `pin ${SIZE_NAME}: peer, C mmap + mlock`, series: 'C (peer)', unit: 'GiB/s', higherIsBetter: true, ...cRate, iterations: samples.cPin.length },
    {
      name: `unpin ${SIZE_NAME}: vfio-like client, remove to commit`,
      unit: 'GiB/s',
      higherIsBetter: true,
      ...un,
      iterations: samples.unpin.length,
      peer: { name: 'C: munlock + munmap', median: cUn.median },
      ratio: un.median / cUn.median,
    },
    {
      name: `unpin ${SIZE_NAME}: peer, C munlock + munmap`,
      series: 'C (peer), unpin',
      unit: 'GiB/s',
      higherIsBetter: true,
      ...cUn,
      iterations: samples.cUnpin.length,
    },
    {
      name: `broker's event loop: largest delay while pinning ${SIZE_NAME}`,
      unit: 'ms',
      ...delay,
      iterations: samples.delayMax.length,
      goal: `< ${DELAY_GOAL_MS} ms`,
      met: delay.p99 < DELAY_GOAL_MS,
      note: `perf_hooks.monitorEventLoopDelay (1 ms resolution) over each add, the broker and the pinning client in one process; median of the maxima ${delay.median.toFixed(1)} ms, the worst ${Math.max(...samples.delayMax).toFixed(1)} ms; p99 of the delays per add ${summarize(samples.delayP99).median.toFixed(1)} ms (median); goal judged on the worst`,
    },
  ];
  report('pinning', results, {
    size: SIZE,
    rounds: ROUNDS,
    backend: 'soft (mlock on libuv worker threads, 128 MiB pieces)',
    peer: `bench/c/mlock.c: mmap(MAP_SHARED) of the same memfd and one mlock() of ${SIZE_NAME}; ${ccVersion()} ${C_FLAGS.join(' ')}`,
    pages: 'allocated once before the timed passes (an untimed C pass): the timed passes populate page tables and lock',
    layout: 'broker, owner and vfio-like client in one process (embedded mode): pinning shares the broker event loop',
    rlimitMemlock: spawnSync('sh', ['-c', 'ulimit -l'], { encoding: 'utf8' }).stdout.trim(),
    checks,
  });
}

runMain(main);
