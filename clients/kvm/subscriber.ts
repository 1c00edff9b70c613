// The kvm-like subscriber: follows an address space as KVM memslots of a real VM (or of the software
// stand-in where /dev/kvm is missing or when asked), declaring the VM's slot limit to the broker at attach
// so that a transaction needing more slots is refused before anything changes.
import type { Logger } from 'pino';
import { InvalidArgError, isMmbError } from '../../protocol/index.js';
import type { BrokerTarget } from '../connection.js';
import type { GuestMemory } from '../memory.js';
import { Subscriber, type SubscriberOptions } from '../subscriber.js';
import { KvmApplier, type GuestOptions, type ParkVcpus, type ProgramOptions, type SlotInfo } from './applier.js';
import type { Hypervisor, Memslots } from './memslots.js';
import { SoftwareMemslots } from './software.js';
import type { GuestRun, KvmVcpu, RunResult } from './vcpu.js';
import { KvmVm } from './vm.js';

export interface KvmSubscriberOptions extends SubscriberOptions {
  /**
   * true: keep the slot table in software even if /dev/kvm exists. false: require a real VM
   * (MMB_ERR_UNSUPPORTED without one). Default: a real VM if /dev/kvm can be used, else software.
   */
  software?: boolean;
  /** Use at most this many slots (default: all the VM offers, KVM_CAP_NR_MEMSLOTS). */
  maxSlots?: number;
  /** A pino logger for slot changes and refusals (each line carries `backend`). Default: none. */
  logger?: Logger;
  /**
   * The VMM's vCPUs are parked through this around a change that deletes and re-creates slots at
   * overlapping addresses (read-only toggle, resize, replacement at one gpa, a coalesced run changing):
   * called before the first delete, it resolves once none of them is in KVM_RUN (nor will enter it), with
   * the function that resumes them, called after the last create (or after the change was undone). A
   * rejection fails the change (nack) with nothing changed. The client's own vCPU is parked too.
   */
  parkVcpus?: ParkVcpus;
  /**
   * Log dirty pages in per-vCPU dirty rings of this many entries (KVM_CAP_DIRTY_LOG_RING) instead of
   * per-slot bitmaps (KVM_GET_DIRTY_LOG). Real KVM only: MMB_ERR_UNSUPPORTED where the kernel has none.
   */
  dirtyRing?: number;
}

/** Opens the memslots the options ask for (a real VM or the stand-in); `reason` says why it is software when it is. */
export function openMemslots(software: boolean | undefined, log?: Logger, dirtyRing?: number): { vm: Memslots; reason?: string } {
  if (software === true) {
    if (dirtyRing) throw new InvalidArgError('dirtyRing needs a real KVM VM; software: true keeps no dirty log');
    return { vm: new SoftwareMemslots(), reason: 'asked for (software: true)' };
  }
  try {
    return { vm: KvmVm.open({ dirtyRing }) };
  } catch (err) {
    // A dirty ring was asked for: the stand-in cannot honour it.
    if (software === false || dirtyRing || !isMmbError(err, 'MMB_ERR_UNSUPPORTED')) throw err;
    log?.warn({ backend: 'software', reason: err.message }, 'kvm client: no usable /dev/kvm, keeping memslots in software');
    return { vm: new SoftwareMemslots(), reason: err.message };
  }
}

export class KvmSubscriber extends Subscriber {
  private constructor(
    target: BrokerTarget,
    private readonly kvm: KvmApplier,
    opts: SubscriberOptions,
    /** Why the memslots are kept in software, when they are. */
    readonly softwareReason: string | undefined,
  ) {
    super(target, kvm, opts);
    // The client's own writes (loading a vCPU program) mark pages dirty too; the vCPU's go to KVM's log.
    kvm.memory.dirty = this.dirty;
    // And what KVM logged in a slot is collected here before the slot is deleted.
    kvm.dirty = this.dirty;
  }

  /**
   * Creates the VM (or the software table), attaches with kind 'kvm' and `maxRegions` = the slot limit,
   * reports `backend` ('kvm' or 'software') to the broker, and resolves once the initial map is
   * established as memslots and acked.
   */
  static async attach(target: BrokerTarget, opts: KvmSubscriberOptions): Promise<KvmSubscriber> {
    const { software, maxSlots, logger, parkVcpus, dirtyRing, ...subOpts } = opts;
    for (const [what, v] of [
      ['maxSlots', maxSlots],
      ['maxRegions', subOpts.maxRegions],
    ] as const) {
      if (v !== undefined && (!Number.isSafeInteger(v) || v < 1)) throw new InvalidArgError(`${what} must be a positive integer, got ${v}`);
    }
    if (parkVcpus !== undefined && typeof parkVcpus !== 'function') throw new InvalidArgError('parkVcpus must be a function');
    const { vm, reason } = openMemslots(software, logger, dirtyRing);
    const limit = Math.min(vm.maxSlots, maxSlots ?? Infinity, subOpts.maxRegions ?? Infinity);
    const applier = new KvmApplier(vm, limit, logger, { ...(parkVcpus ? { parkVcpus } : {}) });
    const sub = new KvmSubscriber(target, applier, { kind: 'kvm', ...subOpts, maxRegions: limit }, reason);
    try {
      // Not connected yet: remembered, and sent right after ATTACH, before the initial sync is acked.
      await sub.report({ backend: vm.hypervisor });
      await sub.start();
    } catch (err) {
      await sub.close().catch(() => undefined);
      throw err;
    }
    logger?.info(
      {
        backend: vm.hypervisor,
        maxSlots: limit,
        dirtyLog: vm instanceof KvmVm ? vm.dirtyLog : 'none',
        space: sub.space,
        client: sub.id,
        ...(reason ? { reason } : {}),
      },
      'kvm client attached',
    );
    return sub;
  }

  /** 'kvm' (a real VM judged by the kernel) or 'software' (the stand-in table). */
  get hypervisor(): Hypervisor {
    return this.kvm.hypervisor;
  }

  /** @deprecated the old name of `hypervisor`. */
  get backend(): Hypervisor {
    return this.hypervisor;
  }

  /** @deprecated the old name of `softwareReason`. */
  get backendReason(): string | undefined {
    return this.softwareReason;
  }

  /** The most slots this client uses: what it declared to the broker as maxRegions. */
  get maxSlots(): number {
    return this.kvm.maxSlots;
  }

  /** This client's own mappings of guest memory (what the slots point at). */
  get memory(): GuestMemory {
    return this.kvm.memory;
  }

  /** The VM (real or software) behind the slots, for inspection and tests. */
  get vm(): Memslots {
    return this.kvm.vm;
  }

  get stats(): KvmApplier['stats'] {
    return this.kvm.stats;
  }

  /** The memslot table, by slot id. */
  slots(): SlotInfo[] {
    return this.kvm.slots();
  }

  /**
   * Runs a tiny guest program on the VM's vCPU: writes each `writes[i].bytes` at its gpa and halts. The
   * program is written at `codeGpa` (a writable region this client has a slot for). Real KVM only:
   * MMB_ERR_UNSUPPORTED in software mode.
   */
  runProgram(opts: ProgramOptions): Promise<RunResult> {
    return this.kvm.runProgram(opts);
  }

  /**
   * Starts a guest that runs on its own while changes are applied (parked around delete + create at
   * overlapping addresses): `image` at `codeGpa`, until it halts or `stop()`. Real KVM only.
   */
  runGuest(opts: GuestOptions): Promise<GuestRun> {
    return this.kvm.runGuest(opts);
  }

  /** 'bitmap', 'ring', 'all-dirty' (the ring overflowed once) or 'none' (software). */
  get dirtyLogMode(): KvmApplier['dirtyLogMode'] {
    return this.kvm.dirtyLogMode;
  }

  /** The vCPU (parked, inKvmRun), once a program or guest ran. */
  get vcpu(): KvmVcpu | undefined {
    return this.kvm.cpu;
  }

  /**
   * GPAs of the pages of the slot holding `gpa` written since the last collection (KVM_GET_DIRTY_LOG or
   * the dirty ring); they go into the subscriber's dirty log as well. Real KVM only.
   */
  dirtyPages(gpa: number): number[] {
    return this.kvm.dirtyPages(gpa);
  }
}
