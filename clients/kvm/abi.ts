// The KVM uAPI as the kvm-like client uses it: request numbers, capabilities, flags, exit reasons and
// the byte layout of every struct it passes, from linux/kvm.h and asm/kvm.h (x86-64). Pure data and
// DataView code, no native import: the software stand-in and the planner use it too.
//
// test/kvm.test.ts compiles a C program against the installed headers and compares every offset, size
// and number here with what gcc says, and compares the request numbers with the addon's own.

// --- ioctl numbers (asm-generic/ioctl.h) ----------------------------------------------------------

const IOC_NONE = 0;
const IOC_WRITE = 1;
const IOC_READ = 2;
const ioc = (dir: number, type: number, nr: number, size: number): number => ((dir << 30) | (size << 16) | (type << 8) | nr) >>> 0;
export const KVMIO = 0xae;

// --- struct layouts (byte offsets) ----------------------------------------------------------------

/** struct kvm_userspace_memory_region */
export const MEMORY_REGION = { size: 32, slot: 0, flags: 4, guest_phys_addr: 8, memory_size: 16, userspace_addr: 24 } as const;

/** struct kvm_regs (x86-64): 18 u64 */
export const REGS = {
  size: 144,
  rax: 0,
  rbx: 8,
  rcx: 16,
  rdx: 24,
  rsi: 32,
  rdi: 40,
  rsp: 48,
  rbp: 56,
  r8: 64,
  r9: 72,
  r10: 80,
  r11: 88,
  r12: 96,
  r13: 104,
  r14: 112,
  r15: 120,
  rip: 128,
  rflags: 136,
} as const;

/** struct kvm_segment */
export const SEGMENT = {
  size: 24,
  base: 0,
  limit: 8,
  selector: 12,
  type: 14,
  present: 15,
  dpl: 16,
  db: 17,
  s: 18,
  l: 19,
  g: 20,
  avl: 21,
  unusable: 22,
} as const;

/** struct kvm_dtable */
export const DTABLE = { size: 16, base: 0, limit: 8 } as const;

/** struct kvm_sregs (x86-64) */
export const SREGS = {
  size: 312,
  cs: 0,
  ds: 24,
  es: 48,
  fs: 72,
  gs: 96,
  ss: 120,
  tr: 144,
  ldt: 168,
  gdt: 192,
  idt: 208,
  cr0: 224,
  cr2: 232,
  cr3: 240,
  cr4: 248,
  cr8: 256,
  efer: 264,
  apic_base: 272,
  interrupt_bitmap: 280,
} as const;

/** struct kvm_dirty_log */
export const DIRTY_LOG = { size: 16, slot: 0, dirty_bitmap: 8 } as const;

/** struct kvm_dirty_gfn: one entry of a vCPU's dirty ring (slot = address space id << 16 | slot id). */
export const DIRTY_GFN = { size: 16, flags: 0, slot: 4, offset: 8 } as const;

/** struct kvm_run: the header and the exit payloads the client reads (the union starts at 32). */
export const RUN = {
  request_interrupt_window: 0,
  immediate_exit: 1,
  exit_reason: 8,
  ready_for_interrupt_injection: 12,
  if_flag: 13,
  flags: 14,
  cr8: 16,
  apic_base: 24,
  hw_hardware_exit_reason: 32,
  fail_entry_hardware_entry_failure_reason: 32,
  fail_entry_cpu: 40,
  io_direction: 32,
  io_size: 33,
  io_port: 34,
  io_count: 36,
  io_data_offset: 40,
  mmio_phys_addr: 32,
  mmio_data: 40,
  mmio_len: 48,
  mmio_is_write: 52,
  internal_suberror: 32,
  internal_ndata: 36,
  internal_data: 40,
} as const;

// --- numbers --------------------------------------------------------------------------------------

export const KVM_API_VERSION = 12;

export const KVM_GET_API_VERSION = ioc(IOC_NONE, KVMIO, 0x00, 0);
export const KVM_CREATE_VM = ioc(IOC_NONE, KVMIO, 0x01, 0);
export const KVM_CHECK_EXTENSION = ioc(IOC_NONE, KVMIO, 0x03, 0);
export const KVM_GET_VCPU_MMAP_SIZE = ioc(IOC_NONE, KVMIO, 0x04, 0);
export const KVM_CREATE_VCPU = ioc(IOC_NONE, KVMIO, 0x41, 0);
export const KVM_GET_DIRTY_LOG = ioc(IOC_WRITE, KVMIO, 0x42, DIRTY_LOG.size);
export const KVM_SET_USER_MEMORY_REGION = ioc(IOC_WRITE, KVMIO, 0x46, MEMORY_REGION.size);
export const KVM_RUN = ioc(IOC_NONE, KVMIO, 0x80, 0);
export const KVM_GET_REGS = ioc(IOC_READ, KVMIO, 0x81, REGS.size);
export const KVM_SET_REGS = ioc(IOC_WRITE, KVMIO, 0x82, REGS.size);
export const KVM_GET_SREGS = ioc(IOC_READ, KVMIO, 0x83, SREGS.size);
export const KVM_SET_SREGS = ioc(IOC_WRITE, KVMIO, 0x84, SREGS.size);
export const KVM_RESET_DIRTY_RINGS = ioc(IOC_NONE, KVMIO, 0xc7, 0);

export const KVM_CAP_USER_MEMORY = 3;
export const KVM_CAP_NR_MEMSLOTS = 10;
export const KVM_CAP_READONLY_MEM = 81;
export const KVM_CAP_IMMEDIATE_EXIT = 136;
/** The dirty ring: CHECK_EXTENSION answers the largest ring in bytes (0: none). */
export const KVM_CAP_DIRTY_LOG_RING = 192;
/** The same ring with acquire/release ordering on the entries' flags (what arm64 needs; x86 offers both). */
export const KVM_CAP_DIRTY_LOG_RING_ACQ_REL = 223;

/** Where a vCPU's dirty ring is mapped in its fd, in pages (asm/kvm.h, x86). */
export const KVM_DIRTY_LOG_PAGE_OFFSET = 64;
/** kvm_dirty_gfn.flags: the kernel published the entry; user space harvested it (to be reset). */
export const KVM_DIRTY_GFN_F_DIRTY = 1 << 0;
export const KVM_DIRTY_GFN_F_RESET = 1 << 1;

/** Memslot flags. */
export const KVM_MEM_LOG_DIRTY_PAGES = 1 << 0;
export const KVM_MEM_READONLY = 1 << 1;

export const KVM_EXIT_UNKNOWN = 0;
export const KVM_EXIT_IO = 2;
export const KVM_EXIT_HLT = 5;
export const KVM_EXIT_MMIO = 6;
export const KVM_EXIT_SHUTDOWN = 8;
export const KVM_EXIT_FAIL_ENTRY = 9;
export const KVM_EXIT_INTR = 10;
export const KVM_EXIT_INTERNAL_ERROR = 17;
export const KVM_EXIT_DIRTY_RING_FULL = 31;

export const EXIT_NAMES: Readonly<Record<number, string>> = {
  [KVM_EXIT_UNKNOWN]: 'KVM_EXIT_UNKNOWN',
  1: 'KVM_EXIT_EXCEPTION',
  [KVM_EXIT_IO]: 'KVM_EXIT_IO',
  3: 'KVM_EXIT_HYPERCALL',
  4: 'KVM_EXIT_DEBUG',
  [KVM_EXIT_HLT]: 'KVM_EXIT_HLT',
  [KVM_EXIT_MMIO]: 'KVM_EXIT_MMIO',
  7: 'KVM_EXIT_IRQ_WINDOW_OPEN',
  [KVM_EXIT_SHUTDOWN]: 'KVM_EXIT_SHUTDOWN',
  [KVM_EXIT_FAIL_ENTRY]: 'KVM_EXIT_FAIL_ENTRY',
  [KVM_EXIT_INTR]: 'KVM_EXIT_INTR',
  [KVM_EXIT_INTERNAL_ERROR]: 'KVM_EXIT_INTERNAL_ERROR',
  [KVM_EXIT_DIRTY_RING_FULL]: 'KVM_EXIT_DIRTY_RING_FULL',
};

/** Largest memslot, in pages (KVM_MEM_MAX_NR_PAGES: (1 << 31) - 1 on 64-bit hosts). */
export const KVM_MEM_MAX_NR_PAGES = 2 ** 31 - 1;
/** Memslots a VM offers when KVM_CAP_NR_MEMSLOTS is absent (the historical KVM_MEMORY_SLOTS). */
export const KVM_DEFAULT_MEMSLOTS = 32;
/** KVM_USER_MEM_SLOTS on x86-64: what KVM_CAP_NR_MEMSLOTS reports there (and the software default). */
export const KVM_X86_USER_MEM_SLOTS = 32764;

// --- packing --------------------------------------------------------------------------------------

/** Writes a number below 2^53 as a little-endian u64. */
export function setU64(dv: DataView, off: number, v: number): void {
  dv.setUint32(off, v % 2 ** 32, true);
  dv.setUint32(off + 4, Math.floor(v / 2 ** 32), true);
}

/** Reads a little-endian u64; throws if it does not fit a JS number exactly. */
export function getU64(dv: DataView, off: number): number {
  const v = dv.getUint32(off + 4, true) * 2 ** 32 + dv.getUint32(off, true);
  if (!Number.isSafeInteger(v)) throw new RangeError(`u64 at offset ${off} does not fit a JS number`);
  return v;
}

export interface MemoryRegionArgs {
  /** Slot id (bits 0-15) and address space id (bits 16-31). */
  slot: number;
  flags: number;
  gpa: number;
  /** 0 deletes the slot. */
  size: number;
  /** Host virtual address of the first byte. */
  hva: number;
}

export function packMemoryRegion(r: MemoryRegionArgs): Uint8Array {
  const buf = new Uint8Array(MEMORY_REGION.size);
  const dv = new DataView(buf.buffer);
  dv.setUint32(MEMORY_REGION.slot, r.slot, true);
  dv.setUint32(MEMORY_REGION.flags, r.flags, true);
  setU64(dv, MEMORY_REGION.guest_phys_addr, r.gpa);
  setU64(dv, MEMORY_REGION.memory_size, r.size);
  setU64(dv, MEMORY_REGION.userspace_addr, r.hva);
  return buf;
}

export function unpackMemoryRegion(buf: Uint8Array): MemoryRegionArgs {
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  return {
    slot: dv.getUint32(MEMORY_REGION.slot, true),
    flags: dv.getUint32(MEMORY_REGION.flags, true),
    gpa: getU64(dv, MEMORY_REGION.guest_phys_addr),
    size: getU64(dv, MEMORY_REGION.memory_size),
    hva: getU64(dv, MEMORY_REGION.userspace_addr),
  };
}

export type RegName = Exclude<keyof typeof REGS, 'size'>;
export type Regs = Record<RegName, number>;
const REG_NAMES = Object.keys(REGS).filter((k) => k !== 'size') as RegName[];

export function packRegs(r: Partial<Regs>): Uint8Array {
  const buf = new Uint8Array(REGS.size);
  const dv = new DataView(buf.buffer);
  for (const name of REG_NAMES) setU64(dv, REGS[name], r[name] ?? 0);
  return buf;
}

export function unpackRegs(buf: Uint8Array): Regs {
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const out = {} as Regs;
  // A register may hold any 64-bit value: above 2^53 the number is the nearest double.
  for (const name of REG_NAMES) out[name] = dv.getUint32(REGS[name] + 4, true) * 2 ** 32 + dv.getUint32(REGS[name], true);
  return out;
}

export interface Segment {
  base: number;
  limit: number;
  selector: number;
  type: number;
  present: number;
  dpl: number;
  db: number;
  s: number;
  l: number;
  g: number;
  avl: number;
  unusable: number;
}

export function readSegment(dv: DataView, at: number): Segment {
  return {
    base: getU64(dv, at + SEGMENT.base),
    limit: dv.getUint32(at + SEGMENT.limit, true),
    selector: dv.getUint16(at + SEGMENT.selector, true),
    type: dv.getUint8(at + SEGMENT.type),
    present: dv.getUint8(at + SEGMENT.present),
    dpl: dv.getUint8(at + SEGMENT.dpl),
    db: dv.getUint8(at + SEGMENT.db),
    s: dv.getUint8(at + SEGMENT.s),
    l: dv.getUint8(at + SEGMENT.l),
    g: dv.getUint8(at + SEGMENT.g),
    avl: dv.getUint8(at + SEGMENT.avl),
    unusable: dv.getUint8(at + SEGMENT.unusable),
  };
}

export function writeSegment(dv: DataView, at: number, s: Segment): void {
  setU64(dv, at + SEGMENT.base, s.base);
  dv.setUint32(at + SEGMENT.limit, s.limit, true);
  dv.setUint16(at + SEGMENT.selector, s.selector, true);
  dv.setUint8(at + SEGMENT.type, s.type);
  dv.setUint8(at + SEGMENT.present, s.present);
  dv.setUint8(at + SEGMENT.dpl, s.dpl);
  dv.setUint8(at + SEGMENT.db, s.db);
  dv.setUint8(at + SEGMENT.s, s.s);
  dv.setUint8(at + SEGMENT.l, s.l);
  dv.setUint8(at + SEGMENT.g, s.g);
  dv.setUint8(at + SEGMENT.avl, s.avl);
  dv.setUint8(at + SEGMENT.unusable, s.unusable);
  dv.setUint8(at + SEGMENT.unusable + 1, 0);
}

/** A flat 4 GiB segment for 32-bit protected mode: base 0, limit 0xfffff pages (g=1), db=1. */
export function flatSegment(selector: number, code: boolean): Segment {
  return {
    base: 0,
    limit: 0xffff_ffff,
    selector,
    // 0xb: code, execute/read, accessed; 0x3: data, read/write, accessed
    type: code ? 0xb : 0x3,
    present: 1,
    dpl: 0,
    db: 1,
    s: 1,
    l: 0,
    g: 1,
    avl: 0,
    unusable: 0,
  };
}

/** Control registers of kvm_sregs (offsets into SREGS). */
export const CR0_PE = 1 << 0;
export const CR0_PG = 2 ** 31;
