// A real KVM VM: /dev/kvm, KVM_CREATE_VM, and its memslots set with real KVM_SET_USER_MEMORY_REGION
// calls, so the kernel itself judges every slot the planner produces. No vCPU until one is asked for
// (vcpu.ts); no irqchip, no devices: this VM exists to hold memslots and run tiny test programs.
import { isNativeError, native } from '../../native/index.js';
import { isKvmIoctlError, kvm } from '../../native/kvm.js';
import { InvalidArgError, KvmError, UnsupportedError, type MmbError, hex } from '../../protocol/index.js';
import {
  DIRTY_GFN,
  KVM_API_VERSION,
  KVM_CAP_DIRTY_LOG_RING,
  KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
  KVM_CAP_IMMEDIATE_EXIT,
  KVM_CAP_NR_MEMSLOTS,
  KVM_CAP_READONLY_MEM,
  KVM_CAP_USER_MEMORY,
  KVM_CHECK_EXTENSION,
  KVM_CREATE_VM,
  KVM_DEFAULT_MEMSLOTS,
  KVM_GET_API_VERSION,
  KVM_GET_VCPU_MMAP_SIZE,
  KVM_RESET_DIRTY_RINGS,
  KVM_SET_USER_MEMORY_REGION,
  packMemoryRegion,
  type MemoryRegionArgs,
} from './abi.js';
import type { Memslots } from './memslots.js';

/** Wraps an addon error from a KVM ioctl into MMB_ERR_KVM carrying its errno. */
export function kvmError(what: string, err: unknown): MmbError {
  if (isNativeError(err)) {
    const request = isKvmIoctlError(err) ? err.request : err.syscall;
    return new KvmError(`[kvm] ${what}: ${request} failed with ${err.code}`, { cause: err, errno: err.code });
  }
  return new KvmError(`[kvm] ${what}: ${err instanceof Error ? err.message : String(err)}`, { cause: err });
}

export interface KvmCapabilities {
  apiVersion: number;
  /** KVM_CAP_NR_MEMSLOTS: user memslots per address space. */
  nrMemslots: number;
  readonlyMem: boolean;
  /** KVM_GET_VCPU_MMAP_SIZE: bytes of a vCPU's kvm_run mapping. */
  vcpuMmapSize: number;
  /** KVM_CAP_IMMEDIATE_EXIT: a vCPU can be parked without a race (kvm_run.immediate_exit). */
  immediateExit: boolean;
  /** KVM_CAP_DIRTY_LOG_RING(_ACQ_REL): the largest dirty ring per vCPU, in bytes (0: no dirty ring). */
  dirtyRingMaxBytes: number;
}

export interface KvmVmOptions {
  /**
   * Log dirty pages in per-vCPU rings of this many entries (KVM_CAP_DIRTY_LOG_RING_ACQ_REL, else
   * KVM_CAP_DIRTY_LOG_RING) instead of per-slot bitmaps (KVM_GET_DIRTY_LOG): a power of two, at least
   * 256 (a page of 16-byte entries). MMB_ERR_UNSUPPORTED where the kernel has no ring or a smaller one.
   */
  dirtyRing?: number;
}

export class KvmVm implements Memslots {
  readonly hypervisor = 'kvm' as const;
  readonly maxSlots: number;
  private closed = false;

  private constructor(
    /** The /dev/kvm fd (system ioctls). */
    readonly sysFd: number,
    /** The VM fd (VM ioctls: memslots, vCPUs, dirty log). */
    readonly fd: number,
    readonly caps: KvmCapabilities,
    /** Entries of each vCPU's dirty ring; 0 when dirty pages are logged in per-slot bitmaps. */
    readonly dirtyRing: number,
  ) {
    this.maxSlots = caps.nrMemslots;
  }

  /** How KVM logs dirty pages in this VM: per-slot bitmaps (KVM_GET_DIRTY_LOG) or per-vCPU rings. */
  get dirtyLog(): 'bitmap' | 'ring' {
    return this.dirtyRing > 0 ? 'ring' : 'bitmap';
  }

  /**
   * Opens /dev/kvm and creates a VM. MMB_ERR_UNSUPPORTED when this machine cannot: no /dev/kvm (or no
   * permission), a KVM API version other than 12, no user memory or no KVM_CAP_READONLY_MEM.
   */
  static open(opts: KvmVmOptions = {}): KvmVm {
    const ring = opts.dirtyRing ?? 0;
    if (!Number.isSafeInteger(ring) || ring < 0 || (ring > 0 && (ring < 256 || (ring & (ring - 1)) !== 0))) {
      throw new InvalidArgError(`dirtyRing must be a power of two of at least 256 entries, got ${opts.dirtyRing}`);
    }
    let sysFd: number;
    try {
      sysFd = kvm.kvmOpen();
    } catch (err) {
      const code = isNativeError(err) ? err.code : 'unknown';
      throw new UnsupportedError(`[kvm] cannot open /dev/kvm (${code}): use the software memslot table instead`, { cause: err, errno: 'EOPNOTSUPP' });
    }
    let vmFd = -1;
    try {
      const apiVersion = kvm.kvmIoctlInt(sysFd, KVM_GET_API_VERSION, 0);
      if (apiVersion !== KVM_API_VERSION) {
        throw new UnsupportedError(`[kvm] /dev/kvm speaks API version ${apiVersion}; this client needs ${KVM_API_VERSION}`);
      }
      if (kvm.kvmIoctlInt(sysFd, KVM_CHECK_EXTENSION, KVM_CAP_USER_MEMORY) <= 0) {
        throw new UnsupportedError('[kvm] KVM lacks KVM_CAP_USER_MEMORY');
      }
      vmFd = kvm.kvmIoctlInt(sysFd, KVM_CREATE_VM, 0);
      // Asked of the VM: the answer may depend on the VM type.
      const nr = kvm.kvmIoctlInt(vmFd, KVM_CHECK_EXTENSION, KVM_CAP_NR_MEMSLOTS);
      const readonlyMem = kvm.kvmIoctlInt(vmFd, KVM_CHECK_EXTENSION, KVM_CAP_READONLY_MEM) > 0;
      if (!readonlyMem) throw new UnsupportedError('[kvm] KVM lacks KVM_CAP_READONLY_MEM: read-only regions cannot be mirrored');
      const vcpuMmapSize = kvm.kvmIoctlInt(sysFd, KVM_GET_VCPU_MMAP_SIZE, 0);
      const immediateExit = kvm.kvmIoctlInt(sysFd, KVM_CHECK_EXTENSION, KVM_CAP_IMMEDIATE_EXIT) > 0;
      // The acquire/release flavour where offered: its ordering rules are the ones the harvest follows.
      const acqRel = Math.max(0, kvm.kvmIoctlInt(vmFd, KVM_CHECK_EXTENSION, KVM_CAP_DIRTY_LOG_RING_ACQ_REL));
      const dirtyRingMaxBytes = acqRel > 0 ? acqRel : Math.max(0, kvm.kvmIoctlInt(vmFd, KVM_CHECK_EXTENSION, KVM_CAP_DIRTY_LOG_RING));
      const caps = { apiVersion, nrMemslots: nr > 0 ? nr : KVM_DEFAULT_MEMSLOTS, readonlyMem, vcpuMmapSize, immediateExit, dirtyRingMaxBytes };
      if (ring > 0) {
        const bytes = ring * DIRTY_GFN.size;
        if (bytes > dirtyRingMaxBytes) {
          throw new UnsupportedError(
            dirtyRingMaxBytes === 0
              ? '[kvm] this kernel has no dirty ring (KVM_CAP_DIRTY_LOG_RING): log dirty pages in bitmaps (no dirtyRing)'
              : `[kvm] a dirty ring of ${ring} entries needs ${bytes} bytes; this kernel allows ${dirtyRingMaxBytes} (${dirtyRingMaxBytes / DIRTY_GFN.size} entries)`,
          );
        }
        kvm.kvmEnableDirtyRing(vmFd, acqRel > 0 ? KVM_CAP_DIRTY_LOG_RING_ACQ_REL : KVM_CAP_DIRTY_LOG_RING, bytes);
      }
      return new KvmVm(sysFd, vmFd, caps, ring);
    } catch (err) {
      if (vmFd >= 0) native.close(vmFd);
      native.close(sysFd);
      if (err instanceof UnsupportedError) throw err;
      throw kvmError('creating a VM', err);
    }
  }

  setUserMemoryRegion(r: MemoryRegionArgs): void {
    const what = `KVM_SET_USER_MEMORY_REGION slot ${r.slot} (gpa ${hex(r.gpa)}, ${hex(r.size)} bytes, hva ${hex(r.hva)}, flags ${r.flags})`;
    if (this.closed) throw new KvmError(`[kvm] ${what}: the VM is closed`, { errno: 'EBADF' });
    try {
      kvm.kvmIoctl(this.fd, KVM_SET_USER_MEMORY_REGION, packMemoryRegion(r));
    } catch (err) {
      throw kvmError(what, err);
    }
  }

  /**
   * KVM_GET_DIRTY_LOG of slot `slot` of `pages` pages: the bitmap (bit i = page i of the slot written
   * since the last call), cleared in the kernel as it is read. The slot must log dirty pages.
   */
  getDirtyLog(slot: number, pages: number): Uint8Array {
    if (!Number.isSafeInteger(pages) || pages < 1) throw new InvalidArgError(`invalid page count ${pages}`);
    const bitmap = new Uint8Array(Math.ceil(pages / 64) * 8);
    try {
      kvm.kvmGetDirtyLog(this.fd, slot, pages, bitmap);
    } catch (err) {
      throw kvmError(`KVM_GET_DIRTY_LOG slot ${slot}`, err);
    }
    return bitmap;
  }

  /** KVM_RESET_DIRTY_RINGS: the kernel takes back the ring entries harvested since the last reset. */
  resetDirtyRings(): number {
    try {
      return kvm.kvmIoctlInt(this.fd, KVM_RESET_DIRTY_RINGS, 0);
    } catch (err) {
      throw kvmError('KVM_RESET_DIRTY_RINGS', err);
    }
  }

  get isClosed(): boolean {
    return this.closed;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    native.close(this.fd);
    native.close(this.sysFd);
  }
}
