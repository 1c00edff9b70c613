// The kvm-like client: memslots of a real KVM VM (or a software stand-in) following an address space.
export { KvmSubscriber, openMemslots, type KvmSubscriberOptions } from './subscriber.js';
export {
  KvmApplier,
  replacesInPlace,
  type SlotInfo,
  type ProgramOptions,
  type ApplyStats,
  type ParkVcpus,
  type KvmApplierOptions,
  type GuestOptions,
} from './applier.js';
export {
  planSlots,
  applyPlan,
  tableAfter,
  indexByKey,
  flagsOf,
  opArgs,
  undoArgs,
  describeSlot,
  type Slot,
  type SlotTable,
  type SlotOp,
  type SlotPlan,
  type SlotChange,
  type PlanOptions,
} from './slots.js';
export { KvmVm, kvmError, type KvmCapabilities, type KvmVmOptions } from './vm.js';
export { SoftwareMemslots, type SoftwareMemslotsOptions } from './software.js';
export {
  KvmVcpu,
  assembleProgram,
  assembleCounterLoop,
  type GuestWrite,
  type Program,
  type RunResult,
  type GuestRun,
  type GuestRunResult,
  type ExitRecord,
  type VcpuState,
} from './vcpu.js';
export type { Memslots, Hypervisor, MemslotBackend, BackendName } from './memslots.js';
export * as kvmAbi from './abi.js';
