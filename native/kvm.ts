// The typed face of native/src/kvm.c: the KVM ioctls of the kvm-like client (clients/kvm/).
//
// Thin on purpose: TypeScript packs and unpacks the structs (clients/kvm/abi.ts) and decides everything;
// C checks, through the addon's one ioctl gate, that a request is one of the few the client uses
// (anything else throws EPERM before any syscall; a known one through the wrong entry point EINVAL) and
// that a struct buffer is exactly the size the request number encodes (RangeError otherwise), then
// performs the ioctl. Failures are IoctlErrors (`syscall: 'ioctl'`, `request` naming the request,
// 'KVM_SET_USER_MEMORY_REGION'); EINTR is retried inside the call, except by KVM_RUN, where it means
// "kicked" (kvmKick) and is handed back to the caller.
import { isIoctlError, native, type IoctlError, type Mapping } from './index.js';

/** Values from linux/kvm.h as this build saw them (the client checks its own table against them). */
export interface KvmConstants {
  KVM_API_VERSION: number;
  KVM_GET_API_VERSION: number;
  KVM_CREATE_VM: number;
  KVM_CHECK_EXTENSION: number;
  KVM_GET_VCPU_MMAP_SIZE: number;
  KVM_CREATE_VCPU: number;
  KVM_SET_USER_MEMORY_REGION: number;
  KVM_GET_DIRTY_LOG: number;
  KVM_RUN: number;
  KVM_GET_REGS: number;
  KVM_SET_REGS: number;
  KVM_GET_SREGS: number;
  KVM_SET_SREGS: number;
  KVM_RESET_DIRTY_RINGS: number;
  KVM_CAP_USER_MEMORY: number;
  KVM_CAP_NR_MEMSLOTS: number;
  KVM_CAP_READONLY_MEM: number;
  KVM_CAP_IMMEDIATE_EXIT: number;
  KVM_CAP_DIRTY_LOG_RING: number;
  KVM_CAP_DIRTY_LOG_RING_ACQ_REL: number;
  KVM_DIRTY_LOG_PAGE_OFFSET: number;
  KVM_DIRTY_GFN_F_DIRTY: number;
  KVM_DIRTY_GFN_F_RESET: number;
  KVM_MEM_LOG_DIRTY_PAGES: number;
  KVM_MEM_READONLY: number;
  KVM_EXIT_UNKNOWN: number;
  KVM_EXIT_IO: number;
  KVM_EXIT_HLT: number;
  KVM_EXIT_MMIO: number;
  KVM_EXIT_SHUTDOWN: number;
  KVM_EXIT_FAIL_ENTRY: number;
  KVM_EXIT_INTR: number;
  KVM_EXIT_INTERNAL_ERROR: number;
  KVM_EXIT_DIRTY_RING_FULL: number;
  sizeof_kvm_userspace_memory_region: number;
  sizeof_kvm_regs: number;
  sizeof_kvm_sregs: number;
  sizeof_kvm_segment: number;
  sizeof_kvm_dtable: number;
  sizeof_kvm_dirty_log: number;
  sizeof_kvm_dirty_gfn: number;
  offsetof_kvm_run_exit_reason: number;
  offsetof_kvm_run_immediate_exit: number;
}

/** A failed KVM ioctl: the addon's one ioctl error shape. */
export type KvmIoctlError = IoctlError;

export interface KvmNative {
  kvmConstants: KvmConstants;
  /** open("/dev/kvm", O_RDWR | O_CLOEXEC). Throws ENOENT (no KVM here), EACCES, ... with syscall 'open'. */
  kvmOpen(): number;
  /**
   * An ioctl whose argument is an integer: KVM_GET_API_VERSION, KVM_CHECK_EXTENSION,
   * KVM_GET_VCPU_MMAP_SIZE (arg 0), KVM_CREATE_VM (machine type), KVM_CREATE_VCPU (vcpu id),
   * KVM_RESET_DIRTY_RINGS (arg 0; returns the entries reset). Returns the
   * result; for KVM_CREATE_VM and KVM_CREATE_VCPU a new close-on-exec fd the caller owns.
   */
  kvmIoctlInt(fd: number, request: number, arg: number): number;
  /**
   * An ioctl whose argument is a struct: KVM_SET_USER_MEMORY_REGION, KVM_GET_REGS / KVM_SET_REGS,
   * KVM_GET_SREGS / KVM_SET_SREGS. `buf` must be exactly the struct's size; _IOR requests fill it.
   */
  kvmIoctl(fd: number, request: number, buf: Uint8Array): number;
  /**
   * KVM_GET_DIRTY_LOG of memslot `slot` (which must have KVM_MEM_LOG_DIRTY_PAGES, ENOENT otherwise)
   * into `bitmap`: one bit per page, little-endian u64 words, cleared in the kernel as it is read.
   * `pages` must be the slot's size in pages; `bitmap` at least ceil(pages / 64) * 8 bytes.
   */
  kvmGetDirtyLog(vmFd: number, slot: number, pages: number, bitmap: Uint8Array): void;
  /**
   * KVM_RUN on a libuv worker thread. Resolves true when the vCPU exited to user space (read the exit from
   * its kvm_run mapping), false when KVM_RUN returned EINTR: kicked (kvmKick), kvm_run.immediate_exit set,
   * or another signal. The call holds its own dup of the fd until it returns.
   */
  kvmRun(vcpuFd: number): Promise<boolean>;
  /**
   * Interrupts a KVM_RUN of vCPU `vcpuFd` in progress (a signal to the worker thread inside it); returns
   * how many threads it signalled (0: none was inside). Set kvm_run.immediate_exit first, so that a
   * KVM_RUN about to start returns at once as well.
   */
  kvmKick(vcpuFd: number): number;
  /**
   * KVM_ENABLE_CAP of KVM_CAP_DIRTY_LOG_RING or KVM_CAP_DIRTY_LOG_RING_ACQ_REL (`cap`; any other is EPERM)
   * with a ring of `bytes` per vCPU (a power of two, at least a page, at most what KVM_CHECK_EXTENSION of
   * the capability answered), before any vCPU is created.
   */
  kvmEnableDirtyRing(vmFd: number, cap: number, bytes: number): void;
  /**
   * Harvests a vCPU's dirty ring (`ring`: the Mapping of its `entries` kvm_dirty_gfn, entries a power of
   * two) from index `fetch`: copies each published entry into `out` (16 bytes each: flags u32, slot u32,
   * offset u64, little-endian) and marks it for reset, until an unpublished entry or `out` is full.
   * Returns the number harvested; then call KVM_RESET_DIRTY_RINGS on the VM.
   */
  kvmDirtyRingHarvest(ring: Mapping, entries: number, fetch: number, out: Uint8Array): number;
}

export const kvm = native as unknown as KvmNative;

export function isKvmIoctlError(err: unknown): err is KvmIoctlError {
  return isIoctlError(err);
}
