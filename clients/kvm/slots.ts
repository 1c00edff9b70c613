// The memslot planner: from the slot table a VM has and a Change of the subscriber's view (clients/view.ts),
// the minimal KVM_SET_USER_MEMORY_REGION operations, in an order KVM accepts at every step. Pure: no
// ioctl, no mapping, no clock; the applier (applier.ts) executes the plan and undoes it on failure.
//
// KVM's rules, and how a Change maps onto them:
//   - slots never overlap (EEXIST), so every delete runs before any create: a region moved into space
//     another one vacates in the same transaction never collides with it;
//   - a slot cannot be resized, moved to another host address, or have KVM_MEM_READONLY toggled in
//     place (EINVAL). Those changes alter the region's key (gpa, size, backing, offset, access), so the
//     view already hands them over as `removed` + `added`: delete, then create;
//   - a change of KVM_MEM_LOG_DIRTY_PAGES alone is one in-place call (KVM_MR_FLAGS_ONLY): the view
//     hands it over as `updated` with the same key;
//   - a change of id, name or backing id alone (same file, same offset) touches no slot;
//   - slot ids are small integers below the VM's limit (KVM_CAP_NR_MEMSLOTS); a new slot takes the
//     lowest id free after this transaction's deletes, so ids are reused and stay dense.
// Order of the plan: deletes, then flag changes, then creates.
import { ClientLimitError, InternalError, KvmError, hex, rangeEnd, rangesOverlap, type Gpa, type Hva } from '../../protocol/index.js';
import type { ViewRegion } from '../view.js';
import { KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, type MemoryRegionArgs } from './abi.js';

/** One memslot as the client holds it. */
export interface Slot {
  /** KVM slot id (address space 0). */
  readonly slot: number;
  readonly gpa: Gpa;
  readonly size: number;
  /** Host virtual address of the slot's first byte (the region's mapping in this process). */
  readonly hva: Hva;
  /** KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY. */
  readonly flags: number;
  /** The region's key in the view (what the slot's establishment depends on). */
  readonly key: string;
  /** The broker's region id and name, for status and messages. */
  readonly region: number;
  readonly name: string;
}

/** Slot id -> slot. */
export type SlotTable = ReadonlyMap<number, Slot>;

export type SlotOp =
  /** KVM_SET_USER_MEMORY_REGION with memory_size 0. */
  | { op: 'delete'; slot: Slot }
  /** In place: same slot, gpa, size and hva; only KVM_MEM_LOG_DIRTY_PAGES differs. */
  | { op: 'flags'; slot: Slot; before: Slot }
  | { op: 'create'; slot: Slot };

export interface SlotPlan {
  /** Deletes, then flag changes, then creates. */
  ops: SlotOp[];
  /** How the table changes once every op succeeded: slot id -> its new entry, or undefined if deleted. */
  changes: Map<number, Slot | undefined>;
}

/** The part of a Change the planner reads. */
export interface SlotChange {
  removed: readonly ViewRegion[];
  updated: readonly { before: ViewRegion; after: ViewRegion }[];
  added: readonly ViewRegion[];
}

export interface PlanOptions {
  /** The most slots the VM may hold (KVM_CAP_NR_MEMSLOTS, or fewer by choice). */
  maxSlots: number;
  /** Host address of an added region's mapping. */
  hva: (region: ViewRegion) => Hva;
  /** Prefix for messages: "kvm" or "software" (Memslots.hypervisor). */
  hypervisor?: string;
  /** `table` indexed by region key, if the caller keeps one (else it is built: O(slots)). */
  byKey?: ReadonlyMap<string, Slot>;
}

export function flagsOf(r: { readonly: boolean; logDirty: boolean }): number {
  return (r.readonly ? KVM_MEM_READONLY : 0) | (r.logDirty ? KVM_MEM_LOG_DIRTY_PAGES : 0);
}

/** The ioctl argument that performs `op`. */
export function opArgs(op: SlotOp): MemoryRegionArgs {
  const s = op.slot;
  return { slot: s.slot, flags: s.flags, gpa: s.gpa, size: op.op === 'delete' ? 0 : s.size, hva: s.hva };
}

/** The ioctl argument that undoes `op` (run in reverse order after a failure). */
export function undoArgs(op: SlotOp): MemoryRegionArgs {
  switch (op.op) {
    case 'create':
      return { ...opArgs(op), size: 0 };
    case 'delete':
      return { ...opArgs(op), size: op.slot.size };
    case 'flags':
      return opArgs({ op: 'create', slot: op.before });
  }
}

export function describeSlot(s: Slot): string {
  return `slot ${s.slot} (region ${JSON.stringify(s.name)}, gpa ${hex(s.gpa)}, ${hex(s.size)} bytes, flags ${s.flags})`;
}

/**
 * The operations that turn `table` into the slot table of the view after `change`, and how the table
 * changes. Pure: throws with nothing changed, MMB_ERR_CLIENT_LIMIT when more than `maxSlots` slots would
 * be needed; MMB_ERR_KVM (EEXIST) when two slots would overlap; MMB_ERR_INTERNAL when the change
 * contradicts the table (an added region that already has a slot). Costs O(slots) for the id and overlap
 * scans plus O(k log k) for k added regions; nothing is copied.
 */
export function planSlots(table: SlotTable, change: SlotChange, opts: PlanOptions): SlotPlan {
  const who = opts.hypervisor ?? 'kvm';
  const byKey = opts.byKey ?? indexByKey(table);
  const changes = new Map<number, Slot | undefined>();
  const current = (id: number): Slot | undefined => (changes.has(id) ? changes.get(id) : table.get(id));
  const deletes: SlotOp[] = [];
  const flagOps: SlotOp[] = [];
  const creates: SlotOp[] = [];

  // Removed regions: a region that never got a slot (never established) is a no-op.
  for (const r of change.removed) {
    const s = byKey.get(r.key);
    if (!s || current(s.slot) !== s) continue;
    changes.set(s.slot, undefined);
    deletes.push({ op: 'delete', slot: s });
  }

  // Updated regions keep their key: gpa, size, file, offset and access are the same.
  for (const { before, after } of change.updated) {
    const s = byKey.get(before.key);
    if (!s || current(s.slot) !== s) continue; // not slotted (its establishment was cancelled): nothing to change
    const updated: Slot = { ...s, key: after.key, flags: flagsOf(after), region: after.id, name: after.name };
    changes.set(s.slot, updated);
    if (updated.flags !== s.flags) {
      if ((updated.flags ^ s.flags) & KVM_MEM_READONLY) {
        // Cannot happen through the view (access is part of the key); KVM would refuse it in place.
        throw new InternalError(`[${who}] region ${JSON.stringify(after.name)} toggles read-only without a new key`);
      }
      flagOps.push({ op: 'flags', slot: updated, before: s });
    }
  }

  const count = table.size - deletes.length + change.added.length;
  if (count > opts.maxSlots) {
    throw new ClientLimitError(
      `[${who}] the change needs ${count} memslots; this VM holds at most ${opts.maxSlots} (${change.added.length} to create, ${deletes.length} to delete, ${table.size} now)`,
    );
  }

  // Lowest free ids, in gpa order of the added regions (deterministic).
  const added = [...change.added].sort((a, b) => a.gpa - b.gpa);
  const created: Slot[] = [];
  let candidate = 0;
  for (const r of added) {
    const existing = byKey.get(r.key);
    if (existing && current(existing.slot) === existing) {
      throw new InternalError(`[${who}] region ${JSON.stringify(r.name)} is added but already has ${describeSlot(existing)}`);
    }
    while (current(candidate) !== undefined) candidate++;
    if (candidate >= opts.maxSlots) {
      throw new ClientLimitError(`[${who}] no free memslot id below ${opts.maxSlots} for region ${JSON.stringify(r.name)}`);
    }
    const s: Slot = { slot: candidate, gpa: r.gpa, size: r.size, hva: opts.hva(r), flags: flagsOf(r), key: r.key, region: r.id, name: r.name };
    changes.set(candidate, s);
    created.push(s);
    creates.push({ op: 'create', slot: s });
  }

  // KVM's no-overlap rule. Deletes and flag changes cannot make slots overlap, and deletes run first, so
  // it is enough that the created slots (sorted by gpa) overlap neither each other nor a remaining slot.
  if (created.length > 0) {
    for (let i = 1; i < created.length; i++) {
      const prev = created[i - 1] as Slot;
      const cur = created[i] as Slot;
      if (rangesOverlap(cur.gpa, cur.size, prev.gpa, prev.size)) throw overlap(who, cur, prev);
    }
    const isNew = new Set(created);
    for (const id of table.keys()) {
      const s = current(id);
      if (!s || isNew.has(s)) continue;
      // The first created slot ending after s starts; it overlaps s if it starts before s ends.
      let lo = 0;
      let hi = created.length;
      while (lo < hi) {
        const mid = (lo + hi) >>> 1;
        const c = created[mid] as Slot;
        if (rangeEnd(c.gpa, c.size) <= s.gpa) lo = mid + 1;
        else hi = mid;
      }
      const c = created[lo];
      if (c && rangesOverlap(c.gpa, c.size, s.gpa, s.size)) throw overlap(who, c, s);
    }
  }

  deletes.sort((a, b) => a.slot.slot - b.slot.slot);
  flagOps.sort((a, b) => a.slot.slot - b.slot.slot);
  return { ops: [...deletes, ...flagOps, ...creates], changes };
}

function overlap(who: string, s: Slot, other: Slot): Error {
  return new KvmError(`[${who}] ${describeSlot(s)} would overlap ${describeSlot(other)}`, { errno: 'EEXIST' });
}

export function indexByKey(table: SlotTable): Map<string, Slot> {
  const byKey = new Map<string, Slot>();
  for (const s of table.values()) byKey.set(s.key, s);
  return byKey;
}

/**
 * Applies a plan's table changes to `table` (and its key index, if given) in place. `skipped` are ids of
 * creates that were not executed: they end up absent.
 */
export function applyPlan(table: Map<number, Slot>, plan: SlotPlan, byKey?: Map<string, Slot>, skipped?: ReadonlySet<number>): void {
  for (const [id, s] of plan.changes) {
    const old = table.get(id);
    if (old && byKey?.get(old.key) === old) byKey.delete(old.key);
    if (s === undefined || skipped?.has(id)) table.delete(id);
    else {
      table.set(id, s);
      byKey?.set(s.key, s);
    }
  }
}

/** The table after `plan`, as a new map (for callers that keep tables immutable). */
export function tableAfter(table: SlotTable, plan: SlotPlan): Map<number, Slot> {
  const next = new Map(table);
  applyPlan(next, plan);
  return next;
}
