// Migration of 4 GiB to another broker over TCP (loopback), while a guest process keeps dirtying memory:
// the bytes sent against the guest's memory, the downtime, and the first copy's throughput against a
// raw copy of the same bytes over the same loopback in the same run.
//
//   - source (this process, as a VMM that embeds the broker): an embedded broker, the owner, a reader
//     subscriber and the migration engine (migrateTo); one 4 GiB region whose every page holds data;
//   - guest: bench/fixtures/dirtier.ts, a subscriber process writing random pages at a steady rate of 1% of
//     guest memory per raw-copy time of the 4 GiB (measured first, in the same run): about 1% of memory
//     per round 0, less in the shorter rounds after it, as a guest with a steady dirty rate; it stops while
//     paused;
//   - destination ("another host"): `mmbroker serve` (its spaces unpublished) and `mmbroker receive` in
//     their own processes, fresh for every run (a run's 4 GiB copy goes with its broker);
//   - peer: bench/c/rawcopy.c, built here with the system cc: the same memfd (inherited) write()n over a
//     loopback TCP connection in 1 MiB calls to a C listener that read()s straight into a 4 GiB memfd
//     mapping, as `cat FILE > /dev/tcp/...` into a listener keeping the bytes in memory; timed from
//     connect to the listener's one-byte answer after the last byte. The two alternate: the raw copy
//     first in even runs, last in odd ones. The goal is against this peer (it does the receiving side's
//     job: the bytes end up in memory); the same C pair with a listener that discards what it reads (the
//     transport alone) is measured too, for the record.
//
// Stop policy (the engine's defaults but the threshold): iterate until a round leaves at most 1 MiB
// dirty, or the dirty set stops shrinking (a round at least 90% of the previous one, from round 3 on), or
// 30 rounds; then pause. Downtime: from PAUSE until the receiver acknowledged the last byte (SYNCED),
// verification excluded; the engine has the receiver catch up (a SYNC) before it pauses. The copy is
// verified (1 MiB block digests on both sides) in the first run only: it takes longer than the rest.
//
//   npm run bench:migration -- [--runs N] [--mib N] [--json]   (BENCH_ITERATIONS sets the default of --runs;
//   --mib the guest memory, 4096 by default: less is for a short run, test/bench.test.ts)
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { parseArgs } from 'node:util';
import { Broker } from '../broker/index.js';
import { MappingSubscriber, OwnerClient } from '../clients/index.js';
import { migrateTo, type MigrateToResult } from '../clients/migration/index.js';
import { constants, native } from '../native/index.js';
import { spawnFixture } from './procs.js';
import { buildC, C_FLAGS, ccVersion, iterations, report, rootDir, runMain, summarize, type Measurement } from './lib.js';

const { values } = parseArgs({
  options: { runs: { type: 'string', default: String(iterations(3)) }, mib: { type: 'string', default: '4096' }, json: { type: 'boolean', default: false } },
});
const RUNS = Number(values.runs);
const GiB = 2 ** 30;
const SIZE = Number(values.mib) * 2 ** 20;
/** How the figures name the guest's memory. */
const SIZE_NAME = SIZE >= GiB ? `${SIZE / GiB} GiB` : `${SIZE / 2 ** 20} MiB`;
const PAGES = SIZE / 4096;
const STOP_BYTES = 1 << 20;
const GOALS = { bytes: 1.1, downtimeMs: 50, throughput: 0.7 };
const log = (s: string) => {
  if (!values.json) console.error(s);
};
const CLI = path.join(rootDir(), 'dist', 'cli', 'mmbroker.js');

/** A process printing lines; `line(pred)` waits for one that matches (JSON parsed when it parses). */
function proc(argv: string[], opts: { fds?: number[] } = {}) {
  const p: ChildProcess = spawn(argv[0] as string, argv.slice(1), { stdio: ['ignore', 'pipe', 'pipe', ...(opts.fds ?? [])] });
  const lines: unknown[] = [];
  const waiters: (() => void)[] = [];
  let stderr = '';
  p.stderr?.setEncoding('utf8').on('data', (d: string) => (stderr = (stderr + d).slice(-4000)));
  readline.createInterface({ input: p.stdout! }).on('line', (l) => {
    let v: unknown = l;
    try {
      v = JSON.parse(l);
    } catch {
      // a plain line
    }
    lines.push(v);
    for (const w of waiters.splice(0)) w();
  });
  const exited = new Promise<number | null>((r) =>
    p.once('exit', (code) => {
      for (const w of waiters.splice(0)) w();
      r(code);
    }),
  );
  return {
    p,
    exited,
    async line<T>(pred: (v: unknown) => boolean): Promise<T> {
      for (;;) {
        const i = lines.findIndex(pred);
        if (i >= 0) return lines.splice(i, 1)[0] as T;
        if (p.exitCode !== null) throw new Error(`${argv.slice(0, 3).join(' ')} exited (${p.exitCode}): ${stderr}`);
        await new Promise<void>((r) => waiters.push(r));
      }
    },
    stop: async () => {
      if (p.exitCode === null && p.signalCode === null) p.kill('SIGTERM');
      await exited;
    },
  };
}

/** One raw copy of the whole memfd over loopback, C to C; nanoseconds from connect to the receiver's answer. */
async function rawCopy(bin: string, fd: number, discard = false): Promise<number> {
  const recv = proc([bin, 'recv', String(SIZE), ...(discard ? ['discard'] : [])]);
  const { port } = await recv.line<{ port: number }>((v) => typeof (v as { port?: unknown }).port === 'number');
  const send = proc([bin, 'send', String(port), String(SIZE)], { fds: [fd] });
  const sent = await send.line<{ bytes: number; ns: number }>((v) => typeof (v as { ns?: unknown }).ns === 'number');
  await recv.line((v) => typeof (v as { ns?: unknown }).ns === 'number');
  await Promise.all([send.exited, recv.exited]);
  if (sent.bytes !== SIZE) throw new Error(`the raw copy sent ${sent.bytes} bytes`);
  return sent.ns;
}

/** Fills every page of the memfd with data (distinct per page), so round 0 copies all of it. */
function fill(fd: number): void {
  for (const m of native.mmapChunked(fd, 0, SIZE, constants.PROT_READ | constants.PROT_WRITE, constants.MAP_SHARED, GiB)) {
    const w = new Uint32Array(m.buffer);
    for (let i = 0; i < w.length; i += 1024) w.fill(0x9e3779b9 ^ i, i, i + 1024);
    native.munmap(m);
  }
}

interface Run {
  result: MigrateToResult;
  rawNs: number;
  discardNs: number;
  dirtied: number;
  round0GiBps: number;
}

async function main(): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'mmb-bench-migration-'));
  const bin = buildC('rawcopy', dir);
  const tokenFile = path.join(dir, 'token');
  const token = 'bench-migration-token-0123456789';
  fs.writeFileSync(tokenFile, `${token}\n`, { mode: 0o600 });
  const socket = path.join(dir, 'src.sock');
  const broker = new Broker({ spaces: ['vm0'], limits: { ackTimeoutMs: 120_000 } });
  broker.listen(socket);
  const owner = await OwnerClient.attach(broker, { space: 'vm0', requestTimeoutMs: 600_000 });
  const ram = await owner.createBacking(SIZE, 'ram');
  log(`filling ${SIZE_NAME} of guest memory`);
  fill(ram.fd);
  await owner.addRegion({ name: 'ram', gpa: 0, size: SIZE, backing: ram.backing });
  const reader = await MappingSubscriber.attach(broker, {
    space: 'vm0',
    name: 'migration-reader',
    kind: 'migration',
    writes: false,
    requestTimeoutMs: 600_000,
  });
  const guest = spawnFixture('dirtier', [socket, 'vm0']);
  await guest.next('ready');
  const runs: Run[] = [];
  let ratePages = 0;
  try {
    for (let run = 0; run < RUNS; run++) {
      // The contenders alternate: the raw copy first in even runs, after the migration in odd ones.
      let rawNs = 0;
      let discardNs = 0;
      const peers = async () => {
        log(`run ${run + 1}/${RUNS}: raw copies (C, loopback), into memory and discarded`);
        rawNs = await rawCopy(bin, ram.fd);
        discardNs = await rawCopy(bin, ram.fd, true);
      };
      if (run % 2 === 0) await peers();
      if (run === 0) ratePages = Math.round((0.01 * PAGES) / (rawNs / 1e9));
      await guest.request({ cmd: 'rate', pages: ratePages }, 'rate');
      const before = (await guest.request<{ pages: number }>({ cmd: 'stats' }, 'stats')).pages;

      const dstSock = path.join(dir, `dst${run}.sock`);
      const serve = proc([process.execPath, CLI, 'serve', '--socket', dstSock, '--space', 'vm1', '--ack-timeout', '120000', '--log-level', 'info']);
      await serve.line((v) => typeof v === 'object' && v !== null && (v as { msg?: string }).msg === 'listening');
      const recv = proc([
        process.execPath,
        CLI,
        'receive',
        '--listen',
        '127.0.0.1:0',
        '--space',
        'vm1',
        '--socket',
        dstSock,
        '--token-file',
        tokenFile,
        '--json',
      ]);
      const { port } = await recv.line<{ port: number }>((v) => (v as { event?: string }).event === 'listening');
      log(`run ${run + 1}/${RUNS}: migration of ${SIZE_NAME} to mmbroker receive on port ${port}, the guest dirtying ${ratePages} pages/s`);
      const result = await migrateTo(`tcp://127.0.0.1:${port}`, {
        owner,
        reader,
        token,
        stopBytes: STOP_BYTES,
        maxRounds: 30,
        verify: run === 0,
        replyTimeoutMs: 600_000,
        onProgress: (p) => log(`  round ${p.round} ${p.phase}: ${(p.bytes / 2 ** 20).toFixed(1)} MiB in ${p.ms} ms`),
      });
      const dirtied = (await guest.request<{ pages: number }>({ cmd: 'stats' }, 'stats')).pages - before;
      await guest.request({ cmd: 'rate', pages: 0 }, 'rate');
      if ((await recv.exited) !== 0) throw new Error('mmbroker receive failed');
      if (run === 0 && result.verified !== true) throw new Error(`verification failed: ${result.verification?.difference}`);
      await serve.stop();
      if (rawNs === 0) await peers();
      const r0 = result.rounds[0];
      runs.push({ result, rawNs, discardNs, dirtied, round0GiBps: (r0?.bytes ?? 0) / GiB / ((r0?.ms ?? 1) / 1000) });
      log(
        `  ${result.rounds.length} rounds, ${(result.totalBytes / SIZE).toFixed(3)}x memory sent, downtime ${result.downtimeMs} ms, round 0 ${runs.at(-1)?.round0GiBps.toFixed(2)} GiB/s, raw copy ${(SIZE / GiB / (rawNs / 1e9)).toFixed(2)} GiB/s`,
      );
    }
  } finally {
    await guest.stop('end-stdin');
    await reader.close();
    owner.close();
    native.close(ram.fd);
    await broker.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }

  const m = (name: string, unit: string, samples: number[], extra: Partial<Measurement> = {}): Measurement => ({
    name,
    unit,
    ...summarize(samples, extra.higherIsBetter ?? false),
    iterations: samples.length,
    ...extra,
  });
  const bytesX = runs.map((r) => r.result.totalBytes / SIZE);
  const downtime = runs.map((r) => r.result.downtimeMs);
  const ours = runs.map((r) => r.round0GiBps);
  const raw = runs.map((r) => SIZE / GiB / (r.rawNs / 1e9));
  const oursMedian = summarize(ours, true).median;
  const rawMedian = summarize(raw, true).median;
  const bytesMedian = summarize(bytesX).median;
  const downMedian = summarize(downtime).median;
  const stops = runs.map((r) => r.result.stopReason);
  report(
    'migration',
    [
      m(`bytes sent / guest memory (${SIZE_NAME})`, 'x', bytesX, {
        goal: `<= ${GOALS.bytes}x`,
        met: bytesMedian <= GOALS.bytes,
        note: `rounds per run (incl. round 0 and the paused one): ${runs.map((r) => r.result.rounds.length).join(', ')}; stopped: ${stops.join(', ')}`,
      }),
      m('downtime: PAUSE until the receiver acknowledged the last byte', 'ms', downtime, {
        goal: `< ${GOALS.downtimeMs} ms`,
        met: downMedian < GOALS.downtimeMs,
        note: `verification excluded; pages copied while paused per run: ${runs.map((r) => r.result.rounds.at(-1)?.pages ?? 0).join(', ')}`,
      }),
      m('first copy (round 0) over TCP into mmbroker receive', 'GiB/s', ours, {
        higherIsBetter: true,
        peer: { name: 'C write() to a C read() into a memfd, same loopback', median: rawMedian },
        ratio: oursMedian / rawMedian,
        goal: `>= ${GOALS.throughput} of the raw copy`,
        met: oursMedian / rawMedian >= GOALS.throughput,
        note: `per run, ours / raw: ${runs.map((r, i) => `${r.round0GiBps.toFixed(2)} / ${raw[i]?.toFixed(2)}`).join('; ')}`,
      }),
      m('raw copy (peer): C write() to a C read() into a memfd, same loopback', 'GiB/s', raw, { higherIsBetter: true, series: 'raw copy (peer)' }),
      m(
        'raw copy with a listener that discards (the transport alone)',
        'GiB/s',
        runs.map((r) => SIZE / GiB / (r.discardNs / 1e9)),
        {
          higherIsBetter: true,
          note: `not a goal: the bytes end up nowhere; ours against it: ${(
            oursMedian /
            summarize(
              runs.map((r) => SIZE / GiB / (r.discardNs / 1e9)),
              true,
            ).median
          ).toFixed(2)}`,
        },
      ),
      m(
        'whole migration',
        'ms',
        runs.map((r) => r.result.ms),
      ),
      m(
        'writers paused (verification included in the first run)',
        'ms',
        runs.map((r) => r.result.pausedMs),
      ),
      m(
        'pages the guest dirtied during the migration',
        'pages',
        runs.map((r) => r.dirtied),
      ),
    ],
    {
      guestBytes: SIZE,
      transport: 'TCP over loopback: migrateTo() in this process (embedded source broker) to `mmbroker receive` into a `mmbroker serve` process',
      dirtyRate: `1% of guest memory per raw-copy time of it: ${ratePages} pages/s, random pages, stopped while paused`,
      stopPolicy: `iterate until a round leaves <= ${STOP_BYTES} bytes dirty, or the dirty set stops shrinking (>= 90% of the previous round, from round 3), or 30 rounds; then pause`,
      verifiedFirstRun: runs[0]?.result.verified ?? false,
      cc: `${ccVersion()} ${C_FLAGS.join(' ')}`,
    },
  );
}

runMain(main);
