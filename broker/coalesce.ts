// Coalesced views, for subscribers with few slots (vhost-user back-ends offer 8 or 32, DPDK 8): adjacent
// regions that are contiguous in the same backing, with the same flags, are merged into one. A map of
// 200 2 MiB blocks cut from one memfd can then be one region to such a client.
//
// A merged region takes the id of its lowest member (unique: each region belongs to exactly one run) and
// a name made from its first and last member. A coalescing client's transactions are the difference
// between its view before and after (viewOps), so it only ever sees whole runs appear and disappear.
//
// **Merging only new memory.** A run a client already follows is memory it has established: a vhost-user
// back-end maps it and may have its vrings and requests in flight there, a KVM client has it as a memslot
// under running vCPUs. Growing such a run means removing it and adding a bigger one (REM_MEM_REG then
// ADD_MEM_REG, or a memslot deleted and re-created), which breaks a running device (libvhost-user 7.2
// panics "remapping queue 0 for new memory region"). So a transaction's view (nextView) keeps every run
// of the client's current view whose memory is still there unchanged, exactly as it is, and coalesces
// only the memory that is new to the client among itself. Only when that would exceed the client's
// region limit does the view fall back to the fully coalesced map (coalesce): a **reshape** of existing
// runs, forced by the slot budget, which the client must apply safely (the vhost-user bridge stops its
// rings around it, see docs/vhost-user.md); if even the fully coalesced map exceeds the limit, the
// broker refuses the transaction before anything is sent (policy.ts).
import { rangeEnd, type Region, type TxnOp } from '../protocol/index.js';

const MAX_NAME = 64;

function runName(first: Region, last: Region, count: number): string {
  if (count === 1) return first.name;
  const name = `${first.name}..${last.name}`;
  return Buffer.byteLength(name) <= MAX_NAME ? name : `${first.name.slice(0, 40)}+${count - 1}`;
}

/** Whether `r` continues the run that starts with `first` and has `last` as its last member so far. */
const continues = (first: Region, last: Region, r: Region) =>
  r.gpa === rangeEnd(last.gpa, last.size) &&
  r.backing === first.backing &&
  r.offset === rangeEnd(last.offset, last.size) &&
  r.readonly === first.readonly &&
  r.logDirty === first.logDirty;

/** The run of `members` (at least one, contiguous): the first member itself when it is alone. */
function runOf(members: readonly Region[]): Region {
  const first = members[0] as Region;
  if (members.length === 1) return first;
  const last = members[members.length - 1] as Region;
  let id = first.id;
  for (const m of members) if (m.id < id) id = m.id;
  return { ...first, id, name: runName(first, last, members.length), size: rangeEnd(last.gpa, last.size) - first.gpa };
}

/** Merges runs of `sorted` (by gpa, non-overlapping). Returns new objects only where a run has > 1 member. */
export function coalesce(sorted: readonly Region[]): Region[] {
  const out: Region[] = [];
  let i = 0;
  while (i < sorted.length) {
    const first = sorted[i] as Region;
    let last = first;
    let j = i + 1;
    for (; j < sorted.length && continues(first, last, sorted[j] as Region); j++) last = sorted[j] as Region;
    out.push(j - i === 1 ? first : runOf(sorted.slice(i, j)));
    i = j;
  }
  return out;
}

/** Index of the first region of `sorted` that starts at or after `gpa`. */
function lowerBound(sorted: readonly Region[], gpa: number): number {
  let lo = 0;
  let hi = sorted.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if ((sorted[mid] as Region).gpa < gpa) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/**
 * The members of `sorted` that tile `run` exactly with its memory (same backing at the same offsets, same
 * access, one logging state), as [start, end) indexes; undefined when its memory is not all still there
 * unchanged. The logging state may differ from the run's: a flag change of the whole run keeps it.
 */
function intact(run: Region, sorted: readonly Region[]): [number, number] | undefined {
  const start = lowerBound(sorted, run.gpa);
  const first = sorted[start];
  if (!first || first.gpa !== run.gpa || first.backing !== run.backing || first.offset !== run.offset || first.readonly !== run.readonly) return undefined;
  const end = rangeEnd(run.gpa, run.size);
  let last = first;
  let j = start + 1;
  while (rangeEnd(last.gpa, last.size) < end) {
    const r = sorted[j];
    if (!r || !continues(first, last, r)) return undefined;
    last = r;
    j++;
  }
  return rangeEnd(last.gpa, last.size) === end ? [start, j] : undefined;
}

/**
 * The view a coalescing client gets after a transaction: `current` is its view now (the runs it follows,
 * sorted by gpa), `sorted` the map after the transaction (sorted by gpa, non-overlapping). Runs of
 * `current` whose memory is all still there unchanged are kept as they are; the rest of the map (memory
 * new to this client, and what is left of runs that lost members or changed flags in part) is coalesced
 * among itself, never into a kept run. When that leaves more than `maxRegions` regions, the result is
 * the fully coalesced map: existing runs reshaped because the budget forces it (`reshaped: true`).
 */
export function nextView(current: readonly Region[], sorted: readonly Region[], maxRegions = Number.POSITIVE_INFINITY): { view: Region[]; reshaped: boolean } {
  const claimed = new Uint8Array(sorted.length);
  const out: Region[] = [];
  for (const run of current) {
    const span = intact(run, sorted);
    if (!span) continue;
    claimed.fill(1, span[0], span[1]);
    out.push(runOf(sorted.slice(span[0], span[1])));
  }
  // What is left, in gpa order: coalesced among itself. A kept run between two leftovers breaks the
  // contiguity by itself (its members are claimed), so nothing merges across it.
  let i = 0;
  while (i < sorted.length) {
    if (claimed[i]) {
      i++;
      continue;
    }
    const first = sorted[i] as Region;
    let last = first;
    let j = i + 1;
    for (; j < sorted.length && !claimed[j] && continues(first, last, sorted[j] as Region); j++) last = sorted[j] as Region;
    out.push(runOf(sorted.slice(i, j)));
    i = j;
  }
  if (out.length > maxRegions) return { view: coalesce(sorted), reshaped: true };
  out.sort((a, b) => a.gpa - b.gpa);
  return { view: out, reshaped: false };
}

const same = (a: Region, b: Region) =>
  a.gpa === b.gpa &&
  a.size === b.size &&
  a.backing === b.backing &&
  a.offset === b.offset &&
  a.readonly === b.readonly &&
  a.logDirty === b.logDirty &&
  a.name === b.name;

/**
 * The ops that turn a coalescing client's view `before` into `after` (both as nextView / coalesce return
 * them), in the order a transaction carries them: every remove first, then every add. A run is named by
 * its id; a run whose id is in both views but differs in anything (size, flags, name) is removed and
 * added again under the same id, which the client's reconciliation turns into a metadata update when
 * only flags or the name changed (same establishment key) and into a remove + add otherwise. The result
 * is what EV_TXN sends that client instead of the transaction's own ops.
 */
export function viewOps(before: readonly Region[], after: readonly Region[]): TxnOp[] {
  const old = new Map(before.map((r) => [r.id, r]));
  const next = new Map(after.map((r) => [r.id, r]));
  const ops: TxnOp[] = [];
  for (const [id, r] of old) {
    const n = next.get(id);
    if (!n || !same(r, n)) ops.push({ op: 'remove', region: id });
  }
  for (const [id, r] of next) {
    const o = old.get(id);
    if (!o || !same(o, r)) ops.push({ op: 'add', region: r });
  }
  return ops;
}
