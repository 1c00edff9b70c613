// Scale: an address space of 65,536 regions, twice KVM's 32,764 slots (and type1's 65,535 DMA mappings).
//   - snapshot: a new subscriber process attaches to the 65,536-region space: from its connect() to its
//     initial sync received, applied and acked (its own clock; each sample a fresh process). Goal: under
//     100 ms. Processes that negotiate COMPACT_SYNC (the library's default: the sync's regions as columns)
//     alternate with processes that do not (the plain form, one msgpack map per region), in the same run.
//   - resync after a broker restart: a subscriber process holding the 65,536 regions keeps them while the
//     broker restarts (its spaces unpublished), the owner rebuilds the map and publishes it; from the
//     PUBLISH request to the subscriber having reconciled the snapshot by key (nothing to remap) and acked,
//     on the machine's monotonic clock (process.hrtime in both processes). Goal: under 100 ms. Compact and
//     plain alternate as above; each sample is a broker restart.
//   - one more add: owner.commit([add]) + removeRegion() round trips that take a map from 65,535 to 65,536
//     regions and back, against the same from 15 to 16 regions in a second address space of the same
//     broker, in the same run; rounds alternate between the two. Goal: the add at 65,536 under 2x the add
//     at 16.
//   - broker memory per region: the V8 heap of this process (after a full gc(); node --expose-gc) and its
//     RSS, at 16 regions and at 65,536, divided by the 65,520 regions added. This process is the broker
//     (embedded) and an owner that keeps nothing per region; the subscriber is another process. Goal: the
//     heap under 256 bytes per region.
//
// The subscriber processes (bench/fixtures/subscriber.ts, 'record' mode) follow the map and ack every
// change without mapping anything: 65,536 mappings would exceed the kernel's vm.max_map_count (65,530 by
// default) for one process. When the machine allows more, a mapping subscriber's snapshot is measured too.
// Regions are 4 KiB each, one every 8 KiB from 4 GiB, slices of one memfd; added 4,096 per commit.
// Checked: the broker's status counts 65,536 regions, every subscriber process reports it holds them all
// and acked the last generation.
//
//   npm run bench:scale -- [--iterations N] [--snapshots N] [--restarts N] [--regions N] [--warmup N] [--json]
//   (--regions below 65,536, a multiple of 4,096, is for a short run: test/bench.test.ts)
//   (BENCH_ITERATIONS sets the default of --iterations)
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import v8 from 'node:v8';
import { Broker } from '../broker/index.js';
import { OwnerClient } from '../clients/index.js';
import { DEFAULT_PROTOCOL_LIMITS, encodeFrame, Msg, type CommitOp } from '../protocol/index.js';
import { compactSyncPart, splitSync } from '../broker/sync.js';
import { native } from '../native/index.js';
import { iterations, report, runMain, summarize, type Measurement } from './lib.js';
import { spawnFixture, spawnSubscribers, statsOf, stopAll } from './procs.js';

// The heap figure needs gc(): re-run this script under node --expose-gc when it was started without.
const gc = (globalThis as { gc?: () => void }).gc;
if (!gc) {
  const r = spawnSync(process.execPath, ['--expose-gc', ...process.execArgv, ...process.argv.slice(1)], { stdio: 'inherit' });
  process.exit(r.status ?? 1);
}

const { values } = parseArgs({
  options: {
    iterations: { type: 'string', default: String(iterations(300)) },
    snapshots: { type: 'string', default: '7' },
    restarts: { type: 'string', default: '3' },
    regions: { type: 'string', default: '65536' },
    warmup: { type: 'string', default: '1000' },
    json: { type: 'boolean', default: false },
  },
});
const ITER = Number(values.iterations);
const SNAPSHOTS = Number(values.snapshots);
const RESTARTS = Number(values.restarts);
const WARMUP = Number(values.warmup);
const REGIONS = Number(values.regions);
const SMALL = 16;
const PAGE = 4096;
const STRIDE = 8192;
const BASE = 0x1_0000_0000;
const BIG = 'vm0';
const SMALL_SPACE = 'small';
const ROUNDS = 3;
const log = (s: string) => {
  if (!values.json) console.error(s);
};

const regionAt = (i: number, backing: number): CommitOp => ({ op: 'add', name: `r${i}`, gpa: BASE + i * STRIDE, size: PAGE, backing, offset: i * PAGE });

/** Adds regions [from, to) in commits of 4,096. */
async function fill(owner: OwnerClient, backing: number, from: number, to: number): Promise<void> {
  for (let i = from; i < to; i += 4096) {
    const ops: CommitOp[] = [];
    for (let j = i; j < Math.min(to, i + 4096); j++) ops.push(regionAt(j, backing));
    await owner.commit(ops);
  }
}

/** Round trips of adding region `index` and removing it again: microseconds of each. */
async function oneMore(owner: OwnerClient, backing: number, index: number, n: number, warmup: number): Promise<{ add: number[]; rem: number[] }> {
  const out = { add: [] as number[], rem: [] as number[] };
  const op = regionAt(index, backing);
  for (let i = -warmup; i < n; i++) {
    const t0 = process.hrtime.bigint();
    await owner.commit([op]);
    const t1 = process.hrtime.bigint();
    await owner.removeRegion(`r${index}`);
    const t2 = process.hrtime.bigint();
    if (i >= 0) {
      out.add.push(Number(t1 - t0) / 1000);
      out.rem.push(Number(t2 - t1) / 1000);
    }
  }
  return out;
}

function memory(): { heap: number; rss: number } {
  for (let i = 0; i < 3; i++) gc!();
  return { heap: v8.getHeapStatistics().used_heap_size, rss: process.memoryUsage().rss };
}

type Form = 'compact' | 'plain';
const FORMS: readonly Form[] = ['compact', 'plain'];
const formArgs = (form: Form) => (form === 'plain' ? ['plain'] : []);

/**
 * Fresh subscriber processes attaching one after the other, the two forms alternating: each one's
 * connect-to-synced time, its CPU time meanwhile, and its GC share.
 */
async function snapshots(
  socket: string,
  mode: 'map' | 'record',
  n: number,
  forms: readonly Form[] = FORMS,
): Promise<Record<Form, { ms: number[]; cpuMs: number[]; gcMs: number[] }>> {
  const out = {
    compact: { ms: [] as number[], cpuMs: [] as number[], gcMs: [] as number[] },
    plain: { ms: [] as number[], cpuMs: [] as number[], gcMs: [] as number[] },
  };
  for (let i = 0; i < n; i++) {
    for (const form of forms) {
      const child = spawnFixture('subscriber', [socket, BIG, `snapshot-${mode}-${form}-${i}`, mode, ...formArgs(form)], {
        name: `${mode} subscriber (${form})`,
      });
      try {
        const ready = await child.next<{ attachMs: number; cpuMs: number; gcMs: number }>('ready', () => true, 3_600_000);
        const [st] = await statsOf([child]);
        if (st?.regions !== REGIONS) throw new Error(`the new subscriber holds ${st?.regions} regions, not ${REGIONS}`);
        out[form].ms.push(ready.attachMs);
        out[form].cpuMs.push(ready.cpuMs);
        out[form].gcMs.push(ready.gcMs);
      } finally {
        await stopAll([child]);
      }
    }
  }
  return out;
}

/** The broker of this benchmark: embedded, the request rate limit raised; `published: false` as after a restart. */
function newBroker(socket: string, spaces: string[], published = true): Broker {
  const broker = new Broker({ spaces, published, limits: { ackTimeoutMs: 60_000 }, connection: { requestsPerSecond: 1e9, requestBurst: 1e9 } });
  broker.listen(socket);
  return broker;
}

/**
 * A subscriber process of `form` following the full map; the broker restarts under it, the owner rebuilds
 * the map from the same memfd and publishes: milliseconds from the PUBLISH request to the subscriber's
 * resync applied and acked, and the subscriber's CPU time from being told to wait to then. Returns the
 * restarted broker and its owner.
 */
async function restartResync(socket: string, state: { broker: Broker; owner: OwnerClient }, fd: number, form: Form): Promise<{ ms: number; cpuMs: number }> {
  const child = spawnFixture('subscriber', [socket, BIG, `resync-${form}`, 'record', ...formArgs(form), 'reconnect'], { name: `resync subscriber (${form})` });
  try {
    await child.next('ready', () => true, 600_000);
    state.owner.close();
    await state.broker.close();
    state.broker = newBroker(socket, [BIG], false);
    await child.next('waiting', () => true, 60_000);
    state.owner = await OwnerClient.attach(state.broker, { space: BIG, requestTimeoutMs: 120_000 });
    const b = await state.owner.addBacking(fd, 'bench-scale');
    await fill(state.owner, b.backing, 0, REGIONS);
    const t0 = process.hrtime.bigint();
    await state.owner.publish();
    const synced = await child.next<{ at: string; cpuMs: number; mode: string; regions: number }>('synced', () => true, 600_000);
    if (synced.mode !== 'snapshot' || synced.regions !== REGIONS) throw new Error(`unexpected resync: ${JSON.stringify(synced)}`);
    const st = state.broker.status(BIG).spaces[0]!;
    const client = st.clients.find((c) => c.name === `resync-${form}`);
    if (client?.ackedGeneration !== st.generation) throw new Error(`the resynced subscriber acked generation ${client?.ackedGeneration}, not ${st.generation}`);
    return { ms: Number(BigInt(synced.at) - t0) / 1e6, cpuMs: synced.cpuMs };
  } finally {
    await stopAll([child]);
  }
}

/** The EV_SYNC frames a new subscriber of `space` is sent now, split as the broker splits them, and their bytes in both forms. */
function syncWire(broker: Broker, space: string): { frames: number; bytes: number; compactBytes: number } {
  const st = broker.status(space).spaces[0]!;
  const limit = DEFAULT_PROTOCOL_LIMITS.maxFrameBytes;
  const parts = splitSync(st.regions, [], limit);
  const message = (part: (typeof parts)[number]) => ({ t: Msg.EV_SYNC, seq: 1, epoch: st.epoch, generation: st.generation, mode: 'snapshot', ...part });
  const bytes = parts.reduce((n, part) => n + encodeFrame(message(part), 0, limit).length, 0);
  const compactBytes = parts.reduce((n, part) => n + encodeFrame(compactSyncPart(message(part)), 0, limit).length, 0);
  return { frames: parts.length, bytes, compactBytes };
}

async function main(): Promise<void> {
  const maxMapCount = Number(fs.readFileSync('/proc/sys/vm/max_map_count', 'utf8'));
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'mmb-bench-scale-'));
  const socket = path.join(dir, 'broker.sock');
  // One EV_SYNC frame holds about 5,000 regions at the default 1 MiB frame limit: a 65,536-region sync
  // is 14 frames. The request rate limit is raised (the round trips are faster than its default).
  const state = { broker: newBroker(socket, [BIG, SMALL_SPACE]), owner: undefined as unknown as OwnerClient };
  const big = await OwnerClient.attach(state.broker, { space: BIG, requestTimeoutMs: 120_000 });
  state.owner = big;
  const small = await OwnerClient.attach(state.broker, { space: SMALL_SPACE, requestTimeoutMs: 120_000 });
  const bb = await big.createBacking(REGIONS * PAGE, 'bench-scale');
  const sb = await small.createBacking(SMALL * PAGE, 'bench-scale-small');
  native.close(sb.fd);
  const subs = [...(await spawnSubscribers(1, socket, BIG, 'record')), ...(await spawnSubscribers(1, socket, SMALL_SPACE, 'record'))];
  const results: Measurement[] = [];
  let wire = { frames: 0, bytes: 0, compactBytes: 0 };
  try {
    await fill(small, sb.backing, 0, SMALL - 1);
    const before = memory();
    log(`filling ${BIG} to ${REGIONS - 1} regions`);
    const t0 = performance.now();
    await fill(big, bb.backing, 0, REGIONS - 1);
    const fillMs = performance.now() - t0;
    const after = memory();
    log(`one more add at ${SMALL} and at ${REGIONS} regions: ${ROUNDS} rounds of ${Math.ceil(ITER / ROUNDS)} round trips each (+${WARMUP} warm-up each)`);
    await oneMore(small, sb.backing, SMALL - 1, 0, WARMUP);
    await oneMore(big, bb.backing, REGIONS - 1, 0, WARMUP);
    const at16 = { add: [] as number[], rem: [] as number[] };
    const at64k = { add: [] as number[], rem: [] as number[] };
    for (let r = 0; r < ROUNDS; r++) {
      for (const [owner, backing, index, into] of [
        [small, sb.backing, SMALL - 1, at16],
        [big, bb.backing, REGIONS - 1, at64k],
      ] as const) {
        const o = await oneMore(owner, backing, index, Math.ceil(ITER / ROUNDS), 20);
        into.add.push(...o.add);
        into.rem.push(...o.rem);
      }
    }
    await fill(big, bb.backing, REGIONS - 1, REGIONS);

    const st = state.broker.status(BIG).spaces[0]!;
    if (st.regions.length !== REGIONS) throw new Error(`the broker holds ${st.regions.length} regions, not ${REGIONS}`);
    const [sub] = await statsOf(subs);
    if (sub!.regions !== REGIONS || sub!.generation !== st.generation)
      throw new Error(`the subscriber holds ${sub!.regions} regions at generation ${sub!.generation}`);

    // What a new subscriber receives: the broker's own split of this map into EV_SYNC frames, encoded.
    wire = syncWire(state.broker, BIG);
    log(
      `snapshot of ${REGIONS} regions to ${SNAPSHOTS} new subscriber processes of each form (${wire.frames} EV_SYNC frames: ${wire.compactBytes} bytes as columns, ${wire.bytes} plain)`,
    );
    const snap = await snapshots(socket, 'record', SNAPSHOTS);
    const snapMap = maxMapCount > REGIONS + 1000 ? await snapshots(socket, 'map', Math.min(3, SNAPSHOTS), ['compact']) : undefined;
    await stopAll(subs.splice(0));
    small.close();

    log(`resync after a broker restart: ${RESTARTS} restarts for each form, the map rebuilt and published each time`);
    const resync = { compact: { ms: [] as number[], cpuMs: [] as number[] }, plain: { ms: [] as number[], cpuMs: [] as number[] } };
    for (let i = 0; i < RESTARTS; i++) {
      for (const form of FORMS) {
        const r = await restartResync(socket, state, bb.fd, form);
        resync[form].ms.push(r.ms);
        resync[form].cpuMs.push(r.cpuMs);
      }
    }

    const added = REGIONS - 1;
    const heapPer = (after.heap - before.heap) / added;
    const rssPer = (after.rss - before.rss) / added;
    const s = summarize(at16.add);
    const l = summarize(at64k.add);
    const sr = summarize(at16.rem);
    const lr = summarize(at64k.rem);
    const snapC = summarize(snap.compact.ms);
    const snapP = summarize(snap.plain.ms);
    const resC = summarize(resync.compact.ms);
    const resP = summarize(resync.plain.ms);
    results.push(
      {
        name: `snapshot of ${REGIONS} regions to a new subscriber process`,
        series: 'snapshot',
        unit: 'ms',
        ...snapC,
        iterations: snap.compact.ms.length,
        peer: { name: 'the same in the plain form (no COMPACT_SYNC), same run', median: snapP.median },
        ratio: snapC.median / snapP.median,
        goal: '< 100 ms',
        met: snapC.median < 100,
        note: `connect, HELLO, ATTACH, ${wire.frames} EV_SYNC frames (${(wire.compactBytes / 2 ** 20).toFixed(2)} MiB as columns, feature COMPACT_SYNC), the target map built and diffed, ack; a fresh process each time (the subscriber records the regions, maps none); its CPU time meanwhile: median ${summarize(snap.compact.cpuMs).median.toFixed(1)} ms`,
      },
      {
        name: `snapshot of ${REGIONS} regions, plain form (a client without COMPACT_SYNC)`,
        series: 'snapshot plain',
        unit: 'ms',
        ...snapP,
        iterations: snap.plain.ms.length,
        note: `the same, the ${wire.frames} frames holding one msgpack map per region (${(wire.bytes / 2 ** 20).toFixed(2)} MiB); CPU time: median ${summarize(snap.plain.cpuMs).median.toFixed(1)} ms`,
      },
      ...(snapMap
        ? [
            {
              name: `snapshot of ${REGIONS} regions to a new mapping subscriber process`,
              unit: 'ms',
              ...summarize(snapMap.compact.ms),
              iterations: snapMap.compact.ms.length,
              note: 'the same, and every region mmap()ed',
            },
          ]
        : []),
      {
        name: 'of which garbage collection in the new subscriber',
        series: 'snapshot gc',
        unit: 'ms',
        ...summarize(snap.compact.gcMs),
        iterations: snap.compact.gcMs.length,
        note: 'perf_hooks gc entries in the subscriber process during its attach (COMPACT_SYNC)',
      },
      {
        name: `resync of ${REGIONS} regions after a broker restart`,
        series: 'resync',
        unit: 'ms',
        ...resC,
        iterations: resync.compact.ms.length,
        peer: { name: 'the same in the plain form, same run', median: resP.median },
        ratio: resC.median / resP.median,
        goal: '< 100 ms',
        met: resC.median < 100,
        note: `from the owner's PUBLISH (the map rebuilt on the restarted broker) to the subscriber process having reconciled the snapshot by key and acked, on the monotonic clock both processes share; nothing was remapped; its CPU time from being told to wait: median ${summarize(resync.compact.cpuMs).median.toFixed(1)} ms`,
      },
      {
        name: `resync of ${REGIONS} regions after a broker restart, plain form`,
        series: 'resync plain',
        unit: 'ms',
        ...resP,
        iterations: resync.plain.ms.length,
        note: `the same for a subscriber without COMPACT_SYNC; CPU time: median ${summarize(resync.plain.cpuMs).median.toFixed(1)} ms`,
      },
      {
        name: `one more add at ${REGIONS} regions`,
        unit: 'us',
        ...l,
        iterations: at64k.add.length,
        peer: { name: `one more add at ${SMALL} regions, same run`, median: s.median },
        ratio: l.median / s.median,
        goal: `< 2x the add at ${SMALL}`,
        met: l.median / s.median < 2,
        note: 'owner.commit([add]) through the embedded broker to one subscriber process, until its ack',
      },
      { name: `one more add at ${SMALL} regions`, unit: 'us', ...s, iterations: at16.add.length },
      {
        name: `its removal at ${REGIONS} regions`,
        unit: 'us',
        ...lr,
        iterations: at64k.rem.length,
        peer: { name: `its removal at ${SMALL} regions, same run`, median: sr.median },
        ratio: lr.median / sr.median,
      },
      { name: `its removal at ${SMALL} regions`, unit: 'us', ...sr, iterations: at16.rem.length },
      {
        name: 'broker heap per region',
        unit: 'bytes',
        median: heapPer,
        p99: heapPer,
        iterations: 1,
        goal: '< 256 bytes',
        met: heapPer < 256,
        note: `V8 heap used after gc(): ${(before.heap / 2 ** 20).toFixed(1)} MiB before, ${(after.heap / 2 ** 20).toFixed(1)} MiB after adding ${added} regions; one measurement`,
      },
      {
        name: 'broker RSS per region',
        unit: 'bytes',
        median: rssPer,
        p99: rssPer,
        iterations: 1,
        note: `process RSS ${(before.rss / 2 ** 20).toFixed(1)} MiB before, ${(after.rss / 2 ** 20).toFixed(1)} MiB after (includes the heap's free space and malloc's); one measurement`,
      },
      {
        name: `adding ${added} regions, 4,096 per commit`,
        unit: 'ms',
        median: fillMs,
        p99: fillMs,
        iterations: 1,
        note: `${((fillMs * 1000) / added).toFixed(1)} us per region, one subscriber process following`,
      },
    );
  } finally {
    await stopAll(subs);
    state.owner.close();
    small.close();
    native.close(bb.fd);
    await state.broker.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
  report('scale', results, {
    regions: REGIONS,
    syncFrames: wire.frames,
    syncBytes: wire.bytes,
    syncCompactBytes: wire.compactBytes,
    restarts: RESTARTS,
    regionLayout: `${PAGE} bytes each, one every ${STRIDE} bytes from 0x${BASE.toString(16)}, slices of one memfd`,
    subscribers:
      "bench/fixtures/subscriber.ts in 'record' mode: follows the map and acks, maps nothing; one per space; for the snapshot and the resync, processes asking for COMPACT_SYNC (the default) alternate with processes that do not ('plain')",
    vmMaxMapCount: maxMapCount,
    mappingSnapshot: maxMapCount > REGIONS + 1000 ? 'measured' : `not measured: vm.max_map_count is ${maxMapCount}, below ${REGIONS} mappings`,
    memoryMethod:
      'V8 used_heap_size after three gc() calls (node --expose-gc), and process RSS, before and after adding the regions; this process holds the embedded broker and two owners that keep nothing per region',
    iterations: ITER,
    rounds: ROUNDS,
    warmup: WARMUP,
  });
}

runMain(main);
