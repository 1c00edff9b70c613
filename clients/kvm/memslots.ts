// What holds a VM's memslots: a real KVM VM (vm.ts) or the software stand-in (software.ts). Both answer
// one KVM_SET_USER_MEMORY_REGION at a time with KVM's own verdict (or, in software, the same checks
// written down), so the applier and the planner do not care which one runs.
import type { MemoryRegionArgs } from './abi.js';

/**
 * Which one holds the slots: 'kvm' (a real VM, judged by the kernel) or 'software' (the stand-in). It is
 * what the client REPORTs as `backend` and logs as `backend` (those field names are kept for readers).
 */
export type Hypervisor = 'kvm' | 'software';

export interface Memslots {
  /** 'kvm' for a real VM, 'software' for the stand-in: reported in status, logs and errors. */
  readonly hypervisor: Hypervisor;
  /** User memslots the VM offers (KVM_CAP_NR_MEMSLOTS). */
  readonly maxSlots: number;
  /**
   * KVM_SET_USER_MEMORY_REGION: creates, deletes (size 0) or changes the flags of one slot. Throws
   * MMB_ERR_KVM carrying the errno the kernel returned (or would return).
   */
  setUserMemoryRegion(r: MemoryRegionArgs): void;
  /** Releases the VM (every slot goes with it). Idempotent. */
  close(): void;
}

/** @deprecated the old name of Memslots ("backend" meant four things in this project). */
export type MemslotBackend = Memslots;
/** @deprecated the old name of Hypervisor. */
export type BackendName = Hypervisor;
