// The kvm-like client's Applier: guest memory mapped in this process (GuestMemory) plus the VM's memslot
// table on top of it. One change is applied in this order:
//   1. map the added regions (each at one contiguous host range: a memslot needs one userspace_addr);
//   2. plan the slot operations (slots.ts) and run them: deletes, flag changes, creates;
//   3. unmap the removed regions (their slots are gone by now).
// KVM has no atomic slot replace: where a deleted slot's range overlaps a created one (read-only toggle,
// resize, replacement at one gpa, a coalesced run that changes), the guest would see a hole in between.
// Around such a change the vCPUs are parked (the client's own, and the VMM's through the parkVcpus hook),
// as QEMU's kvm_region_commit() does with accel_ioctl_inhibit_begin() for the same overlap. A logging
// slot's dirty log is collected into the subscriber's log right before the slot is deleted or stops
// logging (KVM frees the bitmap with the slot).
// A failure anywhere undoes everything this call did, in reverse (re-create deleted slots at their old
// host address, which is still mapped; restore flags; delete created slots; unmap new mappings), and
// throws one typed error: MMB_ERR_KVM with the ioctl's errno, MMB_ERR_CLIENT_LIMIT, MMB_ERR_MAP_FAILED
// or MMB_ERR_CANCELLED. The subscriber then nacks and the broker rolls the transaction back everywhere.
import type { Logger } from 'pino';
import {
  CancelledError,
  InternalError,
  KvmError,
  UnsupportedError,
  toMmbError,
  type Hva,
  type MmbError,
  hex,
  rangeContains,
  rangeEnd,
  rangeHas,
  rangeText,
  rangesOverlap,
} from '../../protocol/index.js';
import { GuestMemory, type MappedRegion } from '../memory.js';
import type { DirtyLog } from '../dirty.js';
import type { Applier, ApplyContext, Change, LocalBacking, ViewRegion } from '../view.js';
import { KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY } from './abi.js';
import type { Hypervisor, Memslots } from './memslots.js';
import { applyPlan, describeSlot, opArgs, planSlots, undoArgs, type Slot, type SlotOp, type SlotPlan } from './slots.js';
import { assembleProgram, KvmVcpu, type GuestRun, type GuestWrite, type RunResult } from './vcpu.js';
import { KvmVm } from './vm.js';

/** Slot operations between two looks at the abort signal (and a turn of the event loop). */
const OPS_PER_TURN = 512;

export interface SlotInfo {
  slot: number;
  gpa: number;
  size: number;
  hva: number;
  /** KVM_MEM_LOG_DIRTY_PAGES (1) | KVM_MEM_READONLY (2). */
  flags: number;
  readonly: boolean;
  logDirty: boolean;
  region: number;
  name: string;
}

export interface ProgramOptions {
  /** Where the program goes: a writable region with a slot; code and payloads must fit inside it. */
  codeGpa: number;
  writes: readonly GuestWrite[];
  /** Exits tolerated before giving up. Default 16. */
  maxExits?: number;
}

/**
 * Parks the VMM's vCPUs (no KVM_RUN in progress, none started) and resolves with the function that lets
 * them run again. Called before the first delete of a change whose deleted and created slots overlap;
 * the resume is called after its last create (or after the change was undone).
 */
export type ParkVcpus = () => Promise<() => void | Promise<void>>;

export interface KvmApplierOptions {
  /** The VMM's hook to park its vCPUs around a delete + create at overlapping addresses. */
  parkVcpus?: ParkVcpus;
}

export interface GuestOptions {
  /** Where the code goes: a writable region with a slot. */
  codeGpa: number;
  /** 32-bit flat-mode code, entered at codeGpa (assembleCounterLoop makes one). */
  image: Uint8Array;
}

export interface ApplyStats {
  /** Transactions (or syncs, rollbacks) applied. */
  applied: number;
  /** KVM_SET_USER_MEMORY_REGION calls made, undo included. */
  calls: number;
  /** Changes undone after a failure. */
  undone: number;
  /** KVM dirty logs copied into the subscriber's log (syncs, and slots about to be deleted or stop logging). */
  collected: number;
  /** Changes applied with the vCPUs parked (a delete and a create at overlapping addresses). */
  parked: number;
}

export class KvmApplier implements Applier {
  readonly memory = new GuestMemory();
  /** Slot id -> slot, and the same slots by region key. Changed only by applyPlan(). */
  private readonly table = new Map<number, Slot>();
  private readonly byKey = new Map<string, Slot>();
  private vcpu: KvmVcpu | undefined;
  /** Changes and guest programs run one at a time (a program never sees a half-applied change). */
  private lock: Promise<unknown> = Promise.resolve();
  private closed = false;
  readonly stats: ApplyStats = { applied: 0, calls: 0, undone: 0, collected: 0, parked: 0 };
  /**
   * The subscriber's dirty log (set by KvmSubscriber): a logging slot's KVM dirty log is copied into it
   * before the slot is deleted or stops logging, so no bit the vCPUs set is lost with the slot.
   */
  dirty: DirtyLog | undefined;
  /** A guest started by runGuest() that has not ended. */
  private guest: GuestRun | undefined;
  /** Slots created by the change being applied, by id (a dirty ring entry may name one). */
  private creating = new Map<number, Slot>();
  /** The dirty ring overflowed once: its entries no longer say everything (see harvestRings). */
  private ringLost = false;

  constructor(
    readonly vm: Memslots,
    /** The most slots this client uses (the VM's limit, or fewer by choice). */
    readonly maxSlots: number,
    private readonly log?: Logger,
    private readonly opts: KvmApplierOptions = {},
  ) {}

  get hypervisor(): Hypervisor {
    return this.vm.hypervisor;
  }

  /** The memslot table, by slot id. */
  slots(): SlotInfo[] {
    return [...this.table.values()]
      .sort((a, b) => a.slot - b.slot)
      .map((s) => ({
        slot: s.slot,
        gpa: s.gpa,
        size: s.size,
        hva: s.hva,
        flags: s.flags,
        readonly: (s.flags & KVM_MEM_READONLY) !== 0,
        logDirty: (s.flags & KVM_MEM_LOG_DIRTY_PAGES) !== 0,
        region: s.region,
        name: s.name,
      }));
  }

  apply(change: Change, backings: ReadonlyMap<number, LocalBacking>, ctx: ApplyContext): Promise<void> {
    return this.exclusive(() => this.applyNow(change, backings, ctx));
  }

  private exclusive<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.lock.then(fn);
    this.lock = run.catch(() => undefined);
    return run;
  }

  private async applyNow(change: Change, backings: ReadonlyMap<number, LocalBacking>, ctx: ApplyContext): Promise<void> {
    if (this.closed) throw new CancelledError(`[${this.hypervisor}] the kvm client is closed`);
    if (ctx.signal.aborted) throw cancelled(ctx.signal);
    const started = process.hrtime.bigint();

    // 1. Map what is added. GuestMemory undoes its own partial work if one mmap fails.
    if (change.added.length > 0) this.memory.apply({ ...change, removed: [], updated: [] }, backings);
    const unmapAdded = () => this.memory.apply({ ...change, cause: 'undo', removed: change.added, updated: [], added: [] }, backings);

    // 2. Plan and run the slot operations.
    const done: SlotOp[] = [];
    let plan: SlotPlan;
    const skipped = new Set<number>();
    let resume: (() => Promise<void>) | undefined;
    try {
      plan = planSlots(this.table, change, {
        maxSlots: this.maxSlots,
        hypervisor: this.hypervisor,
        byKey: this.byKey,
        hva: (r: ViewRegion) => this.addressOf(r),
      });
      if (replacesInPlace(plan)) resume = await this.parkVcpus();
      for (let i = 0; i < plan.ops.length; i++) {
        if (i > 0 && i % OPS_PER_TURN === 0) await new Promise((r) => setImmediate(r));
        if (ctx.signal.aborted) throw cancelled(ctx.signal);
        const op = plan.ops[i] as SlotOp;
        // A queued transaction removes this region: leave it without a slot; the removal is then a no-op.
        if (op.op === 'create' && ctx.cancelled(op.slot.key)) {
          skipped.add(op.slot.slot);
          continue;
        }
        // KVM frees a slot's dirty bitmap with the slot (and a flags change that stops logging clears
        // it): what the vCPUs wrote there goes into the subscriber's log first, or it is lost.
        if (loggedBefore(op)) this.collect(op.op === 'flags' ? op.before : op.slot);
        this.exec(op);
        if (op.op === 'create') this.creating.set(op.slot.slot, op.slot);
        done.push(op);
      }
    } catch (err) {
      const e = this.typed(err);
      this.undo(done, e);
      try {
        if (change.added.length > 0) unmapAdded();
      } catch (unmapErr) {
        this.log?.error({ backend: this.hypervisor, err: unmapErr }, 'kvm client: unmapping after a failed change failed');
      }
      this.stats.undone++;
      this.log?.warn(
        { backend: this.hypervisor, generation: change.generation, cause: change.cause, code: e.code, errno: e.errno, err: e.message },
        'kvm client: change refused and undone',
      );
      throw e;
    } finally {
      this.creating.clear();
      // After the last create, or after the undo: the vCPUs never run while a replaced range is missing.
      if (resume) await resume();
    }
    applyPlan(this.table, plan, this.byKey, skipped);

    // 3. Unmap what is removed, record metadata of what is updated.
    if (change.removed.length > 0 || change.updated.length > 0) this.memory.apply({ ...change, added: [] }, backings);
    this.stats.applied++;
    this.log?.debug(
      {
        backend: this.hypervisor,
        generation: change.generation,
        cause: change.cause,
        ops: plan.ops.length,
        slots: this.table.size,
        us: Number((process.hrtime.bigint() - started) / 1000n),
      },
      'kvm client: memslots applied',
    );
  }

  /**
   * Parks this client's vCPU (if it has one) and the VMM's (the parkVcpus hook); resolves with the resume,
   * which never throws: by then the change is applied (or undone), and a resume that fails is logged.
   */
  private async parkVcpus(): Promise<() => Promise<void>> {
    const vcpu = this.vcpu;
    await vcpu?.park();
    let resumeVmm: (() => void | Promise<void>) | undefined;
    try {
      resumeVmm = await this.opts.parkVcpus?.();
    } catch (err) {
      vcpu?.unpark();
      throw toMmbError(err, 'MMB_ERR_KVM');
    }
    this.stats.parked++;
    return async () => {
      try {
        await resumeVmm?.();
      } catch (err) {
        this.log?.error({ backend: this.hypervisor, err }, 'kvm client: resuming the parked vCPUs failed');
      }
      vcpu?.unpark();
    };
  }

  /** Host address of the mapping of `r` (binary search over the mappings, sorted by gpa). */
  private addressOf(r: ViewRegion): Hva {
    const mapped = this.memory.regions();
    let lo = 0;
    let hi = mapped.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1;
      const m = mapped[mid] as MappedRegion;
      if (m.region.gpa < r.gpa) lo = mid + 1;
      else if (m.region.gpa > r.gpa) hi = mid - 1;
      else {
        // Mid-change a removed region and its replacement may both be mapped at this gpa: look at all.
        let i = mid;
        while (i > 0 && (mapped[i - 1] as MappedRegion).region.gpa === r.gpa) i--;
        for (; i < mapped.length && (mapped[i] as MappedRegion).region.gpa === r.gpa; i++) {
          if ((mapped[i] as MappedRegion).region.key === r.key) return (mapped[i] as MappedRegion).address;
        }
        break;
      }
    }
    throw new InternalError(`[${this.hypervisor}] region ${JSON.stringify(r.name)} was not mapped`);
  }

  private exec(op: SlotOp): void {
    this.vm.setUserMemoryRegion(opArgs(op));
    this.stats.calls++;
  }

  /**
   * Reverts `done` in reverse. An undo step that fails (it should not: it restores a state the VM just
   * accepted) leaves that operation in effect, so the table records it: the table always says what the
   * VM holds.
   */
  private undo(done: SlotOp[], cause: MmbError): void {
    const stuck: SlotOp[] = [];
    for (let i = done.length - 1; i >= 0; i--) {
      const op = done[i] as SlotOp;
      try {
        this.vm.setUserMemoryRegion(undoArgs(op));
        this.stats.calls++;
      } catch (err) {
        this.log?.error({ backend: this.hypervisor, op: op.op, slot: op.slot.slot, err }, 'kvm client: undoing a slot operation failed');
        cause.message += `; undoing ${op.op} of ${describeSlot(op.slot)} failed too: ${err instanceof Error ? err.message : String(err)}`;
        stuck.unshift(op);
      }
    }
    if (stuck.length > 0) {
      applyPlan(this.table, { ops: stuck, changes: new Map(stuck.map((op) => [op.slot.slot, op.op === 'delete' ? undefined : op.slot])) }, this.byKey);
    }
  }

  private typed(err: unknown): MmbError {
    return toMmbError(err, 'MMB_ERR_KVM');
  }

  // --- the vCPU -------------------------------------------------------------------------------------

  /**
   * Writes a straight-line program (vcpu.ts) into guest memory at `codeGpa` through this client's own
   * mapping and runs it on the VM's vCPU until it halts. Real KVM only (MMB_ERR_UNSUPPORTED otherwise).
   * Programs run one at a time, never while a change is being applied.
   */
  runProgram(opts: ProgramOptions): Promise<RunResult> {
    return this.exclusive(() => this.runProgramNow(opts));
  }

  private async runProgramNow(opts: ProgramOptions): Promise<RunResult> {
    if (!(this.vm instanceof KvmVm)) {
      throw new UnsupportedError(
        `[${this.hypervisor}] running a guest program needs a real KVM vCPU; this client keeps its memslots in software (no /dev/kvm, or software: true)`,
      );
    }
    if (this.closed) throw new CancelledError('[kvm] the kvm client is closed');
    const program = assembleProgram(opts.codeGpa, opts.writes);
    const slot = [...this.table.values()].find((s) => rangeContains(s.gpa, s.size, opts.codeGpa, program.image.length));
    if (!slot) throw new KvmError(`[kvm] no memslot covers the program at ${rangeText(opts.codeGpa, program.image.length)}`, { errno: 'EFAULT' });
    if (slot.flags & KVM_MEM_READONLY)
      throw new KvmError(`[kvm] the program at ${hex(opts.codeGpa)} would go into read-only ${describeSlot(slot)}`, { errno: 'EFAULT' });
    this.memory.write(opts.codeGpa, program.image);
    const vcpu = await this.ensureVcpu();
    // Registers are set afresh for every program, so a vCPU stopped by an error (an MMIO exit leaves an
    // instruction half done) runs the next one cleanly: KVM completes a pending MMIO write by simply
    // resuming at the RIP we set (checked in test/kvm.test.ts). A vCPU id cannot be created twice.
    const result = await vcpu.runUntilHalt(opts.codeGpa, opts.maxExits ?? 16);
    const expected = opts.codeGpa + program.hltOffset + 1;
    if (result.rip !== expected) {
      throw new KvmError(`[kvm] the program halted at RIP ${hex(result.rip)}, not after its hlt (${hex(expected)})`, { errno: 'EIO' });
    }
    return result;
  }

  /** The vCPU (id 0), created on first need in 32-bit flat mode. */
  private async ensureVcpu(): Promise<KvmVcpu> {
    if (this.vcpu) return this.vcpu;
    const vcpu = KvmVcpu.create(this.vm as KvmVm, 0);
    try {
      vcpu.enterFlat32();
    } catch (err) {
      await vcpu.close();
      throw err;
    }
    // A full dirty ring stops the vCPU until it is harvested: into the subscriber's log, like a sync.
    vcpu.onRingFull = () => this.harvestRings(this.dirty);
    this.vcpu = vcpu;
    return vcpu;
  }

  /**
   * Starts a guest that runs on its own (not one change or program at a time): `image` is written at
   * `codeGpa` through this client's mapping and the vCPU runs it until it halts or stop() is called. Changes
   * are applied while it runs; around a delete + create at overlapping addresses it is parked. Real KVM
   * only; one run at a time on the vCPU (MMB_ERR_KVM, EBUSY, while a program or another guest runs).
   */
  async runGuest(opts: GuestOptions): Promise<GuestRun> {
    return this.exclusive(async () => {
      if (!(this.vm instanceof KvmVm)) throw new UnsupportedError(`[${this.hypervisor}] running a guest needs a real KVM vCPU`);
      if (this.closed) throw new CancelledError('[kvm] the kvm client is closed');
      const slot = [...this.table.values()].find((s) => rangeContains(s.gpa, s.size, opts.codeGpa, opts.image.length));
      if (!slot || slot.flags & KVM_MEM_READONLY)
        throw new KvmError(`[kvm] no writable memslot holds the guest code at ${rangeText(opts.codeGpa, opts.image.length)}`, { errno: 'EFAULT' });
      this.memory.write(opts.codeGpa, opts.image);
      const run = (await this.ensureVcpu()).runGuest(opts.codeGpa);
      this.guest = run;
      void run.done
        .finally(() => {
          if (this.guest === run) this.guest = undefined;
        })
        .catch(() => undefined);
      return run;
    });
  }

  /**
   * How the vCPUs' writes reach the dirty log: KVM's per-slot bitmaps, its dirty ring, every logging slot
   * reported entirely dirty (the ring overflowed once), or nothing (the software stand-in runs no vCPU).
   */
  get dirtyLogMode(): 'bitmap' | 'ring' | 'all-dirty' | 'none' {
    if (!(this.vm instanceof KvmVm)) return 'none';
    return this.vm.dirtyRing === 0 ? 'bitmap' : this.ringLost ? 'all-dirty' : 'ring';
  }

  /** The vCPU, for inspection (parked, inKvmRun); undefined until a program or guest ran. */
  get cpu(): KvmVcpu | undefined {
    return this.vcpu;
  }

  /**
   * The GPAs of the pages of the slot holding `gpa` (its region must log dirty pages) written since the
   * last collection (KVM_GET_DIRTY_LOG, or the dirty ring), which KVM clears as it reports them. What is
   * collected also goes into the subscriber's log, so reading it here takes nothing from the owner's next
   * sync. Real KVM only.
   */
  dirtyPages(gpa: number, pageSize = 4096): number[] {
    if (!(this.vm instanceof KvmVm)) throw new UnsupportedError(`[${this.hypervisor}] the dirty log needs a real KVM VM`);
    const slot = [...this.table.values()].find((s) => rangeHas(s.gpa, s.size, gpa));
    if (!slot) throw new KvmError(`[kvm] no memslot covers gpa ${hex(gpa)}`, { errno: 'ENOENT' });
    const out: number[] = [];
    if (this.vm.dirtyRing > 0) {
      this.harvestRings(this.dirty, (s, page) => {
        if (s === slot) out.push(slot.gpa + page * pageSize);
      });
      return [...new Set(out)].sort((a, b) => a - b);
    }
    const pages = slot.size / pageSize;
    const bitmap = this.vm.getDirtyLog(slot.slot, pages);
    this.dirty?.markBits(slot.gpa, bitmap, pages);
    for (let i = 0; i < pages; i++) if ((bitmap[i >>> 3] as number) & (1 << (i & 7))) out.push(slot.gpa + i * pageSize);
    return out;
  }

  /**
   * Dirty logging: copies KVM's dirty log of every slot that logs (what the vCPUs wrote since the last
   * call; the kernel clears it as it reports) into the broker's shared bitmaps. The software stand-in
   * runs no vCPU, so it has nothing to add.
   */
  flushDirty(log: DirtyLog): void {
    if (this.vm instanceof KvmVm && this.vm.dirtyRing > 0) {
      this.harvestRings(log);
      this.stats.collected++;
      return;
    }
    for (const slot of this.table.values()) if (slot.flags & KVM_MEM_LOG_DIRTY_PAGES) this.collect(slot, log);
  }

  /**
   * What KVM logged for `slot` (which logs), ORed into `log`: its KVM_GET_DIRTY_LOG, or, with dirty rings,
   * everything the vCPU's ring holds (entries name slots, so the ring is harvested before any slot id is
   * deleted and reused). Real KVM only: the stand-in runs no vCPU.
   */
  private collect(slot: Slot, log = this.dirty): void {
    if (!log || !(this.vm instanceof KvmVm)) return;
    if (this.vm.dirtyRing > 0) this.harvestRings(log);
    else {
      const pages = slot.size / 4096;
      log.markBits(slot.gpa, this.vm.getDirtyLog(slot.slot, pages), pages);
    }
    this.stats.collected++;
  }

  /**
   * Harvests the vCPU's dirty ring into `log` (and `seen`), then KVM_RESET_DIRTY_RINGS. An entry names a
   * slot by id: the slot this change just created under that id if any, else the table's. An entry of a
   * slot that is gone is dropped (its region went with it).
   */
  private harvestRings(log: DirtyLog | undefined, seen?: (slot: Slot, page: number) => void): number {
    const vcpu = this.vcpu;
    if (!vcpu || !(this.vm instanceof KvmVm)) return 0;
    const n = vcpu.harvestDirtyRing((id, page) => {
      const slot = this.creating.get(id) ?? this.table.get(id);
      if (!slot || page * 4096 >= slot.size || (slot.flags & KVM_MEM_LOG_DIRTY_PAGES) === 0) return;
      log?.mark(slot.gpa + page * 4096, 4096);
      seen?.(slot, page);
    });
    if (n > 0) this.vm.resetDirtyRings();
    if (vcpu.ringOverflowed) {
      // Some entries were overwritten: which pages they named is unknown. From now on every logging slot
      // counts as entirely dirty at every collection, as a writer that cannot track does: never a lost bit.
      if (!this.ringLost)
        this.log?.error(
          { backend: this.hypervisor, entries: this.vm.dirtyRing },
          'kvm client: the dirty ring overflowed; logging slots are reported entirely dirty from now on',
        );
      this.ringLost = true;
    }
    if (this.ringLost)
      for (const slot of [...this.table.values(), ...this.creating.values()]) if (slot.flags & KVM_MEM_LOG_DIRTY_PAGES) log?.mark(slot.gpa, slot.size);
    return n;
  }

  // --- lifetime -------------------------------------------------------------------------------------

  /** Waits for a running program, then releases the vCPU, the VM (every slot) and the mappings. */
  /** Two-phase votes: maps now what the commit adds in place of what it removes (Applier.stage). */
  stage(regions: readonly ViewRegion[], backings: ReadonlyMap<number, LocalBacking>): void {
    this.memory.stage(regions, backings);
  }

  unstage(regions: readonly ViewRegion[]): void {
    this.memory.unstage(regions);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.guest?.stop().catch(() => undefined);
    await this.lock;
    if (this.vcpu) await this.vcpu.close();
    this.vcpu = undefined;
    this.vm.close();
    this.table.clear();
    this.byKey.clear();
    this.memory.close();
  }
}

/**
 * True when a slot the plan deletes overlaps one it creates (by gpa): between the two the guest would find
 * no memory where it had some and will have some again, so the vCPUs are parked. The rule of QEMU's
 * kvm_region_commit(). A delete or create alone, or a move to addresses that do not overlap, needs no
 * parking: every state the guest can see between them is one a sequence of plain removals and additions
 * would show too. O((d + c) log d).
 */
export function replacesInPlace(plan: SlotPlan): boolean {
  const deleted = plan.ops
    .filter((op) => op.op === 'delete')
    .map((op) => op.slot)
    .sort((a, b) => a.gpa - b.gpa);
  if (deleted.length === 0) return false;
  for (const op of plan.ops) {
    if (op.op !== 'create') continue;
    const c = op.slot;
    // The last deleted slot starting before c ends; deleted slots never overlap each other, so only it
    // can reach into c.
    let lo = 0;
    let hi = deleted.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if ((deleted[mid] as Slot).gpa < rangeEnd(c.gpa, c.size)) lo = mid + 1;
      else hi = mid;
    }
    const d = deleted[lo - 1];
    if (d && rangesOverlap(d.gpa, d.size, c.gpa, c.size)) return true;
  }
  return false;
}

/** True when `op` deletes a logging slot or stops its logging: its KVM dirty log must be collected first. */
function loggedBefore(op: SlotOp): boolean {
  if (op.op === 'delete') return (op.slot.flags & KVM_MEM_LOG_DIRTY_PAGES) !== 0;
  if (op.op === 'flags') return (op.before.flags & KVM_MEM_LOG_DIRTY_PAGES) !== 0 && (op.slot.flags & KVM_MEM_LOG_DIRTY_PAGES) === 0;
  return false;
}

function cancelled(signal: AbortSignal): MmbError {
  const reason: unknown = signal.reason;
  return reason instanceof Error ? toMmbError(reason, 'MMB_ERR_CANCELLED') : new CancelledError('the change was cancelled');
}
