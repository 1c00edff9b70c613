// The software stand-in for a KVM VM, for machines without /dev/kvm (or when asked for): the same slot
// table, judged by the checks KVM's kvm_set_memory_region() makes (virt/kvm/kvm_main.c), with the errno
// it returns. It is named 'software' everywhere (status, logs, errors) and never pretends to run a guest.
//
// The checks, in the kernel's order:
//   flags other than LOG_DIRTY_PAGES | READONLY                          EINVAL
//   address space id (slot >> 16) other than 0, slot id >= the limit      EINVAL
//   size, gpa or hva not page aligned; hva range not a user address       EINVAL
//   gpa + size wrapping, more than KVM_MEM_MAX_NR_PAGES pages, past the
//   guest-physical limit                                                   EINVAL
//   size 0 (delete) of a slot that does not exist                          EINVAL
//   change of an existing slot's size, hva or READONLY                     EINVAL
//   create or move onto a range another slot covers                        EEXIST
// The same call twice is a no-op, as in KVM; a gpa change of an existing slot is a move.
import { KvmError, hex, rangeEnd, rangesOverlap } from '../../protocol/index.js';
import { KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_MAX_NR_PAGES, KVM_MEM_READONLY, KVM_X86_USER_MEM_SLOTS, type MemoryRegionArgs } from './abi.js';
import type { Memslots } from './memslots.js';

export interface SoftwareMemslotsOptions {
  /** User memslots offered. Default 32764, what x86-64 KVM reports. */
  maxSlots?: number;
  /** Guest-physical address bits (gpa + size must not exceed 2^bits). Default 52. */
  gpaBits?: number;
  /** Page size. Default 4096. */
  pageSize?: number;
}

/** x86-64 user address space ends at 2^47 - one page (TASK_SIZE_MAX). */
const USER_ADDR_END = 2 ** 47 - 4096;

const ERRNO_TEXT: Record<string, string> = { EINVAL: 'Invalid argument', EEXIST: 'File exists', EBADF: 'Bad file descriptor' };

export class SoftwareMemslots implements Memslots {
  readonly hypervisor = 'software' as const;
  readonly maxSlots: number;
  private readonly gpaLimit: number;
  private readonly page: number;
  private readonly slots = new Map<number, MemoryRegionArgs>();
  /** The same slots sorted by gpa, for the overlap check (KVM keeps an interval tree). */
  private sorted: MemoryRegionArgs[] = [];
  private closed = false;
  /** KVM_SET_USER_MEMORY_REGION calls that succeeded (for tests and stats). */
  calls = 0;

  constructor(opts: SoftwareMemslotsOptions = {}) {
    this.maxSlots = opts.maxSlots ?? KVM_X86_USER_MEM_SLOTS;
    this.gpaLimit = 2 ** (opts.gpaBits ?? 52);
    this.page = opts.pageSize ?? 4096;
  }

  setUserMemoryRegion(r: MemoryRegionArgs): void {
    const fail = (errno: string, why: string): never => {
      throw new KvmError(
        `[software] KVM_SET_USER_MEMORY_REGION slot ${r.slot} (gpa ${hex(r.gpa)}, ${hex(r.size)} bytes, flags ${r.flags}): ${ERRNO_TEXT[errno] ?? errno} (${errno}): ${why}`,
        { errno },
      );
    };
    if (this.closed) fail('EBADF', 'the VM is closed');
    if ((r.flags & ~(KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY)) !== 0) fail('EINVAL', 'unknown flags');
    const asId = Math.floor(r.slot / 65536);
    const id = r.slot % 65536;
    if (asId !== 0) fail('EINVAL', 'only address space 0 exists');
    if (id >= this.maxSlots) fail('EINVAL', `slot ids go up to ${this.maxSlots - 1}`);
    if (r.size % this.page !== 0 || r.gpa % this.page !== 0 || r.hva % this.page !== 0) fail('EINVAL', 'not page aligned');
    if (r.size > 0 && rangeEnd(r.hva, r.size) > USER_ADDR_END) fail('EINVAL', 'the host range is not a user address range');
    if (r.size / this.page > KVM_MEM_MAX_NR_PAGES) fail('EINVAL', 'larger than KVM_MEM_MAX_NR_PAGES');

    const old = this.slots.get(id);
    if (r.size === 0) {
      if (!old) fail('EINVAL', 'deleting a slot that does not exist');
      this.remove(old as MemoryRegionArgs);
      this.calls++;
      return;
    }
    if (rangeEnd(r.gpa, r.size) > this.gpaLimit) fail('EINVAL', 'beyond the guest-physical address limit');
    if (old) {
      if (old.size !== r.size || old.hva !== r.hva || ((old.flags ^ r.flags) & KVM_MEM_READONLY) !== 0) {
        fail('EINVAL', 'a slot cannot change size, host address or KVM_MEM_READONLY in place');
      }
      if (old.gpa === r.gpa && old.flags === r.flags) return; // nothing to change
    }
    if (!old || old.gpa !== r.gpa) {
      const other = this.overlapping(r.gpa, r.size, id);
      if (other) fail('EEXIST', `overlaps slot ${other.slot}`);
    }
    if (old) this.remove(old);
    const slot = { ...r, slot: id };
    this.slots.set(id, slot);
    this.sorted.splice(this.lowerBound(slot.gpa), 0, slot);
    this.calls++;
  }

  /** Index of the first slot whose gpa is >= `gpa`. */
  private lowerBound(gpa: number): number {
    let lo = 0;
    let hi = this.sorted.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if ((this.sorted[mid] as MemoryRegionArgs).gpa < gpa) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  /** A slot other than `id` that intersects [gpa, gpa + size). Slots never overlap, so only the neighbours can. */
  private overlapping(gpa: number, size: number, id: number): MemoryRegionArgs | undefined {
    const i = this.lowerBound(gpa);
    for (const s of [this.sorted[i - 1], this.sorted[i], this.sorted[i + 1]]) {
      if (s && s.slot !== id && rangesOverlap(gpa, size, s.gpa, s.size)) return s;
    }
    return undefined;
  }

  private remove(s: MemoryRegionArgs): void {
    this.slots.delete(s.slot);
    let i = this.lowerBound(s.gpa);
    while (i < this.sorted.length && this.sorted[i] !== s) i++;
    if (i < this.sorted.length) this.sorted.splice(i, 1);
  }

  /** The table as the stand-in holds it, by slot id. */
  table(): MemoryRegionArgs[] {
    return [...this.slots.values()].sort((a, b) => a.slot - b.slot);
  }

  close(): void {
    this.closed = true;
    this.slots.clear();
    this.sorted = [];
  }
}
