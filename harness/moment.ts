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
// While a restarted broker's space is unpublished (the owner rebuilding its map), a commit changes only
// the map: nobody applies anything, so its answer is judged by the restart window instead (restart.ts).
import type { CommitOp } from '../protocol/index.js';
import type { CommitReply, CommitRequest, RelayHooks } from '../testkit/relay.js';
import { MEMFD_PREFIX, type ProcessView } from './kernel.js';
import { staleAgainst, type InvariantName } from './invariants.js';
import { delegateView, type ClientProc } from './procs.js';
import type { World } from './world.js';

const hex = (n: number) => `0x${n.toString(16)}`;

/** One process that may reach guest memory, as the kernel showed it. */
export interface Seen {
  who: string;
  pid: number;
  view: ProcessView;
  /** Reads it again (a client's pid is never read once it exited; a delegate's is checked by start time). */
  look: () => ProcessView;
  client?: ClientProc;
}

/** Every process that may reach guest memory: the broker, each client, each process a client handed memory to. */
export function scan(w: World): Seen[] {
  const broker = w.broker;
  const out: Seen[] = [{ who: `the broker (pid ${broker.pid})`, pid: broker.pid, view: broker.view(), look: () => broker.view() }];
  for (const c of w.clients) {
    out.push({ who: c.describe(), pid: c.pid, view: c.view(), look: () => c.view(), client: c });
    for (const d of c.delegates)
      out.push({ who: `pid ${d.pid}, which ${c.describe()} handed memory to`, pid: d.pid, view: delegateView(d), look: () => delegateView(d) });
  }
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
  };

  private judge(request: CommitRequest, reply: CommitReply): void {
    const w = this.w;
    const before = this.before;
    this.before = undefined;
    if (w.restart) {
      // Rebuilding a restarted broker's map: nobody applies anything yet, everybody keeps what it had.
      w.restart.checkKeeps('at the answer to a commit rebuilding the unpublished map');
      return;
    }
    const now = scan(w);
    // A process the harness killed while the commit was under way is gone from the world: look at it anyway.
    for (const b of before ?? []) if (!now.some((n) => n.pid === b.pid)) now.push({ ...b, view: b.look() });
    const refused = reply.error !== undefined;
    const outcome = refused ? String(reply.error?.code) : `generation ${String(reply.result?.generation)}`;
    const dead = now.filter((s) => !s.view.alive).map((s) => s.pid);
    const judged = (invariant: InvariantName, problems: string[]) => w.judged.push({ invariant, problems });
    if (refused) {
      for (const s of now) {
        const b = before?.find((x) => x.pid === s.pid);
        // Dead, or not there when the COMMIT went out: nothing to compare (a death is accounted after the step).
        if (!s.view.alive || !b?.view.alive) continue;
        judged(
          'all-or-nothing',
          layoutChanges(b.view, s.view).map((p) => `at the refusal (${outcome}) ${s.who} ${p}, as the COMMIT went out it did not`),
        );
      }
    } else {
      const after = w.model.regionsAfter((request.ops ?? []) as CommitOp[]);
      let bytes = 0;
      for (const r of after.values()) bytes += r.size;
      const sliced = (memfd: string, writable: boolean) => w.model.fileRangesIn(after.values(), memfd, writable);
      for (const s of now) {
        if (!s.view.alive) continue;
        judged('done-means-done', [
          ...staleAgainst(sliced, `at done (${outcome}) ${s.who}`, s.view.maps, 'committed'),
          ...(s.view.lockedBytes > bytes
            ? [`at done (${outcome}) ${s.who} has ${s.view.lockedBytes} bytes locked, more than the committed map's ${bytes}`]
            : []),
        ]);
      }
    }
    const m: Moment = { outcome, alive: now.length - dead.length, dead };
    w.moments.push(m);
    w.notes.push(`at ${refused ? 'the refusal' : 'done'} (${outcome}): ${m.alive} processes read${dead.length > 0 ? `, gone: pid ${dead.join(', ')}` : ''}`);
  }
}
