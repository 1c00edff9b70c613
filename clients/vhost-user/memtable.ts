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
//     acks the 33rd ADD_MEM_REG and then stops working), so the limit is never probed.
//   - A metadata-only change (name, logDirty, a new backing id for the same file after a broker restart)
//     sends nothing.
import { ClientLimitError } from '../../protocol/index.js';
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
}

export type Step =
  | { op: 'table'; entries: TableEntry[] }
  | { op: 'add'; entry: TableEntry }
  | { op: 'rem'; entry: TableEntry };

export type MemMode = 'slots' | 'table';

export interface Plan {
  steps: Step[];
  /** The back-end's table once every step is done, by key. */
  after: Map<string, TableEntry>;
}

export function entryOf(r: ViewRegion): TableEntry {
  return { key: r.key, name: r.name, backing: r.backing, gpa: r.gpa, size: r.size, uaddr: uaddrOf(r.gpa), mmapOffset: r.offset };
}

const byGpa = (a: TableEntry, b: TableEntry) => a.gpa - b.gpa;

/**
 * The steps that make the back-end's table (`current`, by key) follow `change`. Throws
 * MMB_ERR_CLIENT_LIMIT, before anything is sent, when the result would not fit `maxSlots`.
 */
export function planMemTable(current: ReadonlyMap<string, TableEntry>, change: Change, mode: MemMode, maxSlots: number): Plan {
  const after = new Map(current);
  const removed: TableEntry[] = [];
  for (const r of change.removed) {
    const e = after.get(r.key);
    if (!e) continue; // read-only, never given to the back-end
    after.delete(r.key);
    removed.push(e);
  }
  for (const { after: r } of change.updated) {
    const e = after.get(r.key);
    if (e) after.set(r.key, { ...e, name: r.name, backing: r.backing });
  }
  const added: TableEntry[] = [];
  for (const r of change.added) {
    if (r.readonly) continue;
    const e = entryOf(r);
    after.set(e.key, e);
    added.push(e);
  }
  const limit = mode === 'table' ? Math.min(maxSlots, MEM_TABLE_MAX_REGIONS) : maxSlots;
  if (after.size > limit) {
    throw new ClientLimitError(
      `the vhost-user back-end would need ${after.size} memory regions; it has ${limit} ${mode === 'table' ? '(SET_MEM_TABLE only)' : 'slots'}`,
    );
  }
  const steps: Step[] = [];
  if (removed.length === 0 && added.length === 0) return { steps, after };
  const table = (): Step => ({ op: 'table', entries: [...after.values()].sort(byGpa) });
  if (mode === 'table') steps.push(table());
  else if (removed.length === current.size && after.size > 0 && after.size <= MEM_TABLE_MAX_REGIONS && removed.length + added.length > 1) {
    steps.push(table());
  } else {
    for (const e of removed.sort(byGpa)) steps.push({ op: 'rem', entry: e });
    for (const e of added.sort(byGpa)) steps.push({ op: 'add', entry: e });
  }
  return { steps, after };
}

/**
 * The steps that undo `done` (a prefix of a plan's steps, applied to `before`), in the order to run them.
 */
export function undoSteps(before: ReadonlyMap<string, TableEntry>, done: readonly Step[], mode: MemMode): Step[] {
  if (done.length === 0) return [];
  const prior = [...before.values()].sort(byGpa);
  if (mode === 'table' || done.some((s) => s.op === 'table')) {
    if (mode === 'table' || (prior.length > 0 && prior.length <= MEM_TABLE_MAX_REGIONS)) return [{ op: 'table', entries: prior }];
    // slots mode, a table step replaced everything and the old table does not fit one message.
    const table = done.find((s): s is Extract<Step, { op: 'table' }> => s.op === 'table') as Extract<Step, { op: 'table' }>;
    return [...table.entries.map((entry): Step => ({ op: 'rem', entry })), ...prior.map((entry): Step => ({ op: 'add', entry }))];
  }
  return [...done].reverse().map((s): Step => (s.op === 'add' ? { op: 'rem', entry: s.entry } : { op: 'add', entry: (s as { entry: TableEntry }).entry }));
}
