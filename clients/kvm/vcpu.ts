// A vCPU of a KvmVm and the one kind of program it runs: a straight-line 32-bit guest routine that copies
// given bytes to given guest-physical addresses and halts. Enough to prove that the memslots are real:
// the guest's writes go through KVM's view of guest memory, and every other process that maps the same
// backing sees them.
//
// Set-up: KVM_CREATE_VCPU, its kvm_run mapped from the vCPU fd (KVM_GET_VCPU_MMAP_SIZE bytes), and
// 32-bit flat protected mode written straight into the segment registers' hidden state with
// KVM_SET_SREGS (CR0.PE = 1, paging off, CS/DS/ES/SS base 0, limit 4 GiB, db = 1, g = 1): no GDT in
// guest memory is needed, and every GPA below 4 GiB is reachable. Interrupts stay off (RFLAGS = 2).
//
// The program, at codeGpa, for each write:  mov esi, src; mov edi, dst; mov ecx, len; rep movsb
// preceded by one cld and followed by hlt; the payloads follow the code. KVM_RUN runs on a libuv worker
// thread; a run ends in KVM_EXIT_HLT with RIP just after the hlt, anything else is MMB_ERR_KVM.
//
// A guest that does not halt (runGuest: the counter loop below, or any code) runs until stop(), and can be
// parked: park() sets kvm_run.immediate_exit and kicks the worker thread out of KVM_RUN with a signal
// (native kvmKick), resolves once no KVM_RUN is in progress, and none starts again until unpark(), as
// QEMU's accel_ioctl_inhibit_begin() does around memslot updates. With a dirty ring (KvmVm dirtyRing), the
// vCPU's ring is mapped here and harvested by harvestDirtyRing().
import { constants, native, type Mapping } from '../../native/index.js';
import { kvm } from '../../native/kvm.js';
import { InvalidArgError, KvmError, hex, rangeContains } from '../../protocol/index.js';
import {
  CR0_PE,
  DIRTY_GFN,
  EXIT_NAMES,
  KVM_CREATE_VCPU,
  KVM_DIRTY_LOG_PAGE_OFFSET,
  KVM_EXIT_DIRTY_RING_FULL,
  KVM_EXIT_FAIL_ENTRY,
  KVM_EXIT_HLT,
  KVM_EXIT_INTERNAL_ERROR,
  KVM_EXIT_INTR,
  KVM_EXIT_IO,
  KVM_EXIT_MMIO,
  KVM_EXIT_SHUTDOWN,
  KVM_GET_REGS,
  KVM_GET_SREGS,
  KVM_SET_REGS,
  KVM_SET_SREGS,
  REGS,
  RUN,
  SREGS,
  flatSegment,
  getU64,
  packRegs,
  readSegment,
  unpackRegs,
  writeSegment,
  type Regs,
  type Segment,
} from './abi.js';
import { kvmError, type KvmVm } from './vm.js';

const FOUR_GIB = 2 ** 32;

export interface GuestWrite {
  gpa: number;
  bytes: Uint8Array;
}

export interface Program {
  /** Code followed by the payloads, to be placed at codeGpa. */
  image: Uint8Array;
  /** Offset of the hlt in `image`: a clean run stops with RIP = codeGpa + hltOffset + 1. */
  hltOffset: number;
}

/**
 * Assembles the straight-line program that copies each write's bytes to its gpa, then halts. Every
 * address (the program itself included) must lie below 4 GiB.
 */
export function assembleProgram(codeGpa: number, writes: readonly GuestWrite[]): Program {
  if (!Number.isSafeInteger(codeGpa) || codeGpa < 0) throw new InvalidArgError(`invalid codeGpa ${codeGpa}`);
  if (writes.length === 0) throw new InvalidArgError('a program needs at least one write');
  const codeLen = 1 + writes.length * 17 + 1; // cld; (mov esi; mov edi; mov ecx; rep movsb) * n; hlt
  const payloadLen = writes.reduce((n, w) => n + w.bytes.length, 0);
  const image = new Uint8Array(codeLen + payloadLen);
  if (codeGpa + image.length > FOUR_GIB) throw new InvalidArgError(`the program at ${hex(codeGpa)} (${image.length} bytes) does not fit below 4 GiB`);
  const dv = new DataView(image.buffer);
  let pc = 0;
  let payload = codeLen;
  image[pc++] = 0xfc; // cld
  for (const w of writes) {
    if (!(w.bytes instanceof Uint8Array) || w.bytes.length === 0) throw new InvalidArgError('each write needs a non-empty Uint8Array');
    if (!Number.isSafeInteger(w.gpa) || w.gpa < 0 || !rangeContains(0, FOUR_GIB, w.gpa, w.bytes.length)) {
      throw new InvalidArgError(`write target ${hex(w.gpa)} + ${w.bytes.length} bytes is not below 4 GiB`);
    }
    image[pc++] = 0xbe; // mov esi, imm32
    dv.setUint32(pc, codeGpa + payload, true);
    pc += 4;
    image[pc++] = 0xbf; // mov edi, imm32
    dv.setUint32(pc, w.gpa, true);
    pc += 4;
    image[pc++] = 0xb9; // mov ecx, imm32
    dv.setUint32(pc, w.bytes.length, true);
    pc += 4;
    image[pc++] = 0xf3; // rep
    image[pc++] = 0xa4; // movsb
    image.set(w.bytes, payload);
    payload += w.bytes.length;
  }
  const hltOffset = pc;
  image[pc++] = 0xf4; // hlt
  if (pc !== codeLen) throw new Error(`internal: program length ${pc} != ${codeLen}`);
  return { image, hltOffset };
}

/**
 * A guest that never halts: `loop: mov eax, [readGpa]; inc dword [counterGpa]; jmp loop` (14 bytes, 32-bit
 * flat mode). It reads one region and counts in another as fast as the vCPU runs: a read while no slot
 * covers readGpa is a KVM_EXIT_MMIO read at that gpa.
 */
export function assembleCounterLoop(readGpa: number, counterGpa: number): Uint8Array {
  for (const [what, gpa] of [
    ['readGpa', readGpa],
    ['counterGpa', counterGpa],
  ] as const) {
    if (!Number.isSafeInteger(gpa) || gpa < 0 || gpa + 4 > FOUR_GIB) throw new InvalidArgError(`${what} ${gpa} is not below 4 GiB`);
  }
  const image = new Uint8Array(14);
  const dv = new DataView(image.buffer);
  image.set([0x8b, 0x05], 0); // mov eax, [disp32]
  dv.setUint32(2, readGpa, true);
  image.set([0xff, 0x05], 6); // inc dword [disp32]
  dv.setUint32(8, counterGpa, true);
  image.set([0xeb, 0xf2], 12); // jmp -14
  return image;
}

/** An exit a running guest took to user space (runGuest records them instead of failing). */
export interface ExitRecord {
  reason: string;
  /** KVM_EXIT_MMIO: the gpa, the access, its length. */
  gpa?: number;
  write?: boolean;
  len?: number;
  /** KVM_EXIT_IO: the port. */
  port?: number;
}

export interface GuestRunResult {
  /** true: the guest halted; false: stop() ended it. */
  halted: boolean;
  rip: number;
  /** Exits to user space (KVM_EXIT_INTR and kicks not counted). */
  exits: ExitRecord[];
}

/** A guest running on a vCPU until it halts or is stopped (KvmVcpu.runGuest). */
export interface GuestRun {
  /** Exits so far (MMIO, I/O, dirty ring full). */
  readonly exits: readonly ExitRecord[];
  /** Settles when the run ends: halted, stopped, or an exit it cannot go on after (MMB_ERR_KVM). */
  readonly done: Promise<GuestRunResult>;
  /** Kicks the vCPU out of KVM_RUN and ends the run. */
  stop(): Promise<GuestRunResult>;
}

/**
 * The architectural state of a vCPU that a migration carries, as the kernel's own structs: `regs` is
 * struct kvm_regs (KVM_GET_REGS, 144 bytes), `sregs` struct kvm_sregs (KVM_GET_SREGS, 312 bytes), byte for
 * byte, so no 64-bit value passes through a JS number. Enough for the guests this client runs (no FPU use,
 * no interrupt controller); a VMM running a real OS also carries XSAVE, XCRS, MSRs, LAPIC, vCPU events and
 * debug registers (KVM_GET_XSAVE, ...), which the addon does not whitelist.
 */
export interface VcpuState {
  regs: Uint8Array;
  sregs: Uint8Array;
}

export interface RunResult {
  /** Exits to user space before the halt (KVM_EXIT_INTR included). */
  exits: number;
  /** RIP after the halt. */
  rip: number;
}

export class KvmVcpu {
  private closed = false;
  private running: Promise<unknown> | undefined;
  private readonly run: DataView;
  /** Parks in effect (they nest); while > 0 no KVM_RUN starts. */
  private parks = 0;
  /** Opened by the last unpark(). */
  private gate: { promise: Promise<void>; open: () => void } | undefined;
  /** The KVM_RUN in flight (settles, never rejects), if any. */
  private inRun: Promise<unknown> | undefined;
  /** stop() asked the current guest run to end. */
  private stopping = false;
  /** The dirty ring's harvest buffer and the index of the next entry to harvest. */
  private readonly ringOut: Uint8Array | undefined;
  private fetch = 0;
  /**
   * The ring was found completely full: KVM stops a vCPU at its soft limit (the size less a reserve), so a
   * full ring means it pushed past it and may have overwritten entries: some dirty pages are unknown.
   */
  ringOverflowed = false;
  /**
   * Called on KVM_EXIT_DIRTY_RING_FULL, before the vCPU runs again: harvest the ring and reset it;
   * returns the number of entries harvested.
   */
  onRingFull: (() => number) | undefined;

  private constructor(
    readonly vm: KvmVm,
    readonly id: number,
    readonly fd: number,
    private readonly runMapping: Mapping,
    /** The vCPU's dirty ring (vm.dirtyRing entries of kvm_dirty_gfn), when the VM logs in rings. */
    private readonly ring: Mapping | undefined,
  ) {
    this.run = new DataView(runMapping.buffer);
    if (ring) this.ringOut = new Uint8Array(Math.min(vm.dirtyRing, 4096) * DIRTY_GFN.size);
  }

  /** KVM_CREATE_VCPU, the mapping of its kvm_run and, if the VM logs in rings, of its dirty ring. */
  static create(vm: KvmVm, id = 0): KvmVcpu {
    let fd: number;
    try {
      fd = kvm.kvmIoctlInt(vm.fd, KVM_CREATE_VCPU, id);
    } catch (err) {
      throw kvmError(`KVM_CREATE_VCPU ${id}`, err);
    }
    let m: Mapping | undefined;
    try {
      m = native.mmap(fd, 0, vm.caps.vcpuMmapSize, constants.PROT_READ | constants.PROT_WRITE, constants.MAP_SHARED);
      const ring =
        vm.dirtyRing > 0
          ? native.mmap(
              fd,
              KVM_DIRTY_LOG_PAGE_OFFSET * constants.pageSize,
              vm.dirtyRing * DIRTY_GFN.size,
              constants.PROT_READ | constants.PROT_WRITE,
              constants.MAP_SHARED,
            )
          : undefined;
      return new KvmVcpu(vm, id, fd, m, ring);
    } catch (err) {
      if (m) native.munmap(m);
      native.close(fd);
      throw kvmError(`mapping the kvm_run${vm.dirtyRing > 0 ? ' and dirty ring' : ''} of vCPU ${id}`, err);
    }
  }

  // --- parking --------------------------------------------------------------------------------------

  /** A KVM_RUN of this vCPU is in progress (on a worker thread). */
  get inKvmRun(): boolean {
    return this.inRun !== undefined;
  }

  /** Parked: no KVM_RUN is in progress and none starts until unpark(). */
  get parked(): boolean {
    return this.parks > 0;
  }

  /**
   * Parks the vCPU: a KVM_RUN in progress is kicked out (kvm_run.immediate_exit, then a signal to its
   * thread), and none starts again until the matching unpark(). Resolves once no KVM_RUN is in progress.
   * Parks nest: each needs its own unpark().
   */
  async park(): Promise<void> {
    if (this.parks++ === 0) {
      let open!: () => void;
      const promise = new Promise<void>((r) => (open = r));
      this.gate = { promise, open };
      this.run.setUint8(RUN.immediate_exit, 1);
    }
    await this.kickOut();
  }

  /** Ends one park(); the last one lets the vCPU run again. A no-op once the vCPU is closed. */
  unpark(): void {
    if (this.closed) return;
    if (this.parks === 0) throw new InvalidArgError(`vCPU ${this.id} is not parked`);
    if (--this.parks > 0) return;
    // Nothing is in KVM_RUN while parked, so clearing immediate_exit races with no run.
    if (!this.stopping) this.run.setUint8(RUN.immediate_exit, 0);
    const gate = this.gate;
    this.gate = undefined;
    gate?.open();
  }

  /**
   * Kicks a KVM_RUN in progress out and waits for it; immediate_exit must be set. With
   * KVM_CAP_IMMEDIATE_EXIT one signal is enough (a run that had not entered the kernel yet returns at
   * once); without it a signal can come before the thread enters KVM_RUN, so it is repeated until the
   * run returns.
   */
  private async kickOut(): Promise<void> {
    const run = this.inRun;
    if (!run) return;
    kvm.kvmKick(this.fd);
    if (this.vm.caps.immediateExit) {
      await run;
      return;
    }
    const again = setInterval(() => kvm.kvmKick(this.fd), 1);
    try {
      await run;
    } finally {
      clearInterval(again);
    }
  }

  /**
   * One KVM_RUN that honours parking: waits while parked, re-enters after a kick or a stray signal.
   * Resolves true when the guest exited to user space, false when stop() ended the run.
   */
  private async enter(): Promise<boolean> {
    for (;;) {
      while (this.gate) await this.gate.promise;
      if (this.stopping) return false;
      const p = kvm.kvmRun(this.fd);
      this.inRun = p.catch(() => undefined);
      let exited: boolean;
      try {
        exited = await p;
      } catch (err) {
        throw kvmError(`KVM_RUN of vCPU ${this.id}`, err);
      } finally {
        this.inRun = undefined;
      }
      if (exited) return true;
    }
  }

  // --- the dirty ring -------------------------------------------------------------------------------

  /**
   * Harvests the vCPU's dirty ring: calls `mark(slot, page)` (slot id, page index inside the slot) for
   * every entry KVM published since the last harvest, and hands the entries back for reset. Returns how
   * many; the caller then calls the VM's resetDirtyRings(). 0 when the VM logs in bitmaps. Sets
   * `ringOverflowed` when the whole ring was full.
   */
  harvestDirtyRing(mark: (slot: number, page: number) => void): number {
    const ring = this.ring;
    const out = this.ringOut;
    if (!ring || !out || this.closed) return 0;
    const dv = new DataView(out.buffer);
    let total = 0;
    for (;;) {
      const n = kvm.kvmDirtyRingHarvest(ring, this.vm.dirtyRing, this.fetch, out);
      for (let i = 0; i < n; i++) {
        const at = i * DIRTY_GFN.size;
        // slot: address space id << 16 | slot id; this client uses address space 0 only.
        mark(dv.getUint32(at + DIRTY_GFN.slot, true) & 0xffff, getU64(dv, at + DIRTY_GFN.offset));
      }
      this.fetch = (this.fetch + n) >>> 0;
      total += n;
      if (n * DIRTY_GFN.size < out.length) {
        if (total >= this.vm.dirtyRing) this.ringOverflowed = true;
        return total;
      }
    }
  }

  getRegs(): Regs {
    const buf = new Uint8Array(REGS.size);
    this.ioctl(KVM_GET_REGS, buf, 'KVM_GET_REGS');
    return unpackRegs(buf);
  }

  setRegs(r: Partial<Regs>): void {
    this.ioctl(KVM_SET_REGS, packRegs(r), 'KVM_SET_REGS');
  }

  /**
   * The vCPU's registers (VcpuState), for a migration. The vCPU must be out of KVM_RUN (parked, stopped,
   * or never run): the kernel serializes vCPU ioctls, so a KVM_GET_REGS issued while a run is in progress
   * would block this thread until the guest exits. MMB_ERR_KVM (EBUSY) otherwise.
   */
  saveState(): VcpuState {
    this.assertOutOfRun('saving the registers of');
    const regs = new Uint8Array(REGS.size);
    const sregs = new Uint8Array(SREGS.size);
    this.ioctl(KVM_GET_REGS, regs, 'KVM_GET_REGS');
    this.ioctl(KVM_GET_SREGS, sregs, 'KVM_GET_SREGS');
    return { regs, sregs };
  }

  /**
   * Loads registers saved by saveState() (on another vCPU, another VM, another host of the same
   * architecture): KVM_SET_SREGS, then KVM_SET_REGS. Then runGuest() without a rip resumes the guest
   * where it was. The vCPU must be out of KVM_RUN (MMB_ERR_KVM, EBUSY); sizes are checked
   * (MMB_ERR_INVALID_ARG).
   */
  restoreState(state: VcpuState): void {
    for (const [what, buf, size] of [
      ['regs', state.regs, REGS.size],
      ['sregs', state.sregs, SREGS.size],
    ] as const) {
      if (!(buf instanceof Uint8Array) || buf.length !== size)
        throw new InvalidArgError(`vCPU state: ${what} must be ${size} bytes (struct kvm_${what}), got ${buf instanceof Uint8Array ? buf.length : typeof buf}`);
    }
    this.assertOutOfRun('restoring the registers of');
    // Copies: the ioctl wants a buffer it may own for the call, and the caller's may be a view of anything.
    this.ioctl(KVM_SET_SREGS, Uint8Array.from(state.sregs), 'KVM_SET_SREGS');
    this.ioctl(KVM_SET_REGS, Uint8Array.from(state.regs), 'KVM_SET_REGS');
  }

  private assertOutOfRun(what: string): void {
    if (this.inRun) throw new KvmError(`[kvm] ${what} vCPU ${this.id}: it is in KVM_RUN (park or stop it first)`, { errno: 'EBUSY' });
  }

  /** The parts of kvm_sregs this client sets: segments, CR0, CR4, EFER. */
  getSregs(): { cr0: number; cr4: number; efer: number; cs: Segment; ds: Segment; es: Segment; ss: Segment } {
    const buf = new Uint8Array(SREGS.size);
    this.ioctl(KVM_GET_SREGS, buf, 'KVM_GET_SREGS');
    const dv = new DataView(buf.buffer);
    return {
      cr0: getU64(dv, SREGS.cr0),
      cr4: getU64(dv, SREGS.cr4),
      efer: getU64(dv, SREGS.efer),
      cs: readSegment(dv, SREGS.cs),
      ds: readSegment(dv, SREGS.ds),
      es: readSegment(dv, SREGS.es),
      ss: readSegment(dv, SREGS.ss),
    };
  }

  /** 32-bit flat protected mode, paging off: every GPA below 4 GiB is a linear address. */
  enterFlat32(): void {
    const buf = new Uint8Array(SREGS.size);
    this.ioctl(KVM_GET_SREGS, buf, 'KVM_GET_SREGS');
    const dv = new DataView(buf.buffer);
    writeSegment(dv, SREGS.cs, flatSegment(0x08, true));
    for (const seg of [SREGS.ds, SREGS.es, SREGS.fs, SREGS.gs, SREGS.ss]) writeSegment(dv, seg, flatSegment(0x10, false));
    // CR0: PE on, PG off (bit 31 of the low word); the high word is reserved and stays as it is.
    const cr0 = dv.getUint32(SREGS.cr0, true);
    dv.setUint32(SREGS.cr0, ((cr0 | CR0_PE) & 0x7fff_ffff) >>> 0, true);
    this.ioctl(KVM_SET_SREGS, buf, 'KVM_SET_SREGS');
  }

  /** The raw kvm_run exit reason of the last exit. */
  get exitReason(): number {
    return this.run.getUint32(RUN.exit_reason, true);
  }

  /**
   * Runs from `rip` until KVM_EXIT_HLT. Any other exit (MMIO to a GPA no slot covers, a write to a
   * read-only slot, I/O, shutdown, failed entry, internal error) is MMB_ERR_KVM naming it; so is
   * running past `maxExits` exits.
   */
  async runUntilHalt(rip: number, maxExits = 16): Promise<RunResult> {
    return this.exclusive(() => this.runLoop(rip, maxExits));
  }

  /** One run at a time on a vCPU. */
  private async exclusive<T>(fn: () => Promise<T>): Promise<T> {
    if (this.closed) throw new KvmError(`[kvm] vCPU ${this.id} is closed`, { errno: 'EBADF' });
    if (this.running) throw new KvmError(`[kvm] vCPU ${this.id} is already running`, { errno: 'EBUSY' });
    const work = fn();
    this.running = work.catch(() => undefined);
    try {
      return await work;
    } finally {
      this.running = undefined;
    }
  }

  private async runLoop(rip: number, maxExits: number): Promise<RunResult> {
    this.setRegs({ rip, rflags: 2 });
    for (let exits = 0; exits <= maxExits; exits++) {
      if (!(await this.enter())) throw new KvmError(`[kvm] vCPU ${this.id} was stopped`, { errno: 'EINTR' });
      const reason = this.exitReason;
      if (reason === KVM_EXIT_HLT) return { exits, rip: this.getRegs().rip };
      if (reason === KVM_EXIT_INTR) continue;
      if (reason === KVM_EXIT_DIRTY_RING_FULL) {
        this.ringFull();
        continue;
      }
      throw new KvmError(`[kvm] vCPU ${this.id} stopped with ${this.describeExit(reason)} (RIP ${hex(this.getRegs().rip)})`, { errno: 'EIO' });
    }
    throw new KvmError(`[kvm] vCPU ${this.id} exited more than ${maxExits} times without halting`, { errno: 'EIO' });
  }

  /**
   * KVM_EXIT_DIRTY_RING_FULL: the ring must be harvested and reset before the vCPU may run again. A full
   * ring with nothing to harvest means the kernel pushed past its end (it warns "should never get full"
   * in virt/kvm/dirty_ring.c) and our index is out of step with it: the vCPU cannot run again (every
   * entry is on hold), so the run stops loudly. Seen on this host's KVM (kvm_pvm, shadow paging), which
   * checks the soft limit late: see clients/kvm/README.md.
   */
  private ringFull(): void {
    if (!this.onRingFull) throw new KvmError(`[kvm] vCPU ${this.id}: its dirty ring is full and nobody harvests it`, { errno: 'ENOSPC' });
    if (this.onRingFull() === 0) {
      this.ringOverflowed = true;
      throw new KvmError(
        `[kvm] vCPU ${this.id}: its dirty ring is full but holds no entry at index ${this.fetch}: KVM ran it past its end and it cannot be harvested any more (its logging slots now count as entirely dirty)`,
        { errno: 'EOVERFLOW' },
      );
    }
  }

  /**
   * Runs a guest from `rip` until it halts or stop() is called, on its own (changes may be applied
   * meanwhile: park() holds it out of KVM_RUN). MMIO and port I/O exits are recorded and the guest goes
   * on (an MMIO read gets zeros); KVM_EXIT_DIRTY_RING_FULL is handled; any other exit ends the run with
   * MMB_ERR_KVM. Without `rip` the guest goes on from the registers as they are (after restoreState(), or
   * after a previous run was stopped); with it, RIP is set and the general registers are cleared.
   */
  runGuest(rip?: number): GuestRun {
    // Refused here, not through `done`: the caller learns at once that nothing runs.
    if (this.closed) throw new KvmError(`[kvm] vCPU ${this.id} is closed`, { errno: 'EBADF' });
    if (this.running) throw new KvmError(`[kvm] vCPU ${this.id} is already running`, { errno: 'EBUSY' });
    const exits: ExitRecord[] = [];
    let ended = false;
    const done = this.exclusive(async (): Promise<GuestRunResult> => {
      if (rip !== undefined) this.setRegs({ rip, rflags: 2 });
      try {
        for (;;) {
          if (!(await this.enter())) return { halted: false, rip: this.getRegs().rip, exits };
          const reason = this.exitReason;
          if (reason === KVM_EXIT_HLT) return { halted: true, rip: this.getRegs().rip, exits };
          if (reason === KVM_EXIT_INTR) continue;
          if (reason === KVM_EXIT_DIRTY_RING_FULL) {
            exits.push({ reason: 'KVM_EXIT_DIRTY_RING_FULL' });
            this.ringFull();
          } else if (reason === KVM_EXIT_MMIO) {
            const write = this.run.getUint8(RUN.mmio_is_write) !== 0;
            exits.push({ reason: 'KVM_EXIT_MMIO', gpa: getU64(this.run, RUN.mmio_phys_addr), write, len: this.run.getUint32(RUN.mmio_len, true) });
            if (!write) for (let i = 0; i < 8; i++) this.run.setUint8(RUN.mmio_data + i, 0);
          } else if (reason === KVM_EXIT_IO) {
            exits.push({ reason: 'KVM_EXIT_IO', port: this.run.getUint16(RUN.io_port, true) });
          } else {
            throw new KvmError(`[kvm] vCPU ${this.id} stopped with ${this.describeExit(reason)} (RIP ${hex(this.getRegs().rip)})`, {
              errno: reason === KVM_EXIT_SHUTDOWN ? 'EIO' : 'EFAULT',
            });
          }
        }
      } finally {
        ended = true;
        this.stopping = false;
        if (this.parks === 0) this.run.setUint8(RUN.immediate_exit, 0);
      }
    });
    return {
      exits,
      done,
      stop: async () => {
        // Once the run ended (halted, failed) there is nothing to stop, and no flag may outlive it.
        if (!ended && !this.closed) {
          this.stopping = true;
          this.run.setUint8(RUN.immediate_exit, 1);
          await this.kickOut();
        }
        return done;
      },
    };
  }

  private describeExit(reason: number): string {
    const name = EXIT_NAMES[reason] ?? `exit reason ${reason}`;
    const dv = this.run;
    switch (reason) {
      case KVM_EXIT_MMIO: {
        const len = dv.getUint32(RUN.mmio_len, true);
        const write = dv.getUint8(RUN.mmio_is_write) !== 0;
        return `${name}: a ${len}-byte ${write ? 'write to' : 'read from'} gpa ${hex(getU64(dv, RUN.mmio_phys_addr))}, which no writable memslot covers`;
      }
      case KVM_EXIT_IO:
        return `${name}: port ${hex(dv.getUint16(RUN.io_port, true))} ${dv.getUint8(RUN.io_direction) ? 'out' : 'in'}`;
      case KVM_EXIT_FAIL_ENTRY:
        return `${name}: hardware entry failure reason ${hex(getU64(dv, RUN.fail_entry_hardware_entry_failure_reason))}`;
      case KVM_EXIT_INTERNAL_ERROR:
        return `${name}: suberror ${dv.getUint32(RUN.internal_suberror, true)}`;
      default:
        return name;
    }
  }

  private ioctl(request: number, buf: Uint8Array, name: string): void {
    if (this.closed) throw new KvmError(`[kvm] ${name} on vCPU ${this.id}: the vCPU is closed`, { errno: 'EBADF' });
    try {
      kvm.kvmIoctl(this.fd, request, buf);
    } catch (err) {
      throw kvmError(`${name} on vCPU ${this.id}`, err);
    }
  }

  /** Stops a run in progress (a guest that does not halt included), then unmaps and closes. Idempotent. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (this.running) {
      this.stopping = true;
      this.run.setUint8(RUN.immediate_exit, 1);
      await this.kickOut();
      // A run waiting for unpark() ends now instead.
      this.parks = 0;
      this.gate?.open();
      this.gate = undefined;
    }
    await this.running;
    native.munmap(this.runMapping);
    if (this.ring) native.munmap(this.ring);
    native.close(this.fd);
  }
}
