// `npm run bench:report`: renders the latest results (bench/results/*.json) into docs/performance.md and
// its charts (docs/performance-*.svg). Nothing here is a figure: every number comes from the JSON, and a
// goal's status is the one the benchmark judged. The closing notes explain the missed goals from figures
// of the same JSON.
import fs from 'node:fs';
import path from 'node:path';
import type { Measurement } from './lib.js';
import { rootDir } from './lib.js';
import { BENCHES } from './list.js';
import { barChart, lineChart, type Series } from './svg.js';

interface Result {
  bench: string;
  date: string;
  seconds?: number;
  command?: string;
  machine?: { cpu: string; cpus: number; memoryGiB: number; kernel: string; node: string; loadAtStart: number[]; loadAtEnd: number[] };
  node?: string;
  results: Measurement[];
  [key: string]: unknown;
}

const root = rootDir();
const resultsDir = process.env.MMB_BENCH_RESULTS ?? path.join(root, 'bench', 'results');
// MMB_BENCH_RESULTS reads results from elsewhere, MMB_BENCH_OUT renders elsewhere, leaving docs/ and the
// README alone (test/bench.test.ts).
const docs = process.env.MMB_BENCH_OUT ?? path.join(root, 'docs');
const readme = process.env.MMB_BENCH_OUT ? undefined : path.join(root, 'README.md');

const ORDER: readonly string[] = BENCHES;
const SCRIPT: Record<string, { file: string; npm: string; title: string }> = {
  fanout: { file: 'bench/fanout.ts', npm: 'npm run bench:fanout', title: '1. Fan-out: one change to every subscriber' },
  throughput: { file: 'bench/throughput.ts', npm: 'npm run bench:throughput', title: '2. Throughput: transactions per second, 4 subscribers' },
  translate: { file: 'bench/translate.ts', npm: 'npm run bench:translate', title: '3. Translation: guest-physical lookups per second' },
  scale: { file: 'bench/scale.ts', npm: 'npm run bench:scale', title: '4. Scale: 65,536 regions' },
  pinning: { file: 'bench/pinning.ts', npm: 'npm run bench:pinning', title: '5. Pinning 4 GiB' },
  'dirty-sync': { file: 'bench/dirty-sync.ts', npm: 'npm run bench:dirty-sync', title: '6. Dirty sync: collecting a 32 MiB bitmap' },
  ioas: {
    file: 'bench/ioas.ts',
    npm: 'npm run bench:ioas',
    title: '7. Guest IOMMU: IOVA map + unmap pairs per second (the goals of issue 19, see docs/ioas.md)',
  },
  'ioas-vhost-user': {
    file: 'bench/ioas-vhost-user.ts',
    npm: 'npm run bench:ioas-vhost-user',
    title: "8. Guest IOMMU through the vhost-user bridge: IOVA map + unmap pairs to dpdk-testpmd's IOTLB (issue 19, see docs/ioas.md)",
  },
  migration: { file: 'bench/migration.ts', npm: 'npm run bench:migration', title: '9. Migration of 4 GiB to another broker over TCP, while the guest writes' },
  'vhost-user': {
    file: 'bench/vhost-user.ts',
    npm: 'npm run bench:vhost-user',
    title: 'The vhost-user bridge against qemu-storage-daemon (the goals of the vhost-user issue, see docs/vhost-user.md)',
  },
  'qemu-hotplug': {
    file: 'bench/qemu-hotplug.ts',
    npm: 'npm run bench:qemu-hotplug',
    title: '7. QEMU as the peer: a DIMM hot-added to N vhost-user back-ends',
  },
};

const COLORS = { ours: '#1f6fb2', ours2: '#2ca02c', ours3: '#9467bd', peer: '#444444', peer2: '#999999', goal: '#c0392b' };

function load(): Map<string, Result> {
  const out = new Map<string, Result>();
  if (!fs.existsSync(resultsDir)) return out;
  for (const f of fs
    .readdirSync(resultsDir)
    .filter((x) => x.endsWith('.json'))
    .sort()) {
    const r = JSON.parse(fs.readFileSync(path.join(resultsDir, f), 'utf8')) as Result;
    out.set(r.bench, r);
  }
  return out;
}

/** A figure with its unit, rounded for reading. */
function fmt(v: number, unit: string): string {
  if (!Number.isFinite(v)) return String(v);
  if (unit === 'txn/s' || unit === 'lookups/s' || unit === 'pairs/s') return `${Math.round(v).toLocaleString('en-US')} ${unit}`;
  if (unit === 'bytes') return `${Math.round(v)} bytes`;
  const n = Math.abs(v) >= 100 ? Math.round(v).toLocaleString('en-US') : String(+v.toPrecision(3));
  return `${n} ${unit}`;
}

const ratio = (r: number) => (r >= 10 ? r.toFixed(0) : r >= 1 ? r.toFixed(2) : r.toFixed(3));
const status = (m: Measurement) => (m.goal === undefined ? '' : m.met ? 'met' : '**MISSED**');

function table(results: Measurement[]): string {
  const rows = results.map(
    (m) =>
      `| ${m.name} | ${fmt(m.median, m.unit)} | ${fmt(m.p99, m.unit)} | ${m.iterations} | ${m.peer ? `${m.peer.name}: ${fmt(m.peer.median, m.unit)}` : ''} | ${m.ratio !== undefined ? ratio(m.ratio) : ''} | ${m.goal ? `${m.goal}: ${status(m)}` : ''} |`,
  );
  return ['| measurement | median | p99 | n | peer (same run) | ratio | goal |', '|---|---|---|---|---|---|---|', ...rows].join('\n');
}

function notes(results: Measurement[]): string {
  const n = results.filter((m) => m.note);
  if (n.length === 0) return '';
  return `\n<details><summary>Notes per measurement</summary>\n\n${n.map((m) => `- ${m.name}: ${m.note}`).join('\n')}\n\n</details>\n`;
}

function context(r: Result): string {
  const skip = new Set(['bench', 'date', 'seconds', 'command', 'machine', 'node', 'results', 'iterationsFromEnv']);
  const lines = Object.entries(r)
    .filter(([k]) => !skip.has(k))
    .map(([k, v]) => {
      if (Array.isArray(v) && v.some((x) => typeof x === 'string' && x.length > 40)) return `- ${k}:\n${v.map((x) => `  - ${String(x)}`).join('\n')}`;
      return `- ${k}: ${Array.isArray(v) ? (v.every((x) => typeof x !== 'object') ? v.join(', ') : v.map((x) => JSON.stringify(x)).join('; ')) : typeof v === 'object' ? JSON.stringify(v) : String(v)}`;
    });
  return lines.join('\n');
}

function when(r: Result): string {
  const load = r.machine ? `, load average ${r.machine.loadAtStart[0]} at its start and ${r.machine.loadAtEnd[0]} at its end` : '';
  return `Measured ${r.date.replace('T', ' ').slice(0, 16)} UTC in ${r.seconds ?? '?'} s${load}; \`${r.command ?? SCRIPT[r.bench]?.npm}\`.`;
}

function writeSvg(name: string, svg: string): string {
  fs.writeFileSync(path.join(docs, name), svg);
  return name;
}

const byX = (ms: Measurement[], series: string): [number, number][] =>
  ms.filter((m) => m.series === series && m.x !== undefined).map((m) => [m.x as number, m.median]);

// --- per benchmark ------------------------------------------------------------------------------------

function fanoutChart(r: Result): string | undefined {
  const ms = r.results;
  const s: Series[] = [
    { name: 'broker, embedded owner: add, until every subscriber acked', points: byX(ms, 'broker, embedded owner, add'), color: COLORS.ours },
    { name: 'broker, owner in its own process: add', points: byX(ms, 'broker, owner process, add'), color: COLORS.ours3 },
    {
      name: 'peer: C vhost-user front-end, ADD_MEM_REG to N qemu-storage-daemons one after the other',
      points: byX(ms, 'C vhost-user front-end (peer), ADD_MEM_REG'),
      color: COLORS.peer,
      dashed: true,
    },
  ].filter((x) => x.points.length > 0);
  if (s.length === 0) return undefined;
  return writeSvg(
    'performance-fanout.svg',
    lineChart({
      title: 'Fan-out latency against the number of subscribers (median, lower is better)',
      xLabel: 'subscriber processes (peer: back-ends)',
      yLabel: 'microseconds, log scale',
      series: s,
      xLog: true,
      yLog: true,
    }),
  );
}

function throughputChart(r: Result): string | undefined {
  const ms = r.results;
  if (ms.length === 0) return undefined;
  return writeSvg(
    'performance-throughput.svg',
    barChart({
      title: 'Transactions per second with 4 subscriber processes (median, higher is better)',
      yLabel: 'transactions per second',
      bars: ms.map((m) => ({
        label: (m.series ?? m.name).replace(/^broker, /, ''),
        value: m.median,
        color: m.series?.startsWith('C ') ? COLORS.peer : COLORS.ours,
      })),
      goals: [{ y: 20_000, label: 'goal: 20,000 per second' }],
      legend: [
        { name: 'this broker (4 plain subscriber processes, each mapping every region)', color: COLORS.ours },
        { name: 'peer: C vhost-user front-end, 4 qemu-storage-daemons, acked updates', color: COLORS.peer },
      ],
    }),
  );
}

function translateChart(r: Result): string | undefined {
  const ms = r.results;
  const s: Series[] = [
    { name: 'C lookup (peer), random regions', points: byX(ms, 'C (peer), random'), color: COLORS.peer, dashed: true },
    { name: 'DeviceSubscriber.resolve(), random regions', points: byX(ms, 'resolve(), random'), color: COLORS.ours },
    { name: 'C lookup (peer), 16 in a row per region', points: byX(ms, 'C (peer), local'), color: COLORS.peer2, dashed: true },
    { name: 'DeviceSubscriber.resolve(), 16 in a row per region', points: byX(ms, 'resolve(), local'), color: COLORS.ours2 },
  ].filter((x) => x.points.length > 0);
  if (s.length === 0) return undefined;
  return writeSvg(
    'performance-translate.svg',
    lineChart({
      title: 'GPA lookups per second against the number of regions (median, higher is better)',
      xLabel: 'regions',
      yLabel: 'lookups per second, log scale',
      series: s,
      xLog: true,
      yLog: true,
    }),
  );
}

function qemuChart(r: Result): string | undefined {
  const ms = r.results;
  const s: Series[] = [
    {
      name: 'QEMU: device_add of a pc-dimm, until its reply (every back-end REPLY_ACKed, one after the other)',
      points: byX(ms, 'QEMU device_add'),
      color: COLORS.peer,
      dashed: true,
    },
    { name: 'broker: the same add through one vhost-user bridge per back-end, until the commit', points: byX(ms, 'broker add'), color: COLORS.ours },
  ].filter((x) => x.points.length > 0);
  if (s.length === 0) return undefined;
  return writeSvg(
    'performance-qemu-hotplug.svg',
    lineChart({
      title: 'Hot-adding a DIMM against the number of vhost-user back-ends (median, lower is better)',
      xLabel: 'qemu-storage-daemon back-ends',
      yLabel: 'microseconds',
      series: s,
    }),
  );
}

function pinningChart(r: Result): string | undefined {
  const ms = r.results.filter((m) => m.unit === 'GiB/s');
  if (ms.length === 0) return undefined;
  return writeSvg(
    'performance-pinning.svg',
    barChart({
      title: 'Pinning and unpinning 4 GiB of one memfd (median, higher is better)',
      yLabel: 'GiB per second',
      bars: ms
        .filter((m) => m.peer)
        .flatMap((m) => [
          { label: `${m.name.replace(/:.*$/, '')}: ours`, value: m.median, color: COLORS.ours },
          { label: `${m.name.replace(/:.*$/, '')}: C`, value: (m.peer as { median: number }).median, color: COLORS.peer },
        ]),
      legend: [
        { name: "the vfio-like client's soft backend (mlock in 128 MiB pieces on worker threads), through a transaction", color: COLORS.ours },
        { name: 'peer: C, mmap + one mlock (munlock + munmap) of the same memfd', color: COLORS.peer },
      ],
    }),
  );
}

/** IOVA map + unmap pairs per second, batched and unbatched, ours beside the C peers (bench/ioas.ts, bench/ioas-vhost-user.ts). */
function pairsChart(r: Result, file: string, title: string, legend: { ours: string; peer: string }): string | undefined {
  const rate = (m: Measurement | undefined) => (m === undefined ? undefined : m.unit === 'pairs/s' ? m.median : 1e6 / m.median);
  const bars = [
    { label: 'batched: ours', m: r.results.find((m) => m.series === 'ours' && m.unit === 'pairs/s'), color: COLORS.ours },
    { label: 'batched: C, directly', m: r.results.find((m) => m.series === 'C (peer)'), color: COLORS.peer },
    { label: 'unbatched: ours', m: r.results.find((m) => m.series === 'ours' && m.unit === 'us/pair'), color: COLORS.ours2 },
    { label: 'unbatched: C floor', m: r.results.find((m) => m.series === 'C (floor)'), color: COLORS.peer2 },
  ].filter((b) => b.m !== undefined);
  if (bars.length === 0) return undefined;
  return writeSvg(
    file,
    barChart({
      title,
      yLabel: 'pairs per second',
      bars: bars.map((b) => ({ label: b.label, value: rate(b.m) as number, color: b.color })),
      goals: [{ y: 100_000, label: 'goal (batched): 100,000 per second' }],
      legend: [
        { name: legend.ours, color: COLORS.ours },
        { name: legend.peer, color: COLORS.peer },
      ],
    }),
  );
}

const ioasChart = (r: Result) =>
  pairsChart(r, 'performance-ioas.svg', 'IOVA map + unmap pairs per second, a vfio-like (soft) and a vhost-like client (median, higher is better)', {
    ours: 'through the broker (batched: many pairs per transaction; unbatched: a map and an unmap transaction per pair)',
    peer: 'peer: C, mlock + munlock of the same pages (floor: with a round trip to a peer process each)',
  });

const ioasVhostUserChart = (r: Result) =>
  pairsChart(r, 'performance-ioas-vhost-user.svg', "IOVA map + unmap pairs per second into dpdk-testpmd's IOTLB (median, higher is better)", {
    ours: 'through the broker and the vhost-user bridge (batched: many pairs per transaction; unbatched: a map and an unmap transaction per pair)',
    peer: 'peer: C, the same VHOST_USER_IOTLB_MSG sent directly (floor: UPDATE and INVALIDATE, each waiting for its reply-ack)',
  });

// --- why goals were missed ----------------------------------------------------------------------------

const find = (r: Result | undefined, pred: (m: Measurement) => boolean) => r?.results.find(pred);
/** The snapshot to a new subscriber (by name: results from before it had a series name it the same). */
const isSnapshot = (m: Measurement) => m.name.startsWith('snapshot of ') && m.name.endsWith(' regions to a new subscriber process');

function whyMissed(all: Map<string, Result>): string[] {
  const out: string[] = [];
  const fan = all.get('fanout');
  const cpu = (n: number, who: string) => find(fan, (m) => m.series === `CPU per transaction: ${who}` && m.x === n);
  const one = find(fan, (m) => m.series === 'broker, embedded owner, add' && m.x === 1);
  const oneR = find(fan, (m) => m.series === 'broker, embedded owner, remove' && m.x === 1);
  if ((one && one.met === false) || (oneR && oneR.met === false)) {
    const b = cpu(1, 'broker process');
    const s = cpu(1, 'subscriber processes');
    out.push(
      `**Fan-out to one subscriber** (${one ? `add ${ratio(one.ratio ?? NaN)}x` : ''}${oneR ? `, remove ${ratio(oneR.ratio ?? NaN)}x` : ''} the C round trip, goal 3x). ` +
        `The C peer's round trip is two system calls on each side and a 2 MiB mmap in qemu-storage-daemon. Ours is three ` +
        `messages (EV_TXN, ACK, EV_COMMITTED), each encoded as msgpack, framed, checked as plain msgpack, decoded and validated ` +
        `field by field at the receiving edge, on top of the transaction itself (plan, fan-out, commit, history) and the owner's ` +
        `request and reply. ${b && s ? `Measured from the kernel's schedstat in the same run, a transaction took on average ${fmt(b.median, 'us')} of CPU in the broker's process and ${fmt(s.median, 'us')} in the subscriber's, on the one CPU they share, against the C round trip's ${fmt(one?.peer?.median ?? NaN, 'us')} in all. ` : ''}` +
        `Profiles (node --cpu-prof, perf) show no single cost left to remove: the largest were fixed in this issue (bench/README.md ` +
        `lists them); what remains is spread over the codec, validation, promises, timers and syscalls of two Node processes ` +
        `sharing one CPU, and a removal also pays for Node releasing the unmapped buffer on a later turn of the subscriber's loop.`,
    );
  }
  const sixteen = find(fan, (m) => m.series === 'broker, embedded owner, add' && m.x === 16);
  const sixtyFour = find(fan, (m) => m.series === 'broker, embedded owner, add' && m.x === 64);
  if (sixteen && sixteen.met === false) {
    const b = cpu(16, 'broker process');
    const s = cpu(16, 'subscriber processes');
    const at64 = sixtyFour && sixtyFour.met === false ? `; to 64: ${ratio(sixtyFour.ratio ?? NaN)}x, goal within 1.2x` : '';
    out.push(
      `**Fan-out to 16 subscribers** (${ratio(sixteen.ratio ?? NaN)}x the C serial loop, goal below 1x${at64}). Sending to all 16 at once ` +
        `only pays when they can run at once: this machine has ${fan?.machine?.cpus ?? 2} CPUs for 17 processes (65 with 64 subscribers), so the latency is ` +
        `bounded by the CPU time all of them need per transaction. ${b && s ? `In the same run that was ${fmt(b.median, 'us')} in the broker and ${fmt(s.median, 'us')} in the 16 subscriber processes together, that is at least ${fmt((b.median + s.median) / (fan?.machine?.cpus ?? 2), 'us')} of wall time on ${fan?.machine?.cpus ?? 2} CPUs, ` : ''}` +
        `against one C process and 16 C back-ends whose whole round trip is ${fmt((sixteen.peer?.median ?? NaN) / 16, 'us')} per back-end. ` +
        `A Node process woken for each message pays tens of microseconds of CPU that a C daemon does not; with cores for the ` +
        `subscribers the fan-out's latency would approach the slowest subscriber's instead of the sum.`,
    );
  }
  const slope = find(fan, (m) => m.series === 'CPU per transaction: broker, per subscriber');
  if (slope && slope.met === false) {
    out.push(
      `**Broker CPU per subscriber** (${fmt(slope.median, 'us')} per transaction, the slope between 4 and 16 subscribers; goal ` +
        `10 us). The broker encodes each event once, writes each socket once per turn of its event loop and counts acks ` +
        `without a promise or a timer per subscriber, so what it pays per subscriber is now the kernel's: one transaction at ` +
        `a time, each subscriber gets EV_TXN and EV_COMMITTED (with a \`seq\` to ack for a two-phase removal) and sends one or ` +
        `two ACKs, and each sendmsg wakes that process, each ACK costs an epoll wake-up and a recvmsg (strace and perf in ` +
        `bench/README.md). Fewer messages per transaction would need a wire extension (a removal's commit without its vote ` +
        `round for a subscriber that never refuses a removal): not done.`,
    );
  }
  const tp = find(all.get('throughput'), (m) => m.series === 'broker, embedded owner, pipelined');
  if (tp && tp.met === false) {
    const serial = find(all.get('throughput'), (m) => m.series === 'broker, embedded owner, one at a time');
    out.push(
      `**Throughput** (${fmt(tp.median, 'txn/s')}, goal 20,000). The broker pipelines (feature PIPELINE, a window of 64): ` +
        `transaction N+1 goes to the subscribers before N is acked, which the same run shows buys ` +
        `${serial ? `${ratio(tp.median / serial.median)}x over one at a time (${fmt(serial.median, 'txn/s')})` : 'a multiple of one at a time'}. ` +
        `Each event is encoded once for every subscriber, and frames sent in one turn of the event loop leave in one write per ` +
        `socket, so a subscriber takes the transactions of a wake-up together and acks them in one write (strace, 2,000 ` +
        `pipelined transactions: the broker's sendmsg calls fell from 16,008 to 2,444, a subscriber's from 4,000 to 402; ` +
        `bench/README.md). What bounds it now is CPU on ${all.get('throughput')?.machine?.cpus ?? 2} CPUs shared by 5 ` +
        `processes: each subscriber still establishes every transaction itself (an mmap or munmap of the region with its ` +
        `address reservation, the change bookkeeping, the ack), and the broker plans, commits and records each one; a ` +
        `subscriber process costs a few times a qemu-storage-daemon's update (bench 1 gives the CPU per transaction of each side).`,
    );
  }
  const tr = all.get('translate');
  const trMissed = tr?.results.filter((m) => m.met === false) ?? [];
  if (trMissed.length > 0) {
    const local = trMissed.filter((m) => m.name.includes('local'));
    const random = trMissed.filter((m) => m.name.includes('random'));
    out.push(
      `**Translation** (resolve() missed in ${trMissed.length} of ${tr?.results.filter((m) => m.goal).length} cases: ${trMissed.map((m) => `${m.name.replace(/: .*\(/, ' (')} ${ratio(m.ratio ?? NaN)}x`).join('; ')}). ` +
        `Both sides run the same search over the same two arrays and return where the bytes are, without allocating, each table size ` +
        `and pattern in a fresh process. When the last-hit region matches, C's lookup is two compares and an add ` +
        `(${local.length > 0 ? `about ${fmt(1e9 / (local[0]?.peer?.median ?? NaN), 'ns')} in the local pattern` : 'a nanosecond or two'}), inlined by the C compiler into its loop; ` +
        `ours, inlined by V8, compares the address with the last hit kept in fields (integer checks included: JavaScript numbers may be ` +
        `fractions), stores the view and the offset into the caller's object, and after a miss runs a branch-free binary search and ` +
        `remembers the new region (${local.length > 0 ? `about ${fmt(1e9 / (local[0]?.median ?? NaN), 'ns')}` : 'a few nanoseconds'}), which weighs most where C's lookup is cheapest` +
        `${random.length > 0 ? `; with random regions the search's cache misses weigh on both sides` : ''}.`,
    );
  }
  const sc = all.get('scale');
  const snapGc = find(sc, (m) => m.series === 'snapshot gc');
  for (const series of ['snapshot', 'resync']) {
    const snap = find(sc, (m) => (series === 'snapshot' ? isSnapshot(m) : m.series === series) && m.goal !== undefined);
    if (!snap || snap.met !== false) continue;
    out.push(
      `**${snap.name}** (${fmt(snap.median, 'ms')}, goal ${snap.goal}${snap.peer ? `; the plain form in the same run: ${fmt(snap.peer.median, 'ms')}` : ''}). The broker's part is small: it sends the map as ` +
        `${typeof sc?.syncFrames === 'number' && typeof sc.syncCompactBytes === 'number' ? `${sc.syncFrames} EV_SYNC frames (${fmt(sc.syncCompactBytes / 2 ** 20, 'MiB')} as columns)` : 'EV_SYNC frames of at most the frame limit'} ` +
        `in a few milliseconds while the subscriber decodes the first ones. The time is the subscriber's, ${series === 'snapshot' ? 'a fresh Node process' : 'a Node process that holds every region already'}: ` +
        `the columns are read in place (no Region object is made from them), and each region costs a view object, its key string and its name, ` +
        `entered in three maps (the committed map by id, which holds the views, and what is established by key and by id), ` +
        `and garbage collection${snapGc ? ` (${fmt(snapGc.median, 'ms')} in the snapshot, from perf_hooks in the same run)` : ''}: ` +
        `allocation-bound work of a few hundred nanoseconds per region in a process whose code V8 has not compiled yet. The CPU time in the note shows how much of the wall time was the subscriber's own on this machine.`,
    );
  }
  const qh = all.get('qemu-hotplug');
  const qslope = find(qh, (m) => m.name === 'broker: per back-end');
  if (qslope && qslope.met === false) {
    out.push(
      `**QEMU as the peer, per back-end** (${fmt(qslope.median, 'us')} through the broker, QEMU ${fmt(qslope.peer?.median ?? NaN, 'us')}). ` +
        `QEMU's memory listener updates its back-ends one after the other, each waiting for the REPLY_ACK; the broker sends the transaction to ` +
        `every bridge at once, and each bridge sends its ADD_MEM_REG without waiting for the others. Its slope is what each more bridge costs ` +
        `the broker's process (the transaction's bookkeeping per subscriber, encoding, the bridge's own work) plus what the back-ends' ` +
        `replies cost when they cannot run at once on this machine's ${qh?.machine?.cpus ?? 2} CPUs.`,
    );
  }
  const io = all.get('ioas');
  const unb = find(io, (m) => m.series === 'ours' && m.unit === 'us/pair');
  const bat = find(io, (m) => m.series === 'ours' && m.unit === 'pairs/s');
  if (unb && unb.met === false) {
    out.push(
      `**Guest IOMMU, unbatched** (${fmt(unb.median, unb.unit)} per pair, ${ratio(unb.ratio ?? NaN)}x the floor's ${fmt(unb.peer?.median ?? NaN, unb.unit)}, goal 3x). ` +
        `The floor is two round trips to one C process that mlocks or munlocks; ours is two transactions, each a request from the ` +
        `owner, a fan-out to two Node processes (the vfio-like client, whose mlock also takes a turn on a libuv worker thread since the ` +
        `addon only offers it asynchronously, and the vhost-like client), their acks, and for a map the commit notice: four Node ` +
        `wake-ups and msgpack round trips per transaction on the one CPU they share, where the floor has two C ones. Closing the gap ` +
        `needs fewer wake-ups per guest operation (a synchronous mlock for small ranges in the addon; the commit notice of a map folded ` +
        `into the next event) or a guest that batches its invalidations, which is what the batched figure measures.`,
    );
  }
  if (bat && bat.met === false) {
    out.push(`**Guest IOMMU, batched** (${fmt(bat.median, bat.unit)}, goal 100,000): ${bat.note ?? ''}`);
  }
  const vu = all.get('ioas-vhost-user');
  const vuUnb = find(vu, (m) => m.series === 'ours' && m.unit === 'us/pair');
  const vuBat = find(vu, (m) => m.series === 'ours' && m.unit === 'pairs/s');
  if (vuUnb && vuUnb.met === false) {
    out.push(
      `**Guest IOMMU through the vhost-user bridge, unbatched** (${fmt(vuUnb.median, vuUnb.unit)} per pair, ${ratio(vuUnb.ratio ?? NaN)}x the floor's ${fmt(vuUnb.peer?.median ?? NaN, vuUnb.unit)}, goal 3x). ` +
        `The floor is what testpmd does for the pair and two round trips to it from one C process. Ours pays the same two round trips ` +
        `to testpmd, from the bridge, inside two broker transactions: each is the owner's request, the event to the bridge's Node ` +
        `process, the bridge's ack and, for a map, the commit notice, with msgpack and validation at each edge, all on the CPU that ` +
        `testpmd's vhost-user thread runs on. The transactions cost what they cost in bench 7 (a vfio-like and a vhost-like client); ` +
        `the back-end's round trips come on top, since an unmap may be acked only once testpmd confirmed its invalidation. What would ` +
        `close the gap is what closes it in bench 7 (fewer wake-ups per guest operation, guests batching their invalidations); the ` +
        `update of a map could also be left to the back-end's first miss, as QEMU does, which takes the back-end out of the map's vote.`,
    );
  }
  if (vuBat && vuBat.met === false) {
    out.push(
      `**Guest IOMMU through the vhost-user bridge, batched** (${fmt(vuBat.median, vuBat.unit)}, goal 100,000; ${ratio(vuBat.ratio ?? NaN)}x the C peer's ${fmt(vuBat.peer?.median ?? NaN, vuBat.unit)}): ${vuBat.note ?? ''}`,
    );
  }
  const mig = all.get('migration');
  const migCopy = find(mig, (x) => x.name.startsWith('first copy'));
  if (migCopy && migCopy.met === false) {
    out.push(
      `**Migration, first copy** (${ratio(migCopy.ratio ?? NaN)} of the raw copy, goal ${migCopy.goal}). Both write the same new pages at the destination; ` +
        `the C peer moves each byte from the source's page cache into the socket and from the socket into the destination's memory, in the kernel. The migration ` +
        `reads each byte into a record with pread (never sends it from a mapping, which a later transaction may unmap while the record waits in the socket), ` +
        `and the receiver writes it from its socket buffers with pwrite, one more pass on each side, with a Node wake-up per 64 KiB read, in two processes on the ` +
        `${mig?.machine?.cpus ?? 2} CPUs the brokers, the guest and the C peer's turn share.`,
    );
  }
  for (const [bench, r] of all) {
    if (['fanout', 'throughput', 'translate', 'scale', 'vhost-user', 'ioas', 'ioas-vhost-user', 'qemu-hotplug'].includes(bench)) continue;
    if (bench === 'migration' && migCopy?.met === false) {
      for (const x of r.results.filter((y) => y.met === false && y !== migCopy))
        out.push(
          `**${SCRIPT[bench]?.title ?? bench}: ${x.name}** (${fmt(x.median, x.unit)}, goal ${x.goal}): see the benchmark's own notes and docs/migration.md.`,
        );
      continue;
    }
    for (const m of r.results.filter((x) => x.met === false && !x.note?.includes('not what a sync does'))) {
      out.push(`**${SCRIPT[bench]?.title ?? bench}: ${m.name}** (${fmt(m.median, m.unit)}, goal ${m.goal}): see the benchmark's own notes and its document.`);
    }
  }
  return out;
}

// --- the headline -------------------------------------------------------------------------------------

/** One line per benchmark with its main figure beside its peer's: the top of the page, and the README's. */
function headline(all: Map<string, Result>): string[] {
  const out: string[] = [];
  const m = (bench: string, pred: (x: Measurement) => boolean) => find(all.get(bench), pred);
  const vs = (x: Measurement | undefined) =>
    x?.peer ? ` (${x.peer.name.replace(/, (ADD|REM)_MEM_REG$/, '')}: ${fmt(x.peer.median, x.unit)}, ${ratio(x.ratio ?? NaN)}x)` : '';
  const mark = (x: Measurement | undefined) => (x?.goal === undefined ? '' : x.met ? '' : ' **goal missed**');
  const f1 = m('fanout', (x) => x.series === 'broker, embedded owner, add' && x.x === 1);
  const f16 = m('fanout', (x) => x.series === 'broker, embedded owner, add' && x.x === 16);
  const r1 = m('fanout', (x) => x.series === 'broker, embedded owner, remove' && x.x === 1);
  if (f1)
    out.push(
      `Fan-out, one subscriber process, until acked: add ${fmt(f1.median, f1.unit)}${vs(f1)}${mark(f1)}${r1 ? `, remove ${fmt(r1.median, r1.unit)} (REM_MEM_REG: ${fmt(r1.peer?.median ?? NaN, r1.unit)}, ${ratio(r1.ratio ?? NaN)}x)${mark(r1)}` : ''}`,
    );
  if (f16) out.push(`Fan-out, 16 subscriber processes: ${fmt(f16.median, f16.unit)}${vs(f16)}${mark(f16)}`);
  const tp = m('throughput', (x) => x.series === 'broker, embedded owner, pipelined');
  if (tp) out.push(`Throughput, 4 subscriber processes: ${fmt(tp.median, tp.unit)} (goal 20,000)${mark(tp)}`);
  const tr = m('translate', (x) => x.goal !== undefined && x.x === 512 && x.name.includes('random'));
  const trIov = m('translate', (x) => x.series === 'translate(), random' && x.x === 512);
  if (tr)
    out.push(
      `Translation, 512 regions, random: resolve() ${(tr.median / 1e6).toFixed(1)} M lookups/s (the same search in C: ${((tr.peer?.median ?? NaN) / 1e6).toFixed(1)} M, ${ratio(tr.ratio ?? NaN)}x)${mark(tr)}${trIov ? `; translate(), which allocates an iovec, ${(trIov.median / 1e6).toFixed(1)} M` : ''}`,
    );
  const snap = m('scale', isSnapshot);
  const resync = m('scale', (x) => x.series === 'resync');
  const more = m('scale', (x) => x.goal?.startsWith('< 2x') === true);
  const heap = m('scale', (x) => x.name === 'broker heap per region');
  if (snap && more && heap) {
    out.push(
      `65,536 regions: snapshot to a new subscriber ${fmt(snap.median, snap.unit)}${snap.peer ? ` (plain form: ${fmt(snap.peer.median, snap.unit)})` : ''}${mark(snap)}` +
        `${resync ? `; resync after a broker restart ${fmt(resync.median, resync.unit)}${mark(resync)}` : ''}; one more add ${fmt(more.median, more.unit)} (at 16 regions ${fmt(more.peer?.median ?? NaN, more.unit)})${mark(more)}; ${fmt(heap.median, heap.unit)} of broker heap per region${mark(heap)}`,
    );
  }
  const pin = m('pinning', (x) => x.unit === 'GiB/s' && x.goal !== undefined);
  const delay = m('pinning', (x) => x.unit === 'ms' && x.goal !== undefined);
  const pinSize = all.get('pinning')?.size;
  if (pin)
    out.push(
      `Pinning ${typeof pinSize === 'number' ? `${+(pinSize / 2 ** 30).toPrecision(3)} GiB` : '4 GiB'} (soft backend): ${fmt(pin.median, pin.unit)} (C mlock of the same memfd: ${fmt(pin.peer?.median ?? NaN, pin.unit)})${mark(pin)}${delay ? `, broker event loop delayed at most ${fmt(Math.max(delay.p99, delay.median), 'ms')}${mark(delay)}` : ''}`,
    );
  const slope = m('qemu-hotplug', (x) => x.name === 'broker: per back-end');
  const model = m('qemu-hotplug', (x) => x.series === 'device model');
  if (slope) {
    out.push(
      `QEMU as the peer, a DIMM hot-added to N vhost-user back-ends: per back-end ${fmt(slope.median, slope.unit)} through the broker's bridges, ${fmt(slope.peer?.median ?? NaN, slope.unit)} in QEMU (${ratio(slope.ratio ?? NaN)}x)${mark(slope)}` +
        `${model ? `; QEMU's device-model cost without back-ends ${fmt(model.median, model.unit)}` : ''}`,
    );
  }
  const dirty = m('dirty-sync', (x) => x.name.startsWith('flip + take') && x.name.includes('100%'));
  const bitmapBytes = all.get('dirty-sync')?.bitmapBytes;
  const bitmap =
    typeof bitmapBytes === 'number'
      ? `${bitmapBytes / 2 ** 20} MiB bitmap (${fmt((bitmapBytes * 8 * 4096) / 2 ** 40, 'TiB')} of guest memory)`
      : '32 MiB bitmap (1 TiB of guest memory)';
  if (dirty)
    out.push(`Dirty sync of a ${bitmap}: ${fmt(dirty.median, dirty.unit)} (memcpy of it: ${fmt(dirty.peer?.median ?? NaN, dirty.unit)})${mark(dirty)}`);
  const migBytes = m('migration', (x) => x.name.startsWith('bytes sent'));
  const migDown = m('migration', (x) => x.name.startsWith('downtime'));
  const migCopy = m('migration', (x) => x.name.startsWith('first copy'));
  if (migBytes && migDown && migCopy) {
    out.push(
      `Migration of ${typeof all.get('migration')?.guestBytes === 'number' ? `${+((all.get('migration')?.guestBytes as number) / 2 ** 30).toPrecision(3)} GiB` : '4 GiB'} over TCP while the guest writes: ${migBytes.median.toFixed(3)}x its memory sent${mark(migBytes)}, downtime ${fmt(migDown.median, migDown.unit)}${mark(migDown)}, ` +
        `first copy ${fmt(migCopy.median, migCopy.unit)} (raw C copy over the same loopback: ${fmt(migCopy.peer?.median ?? NaN, migCopy.unit)}, ${ratio(migCopy.ratio ?? NaN)}x)${mark(migCopy)}`,
    );
  }
  const iob = m('ioas', (x) => x.series === 'ours' && x.unit === 'pairs/s');
  const iou = m('ioas', (x) => x.series === 'ours' && x.unit === 'us/pair');
  if (iob) {
    out.push(
      `Guest IOMMU, IOVA map + unmap pairs through the broker to a vfio-like (soft) and a vhost-like client: batched ${fmt(iob.median, iob.unit)}${mark(iob)}` +
        `${iou ? `; unbatched ${fmt(iou.median, iou.unit)} per pair (floor, C round trips: ${fmt(iou.peer?.median ?? NaN, iou.unit)}, ${ratio(iou.ratio ?? NaN)}x)${mark(iou)}` : ''}`,
    );
  }
  const vb = m('ioas-vhost-user', (x) => x.series === 'ours' && x.unit === 'pairs/s');
  const vn = m('ioas-vhost-user', (x) => x.series === 'ours' && x.unit === 'us/pair');
  if (vb) {
    out.push(
      `Guest IOMMU through the vhost-user bridge into dpdk-testpmd's IOTLB: batched ${fmt(vb.median, vb.unit)}${vs(vb)}${mark(vb)}` +
        `${vn ? `; unbatched ${fmt(vn.median, vn.unit)} (floor, C IOTLB round trips: ${fmt(vn.peer?.median ?? NaN, vn.unit)}, ${ratio(vn.ratio ?? NaN)}x)${mark(vn)}` : ''}`,
    );
  }
  return out;
}

// --- the README's figures -----------------------------------------------------------------------------

const README_START = '<!-- bench:headline:start (written by npm run bench:report) -->';
const README_END = '<!-- bench:headline:end -->';

/** Replaces the README's headline figures (between its two markers) with this run's; no markers, no change. */
function updateReadme(head: string[], goals: string, date: string, machine: string): void {
  const file = readme;
  if (!file) return;
  const text = fs.existsSync(file) ? fs.readFileSync(file, 'utf8') : '';
  const a = text.indexOf(README_START);
  const b = text.indexOf(README_END);
  if (a < 0 || b < a) return;
  const body = [
    README_START,
    `Measured ${date} with \`npm run bench\` on ${machine} (${goals}; every figure, its peer and the reasons for the goals missed: [docs/performance.md](docs/performance.md)):`,
    '',
    ...head.map((h) => `- ${h}`),
    '',
  ].join('\n');
  fs.writeFileSync(file, text.slice(0, a) + body + text.slice(b));
}

// --- the page -----------------------------------------------------------------------------------------

function main(): void {
  const all = load();
  if (all.size === 0) throw new Error(`no results in ${resultsDir}: run npm run bench first`);
  fs.mkdirSync(docs, { recursive: true });
  const first = [...all.values()].find((r) => r.machine);
  const m = first?.machine;
  const charts = new Map<string, string | undefined>([
    ['fanout', all.get('fanout') && fanoutChart(all.get('fanout') as Result)],
    ['throughput', all.get('throughput') && throughputChart(all.get('throughput') as Result)],
    ['translate', all.get('translate') && translateChart(all.get('translate') as Result)],
    ['pinning', all.get('pinning') && pinningChart(all.get('pinning') as Result)],
    ['ioas', all.get('ioas') && ioasChart(all.get('ioas') as Result)],
    ['qemu-hotplug', all.get('qemu-hotplug') && qemuChart(all.get('qemu-hotplug') as Result)],
    ['ioas-vhost-user', all.get('ioas-vhost-user') && ioasVhostUserChart(all.get('ioas-vhost-user') as Result)],
  ]);
  // The goals of the benchmark issue; vhost-user.ts keeps the goals of its own issue, shown in its section.
  const goals = [...all.values()]
    .filter((r) => r.bench !== 'vhost-user')
    .flatMap((r) => r.results.filter((x) => x.goal && !x.note?.includes('not what a sync does')).map((x) => ({ bench: r.bench, m: x })));
  const met = goals.filter((g) => g.m.met).length;
  const dates = [...all.values()].map((r) => r.date).sort();
  const out: string[] = [];
  out.push('# Performance');
  out.push('');
  out.push(
    `Generated by \`npm run bench:report\` from \`bench/results/*.json\`, which \`npm run bench\` writes (it runs every benchmark in \`bench/\`, each in its own process, then this report). ` +
      `Do not edit by hand. Every figure is a median over repeated runs, with its 99th percentile, and stands next to a peer measured in the same run on the same machine where there is one. ` +
      `**${met} of ${goals.length} goals met.**`,
  );
  out.push('');
  out.push(`- Machine: ${m ? `${m.cpu}, ${m.cpus} CPUs, ${m.memoryGiB} GiB, ${m.kernel}, Node ${m.node}` : 'unknown'}`);
  out.push(
    `- Measured: ${dates[0]?.slice(0, 16).replace('T', ' ')} to ${dates[dates.length - 1]?.slice(0, 16).replace('T', ' ')} UTC (each benchmark's section says when, and how busy the machine was).`,
  );
  out.push(`- Command: \`npm run bench\` (all, then this report), or one benchmark: \`npm run bench:<name>\`; \`BENCH_ITERATIONS\` changes the repetitions.`);
  out.push(
    `- Round trips are measured with every process on one CPU (taskset) where the benchmark says so: on a 2-CPU VM, cross-CPU wake-ups otherwise decide the result.`,
  );
  out.push('');
  const head = headline(all);
  if (head.length > 0) {
    out.push('## Headline');
    out.push('');
    for (const h of head) out.push(`- ${h}`);
    out.push('');
  }
  out.push('## Goals');
  out.push('');
  out.push('| benchmark | measurement | median | peer (same run) | ratio | goal | status |');
  out.push('|---|---|---|---|---|---|---|');
  for (const { bench, m: x } of goals) {
    out.push(
      `| ${bench} | ${x.name} | ${fmt(x.median, x.unit)} | ${x.peer ? fmt(x.peer.median, x.unit) : ''} | ${x.ratio !== undefined ? ratio(x.ratio) : ''} | ${x.goal} | ${x.met ? 'met' : '**MISSED**'} |`,
    );
  }
  out.push('');
  for (const name of [...ORDER, ...[...all.keys()].filter((k) => !ORDER.includes(k))]) {
    const r = all.get(name);
    if (!r) continue;
    const sc = SCRIPT[name];
    out.push(`## ${sc?.title ?? name}`);
    out.push('');
    out.push(`\`${sc?.file ?? name}\`, \`${sc?.npm ?? ''}\`. ${when(r)}`);
    out.push('');
    const chart = charts.get(name);
    if (chart) {
      out.push(`![${sc?.title ?? name}](${chart})`);
      out.push('');
    }
    out.push(table(r.results));
    out.push(notes(r.results));
    const ctx = context(r);
    if (ctx) {
      out.push('<details><summary>How it was measured</summary>\n');
      out.push(ctx);
      out.push('\n</details>\n');
    }
  }
  const why = whyMissed(all);
  out.push('## Why the missed goals were missed');
  out.push('');
  out.push(why.length === 0 ? 'Every goal was met in this run.' : why.map((w) => `- ${w}`).join('\n'));
  out.push('');
  fs.writeFileSync(path.join(docs, 'performance.md'), out.join('\n'));
  updateReadme(head, `${met} of ${goals.length} goals met`, dates[dates.length - 1]?.slice(0, 10) ?? '?', m ? `${m.cpus} CPUs, ${m.cpu}` : 'unknown machine');
  console.log(
    `wrote ${path.relative(root, path.join(docs, 'performance.md'))} (${goals.length} goals, ${met} met) and ${[...charts.values()].filter(Boolean).join(', ')}`,
  );
  for (const h of head) console.log(`  ${h.replace(/\*\*/g, '')}`);
}

main();
