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
import { constants, native, type Mapping } from '../../native/index.js';
import { kvm } from '../../native/kvm.js';
import { InvalidArgError, KvmError } from '../../protocol/index.js';
import {
  CR0_PE,
  EXIT_NAMES,
  KVM_CREATE_VCPU,
  KVM_EXIT_FAIL_ENTRY,
  KVM_EXIT_HLT,
  KVM_EXIT_INTERNAL_ERROR,
  KVM_EXIT_INTR,
  KVM_EXIT_IO,
  KVM_EXIT_MMIO,
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

const hex = (n: number) => `0x${n.toString(16)}`;
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
    if (!Number.isSafeInteger(w.gpa) || w.gpa < 0 || w.gpa + w.bytes.length > FOUR_GIB) {
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

  private constructor(
    readonly vm: KvmVm,
    readonly id: number,
    readonly fd: number,
    private readonly runMapping: Mapping,
  ) {
    this.run = new DataView(runMapping.buffer);
  }

  /** KVM_CREATE_VCPU and the mapping of its kvm_run. */
  static create(vm: KvmVm, id = 0): KvmVcpu {
    let fd: number;
    try {
      fd = kvm.kvmIoctlInt(vm.fd, KVM_CREATE_VCPU, id);
    } catch (err) {
      throw kvmError(`KVM_CREATE_VCPU ${id}`, err);
    }
    try {
      const m = native.mmap(fd, 0, vm.caps.vcpuMmapSize, constants.PROT_READ | constants.PROT_WRITE, constants.MAP_SHARED);
      return new KvmVcpu(vm, id, fd, m);
    } catch (err) {
      native.close(fd);
      throw kvmError(`mapping the kvm_run of vCPU ${id}`, err);
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
    if (this.closed) throw new KvmError(`[kvm] vCPU ${this.id} is closed`, { errno: 'EBADF' });
    if (this.running) throw new KvmError(`[kvm] vCPU ${this.id} is already running`, { errno: 'EBUSY' });
    const work = this.runLoop(rip, maxExits);
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
      try {
        await kvm.kvmRun(this.fd);
      } catch (err) {
        throw kvmError(`KVM_RUN of vCPU ${this.id}`, err);
      }
      const reason = this.exitReason;
      if (reason === KVM_EXIT_HLT) return { exits, rip: this.getRegs().rip };
      if (reason === KVM_EXIT_INTR) continue;
      throw new KvmError(`[kvm] vCPU ${this.id} stopped with ${this.describeExit(reason)} (RIP ${hex(this.getRegs().rip)})`, { errno: 'EIO' });
    }
    throw new KvmError(`[kvm] vCPU ${this.id} exited more than ${maxExits} times without halting`, { errno: 'EIO' });
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

  /** Waits for a run in progress, then unmaps kvm_run and closes the vCPU fd. Idempotent. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.running;
    native.munmap(this.runMapping);
    native.close(this.fd);
  }
}
