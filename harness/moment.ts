// The judge at the moment a promise is made. The harness's owner talks to the broker through the testkit's
// relay (testkit/relay.ts): as a COMMIT goes out, every process that may reach guest memory is read (its
// /proc/PID/maps, VmLck and fd table); as the broker's answer comes back, it is held, every process is read
// again, and only then does the owner hear it. So what the kernel showed when "done" (or the refusal) was
// said is judged, before anything could settle or slip in:
//   - done-means-done: after a commit, no process maps memory the committed map no longer slices (a
//     removed region, a region made read-only mapped writable), and none has more memory locked than the
//     committed map holds. A process that died meanwhile (fenced: killed through its pidfd) maps nothing.
//   - all-or-nothing: after a refusal, every process still alive is exactly as it was when the COMMIT went
//     out: the same mappings at the same addresses, the same locked bytes.
//   - iova-pins (--ioas): after an IOAS transaction, every shadow-mode vfio client attached to an IOAS
//     locks exactly the distinct pages its IOASes map (VmLck) and its host domains map exactly the IOVAs
//     they map (asked while the answer is held): an unmap is done only once nothing it unmapped is
//     pinned or mapped by anyone. A refused IOAS transaction is judged by all-or-nothing, as a refused COMMIT.
// While a restarted broker's space is unpublished (the owner rebuilding its map), a commit changes only
// the map: nobody applies anything, so its answer is judged by the restart window instead (restart.ts).
import { hex, type CommitOp, type IoasOp } from '../protocol/index.js';
import type { CommitReply, CommitRequest, RelayHooks } from '../testkit/relay.js';
import { MEMFD_PREFIX, type ProcessView } from './kernel.js';
import { staleAgainst } from './invariants.js';
import { delegateView, type ClientProc, type Line } from './procs.js';
import type { IovaMapping } from './model.js';
import { ioasAfter, type World } from './world.js';

/** One process that may reach guest memory, as the kernel showed it. */
export interface Seen {
  who: string;
  pid: number;
  view: ProcessView;
  /** Reads it again (a client's pid is never read once it exited; a delegate's is checked by start time). */
  look: () => ProcessView;
  /** The client it is, or whose delegate or back-end it is. */
  client?: ClientProc;
}

/** Every process that may reach guest memory: the broker, each client, each process a client handed memory to. */
export function scan(w: World): Seen[] {
  const broker = w.broker;
  const out: Seen[] = [{ who: `the broker (pid ${broker.pid})`, pid: broker.pid, view: broker.view(), look: () => broker.view() }];
  for (const c of w.clients) {
    out.push({ who: c.describe(), pid: c.pid, view: c.view(), look: () => c.view(), client: c });
    for (const d of c.delegates)
      out.push({ who: `pid ${d.pid}, which ${c.describe()} handed memory to`, pid: d.pid, view: delegateView(d), look: () => delegateView(d), client: c });
    const b = c.backend;
    if (b)
      out.push({
        who: `${b.name} (pid ${b.pid}), the back-end of ${c.describe()}`,
        pid: b.pid,
        view: c.backendView(),
        look: () => c.backendView(),
        client: c,
      });
  }
  return out;
}

const mappingKey = (m: { iova: number; gpa: number; size: number; readonly: boolean }) =>
  `${hex(m.iova)}+${hex(m.size)}->${hex(m.gpa)}${m.readonly ? ' ro' : ''}`;

/**
 * A shadow-mode client against IOAS mappings `maps` (what the IOASes map, by name): its VmLck is the distinct
 * ordinary pages its devices' IOASes map, and its host domains (asked with `domain`) map exactly those
 * IOVAs. `when` starts each problem. A client that died meanwhile has nothing (accounted elsewhere).
 */
export async function shadowProblems(
  w: World,
  c: ClientProc,
  maps: ReadonlyMap<string, readonly IovaMapping[]>,
  when: string,
  locked: number,
): Promise<string[]> {
  const ioases = new Set(c.deviceIoas.values());
  const want = w.model.shadowLocked(ioases, maps);
  const out: string[] = [];
  if (locked !== want) out.push(`${when} ${c.describe()} has VmLck ${locked} bytes, the distinct pages its IOAS(es) ${[...ioases].join(', ')} map are ${want}`);
  const d = await c.request({ cmd: 'domain' }, 'domain', 10_000).catch((err: Error): Line => ({ event: 'failed', message: err.message }));
  if (c.gone) return [];
  if (d.event !== 'domain') return [...out, `${when} ${c.describe()} could not list its domain: ${String(d.message)}`];
  const got = (d.mappings ?? []) as { iova: number; gpa: number; size: number; readonly: boolean; ioas?: string }[];
  for (const name of ioases) {
    const have = got
      .filter((m) => m.ioas === name)
      .map(mappingKey)
      .sort();
    const should = (maps.get(name) ?? []).map(mappingKey).sort();
    const stale = have.filter((k) => !should.includes(k));
    const missing = should.filter((k) => !have.includes(k));
    if (stale.length > 0)
      out.push(`${when} ${c.describe()} still maps ${stale.slice(0, 4).join(', ')} in its domain of ${name}, which the IOAS no longer maps`);
    if (missing.length > 0) out.push(`${when} ${c.describe()} does not map ${missing.slice(0, 4).join(', ')} of ${name}`);
  }
  const foreign = got.filter((m) => m.ioas === undefined || !ioases.has(m.ioas));
  if (foreign.length > 0) out.push(`${when} ${c.describe()} maps ${foreign.slice(0, 4).map(mappingKey).join(', ')} in IOAS(es) none of its devices is in`);
  return out;
}

/** A process's mappings of the harness's memfds, one line each, in address order: what "exactly as before" compares. */
export function layout(v: ProcessView): string[] {
  return v.maps
    .filter((m) => m.memfd.startsWith(MEMFD_PREFIX))
    .sort((a, b) => a.start - b.start)
    .map((m) => `${m.memfd} [${hex(m.offset)}, ${hex(m.offset + m.end - m.start)}) ${m.perms} at ${hex(m.start)}`);
}

/** How `now` differs from `before` (mappings gone, mappings new, locked bytes), or nothing. */
export function layoutChanges(before: ProcessView, now: ProcessView): string[] {
  const was = layout(before);
  const is = layout(now);
  const gone = was.filter((l) => !is.includes(l));
  const added = is.filter((l) => !was.includes(l));
  return [
    ...(gone.length > 0 ? [`no longer maps ${gone.slice(0, 4).join(', ')}${gone.length > 4 ? ` and ${gone.length - 4} more` : ''}`] : []),
    ...(added.length > 0 ? [`now maps ${added.slice(0, 4).join(', ')}${added.length > 4 ? ` and ${added.length - 4} more` : ''}`] : []),
    ...(before.lockedBytes !== now.lockedBytes ? [`has ${now.lockedBytes} bytes locked, ${before.lockedBytes} before`] : []),
  ];
}

/** What one held answer showed, kept in the step's result. */
export interface Moment {
  /** The committed generation, or the refusal's code. */
  outcome: string;
  /** Processes alive at the moment. */
  alive: number;
  /** Pids of processes that were gone at the moment (fenced by their exit, or killed by the harness). */
  dead: number[];
}

export class MomentJudge {
  /** Every process as the COMMIT went out, for the refusal's all-or-nothing. */
  private before: Seen[] | undefined;

  constructor(private readonly w: World) {}

  readonly hooks: RelayHooks = {
    onCommit: () => {
      this.before = this.w.restart ? undefined : scan(this.w);
    },
    onCommitReply: (request, reply) => this.judge(request, reply),
    onIoas: (request) => {
      this.before = this.w.restart || request.op !== 'commit' ? undefined : scan(this.w);
    },
    onIoasReply: (request, reply) => this.judgeIoas(request, reply),
  };

  /** The answer to an IOAS request, held: a refused commit by all-or-nothing, an answered one by iova-pins. */
  private async judgeIoas(request: CommitRequest, reply: CommitReply): Promise<void> {
    const w = this.w;
    const before = this.before;
    this.before = undefined;
    if (request.op !== 'commit') return;
    if (w.restart) {
      w.restart.checkKeeps('at the answer to an IOAS commit rebuilding the unpublished map');
      return;
    }
    const name = String(request.ioas);
    if (reply.error !== undefined) {
      this.refusal(before, `${String(reply.error.code)} to IOAS ${name}`);
      return;
    }
    const maps = new Map(w.model.ioas);
    maps.set(name, ioasAfter(maps.get(name) ?? [], (request.ops ?? []) as IoasOp[]));
    const outcome = `IOAS ${name} generation ${String(reply.result?.generation)}`;
    const dead: number[] = [];
    let alive = 0;
    for (const c of w.clients) {
      if (c.kind !== 'shadow') continue;
      const v = c.view();
      if (!v.alive) {
        dead.push(c.pid);
        continue;
      }
      alive++;
      w.judged.push({ invariant: 'iova-pins', problems: await shadowProblems(w, c, maps, `at done (${outcome})`, v.lockedBytes) });
    }
    w.moments.push({ outcome, alive, dead });
    w.notes.push(`at done (${outcome}): ${alive} shadow client(s) read${dead.length > 0 ? `, gone: pid ${dead.join(', ')}` : ''}`);
  }

  /** At a held refusal: every process alive then is exactly as when the request went out. */
  private refusal(before: Seen[] | undefined, outcome: string): void {
    const now = this.now(before);
    for (const s of now) {
      const b = before?.find((x) => x.pid === s.pid);
      // Dead, or not there when the request went out: nothing to compare (a death is accounted after the step).
      if (!s.view.alive || !b?.view.alive) continue;
      this.w.judged.push({
        invariant: 'all-or-nothing',
        problems: layoutChanges(b.view, s.view).map((p) => `at the refusal (${outcome}) ${s.who} ${p}, as the request went out it did not`),
      });
    }
    this.record(now, 'the refusal', outcome);
  }

  private judge(request: CommitRequest, reply: CommitReply): void {
    const w = this.w;
    const before = this.before;
    this.before = undefined;
    if (w.restart) {
      // Rebuilding a restarted broker's map: nobody applies anything yet, everybody keeps what it had.
      w.restart.checkKeeps('at the answer to a commit rebuilding the unpublished map');
      return;
    }
    // Committed, with clients the broker evicted and could not fence in time: they may still reach what the
    // change took away (documented), so they are left out of done-means-done; the rest is judged as done.
    const unfenced = reply.error?.code === 'MMB_ERR_COMMITTED_UNFENCED';
    const refused = reply.error !== undefined && !unfenced;
    const outcome = refused
      ? String(reply.error?.code)
      : `generation ${String(reply.result?.generation ?? reply.error?.generation)}${unfenced ? ' (committed unfenced)' : ''}`;
    if (refused) {
      this.refusal(before, outcome);
      return;
    }
    const evicted = (s: Seen) => unfenced && s.client !== undefined && w.broker.warned('evicting client', s.client.pid);
    const now = this.now(before).filter((s) => !evicted(s));
    const after = w.model.regionsAfter((request.ops ?? []) as CommitOp[]);
    const bytes = w.model.lockableBytes(after.values());
    const sliced = (memfd: string, writable: boolean) => w.model.fileRangesIn(after.values(), memfd, writable);
    for (const s of now) {
      if (!s.view.alive) continue;
      w.judged.push({
        invariant: 'done-means-done',
        problems: [
          ...staleAgainst(sliced, `at done (${outcome}) ${s.who}`, s.view.maps, 'committed'),
          ...(s.view.lockedBytes > bytes
            ? [`at done (${outcome}) ${s.who} has ${s.view.lockedBytes} bytes locked, more than the committed map's ${bytes} of ordinary memory`]
            : []),
        ],
      });
    }
    this.record(now, 'done', outcome);
  }

  /** Every process now; one the harness killed while the request was under way is gone from the world: looked at anyway. */
  private now(before: Seen[] | undefined): Seen[] {
    const now = scan(this.w);
    for (const b of before ?? []) if (!now.some((n) => n.pid === b.pid)) now.push({ ...b, view: b.look() });
    return now;
  }

  /** What the held answer showed, into the step's result. */
  private record(now: Seen[], what: string, outcome: string): void {
    const dead = now.filter((s) => !s.view.alive).map((s) => s.pid);
    const m: Moment = { outcome, alive: now.length - dead.length, dead };
    this.w.moments.push(m);
    this.w.notes.push(`at ${what} (${outcome}): ${m.alive} processes read${dead.length > 0 ? `, gone: pid ${dead.join(', ')}` : ''}`);
  }

  /** The answer to an IOAS request, held: a refused commit by all-or-nothing, an answered one by iova-pins. */
}
