// The memslot planner (clients/kvm/slots.ts) and the software stand-in (clients/kvm/software.ts), without
// a kernel: slot ids assigned and reused, KVM's rules (no overlap, no resize or move in place, READONLY
// never toggled in place, LOG_DIRTY_PAGES toggled in place), the safe order, the slot limit. Every plan
// is also executed on the software table, which checks each call the way kvm_set_memory_region() does;
// test/kvm.test.ts holds the software table to the real kernel's verdicts.
import { describe, expect, it } from 'vitest';
import { planSlots, tableAfter, SoftwareMemslots, opArgs, type SlotChange, type SlotOp, type SlotTable } from '../clients/kvm/index.js';
import { KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY } from '../clients/kvm/abi.js';
import { toView, type LocalBacking, type ViewRegion } from '../clients/view.js';
import { asGpa, asHva, asOffset, isMmbError, type Region } from '../protocol/index.js';

const MiB = 1 << 20;
const backings = new Map<number, LocalBacking>([
  [1, { id: 1, name: 'ram', size: 1 << 30, fd: -1, dev: 7, ino: 100 }],
  [2, { id: 2, name: 'rom', size: 1 << 30, fd: -1, dev: 7, ino: 200 }],
]);

function region(id: number, name: string, gpa: number, size: number, more: Partial<Region> = {}): ViewRegion {
  return toView({ id, name, gpa: asGpa(gpa), size, backing: 1, offset: asOffset(gpa), readonly: false, logDirty: false, ...more }, backings);
}

/** A fake host address per region key, as GuestMemory would hand out (distinct, page aligned). */
const hvaOf = (r: ViewRegion) => asHva(0x7f00_0000_0000 + r.offset + (r.readonly ? 0x10_0000_0000 : 0) + r.size * 0);

const change = (c: Partial<SlotChange>): SlotChange => ({ removed: [], updated: [], added: [], ...c });

/** The plan, and the table after it (a new map: `table` is left alone). */
function plan(table: SlotTable, c: Partial<SlotChange>, maxSlots = 32764) {
  const p = planSlots(table, change(c), { maxSlots, hva: hvaOf, hypervisor: 'software' });
  return { ...p, table: tableAfter(table, p) };
}

const brief = (ops: SlotOp[]) => ops.map((o) => `${o.op} ${o.slot.slot}`);

/** A stand-in VM and table that follow each plan, so every op is checked as KVM would. */
function vmWith(...regions: ViewRegion[]) {
  const vm = new SoftwareMemslots();
  let table: SlotTable = new Map();
  const apply = (c: Partial<SlotChange>, maxSlots?: number) => {
    const p = plan(table, c, maxSlots);
    for (const op of p.ops) vm.setUserMemoryRegion(opArgs(op));
    table = p.table;
    return p;
  };
  if (regions.length) apply({ added: regions });
  return { vm, apply, table: () => table, ids: () => [...table.values()].sort((a, b) => a.gpa - b.gpa).map((s) => `${s.name}@${s.slot}`) };
}

describe('slot ids', () => {
  it('creates one slot per region, ids from 0 in gpa order, flags from the region', () => {
    const p = plan(new Map(), {
      added: [region(3, 'c', 0x3000_0000, 4 * MiB), region(1, 'a', 0, 2 * MiB, { readonly: true }), region(2, 'b', 0x1000_0000, 8 * MiB, { logDirty: true })],
    });
    expect(brief(p.ops)).toEqual(['create 0', 'create 1', 'create 2']);
    const slots = [...p.table.values()];
    expect(slots.map((s) => [s.slot, s.name, s.gpa, s.size, s.flags])).toEqual([
      [0, 'a', 0, 2 * MiB, KVM_MEM_READONLY],
      [1, 'b', 0x1000_0000, 8 * MiB, KVM_MEM_LOG_DIRTY_PAGES],
      [2, 'c', 0x3000_0000, 4 * MiB, 0],
    ]);
    expect(slots[1]!.hva).toBe(hvaOf(region(2, 'b', 0x1000_0000, 8 * MiB)));
  });

  it('reuses the lowest free id, including ids freed by the same transaction', () => {
    const [a, b, c, d] = [region(1, 'a', 0, MiB), region(2, 'b', 0x100_0000, MiB), region(3, 'c', 0x200_0000, MiB), region(4, 'd', 0x300_0000, MiB)];
    const vm = vmWith(a, b, c, d);
    expect(vm.ids()).toEqual(['a@0', 'b@1', 'c@2', 'd@3']);
    // Free 1 and 2; the next region takes 1.
    vm.apply({ removed: [b, c] });
    const e = region(5, 'e', 0x800_0000, MiB);
    expect(brief(vm.apply({ added: [e] }).ops)).toEqual(['create 1']);
    // Free 0 and add two in one transaction: 0 (freed now) and 2 (free before).
    const f = region(6, 'f', 0x900_0000, MiB);
    const g = region(7, 'g', 0xa00_0000, MiB);
    expect(brief(vm.apply({ removed: [a], added: [g, f] }).ops)).toEqual(['delete 0', 'create 0', 'create 2']);
    expect(vm.ids()).toEqual(['d@3', 'e@1', 'f@0', 'g@2']);
    expect(vm.vm.table().map((s) => s.slot)).toEqual([0, 1, 2, 3]);
  });

  it('removing a region that never got a slot is a no-op', () => {
    const vm = vmWith(region(1, 'a', 0, MiB));
    const p = vm.apply({ removed: [region(9, 'ghost', 0x4000_0000, MiB)] });
    expect(p.ops).toEqual([]);
    expect(vm.ids()).toEqual(['a@0']);
  });
});

describe("KVM's rules", () => {
  it('a move (new gpa) is delete then create, never an in-place move', () => {
    const a = region(1, 'a', 0x1000_0000, 4 * MiB);
    const vm = vmWith(a);
    const moved = region(1, 'a', 0x2000_0000, 4 * MiB, { offset: a.offset });
    const p = vm.apply({ removed: [a], added: [moved] });
    expect(p.ops.map((o) => [o.op, o.slot.slot, o.slot.gpa])).toEqual([
      ['delete', 0, 0x1000_0000],
      ['create', 0, 0x2000_0000],
    ]);
    expect(opArgs(p.ops[0]!).size).toBe(0);
  });

  it('a resize is delete then create', () => {
    const a = region(1, 'a', 0x1000_0000, 4 * MiB);
    const vm = vmWith(a);
    const bigger = region(1, 'a', 0x1000_0000, 8 * MiB);
    const p = vm.apply({ removed: [a], added: [bigger] });
    expect(p.ops.map((o) => [o.op, o.slot.size])).toEqual([
      ['delete', 4 * MiB],
      ['create', 8 * MiB],
    ]);
  });

  it('a READONLY toggle is delete then create (KVM refuses it in place), keeping the slot id', () => {
    const rw = region(1, 'rom', 0xfff0_0000, MiB);
    const vm = vmWith(region(2, 'low', 0, MiB), rw);
    const ro = region(1, 'rom', 0xfff0_0000, MiB, { readonly: true });
    expect(ro.key).not.toBe(rw.key); // the view hands it over as removed + added
    const p = vm.apply({ removed: [rw], added: [ro] });
    expect(p.ops.map((o) => [o.op, o.slot.slot, o.slot.flags])).toEqual([
      ['delete', 1, 0],
      ['create', 1, KVM_MEM_READONLY],
    ]);
    // The in-place call really is refused by the stand-in, as by KVM.
    const inPlace = { slot: 1, flags: 0, gpa: 0xfff0_0000, size: MiB, hva: p.ops[1]!.slot.hva };
    let code: string | undefined;
    try {
      vm.vm.setUserMemoryRegion(inPlace);
    } catch (err) {
      code = isMmbError(err, 'MMB_ERR_KVM') ? err.errno : 'other';
    }
    expect(code).toBe('EINVAL');
  });

  it('a LOG_DIRTY_PAGES toggle is one in-place operation on the same slot', () => {
    const a = region(1, 'ram', 0, 64 * MiB);
    const vm = vmWith(region(2, 'x', 0x1_0000_0000, MiB), a);
    const before = vm.table().get(0)!;
    expect(before.name).toBe('ram');
    const on = region(1, 'ram', 0, 64 * MiB, { logDirty: true });
    expect(on.key).toBe(a.key);
    const calls = vm.vm.calls;
    const p = vm.apply({ updated: [{ before: a, after: on }] });
    expect(p.ops).toHaveLength(1);
    const op = p.ops[0]!;
    expect(op.op).toBe('flags');
    expect([op.slot.slot, op.slot.gpa, op.slot.size, op.slot.hva, op.slot.flags]).toEqual([0, 0, 64 * MiB, before.hva, KVM_MEM_LOG_DIRTY_PAGES]);
    expect(vm.vm.calls).toBe(calls + 1);
    // And back off.
    const p2 = vm.apply({ updated: [{ before: on, after: a }] });
    expect(p2.ops.map((o) => [o.op, o.slot.slot, o.slot.flags])).toEqual([['flags', 0, 0]]);
  });

  it('a change of name or id alone touches no slot but updates the table', () => {
    const a = region(1, 'ram', 0, MiB);
    const vm = vmWith(a);
    const renamed = region(7, 'ram-renamed', 0, MiB);
    const p = vm.apply({ updated: [{ before: a, after: renamed }] });
    expect(p.ops).toEqual([]);
    expect(vm.table().get(0)).toMatchObject({ name: 'ram-renamed', region: 7, flags: 0 });
  });

  it('several operations in one transaction: deletes, then flag changes, then creates, every step accepted', () => {
    const a = region(1, 'a', 0x1000_0000, 16 * MiB);
    const b = region(2, 'b', 0x2000_0000, 16 * MiB);
    const c = region(3, 'c', 0x3000_0000, 16 * MiB);
    const vm = vmWith(a, b, c);
    // One transaction: remove a and c, replace a's range by two halves (one from another file), dirty-log b.
    const a1 = region(4, 'a1', 0x1000_0000, 8 * MiB, { offset: asOffset(0x5000_0000) });
    const a2 = toView(
      { id: 5, name: 'a2', gpa: asGpa(0x1080_0000), size: 8 * MiB, backing: 2, offset: asOffset(0), readonly: true, logDirty: false },
      backings,
    );
    const bDirty = region(2, 'b', 0x2000_0000, 16 * MiB, { logDirty: true });
    // Listed in the worst order on purpose.
    const p = vm.apply({ added: [a2, a1], updated: [{ before: b, after: bDirty }], removed: [c, a] });
    expect(brief(p.ops)).toEqual(['delete 0', 'delete 2', 'flags 1', 'create 0', 'create 2']);
    expect(vm.ids()).toEqual(['a1@0', 'a2@2', 'b@1']);
    expect(vm.vm.table().map((s) => [s.slot, s.gpa, s.flags])).toEqual([
      [0, 0x1000_0000, 0],
      [1, 0x2000_0000, KVM_MEM_LOG_DIRTY_PAGES],
      [2, 0x1080_0000, KVM_MEM_READONLY],
    ]);
  });

  it('the order matters: the same operations with creates first are refused', () => {
    const a = region(1, 'a', 0x1000_0000, 16 * MiB);
    const b = region(2, 'b', 0x2000_0000, 16 * MiB);
    const p0 = plan(new Map(), { added: [a, b] });
    const fresh = () => {
      const vm = new SoftwareMemslots();
      for (const op of p0.ops) vm.setUserMemoryRegion(opArgs(op));
      return vm;
    };
    // Replace a by a region in the same range from another file, and move b up.
    const a1 = region(3, 'a1', 0x1000_0000, 8 * MiB, { offset: asOffset(0x5000_0000) });
    const b1 = region(2, 'b', 0x3000_0000, 16 * MiB, { offset: b.offset });
    const p = plan(p0.table, { removed: [a, b], added: [a1, b1] });
    expect(brief(p.ops)).toEqual(['delete 0', 'delete 1', 'create 0', 'create 1']);
    const inPlan = fresh();
    for (const op of p.ops) inPlan.setUserMemoryRegion(opArgs(op));
    expect(inPlan.table().map((s) => s.gpa)).toEqual([0x1000_0000, 0x3000_0000]);
    // Creates first: slot 0 still holds a, and KVM cannot resize or move it onto another host range.
    const naive = fresh();
    const creates = p.ops.filter((o) => o.op === 'create');
    expect(() => naive.setUserMemoryRegion(opArgs(creates[0]!))).toThrow(/EINVAL/);
    // Nor can a fresh id take a1's range while a still covers it.
    expect(() => naive.setUserMemoryRegion({ ...opArgs(creates[0]!), slot: 5 })).toThrow(/EEXIST/);
  });

  it('refuses a final table with overlapping slots (EEXIST), without side effects', () => {
    const vm = vmWith(region(1, 'a', 0, 16 * MiB));
    const before = new Map(vm.table());
    const clash = region(2, 'b', 8 * MiB, 16 * MiB, { offset: asOffset(0x4000_0000) });
    let err: unknown;
    try {
      plan(vm.table(), { added: [clash] });
    } catch (e) {
      err = e;
    }
    expect(isMmbError(err, 'MMB_ERR_KVM') && err.errno).toBe('EEXIST');
    expect(vm.table()).toEqual(before);
  });
});

describe('overlap, checked on what is created', () => {
  it('two created slots that overlap each other are refused (EEXIST)', () => {
    const a = region(1, 'a', 0x1000_0000, 16 * MiB);
    const b = region(2, 'b', 0x1080_0000, 16 * MiB, { offset: asOffset(0x4000_0000) });
    expect(() => plan(new Map(), { added: [b, a] })).toThrow(/would overlap/);
  });

  it('a created slot inside, across or around remaining slots is refused; next to them it is fine', () => {
    const table = plan(new Map(), {
      added: [region(1, 'a', 0x1000_0000, 16 * MiB), region(2, 'b', 0x2000_0000, 16 * MiB), region(3, 'c', 0x3000_0000, 16 * MiB)],
    }).table;
    const at = (gpa: number, size: number) => () => plan(table, { added: [region(9, 'x', gpa, size, { offset: asOffset(0x5000_0000) })] });
    expect(at(0x2040_0000, MiB)).toThrow(/EEXIST|overlap/); // inside b
    expect(at(0x1f00_0000, 32 * MiB)).toThrow(/overlap/); // across b's start
    expect(at(0x0f00_0000, 0x3000_0000)).toThrow(/overlap/); // around a, b and c
    expect(at(0x3100_0000 - MiB, MiB)).toThrow(/overlap/); // c's last MiB
    expect(() => at(0x1100_0000, 16 * MiB)()).not.toThrow(); // right after a
    expect(() => at(0x0f00_0000, 16 * MiB)()).not.toThrow(); // right before a
  });

  it('a large table: one hotplug plans only its own slots, with ids reused (speed is measured in bench/)', () => {
    const regions = Array.from({ length: 30_000 }, (_, i) => region(i + 1, `r${i}`, i * 4 * MiB, 2 * MiB));
    const full = plan(new Map(), { added: regions });
    expect(full.table.size).toBe(30_000);
    const p = plan(full.table, { removed: [regions[12_345]!], added: [region(99_999, 'hp', 0x100_0000_0000, 2 * MiB)] });
    expect(brief(p.ops)).toEqual(['delete 12345', 'create 12345']);
  });
});

describe('the slot limit', () => {
  it('refuses a change needing more slots than the limit, with MMB_ERR_CLIENT_LIMIT and nothing changed', () => {
    const [a, b] = [region(1, 'a', 0, MiB), region(2, 'b', 0x100_0000, MiB)];
    const vm = vmWith(a, b);
    const table = vm.table();
    const snapshot = structuredClone([...table.entries()]);
    const calls = vm.vm.calls;
    let err: unknown;
    try {
      vm.apply({ added: [region(3, 'c', 0x200_0000, MiB)] }, 2);
    } catch (e) {
      err = e;
    }
    expect(isMmbError(err, 'MMB_ERR_CLIENT_LIMIT')).toBe(true);
    expect((err as Error).message).toContain('at most 2');
    expect([...vm.table().entries()]).toEqual(snapshot);
    expect(vm.table()).toBe(table);
    expect(vm.vm.calls).toBe(calls);
  });

  it('counts the slots the same transaction frees: replacing at the limit is fine', () => {
    const [a, b] = [region(1, 'a', 0, MiB), region(2, 'b', 0x100_0000, MiB)];
    const vm = vmWith(a, b);
    const p = vm.apply({ removed: [a], added: [region(3, 'c', 0x200_0000, MiB)] }, 2);
    expect(brief(p.ops)).toEqual(['delete 0', 'create 0']);
  });

  it('the stand-in refuses slot ids at or above its limit, as KVM does', () => {
    const vm = new SoftwareMemslots({ maxSlots: 4 });
    expect(() => vm.setUserMemoryRegion({ slot: 4, flags: 0, gpa: 0, size: 4096, hva: 0x10000 })).toThrow(/EINVAL/);
    vm.setUserMemoryRegion({ slot: 3, flags: 0, gpa: 0, size: 4096, hva: 0x10000 });
    expect(vm.table()).toHaveLength(1);
  });
});

describe('the software stand-in judges calls like kvm_set_memory_region()', () => {
  const errnoOf = (vm: SoftwareMemslots, r: Parameters<SoftwareMemslots['setUserMemoryRegion']>[0]) => {
    try {
      vm.setUserMemoryRegion(r);
      return 'ok';
    } catch (err) {
      return isMmbError(err, 'MMB_ERR_KVM') ? err.errno : String(err);
    }
  };
  it('returns the errno KVM returns', () => {
    const vm = new SoftwareMemslots();
    const base = { slot: 0, flags: 0, gpa: 0x10_0000, size: MiB, hva: 0x7000_0000_0000 };
    expect(errnoOf(vm, base)).toBe('ok');
    expect(errnoOf(vm, base)).toBe('ok'); // same again: nothing to change
    expect(errnoOf(vm, { ...base, slot: 5, gpa: 0x18_0000 })).toBe('EEXIST');
    expect(errnoOf(vm, { ...base, slot: 6, size: 0 })).toBe('EINVAL'); // delete of an empty slot
    expect(errnoOf(vm, { ...base, flags: KVM_MEM_READONLY })).toBe('EINVAL');
    expect(errnoOf(vm, { ...base, size: MiB / 2 })).toBe('EINVAL');
    expect(errnoOf(vm, { ...base, hva: base.hva + 4096 })).toBe('EINVAL');
    expect(errnoOf(vm, { ...base, flags: 4 })).toBe('EINVAL');
    expect(errnoOf(vm, { ...base, slot: 7, gpa: 0x80_0000, size: 4096 * 3 + 1 })).toBe('EINVAL');
    expect(errnoOf(vm, { ...base, slot: 7, gpa: 0x80_0800 })).toBe('EINVAL');
    expect(errnoOf(vm, { ...base, slot: 7, gpa: 2 ** 52 })).toBe('EINVAL');
    expect(errnoOf(vm, { ...base, slot: 65536 + 3, gpa: 0x90_0000 })).toBe('EINVAL');
    expect(errnoOf(vm, { ...base, slot: 7, gpa: 0x90_0000, hva: 2 ** 47 })).toBe('EINVAL');
    expect(errnoOf(vm, { ...base, flags: KVM_MEM_LOG_DIRTY_PAGES })).toBe('ok'); // flags only, in place
    expect(errnoOf(vm, { ...base, slot: 0, size: 0 })).toBe('ok');
    expect(vm.table()).toEqual([]);
  });
});
