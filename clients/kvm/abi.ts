// The KVM uAPI as the kvm-like client uses it: request numbers, capabilities, flags, exit reasons and
// the byte layout of every struct it passes, from linux/kvm.h and asm/kvm.h (x86-64). Pure data and
// DataView code, no native import: the software stand-in and the planner use it too.
//
// The structs are tables in the one layout format of clients/abi/layout.ts (KVM_LAYOUTS), shared with VFIO
// and vhost-user; the offset objects below (MEMORY_REGION, REGS, ...) are read from them. test/kvm.test.ts
// compiles every member with gcc against the installed headers (test/helpers/layout-probe.ts) and compares
// offsets and sizes, and every number here, and compares the request numbers with the addon's own.
import { f, layoutCodec, offsets, toNumber, type Layout } from '../abi/layout.js';

// --- ioctl numbers (asm-generic/ioctl.h) ----------------------------------------------------------

const IOC_NONE = 0;
const IOC_WRITE = 1;
const IOC_READ = 2;
const ioc = (dir: number, type: number, nr: number, size: number): number => ((dir << 30) | (size << 16) | (type << 8) | nr) >>> 0;
export const KVMIO = 0xae;

// --- struct layouts -----------------------------------------------------------------------------

const u64s = (names: readonly string[], from = 0): Record<string, ReturnType<typeof f>> => Object.fromEntries(names.map((n, i) => [n, f(from + 8 * i, 8)]));
const seg = (offset: number) => ({ offset, size: 24, struct: 'kvm_segment' });
const dtab = (offset: number) => ({ offset, size: 16, struct: 'kvm_dtable' });

/** Every KVM struct the client passes, by its kernel name (linux/kvm.h; x86-64's asm/kvm.h for the registers). */
export const KVM_LAYOUTS = {
  kvm_userspace_memory_region: {
    header: 'linux/kvm.h',
    size: 32,
    fields: { slot: f(0, 4), flags: f(4, 4), guest_phys_addr: f(8, 8), memory_size: f(16, 8), userspace_addr: f(24, 8) },
  },
  /** x86-64: 18 u64 */
  kvm_regs: {
    header: 'asm/kvm.h',
    size: 144,
    fields: {
      rax: f(0, 8),
      rbx: f(8, 8),
      rcx: f(16, 8),
      rdx: f(24, 8),
      rsi: f(32, 8),
      rdi: f(40, 8),
      rsp: f(48, 8),
      rbp: f(56, 8),
      r8: f(64, 8),
      r9: f(72, 8),
      r10: f(80, 8),
      r11: f(88, 8),
      r12: f(96, 8),
      r13: f(104, 8),
      r14: f(112, 8),
      r15: f(120, 8),
      rip: f(128, 8),
      rflags: f(136, 8),
    },
  },
  kvm_segment: {
    header: 'asm/kvm.h',
    size: 24,
    fields: {
      base: f(0, 8),
      limit: f(8, 4),
      selector: f(12, 2),
      type: f(14, 1),
      present: f(15, 1),
      dpl: f(16, 1),
      db: f(17, 1),
      s: f(18, 1),
      l: f(19, 1),
      g: f(20, 1),
      avl: f(21, 1),
      unusable: f(22, 1),
      padding: f(23, 1),
    },
  },
  kvm_dtable: { header: 'asm/kvm.h', size: 16, fields: { base: f(0, 8), limit: f(8, 2), padding: { offset: 10, size: 6, count: 3 } } },
  kvm_sregs: {
    header: 'asm/kvm.h',
    size: 312,
    fields: {
      cs: seg(0),
      ds: seg(24),
      es: seg(48),
      fs: seg(72),
      gs: seg(96),
      ss: seg(120),
      tr: seg(144),
      ldt: seg(168),
      gdt: dtab(192),
      idt: dtab(208),
      ...(u64s(['cr0', 'cr2', 'cr3', 'cr4', 'cr8', 'efer', 'apic_base'], 224) as Record<
        'cr0' | 'cr2' | 'cr3' | 'cr4' | 'cr8' | 'efer' | 'apic_base',
        ReturnType<typeof f>
      >),
      interrupt_bitmap: { offset: 280, size: 32, count: 4 },
    },
  },
  /** dirty_bitmap is a pointer C fills in (kvmGetDirtyLog), in a union with a u64 of padding. */
  kvm_dirty_log: { header: 'linux/kvm.h', size: 16, fields: { slot: f(0, 4), dirty_bitmap: f(8, 8) } },
  /** One entry of a vCPU's dirty ring (slot = address space id << 16 | slot id). */
  kvm_dirty_gfn: { header: 'linux/kvm.h', size: 16, fields: { flags: f(0, 4), slot: f(4, 4), offset: f(8, 8) } },
  /** The header and the exit payloads the client reads (the union starts at 32). */
  kvm_run: {
    header: 'linux/kvm.h',
    size: 2352,
    partial: true,
    fields: {
      request_interrupt_window: f(0, 1),
      immediate_exit: f(1, 1),
      exit_reason: f(8, 4),
      ready_for_interrupt_injection: f(12, 1),
      if_flag: f(13, 1),
      flags: f(14, 2),
      cr8: f(16, 8),
      apic_base: f(24, 8),
      hw_hardware_exit_reason: f(32, 8, 'hw.hardware_exit_reason'),
      fail_entry_hardware_entry_failure_reason: f(32, 8, 'fail_entry.hardware_entry_failure_reason'),
      fail_entry_cpu: f(40, 4, 'fail_entry.cpu'),
      io_direction: f(32, 1, 'io.direction'),
      io_size: f(33, 1, 'io.size'),
      io_port: f(34, 2, 'io.port'),
      io_count: f(36, 4, 'io.count'),
      io_data_offset: f(40, 8, 'io.data_offset'),
      mmio_phys_addr: f(32, 8, 'mmio.phys_addr'),
      mmio_data: { offset: 40, size: 8, count: 8, c: 'mmio.data' },
      mmio_len: f(48, 4, 'mmio.len'),
      mmio_is_write: f(52, 1, 'mmio.is_write'),
      internal_suberror: f(32, 4, 'internal.suberror'),
      internal_ndata: f(36, 4, 'internal.ndata'),
      internal_data: { offset: 40, size: 128, count: 16, c: 'internal.data' },
    },
  },
} as const satisfies Record<string, Layout>;

const kvmCodec = layoutCodec(KVM_LAYOUTS);

/** struct kvm_userspace_memory_region: offsets by member, and size */
export const MEMORY_REGION = offsets(KVM_LAYOUTS.kvm_userspace_memory_region);
/** struct kvm_regs (x86-64) */
export const REGS = offsets(KVM_LAYOUTS.kvm_regs);
/** struct kvm_segment */
export const SEGMENT = offsets(KVM_LAYOUTS.kvm_segment);
/** struct kvm_dtable */
export const DTABLE = offsets(KVM_LAYOUTS.kvm_dtable);
/** struct kvm_sregs (x86-64) */
export const SREGS = offsets(KVM_LAYOUTS.kvm_sregs);
/** struct kvm_dirty_log */
export const DIRTY_LOG = offsets(KVM_LAYOUTS.kvm_dirty_log);
/** struct kvm_dirty_gfn */
export const DIRTY_GFN = offsets(KVM_LAYOUTS.kvm_dirty_gfn);
/** struct kvm_run: the header and the exit payloads the client reads */
export const RUN = offsets(KVM_LAYOUTS.kvm_run);

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
  return kvmCodec.pack('kvm_userspace_memory_region', { slot: r.slot, flags: r.flags, guest_phys_addr: r.gpa, memory_size: r.size, userspace_addr: r.hva });
}

export function unpackMemoryRegion(buf: Uint8Array): MemoryRegionArgs {
  const get = (field: 'slot' | 'flags' | 'guest_phys_addr' | 'memory_size' | 'userspace_addr') => kvmCodec.get('kvm_userspace_memory_region', buf, field);
  return { slot: get('slot'), flags: get('flags'), gpa: get('guest_phys_addr'), size: get('memory_size'), hva: get('userspace_addr') };
}

export type RegName = keyof typeof KVM_LAYOUTS.kvm_regs.fields;
export type Regs = Record<RegName, number>;

export function packRegs(r: Partial<Regs>): Uint8Array {
  return kvmCodec.pack('kvm_regs', r);
}

export function unpackRegs(buf: Uint8Array): Regs {
  // A register may hold any 64-bit value: above 2^53 the number is the nearest double.
  return Object.fromEntries(Object.entries(kvmCodec.unpack('kvm_regs', buf)).map(([k, v]) => [k, Number(v)])) as Regs;
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

const bytesOf = (dv: DataView): Uint8Array => new Uint8Array(dv.buffer, dv.byteOffset, dv.byteLength);

/** The kvm_segment at `at` of a kvm_sregs buffer (throws if its base does not fit a JS number). */
export function readSegment(dv: DataView, at: number): Segment {
  const s = kvmCodec.unpack('kvm_segment', bytesOf(dv), at);
  const { base, padding: _padding, ...small } = s;
  const out = Object.fromEntries(Object.entries(small).map(([k, v]) => [k, Number(v)])) as Omit<Segment, 'base'>;
  return { base: toNumber(base, 'kvm_segment.base'), ...out };
}

/** Writes `s` as the kvm_segment at `at` of a kvm_sregs buffer, its padding byte zero. */
export function writeSegment(dv: DataView, at: number, s: Segment): void {
  kvmCodec.packInto('kvm_segment', bytesOf(dv), at, { ...s, padding: 0 });
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
