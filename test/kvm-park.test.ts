// vCPU parking (issue 13, point 3): KVM has no atomic slot replace, so a change that deletes and
// re-creates a slot at overlapping addresses (a read-only toggle here) leaves the guest a moment with no
// memory where it has some before and after. The kvm-like client parks the vCPUs around it: its own (a
// KVM_RUN in progress is kicked out with immediate_exit and a signal, and not re-entered until resumed)
// and the VMM's, through the parkVcpus hook. Judged with a real vCPU running a guest loop that reads the
// toggled region: at every KVM_SET_USER_MEMORY_REGION of the pair the vCPU is out of KVM_RUN, and the
// guest never takes an exit to a missing slot.
//
// Without /dev/kvm these tests are skipped, except under CI=true, where that is a failure.
import fs from 'node:fs';
import { afterEach, describe, expect, it } from 'vitest';
import {
  KvmSubscriber,
  assembleCounterLoop,
  assembleProgram,
  replacesInPlace,
  planSlots,
  type KvmSubscriberOptions,
  type GuestRun,
  type Slot,
} from '../clients/kvm/index.js';
import type { OwnerClient } from '../clients/index.js';
import type { ViewRegion } from '../clients/view.js';
import { native } from '../native/index.js';
import { ALL_FEATURES, Feature, asGpa, asHva } from '../protocol/index.js';
import { IN_CI } from './helpers/ci.js';
import { defer, embeddedBroker, ownerOf, runCleanups } from './helpers/embedded.js';

const MiB = 1 << 20;
const HAVE_KVM = fs.existsSync('/dev/kvm');
const describeKvm = describe.skipIf(!HAVE_KVM && !IN_CI);
if (!HAVE_KVM && !IN_CI) console.warn('vCPU parking tests skipped: no /dev/kvm (CI=true makes this a failure)');

afterEach(runCleanups);

const CODE = 0x10_0000;
const COUNTER = 0x18_0000;
const DATA = 16 * MiB;
const READ = DATA + 0x100;

/** A space with "code" (1 MiB at 1 MiB: the guest loop and its counter) and "data" (2 MiB at 16 MiB). */
async function setup(opts: Partial<KvmSubscriberOptions> = {}): Promise<{ owner: OwnerClient; kvm: KvmSubscriber; backing: number }> {
  const broker = embeddedBroker();
  const owner = await ownerOf(broker);
  const ram = await owner.createBacking(32 * MiB, 'ram');
  defer(() => native.close(ram.fd));
  await owner.commit([
    { op: 'add', name: 'code', gpa: CODE, size: MiB, backing: ram.backing, offset: 0 },
    { op: 'add', name: 'data', gpa: DATA, size: 2 * MiB, backing: ram.backing, offset: 8 * MiB },
  ]);
  const kvm = await KvmSubscriber.attach(broker, { space: 'vm0', name: 'kvm0', software: false, ...opts });
  defer(() => kvm.close());
  return { owner, kvm, backing: ram.backing };
}

const counter = (kvm: KvmSubscriber) => new DataView(kvm.memory.read(COUNTER, 4).buffer).getUint32(0, true);

/** Resolves once the guest's counter moved past `from` (the guest really runs); turns of the event loop, no timer. */
async function advances(kvm: KvmSubscriber, from = counter(kvm)): Promise<number> {
  for (let turn = 0; turn < 1_000_000; turn++) {
    const now = counter(kvm);
    if (now !== from) return now;
    await new Promise((r) => setImmediate(r));
  }
  throw new Error(`the guest's counter stayed at ${from}`);
}

async function startLoop(kvm: KvmSubscriber): Promise<GuestRun> {
  const run = await kvm.runGuest({ codeGpa: CODE, image: assembleCounterLoop(READ, COUNTER) });
  defer(() => run.stop());
  await advances(kvm, 0);
  return run;
}

describeKvm('the vCPU runner can be parked', () => {
  it('park() kicks a guest loop out of KVM_RUN and keeps it out until unpark()', async () => {
    const { kvm } = await setup();
    const run = await startLoop(kvm);
    const vcpu = kvm.vcpu!;
    expect(vcpu.parked).toBe(false);
    await vcpu.park();
    expect([vcpu.parked, vcpu.inKvmRun]).toEqual([true, false]);
    const frozen = counter(kvm);
    // Many turns of the event loop (each a chance for the runner to re-enter): the guest does not run.
    for (let i = 0; i < 2000; i++) await new Promise((r) => setImmediate(r));
    expect(counter(kvm)).toBe(frozen);
    expect(vcpu.inKvmRun).toBe(false);
    // Parks nest.
    await vcpu.park();
    vcpu.unpark();
    for (let i = 0; i < 200; i++) await new Promise((r) => setImmediate(r));
    expect(counter(kvm)).toBe(frozen);
    vcpu.unpark();
    await advances(kvm, frozen);
    const result = await run.stop();
    expect(result).toMatchObject({ halted: false, exits: [] });
    expect(vcpu.inKvmRun).toBe(false);
  });
});

describeKvm('guest runs and programs share the vCPU', () => {
  it('one run at a time; a halted or stopped guest leaves the vCPU ready for the next program', async () => {
    const { kvm } = await setup();
    const run = await startLoop(kvm);
    const busy = await kvm.runGuest({ codeGpa: CODE + 0x1000, image: assembleCounterLoop(READ, COUNTER) }).then(
      () => undefined,
      (e: { errno: string }) => e,
    );
    expect(busy?.errno).toBe('EBUSY');
    await run.stop();
    // A guest that halts on its own; stop() after that changes nothing.
    const halting = await kvm.runGuest({
      codeGpa: CODE + 0x1000,
      image: assembleProgram(CODE + 0x1000, [{ gpa: COUNTER + 8, bytes: Buffer.from('hlt') }]).image,
    });
    expect(await halting.done).toMatchObject({ halted: true, exits: [] });
    await halting.stop();
    await kvm.runProgram({ codeGpa: CODE + 0x2000, writes: [{ gpa: COUNTER + 16, bytes: Buffer.from('after') }] });
    expect(Buffer.from(kvm.memory.read(COUNTER + 8, 13)).toString()).toBe('hlt\0\0\0\0\0after');
  });
});

describeKvm('changes that delete and re-create a slot run with the vCPUs parked', () => {
  it('a guest loop reading a region across 40 read-only toggles: parked at every slot call of the pair, never an exit to a missing slot', async () => {
    const vmm: string[] = [];
    const { owner, kvm } = await setup({
      parkVcpus: async () => {
        vmm.push('park');
        return () => void vmm.push('resume');
      },
    });
    const run = await startLoop(kvm);
    // The kernel's calls for the "data" slot, with the vCPU's state at each.
    const calls: { size: number; flags: number; parked: boolean; inKvmRun: boolean; vmm: string | undefined }[] = [];
    const setRegion = kvm.vm.setUserMemoryRegion.bind(kvm.vm);
    kvm.vm.setUserMemoryRegion = (r) => {
      if (r.gpa === DATA) calls.push({ size: r.size, flags: r.flags, parked: kvm.vcpu!.parked, inKvmRun: kvm.vcpu!.inKvmRun, vmm: vmm.at(-1) });
      setRegion(r);
    };
    let seen = counter(kvm);
    const toggles = 40;
    for (let i = 0; i < toggles; i++) {
      await owner.commit([{ op: 'set', region: 'data', readonly: i % 2 === 0 }]);
      // The guest runs between changes: its counter moves on.
      seen = await advances(kvm, seen);
    }
    const result = await run.stop();
    // Each toggle is a delete and a create, both while the vCPU was parked (out of KVM_RUN) and the VMM's
    // vCPUs too; and the guest never read from a gpa that had no slot.
    expect(calls).toHaveLength(2 * toggles);
    expect(calls.map((c) => c.size === 0)).toEqual(Array.from({ length: 2 * toggles }, (_, i) => i % 2 === 0));
    for (const c of calls) expect(c).toMatchObject({ parked: true, inKvmRun: false, vmm: 'park' });
    expect(result.exits.filter((e) => e.reason === 'KVM_EXIT_MMIO')).toEqual([]);
    expect(vmm).toEqual(Array.from({ length: 2 * toggles }, (_, i) => (i % 2 === 0 ? 'park' : 'resume')));
    expect(kvm.stats.parked).toBe(toggles);
    expect(kvm.vcpu!.parked).toBe(false);
  });

  it('adds, removals and moves to other addresses need no parking; a replacement at one gpa does', async () => {
    const parks: number[] = [];
    const { owner, kvm, backing } = await setup({ parkVcpus: async () => (parks.push(kvm.stats.applied), () => undefined) });
    await owner.commit([{ op: 'add', name: 'hot', gpa: 64 * MiB, size: 2 * MiB, backing, offset: 16 * MiB }]);
    await owner.commit([
      { op: 'remove', region: 'hot' },
      { op: 'add', name: 'hot2', gpa: 128 * MiB, size: 2 * MiB, backing, offset: 16 * MiB },
    ]);
    await owner.commit([{ op: 'remove', region: 'hot2' }]);
    expect(parks).toEqual([]);
    await owner.commit([
      { op: 'remove', region: 'data' },
      { op: 'add', name: 'data2', gpa: DATA, size: 2 * MiB, backing, offset: 18 * MiB },
    ]);
    expect(parks).toHaveLength(1);
  });

  // Single-phase (no TWO_PHASE), so that the slot change, and the hook with it, is part of the vote and a
  // failure is a refusal. A two-phase client parks at the commit, which cannot be refused: there a failing
  // hook makes the client nack the commit and be fenced (docs/clients.md).
  it('a hook that fails refuses the change: nothing changed, the vCPU runs on', async () => {
    let fail = true;
    const { owner, kvm } = await setup({
      features: ALL_FEATURES & ~Feature.TWO_PHASE,
      parkVcpus: async () => {
        if (fail) throw new Error('the VMM could not stop its vCPUs');
        return () => undefined;
      },
    });
    const run = await startLoop(kvm);
    const before = kvm.slots();
    const refused = await owner.commit([{ op: 'set', region: 'data', readonly: true }]).then(
      () => undefined,
      (err: Error & { code: string }) => err,
    );
    expect(refused?.code).toBe('MMB_ERR_KVM');
    expect(refused?.message).toMatch(/kvm0.*the VMM could not stop its vCPUs/s);
    expect(kvm.slots()).toEqual(before);
    expect(kvm.vcpu!.parked).toBe(false);
    await advances(kvm);
    fail = false;
    await owner.commit([{ op: 'set', region: 'data', readonly: true }]);
    expect(kvm.slots().find((s) => s.name === 'data')).toMatchObject({ readonly: true });
    await advances(kvm);
    expect((await run.stop()).exits).toEqual([]);
  });
});

describe('which plans need parking (pure)', () => {
  const slot = (id: number, gpa: number, size: number): Slot => ({
    slot: id,
    gpa: asGpa(gpa),
    size,
    hva: asHva(0x7f00_0000_0000 + gpa),
    flags: 0,
    key: `${gpa}+${size}`,
    region: id,
    name: `r${id}`,
  });
  const region = (gpa: number, size: number, key = `${gpa}+${size}:new`): ViewRegion =>
    ({ id: 99, name: 'n', gpa, size, backing: 1, offset: 0, readonly: false, logDirty: false, file: '1:1', key }) as ViewRegion;
  const table = new Map([
    [0, slot(0, 0, 4 * MiB)],
    [1, slot(1, 8 * MiB, 4 * MiB)],
  ]);
  const removed = (s: Slot) => ({ ...region(s.gpa, s.size, s.key) });
  const plan = (rm: Slot[], add: ViewRegion[]) =>
    planSlots(table, { removed: rm.map(removed), updated: [], added: add }, { maxSlots: 16, hva: (r) => asHva(0x7f00_0000_0000 + r.gpa) });
  it('parks only where a deleted range overlaps a created one', () => {
    expect(replacesInPlace(plan([], [region(16 * MiB, MiB)]))).toBe(false);
    expect(replacesInPlace(plan([table.get(0)!], []))).toBe(false);
    expect(replacesInPlace(plan([table.get(0)!], [region(4 * MiB, 4 * MiB)]))).toBe(false); // adjacent, no overlap
    expect(replacesInPlace(plan([table.get(0)!], [region(0, 4 * MiB)]))).toBe(true); // same range
    expect(replacesInPlace(plan([table.get(1)!], [region(6 * MiB, 4 * MiB)]))).toBe(true); // shifted into it
    expect(replacesInPlace(plan([table.get(0)!, table.get(1)!], [region(11 * MiB, 2 * MiB)]))).toBe(true);
  });
});
