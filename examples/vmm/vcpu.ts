// The VMM's vCPU. The kvm client (KvmSubscriber) owns the VM and its memslots; the vCPU is the VMM's, made
// on that VM, as a VMM's vCPU threads are its own and only the memory listener is shared. So the kvm
// client cannot park it by itself: it asks through the parkVcpus hook (parkHook below) whenever a change
// deletes and re-creates a memslot at overlapping addresses, and the VMM parks it through the same
// mechanism for its own reasons (a `stop` command, the last round of a migration, copying a DIMM).
//
// Parks nest (KvmVcpu counts them): the guest runs only when every reason to stop it is gone.
import { KvmError, KvmVcpu, KvmVm, type KvmSubscriber } from '../../index.js';
import { CODE_GPA } from './layout.js';
import { guestProgram } from './guest.js';

/** The vCPU's registers as the kernel's structs (KvmVcpu.saveState()). */
export type VcpuState = ReturnType<KvmVcpu['saveState']>;
type GuestRun = ReturnType<KvmVcpu['runGuest']>;

export class Vcpu {
  private run: GuestRun | undefined;
  /** Why the guest stopped for good, if it did (an exit it cannot go on after). */
  private failure: Error | undefined;
  /** How many times the kvm client asked to park the vCPU around a memslot replacement. */
  hookParks = 0;

  private constructor(private readonly cpu: KvmVcpu) {}

  /** Creates vCPU 0 on the kvm client's VM, in 32-bit flat mode. Needs a real KVM VM. */
  static create(kvm: KvmSubscriber): Vcpu {
    if (!(kvm.vm instanceof KvmVm))
      throw new KvmError(`the kvm client keeps its memslots in software (${kvm.softwareReason ?? 'asked for'}): no vCPU can run`, { errno: 'ENODEV' });
    const cpu = KvmVcpu.create(kvm.vm, 0);
    try {
      cpu.enterFlat32();
    } catch (err) {
      void cpu.close();
      throw err;
    }
    return new Vcpu(cpu);
  }

  /** Writes the guest program into RAM (through the kvm client's mapping) and starts it at CODE_GPA. */
  boot(kvm: KvmSubscriber): void {
    kvm.memory.write(CODE_GPA, guestProgram());
    this.start(this.cpu.runGuest(CODE_GPA));
  }

  /** Loads registers saved on another vCPU (a migration's source) and goes on from them. */
  resume(state: VcpuState): void {
    this.cpu.restoreState(state);
    this.start(this.cpu.runGuest());
  }

  private start(run: GuestRun): void {
    this.run = run;
    run.done.catch((err: Error) => (this.failure = err));
  }

  /**
   * The kvm client's hook (KvmSubscriberOptions.parkVcpus): resolves once the vCPU is out of KVM_RUN and
   * will not enter it, with the function that lets it run again.
   */
  readonly parkHook = async (): Promise<() => void> => {
    this.hookParks++;
    await this.cpu.park();
    return () => this.cpu.unpark();
  };

  /** Out of KVM_RUN until the matching unpark(). */
  park(): Promise<void> {
    return this.cpu.park();
  }

  unpark(): void {
    this.cpu.unpark();
  }

  get parked(): boolean {
    return this.cpu.parked;
  }

  /** Running: started, not failed, not parked. */
  get running(): boolean {
    return this.run !== undefined && this.failure === undefined && !this.cpu.parked;
  }

  get error(): string | undefined {
    return this.failure?.message;
  }

  /** Exits to user space so far: an MMIO exit means the guest touched a gpa with no memslot. */
  exits(): { mmio: number; io: number } {
    const exits = this.run?.exits ?? [];
    return { mmio: exits.filter((e) => e.reason === 'KVM_EXIT_MMIO').length, io: exits.filter((e) => e.reason === 'KVM_EXIT_IO').length };
  }

  /** The registers, while the vCPU is parked (or not started): MMB_ERR_KVM (EBUSY) while it runs. */
  save(): VcpuState {
    return this.cpu.saveState();
  }

  /**
   * A few decoded registers, for status; undefined while a KVM_RUN is in progress (the kernel would make
   * this thread wait for the guest's next exit).
   */
  registers(): { rip: number; rbx: number; rsi: number; rflags: number } | undefined {
    if (this.cpu.inKvmRun) return undefined;
    const r = this.cpu.getRegs();
    return { rip: r.rip, rbx: r.rbx, rsi: r.rsi, rflags: r.rflags };
  }

  /**
   * Stops the guest and releases the vCPU (its fd and kvm_run mapping). KvmVcpu.close() ends a run even
   * while it is parked; the run's stop() would wait for an unpark.
   */
  async close(): Promise<void> {
    await this.cpu.close();
    await this.run?.done.catch(() => undefined);
  }
}
