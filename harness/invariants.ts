// The invariants checked after every step, each by name. Each check compares the kernel's view of a
// process (/proc/PID/maps, /proc/PID/fd, VmLck) or a process's own answer with the owner's model; the
// broker's counters are never the judge.
import fs from 'node:fs';
import { constants, native } from '../native/index.js';
import { hex, rangesCover, type Range } from '../protocol/index.js';
import { MEMFD_PREFIX, type FileMapping } from './kernel.js';
import { covers, PAGE, type Memfd, type Model, type ModelRegion } from './model.js';
import { shadowProblems } from './moment.js';
import type { ClientSnapshot, Snapshot } from './observe.js';
import { modelDevices, type StepResult } from './operations.js';
import type { ClientProc, Line } from './procs.js';
import { Rng } from '../testkit/rng.js';
import type { World } from './world.js';

export const INVARIANTS = [
  'convergence',
  'no-stale-mapping',
  'pins',
  'data',
  'leaks',
  'all-or-nothing',
  'done-means-done',
  'restart-keeps-memory',
  'vote-disturbs-nobody',
  'iova-pins',
  'outcome',
] as const;
export type InvariantName = (typeof INVARIANTS)[number];

export interface Violation {
  step: number;
  invariant: InvariantName;
  detail: string;
}

/** A check made during a step (at a held reply, in a restart window, while a vote is held), counted after it. */
export interface Judged {
  invariant: InvariantName;
  problems: string[];
}

export class Tally {
  readonly checks = Object.fromEntries(INVARIANTS.map((n) => [n, 0])) as Record<InvariantName, number>;
  readonly violations: Violation[] = [];
  step = 0;

  /** Counts one check; `problems` empty means it held. */
  check(name: InvariantName, problems: string[]): void {
    this.checks[name]++;
    if (problems.length > 0) this.violations.push({ step: this.step, invariant: name, detail: problems.join('; ') });
  }
}

function viewOf(m: Model): string {
  return JSON.stringify(m.list().map((r) => ({ name: r.name, gpa: r.gpa, size: r.size, readonly: r.readonly })));
}

/** The client's view (its `regions` answer) against the model. */
function viewProblems(w: World, s: ClientSnapshot, generation: number | undefined): string[] {
  if (typeof s.view === 'string') return [`${s.client.describe()}: ${s.view}`];
  const out: string[] = [];
  if (generation !== undefined && s.view.generation !== generation)
    out.push(`${s.client.describe()} is at generation ${s.view.generation}, the space at ${generation}`);
  const mine = JSON.stringify([...s.view.regions].sort((a, b) => a.gpa - b.gpa).map(({ name, gpa, size, readonly }) => ({ name, gpa, size, readonly })));
  if (mine !== viewOf(w.model)) out.push(`${s.client.describe()}'s view differs from the map: ${mine.slice(0, 300)} vs ${viewOf(w.model).slice(0, 300)}`);
  return out;
}

/**
 * Every region's memory is mapped in the process (per /proc/PID/maps), writable where the region is; a
 * bridge's back-end maps every writable region (read-only memory is never given to a vhost-user back-end:
 * the protocol has no read-only flag).
 */
function coverageProblems(w: World, who: string, maps: readonly FileMapping[], backend = false): string[] {
  const out: string[] = [];
  for (const r of w.model.regions.values()) {
    if (backend && r.readonly) continue;
    const memfd = w.model.memfdOf(r).name;
    const ranges: Range[] = maps.filter((m) => m.memfd === memfd && (r.readonly || m.writable)).map((m) => ({ start: m.offset, size: m.end - m.start }));
    if (!covers(ranges, r.offset, r.offset + r.size))
      out.push(`${who} does not map ${r.name} (${memfd} [${hex(r.offset)}, ${hex(r.offset + r.size)})${r.readonly ? '' : ' writable'})`);
  }
  return out;
}

/** A bridge's back-end, judged like a client: it maps every writable region and nothing else (no-stale-mapping separately). */
function backendCoverage(w: World, s: ClientSnapshot): string[] {
  return s.backend ? coverageProblems(w, s.backend.who, s.backend.maps, true) : [];
}

/** The file ranges of a memfd a map slices (`writable`: only its writable regions'). */
export type SlicedBy = (memfd: string, writable: boolean) => Range[];

/**
 * No mapping of a harness memfd outside what the map (`sliced`) slices, writable only where a writable region
 * is. A vhost-user back-end is judged the same: it maps each region's memfd from offset 0 over mmap_offset +
 * size (DPDK and libvhost-user before QEMU 9.0 do), and the broker keeps that prefix inside the map's writable
 * regions for it (feature MAPS_FROM_ZERO), so every byte it maps must be the map's.
 */
export function staleAgainst(sliced: SlicedBy, who: string, maps: readonly FileMapping[], what = 'current'): string[] {
  const out: string[] = [];
  const ranges = new Map<string, [Range[], Range[]]>();
  for (const m of maps) {
    if (!m.memfd.startsWith(MEMFD_PREFIX)) continue;
    let r = ranges.get(m.memfd);
    if (!r) ranges.set(m.memfd, (r = [sliced(m.memfd, false), sliced(m.memfd, true)]));
    const end = m.offset + m.end - m.start;
    if (!rangesCover(m.writable ? r[1] : r[0], m.offset, end - m.offset)) {
      out.push(
        `${who} maps ${m.memfd} [${hex(m.offset)}, ${hex(end)})${m.writable ? ' writable' : ''} at ${hex(m.start)}, which no ${what} ${m.writable ? 'writable ' : ''}region slices`,
      );
    }
  }
  return out;
}

function staleProblems(w: World, who: string, maps: readonly FileMapping[]): string[] {
  return staleAgainst((memfd, writable) => w.model.fileRanges(memfd, writable), who, maps);
}

/** kvm: its memslots are the map, and each slot's host address maps the region's memory (per /proc). */
function slotProblems(w: World, s: ClientSnapshot): string[] {
  if (!s.slots) return [];
  const out: string[] = [];
  const want = JSON.stringify(w.model.list().map((r) => [r.gpa, r.size, r.readonly, r.logDirty]));
  const got = JSON.stringify([...s.slots].sort((a, b) => a.gpa - b.gpa).map((x) => [x.gpa, x.size, x.readonly, x.logDirty]));
  if (want !== got) out.push(`${s.client.describe()}'s memslots ${got.slice(0, 200)} differ from the map ${want.slice(0, 200)}`);
  for (const slot of s.slots) {
    const r = [...w.model.regions.values()].find((x) => x.gpa === slot.gpa);
    if (!r) continue;
    const m = s.maps.find((x) => x.start <= slot.hva && slot.hva < x.end);
    if (!m || m.memfd !== w.model.memfdOf(r).name || m.offset + (slot.hva - m.start) !== r.offset) {
      out.push(
        `${s.client.describe()}'s slot at ${hex(slot.gpa)} points at ${hex(slot.hva)}, which maps ${m ? `${m.memfd}+${hex(m.offset + slot.hva - m.start)}` : 'nothing'}, not ${r.name}'s memory`,
      );
    }
  }
  return out;
}

/** What a vfio-like process must have locked: the whole map (its ordinary memory: hugetlb is never in VmLck) once while its domain has a device. */
function pinProblems(w: World, s: ClientSnapshot): string[] {
  const want = s.client.devices.length > 0 ? w.model.lockableBytes() : 0;
  return s.locked === want
    ? []
    : [`${s.client.describe()} has VmLck ${s.locked} bytes, its domain (${s.client.devices.length} device(s)) should pin ${want} once`];
}

function statusProblems(w: World, snap: Snapshot): string[] {
  const regions = snap.status?.regions ?? [];
  const got = JSON.stringify([...regions].sort((a, b) => a.gpa - b.gpa).map((r) => [r.name, r.gpa, r.size, r.backing, r.offset, r.readonly, r.logDirty]));
  const want = JSON.stringify(w.model.list().map((r) => [r.name, r.gpa, r.size, r.backing, r.offset, r.readonly, r.logDirty]));
  return got === want ? [] : [`the broker's map ${got.slice(0, 300)} differs from the owner's ${want.slice(0, 300)}`];
}

export function convergence(w: World, snap: Snapshot, t: Tally): void {
  t.check('convergence', [...(snap.unsettled ? [`not settled: ${snap.unsettled}`] : []), ...statusProblems(w, snap)]);
  for (const s of snap.clients) {
    const devices =
      s.devices !== undefined && JSON.stringify(s.devices) !== JSON.stringify(s.client.devices)
        ? [`${s.client.describe()} reports devices ${JSON.stringify(s.devices)}, the harness attached ${JSON.stringify(s.client.devices)}`]
        : [];
    const failed = s.failed ? [`${s.client.describe()}: ${s.failed}`] : [];
    const ioasDevices =
      s.ioasDevices !== undefined && JSON.stringify(s.ioasDevices) !== JSON.stringify(modelDevices(s.client))
        ? [`${s.client.describe()} reports devices ${JSON.stringify(s.ioasDevices)}, the harness attached ${JSON.stringify(modelDevices(s.client))}`]
        : [];
    t.check('convergence', [
      ...viewProblems(w, s, snap.status?.generation),
      ...coverageProblems(w, s.client.describe(), s.maps),
      ...backendCoverage(w, s),
      ...slotProblems(w, s),
      ...devices,
      ...ioasDevices,
      ...failed,
    ]);
  }
}

export function noStaleMapping(w: World, snap: Snapshot, t: Tally): void {
  t.check('no-stale-mapping', staleProblems(w, `the broker (pid ${w.broker.pid})`, snap.broker.maps));
  for (const s of snap.clients) {
    t.check('no-stale-mapping', staleProblems(w, s.client.describe(), s.maps));
    if (s.backend) t.check('no-stale-mapping', staleProblems(w, s.backend.who, s.backend.maps));
  }
}

export function pins(w: World, snap: Snapshot, t: Tally): void {
  for (const s of snap.clients) if (s.client.kind === 'vfio') t.check('pins', pinProblems(w, s));
}

/** Shadow-mode clients, settled: VmLck = the distinct pages their IOASes map, and their domains map exactly those IOVAs. */
export async function iovaPins(w: World, snap: Snapshot, t: Tally): Promise<void> {
  for (const s of snap.clients) {
    if (s.client.kind !== 'shadow' || s.client.gone) continue;
    t.check('iova-pins', await shadowProblems(w, s.client, w.model.ioas, 'settled:', s.locked));
  }
}

/**
 * A refused or faulted transaction, judged the moment the owner had its answer (observeNow), before
 * anything settles: the broker calls a change done only once every client applied it or rolled it back,
 * so the broker's map and every client it lists as ready hold exactly the map the answer says (old or
 * new), in their views, /proc/PID/maps and VmLck: nothing partial, and nothing left to catch up later.
 */
export function allOrNothing(w: World, snap: Snapshot, t: Tally): void {
  t.check('all-or-nothing', statusProblems(w, snap));
  for (const s of snap.clients) {
    t.check('all-or-nothing', [
      ...viewProblems(w, s, undefined),
      ...coverageProblems(w, s.client.describe(), s.maps),
      ...backendCoverage(w, s),
      ...staleProblems(w, s.client.describe(), s.maps),
      ...(s.backend ? staleProblems(w, s.backend.who, s.backend.maps) : []),
      ...(s.client.kind === 'vfio' ? pinProblems(w, s) : []),
    ]);
  }
}

export function outcome(result: StepResult, t: Tally): void {
  t.check('outcome', result.surprises);
}

/** Live backings per memfd name, as the model counts them. */
function backingsPerMemfd(m: Model): Map<string, number> {
  const n = new Map<string, number>();
  for (const b of m.backings.values()) n.set(b.memfd.name, (n.get(b.memfd.name) ?? 0) + 1);
  return n;
}

export function leaks(w: World, snap: Snapshot, t: Tally): void {
  const live = backingsPerMemfd(w.model);
  const logging = [...w.model.regions.values()].filter((r) => r.logDirty).length;
  const backendLogging = [...w.model.regions.values()].filter((r) => r.logDirty && !r.readonly).length;
  const b = snap.broker.census;
  const base = w.broker.baseline;
  const problems: string[] = [];
  for (const name of new Set([...live.keys(), ...b.memfds.keys()])) {
    // One fd per live backing, plus its read-only reopen once a subscriber needed one (broker/backings.ts).
    const held = b.memfds.get(name) ?? 0;
    const n = live.get(name) ?? 0;
    if (held < n || held > 2 * n) problems.push(`the broker holds ${held} fd(s) of ${name}, ${n} live backing(s) use it`);
  }
  const conns = 1 + w.clients.length;
  // A bridge names its back-end to the broker (DELEGATE of its pidfd): one pidfd more each.
  const delegated = w.clients.filter((c) => c.backend && c.backendView().alive).length;
  if (b.sockets !== base.sockets + conns) problems.push(`the broker holds ${b.sockets} sockets, expected ${base.sockets} + ${conns} connections`);
  if (b.pidfds > base.pidfds + conns + delegated)
    problems.push(`the broker holds ${b.pidfds} pidfds, more than ${base.pidfds} + ${conns} connections + ${delegated} bridge back-ends`);
  if (b.bitmaps !== logging) problems.push(`the broker holds ${b.bitmaps} dirty bitmaps for ${logging} logging region(s)`);
  // One pidfd per socket connection (SO_PEERPIDFD), and one per process a client being fenced reaches.
  const fencing = (snap.status?.holders ?? []).reduce((n, h) => n + h.alive.length, 0);
  if (b.pidfds !== base.pidfds + conns + delegated + fencing)
    problems.push(
      `the broker holds ${b.pidfds} pidfds, expected ${base.pidfds} + ${conns} connections + ${delegated} bridge back-ends + ${fencing} of clients being fenced`,
    );
  if (b.other !== base.other) problems.push(`the broker holds ${b.other} other fds, ${base.other} at start`);
  t.check('leaks', problems);
  for (const s of snap.clients) {
    const c = s.census;
    const p: string[] = [];
    for (const [name, n] of c.memfds) if (n > (live.get(name) ?? 0)) p.push(`holds ${n} fd(s) of ${name}, ${live.get(name) ?? 0} live backing(s) use it`);
    for (const r of w.model.regions.values())
      if (!c.memfds.has(w.model.memfdOf(r).name)) p.push(`holds no fd of ${w.model.memfdOf(r).name}, which ${r.name} uses`);
    if (c.bitmaps > logging) p.push(`holds ${c.bitmaps} dirty bitmaps for ${logging} logging region(s)`);
    // Its stdio pipes are sockets too (libuv socketpairs): compared with what it held once attached.
    const cb = s.client.baseline;
    if (cb && c.sockets !== cb.sockets) p.push(`holds ${c.sockets} sockets, ${cb.sockets} after it attached (stdio and its one connection)`);
    // A bridge shares its dirty log with its back-end (one `vhost-log` memfd) while a region it gives the
    // back-end logs (read-only ones are never given), and only then.
    const log = s.client.backend && backendLogging > 0 ? 1 : 0;
    if (c.vhostLogs !== log) p.push(`holds ${c.vhostLogs} vhost-user dirty log(s) while ${backendLogging} writable region(s) log`);
    // The baseline is read right after the client said ready, when a descriptor of its start-up may still be
    // open for a moment (a sysfs read on a loaded machine): fewer later lowers it; only more is a leak.
    if (cb && c.other < cb.other) cb.other = c.other;
    if (cb && c.other > cb.other) p.push(`holds ${c.other} other fds, ${cb.other} after it attached`);
    t.check(
      'leaks',
      p.map((x) => `${s.client.describe()} ${x}`),
    );
    // A bridge's back-end holds no descriptor of memory no live backing uses.
    if (s.backend) {
      const bp: string[] = [];
      for (const [name, n] of s.backend.census.memfds)
        if (n > 0 && !live.has(name)) bp.push(`${s.backend.who} holds ${n} fd(s) of ${name}, which no live backing uses`);
      t.check('leaks', bp);
    }
  }
}

/**
 * A client that left detached and exited 0 on SIGTERM (null: it had to be killed after the grace period);
 * the leaks check that follows covers what the processes still running hold.
 */
export function leftClean(c: ClientProc, code: number | null, t: Tally): void {
  t.check('leaks', code === 0 ? [] : [`${c.describe()} ${code === null ? 'did not exit on SIGTERM and was killed' : `exited ${code}`} when it left`]);
}

/**
 * Bytes written by one client at a GPA are read back by every other client and by the owner. A client that
 * dies meanwhile (evicted and killed) is left out: its death is accounted for by the next step.
 */
export async function data(w: World, snap: Snapshot, t: Tally): Promise<void> {
  const regions = w.model.list();
  const healthy = snap.clients.filter((s) => typeof s.view !== 'string' && !s.client.gone);
  if (regions.length === 0 || healthy.length < 2) return;
  const rng = new Rng((w.opts.seed ^ Math.imul(t.step + 1, 0x9e3779b1)) >>> 0);
  const r: ModelRegion = rng.pick(regions);
  const at = rng.int(0, r.size - 16);
  const gpa = r.gpa + at;
  const bytes = rng.bytes(16);
  const memfd = w.model.memfdOf(r);
  const writer = r.readonly || rng.chance(0.15) ? undefined : rng.pick(healthy).client;
  const problems: string[] = [];
  const ask = (c: ClientProc, cmd: Record<string, unknown> & { cmd: string }, reply: string) =>
    c.request(cmd, reply).catch((err: Error): Line | undefined => (c.gone ? undefined : { event: 'failed', message: err.message }));
  if (writer) {
    const reply = await ask(writer, { cmd: 'write', gpa, hex: bytes.toString('hex') }, 'wrote');
    if (reply === undefined) return;
    if (reply.event !== 'wrote') problems.push(`${writer.describe()} could not write ${hex(gpa)} in ${r.name}: ${String(reply.message)}`);
  } else {
    ownerWrite(memfd, r.offset + at, bytes);
    if (r.readonly) {
      // A client may not write a read-only region: refused, and nothing changes.
      const c = rng.pick(healthy).client;
      const reply = await ask(c, { cmd: 'write', gpa, hex: Buffer.alloc(16, 0xee).toString('hex') }, 'wrote');
      if (reply && reply.event !== 'failed') problems.push(`${c.describe()} wrote read-only ${r.name} at ${hex(gpa)}`);
    }
  }
  for (const s of healthy) {
    if (s.client === writer) continue;
    const reply = await ask(s.client, { cmd: 'read', gpa, len: 16 }, 'read');
    if (reply && reply.hex !== bytes.toString('hex'))
      problems.push(
        `${s.client.describe()} reads ${String(reply.hex ?? reply.message)} at ${hex(gpa)} (${r.name}), ${writer ? writer.describe() : 'the owner'} wrote ${bytes.toString('hex')}`,
      );
  }
  const mine = Buffer.alloc(16);
  fs.readSync(memfd.fd, mine, 0, 16, r.offset + at);
  if (!mine.equals(bytes))
    problems.push(
      `the owner reads ${mine.toString('hex')} in ${memfd.name} at ${hex(r.offset + at)} (${r.name}), ${writer?.describe()} wrote ${bytes.toString('hex')}`,
    );
  t.check('data', problems);
}

/** The owner writes guest memory through its memfd: pwrite, or for hugetlb (no write(2) on hugetlbfs) a mapping of the page. */
function ownerWrite(memfd: Memfd, offset: number, bytes: Buffer): void {
  if (memfd.pageSize === PAGE) {
    fs.writeSync(memfd.fd, bytes, 0, bytes.length, offset);
    return;
  }
  const page = Math.floor(offset / memfd.pageSize) * memfd.pageSize;
  const len = Math.ceil((offset + bytes.length - page) / memfd.pageSize) * memfd.pageSize;
  const view = native.mmap(memfd.fd, page, len, constants.PROT_READ | constants.PROT_WRITE, constants.MAP_SHARED);
  try {
    new Uint8Array(view.buffer).set(bytes, offset - page);
  } finally {
    native.munmap(view);
  }
}
