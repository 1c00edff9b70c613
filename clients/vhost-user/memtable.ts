// From a map change to vhost-user memory-table messages: a pure planner, so that the rules are tested
// without a back-end, and the slot limit is enforced before anything is sent.
//
// Rules:
//   - Read-only regions are not given to the back-end (QEMU leaves ROM out of vhost memory tables too:
//     the protocol has no read-only flag, and a back-end would map them writable).
//   - 'table' mode (no CONFIGURE_MEM_SLOTS, e.g. DPDK): every change is one SET_MEM_TABLE with the whole
//     new table, at most 8 regions.
//   - 'slots' mode (CONFIGURE_MEM_SLOTS, e.g. libvhost-user): REM_MEM_REG for each removed region first,
//     then ADD_MEM_REG for each added one (QEMU's order: a region moved or replaced at the same GPA never
//     overlaps its old self, and the slot count never exceeds max(before, after)). When nothing stays
//     (first sync, or a full replacement) and the new table fits 8 regions, one SET_MEM_TABLE does it.
//   - The table after the change must fit the slot limit (`maxSlots`): otherwise MMB_ERR_CLIENT_LIMIT
//     and nothing is sent. A back-end's reply-ack of 0 is not proof that it had room (libvhost-user 7.2
//     acks the 33rd ADD_MEM_REG and then stops working), so the limit is never probed. One exception: a
//     change that only adds (the vote of a two-phase transaction, whose removals come in a second change)
//     gives the back-end what fits and defers the rest (`deferred`); the next change places them after
//     its removals, or fails.
//   - A metadata-only change (name, logDirty, a new backing id for the same file after a broker restart)
//     sends nothing.
//
// Reshapes: a plan that removes memory the back-end keeps in another shape (a run re-added bigger or
// split, a region replaced by one overlapping it) or, in 'table' mode, remaps a table the back-end already
// has, is a **reshape** (`reshape: true`): the applier stops the rings around it (rings.ts). Where a
// removed region holds a running vring, REM_MEM_REG + ADD_MEM_REG cannot work on libvhost-user before
// QEMU 9.0 (ADD_MEM_REG remaps every ring before it counts the new region: "vu_panic: remapping queue 0
// for new memory region"), nor can adding the new shape first (from 9.0 overlapping regions panic); so
// the table is rebuilt: one SET_MEM_TABLE with the regions holding rings and up to 8 in all, then
// ADD_MEM_REG for the rest (every version remaps its stopped rings at SET_MEM_TABLE). Removing the memory
// of a running vring without giving it back is refused (MMB_ERR_CLIENT_REFUSED): stop the device first.
import { ClientLimitError, ClientRefusedError, rangeContains, rangeText, rangesOverlap, type Gpa } from '../../protocol/index.js';
import type { Change, ViewRegion } from '../view.js';
import { MEM_TABLE_MAX_REGIONS, type MemRegion } from './messages.js';

/**
 * Base of the "user addresses" given to the back-end: any unique, consistent value works (back-ends only
 * use it to translate ring addresses from SET_VRING_ADDR). uaddr = base + gpa, so regions never overlap.
 */
export const UADDR_BASE = 0x7f00_0000_0000n;

export const uaddrOf = (gpa: number): bigint => UADDR_BASE + BigInt(gpa);

/** A region as the back-end holds it. */
export interface TableEntry extends MemRegion {
  /** The view region's key (gpa, size, backing file, offset, access). */
  readonly key: string;
  readonly name: string;
  /** The broker's backing id, to find our fd for it (it may change across broker restarts). */
  backing: number;
  /** The region logs dirty pages (the back-end's writes must then be logged). */
  logDirty: boolean;
}

export type Step = { op: 'table'; entries: TableEntry[] } | { op: 'add'; entry: TableEntry } | { op: 'rem'; entry: TableEntry };

export type MemMode = 'slots' | 'table';

/** A guest-physical range, [gpa, gpa + bytes). */
export interface GuestRange {
  gpa: Gpa;
  bytes: number;
}

export interface PlanOptions {
  /** Where the back-end's running vrings are (rings.ts). */
  rings?: readonly GuestRange[];
  /** Entries an earlier change accepted without giving them to the back-end (no slot was free then). */
  deferred?: ReadonlyMap<string, TableEntry>;
}

export interface Plan {
  steps: Step[];
  /** The back-end's table once every step is done, by key. */
  after: Map<string, TableEntry>;
  /** Entries accepted but not given to the back-end yet, by key (see the rules). */
  deferred: Map<string, TableEntry>;
  /** The steps take away memory the back-end keeps in another shape: stop the rings around them. */
  reshape: boolean;
}

export function entryOf(r: ViewRegion): TableEntry {
  return { key: r.key, name: r.name, backing: r.backing, logDirty: r.logDirty, gpa: r.gpa, size: r.size, uaddr: uaddrOf(r.gpa), mmapOffset: r.offset };
}

const byGpa = (a: TableEntry, b: TableEntry) => a.gpa - b.gpa;

/**
 * The steps that make the back-end's table (`current`, by key) follow `change`. Throws
 * MMB_ERR_CLIENT_LIMIT, before anything is sent, when the result would not fit `maxSlots`.
 */
export function planMemTable(current: ReadonlyMap<string, TableEntry>, change: Change, mode: MemMode, maxSlots: number, opts: PlanOptions = {}): Plan {
  const rings = opts.rings ?? [];
  const after = new Map(current);
  const deferred = new Map(opts.deferred ?? []);
  const removed: TableEntry[] = [];
  for (const r of change.removed) {
    if (deferred.delete(r.key)) continue; // never given to the back-end
    const e = after.get(r.key);
    if (!e) continue; // read-only, never given to the back-end
    after.delete(r.key);
    removed.push(e);
  }
  for (const { after: r } of change.updated) {
    for (const m of [after, deferred]) {
      const e = m.get(r.key);
      if (e) m.set(r.key, { ...e, name: r.name, backing: r.backing, logDirty: r.logDirty });
    }
  }
  let added: TableEntry[] = [...deferred.values()];
  deferred.clear();
  for (const r of change.added) {
    if (r.readonly) continue;
    added.push(entryOf(r));
  }
  added.sort(byGpa);
  for (const e of added) after.set(e.key, e);
  const limit = mode === 'table' ? Math.min(maxSlots, MEM_TABLE_MAX_REGIONS) : maxSlots;
  if (after.size > limit) {
    const what = `${after.size} memory regions; it has ${limit} ${mode === 'table' ? '(SET_MEM_TABLE only)' : 'slots'}`;
    if (change.removed.length > 0 || change.updated.length > 0 || opts.deferred?.size) throw new ClientLimitError(`the vhost-user back-end would need ${what}`);
    // Only adds: the vote of a two-phase transaction. What does not fit waits for its removals.
    const room = added.length - (after.size - limit);
    for (const e of added.slice(room)) {
      after.delete(e.key);
      deferred.set(e.key, e);
    }
    added = added.slice(0, room);
  }
  const steps: Step[] = [];
  if (removed.length === 0 && added.length === 0) return { steps, after, deferred, reshape: false };
  const keeps = (e: TableEntry) => added.some((a) => rangesOverlap(a.gpa, a.size, e.gpa, e.size));
  let reshape = mode === 'table' ? current.size > 0 : removed.some(keeps);
  const table = (): Step => ({ op: 'table', entries: [...after.values()].sort(byGpa) });
  // The running vrings whose region this plan removes: it must give their memory back in one region.
  const orphaned = rings.filter((g) => removed.some((e) => rangesOverlap(e.gpa, e.size, g.gpa, g.bytes)));
  const lost = orphaned.find((g) => !added.some((a) => rangeContains(a.gpa, a.size, g.gpa, g.bytes)));
  if (lost) {
    throw new ClientRefusedError(
      `the vhost-user back-end runs a vring at ${rangeText(lost.gpa, lost.bytes)}, whose memory the change removes: stop the device first`,
    );
  }
  if (mode === 'table') steps.push(table());
  else if (orphaned.length > 0) {
    steps.push(...rebuild([...after.values()], rings));
    reshape = true;
  } else if (removed.length === current.size && after.size > 0 && after.size <= MEM_TABLE_MAX_REGIONS && removed.length + added.length > 1) {
    steps.push(table());
  } else {
    for (const e of removed.sort(byGpa)) steps.push({ op: 'rem', entry: e });
    for (const e of added) steps.push({ op: 'add', entry: e });
  }
  return { steps, after, deferred, reshape };
}

/**
 * The steps that give the back-end exactly `entries`, whatever it has now: one SET_MEM_TABLE (which
 * replaces everything and remaps the rings) with the regions holding `rings` first and at most 8 in all,
 * then one ADD_MEM_REG per remaining region. The rings must be stopped.
 */
export function rebuild(entries: readonly TableEntry[], rings: readonly GuestRange[]): Step[] {
  const holds = (e: TableEntry) => rings.some((g) => rangesOverlap(e.gpa, e.size, g.gpa, g.bytes));
  const order = [...entries].sort((a, b) => Number(holds(b)) - Number(holds(a)) || a.gpa - b.gpa);
  const first = order.slice(0, MEM_TABLE_MAX_REGIONS).sort(byGpa);
  return [
    { op: 'table', entries: first },
    ...order
      .slice(MEM_TABLE_MAX_REGIONS)
      .sort(byGpa)
      .map((entry): Step => ({ op: 'add', entry })),
  ];
}

/**
 * The steps that undo `done` (a prefix of a plan's steps, applied to `before`), in the order to run them.
 * A prefix that replaced the table, or took away the memory of a running vring, is undone by rebuilding
 * the old table (see rebuild()); anything else by the opposite steps in reverse.
 */
export function undoSteps(before: ReadonlyMap<string, TableEntry>, done: readonly Step[], mode: MemMode, rings: readonly GuestRange[] = []): Step[] {
  if (done.length === 0) return [];
  const prior = [...before.values()].sort(byGpa);
  if (mode === 'table') return [{ op: 'table', entries: prior }];
  const ringLost = done.some((s) => s.op === 'rem' && rings.some((g) => rangesOverlap(s.entry.gpa, s.entry.size, g.gpa, g.bytes)));
  if (ringLost || done.some((s) => s.op === 'table')) {
    if (prior.length <= MEM_TABLE_MAX_REGIONS || ringLost || rings.length > 0) return rebuild(prior, rings);
    // No rings: remove what the prefix left, then add the old table back.
    const now = new Map(before);
    for (const s of done) {
      if (s.op === 'table') {
        now.clear();
        for (const e of s.entries) now.set(e.key, e);
      } else if (s.op === 'add') now.set(s.entry.key, s.entry);
      else now.delete(s.entry.key);
    }
    return [...[...now.values()].sort(byGpa).map((entry): Step => ({ op: 'rem', entry })), ...prior.map((entry): Step => ({ op: 'add', entry }))];
  }
  return [...done].reverse().map((s): Step => (s.op === 'add' ? { op: 'rem', entry: s.entry } : { op: 'add', entry: (s as { entry: TableEntry }).entry }));
}
