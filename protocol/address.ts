// The address vocabulary (in the spirit of rust-vmm's vm-memory, GuestAddress and friends): four kinds of
// address that must never be mixed, and one half-open range with its end, overlap, containment and
// intersection.
//
//   Gpa     guest-physical address: where the guest sees memory (Region.gpa, a memslot's
//           guest_phys_addr, a vhost-user region's guest address).
//   Hva     host virtual address in some process: where a mapping of guest memory is (a memslot's
//           userspace_addr, VFIO_IOMMU_MAP_DMA's vaddr, a vhost-user region's user address).
//   Iova    I/O virtual address: what a device uses through an IOMMU (IovaMapping.iova; equal to the GPA
//           for a passthrough VM without a guest IOMMU, but still a different kind of address: the code
//           says so where it uses one as the other).
//   Offset  a byte offset inside a backing file (Region.offset, mmap's offset, vhost-user's mmap_offset).
//
// They are branded numbers: the same number at run time (zero cost, nothing is wrapped or allocated),
// distinct types to the checker, so an IOVA cannot be passed where a guest-physical address is expected.
// A plain number becomes one at an edge (the message schema, a kernel struct, a parsed argument) with
// asGpa and friends. Arithmetic gives plain numbers again: name what a result is by branding it
// (`asGpa(r.gpa + delta)`); rangeEnd keeps the kind. A branded value is still a number, so it goes
// anywhere a number goes (messages, logs, hex()).
//
// Ranges are half-open, [start, start + size), everywhere in the code. The kernel's VFIO and iommufd
// uAPIs, sysfs reserved_regions and, after them, the wire's REPORT.reserved and STATUS use the inclusive
// form {start, last}: it is converted where it arrives or leaves (fromInclusive / toInclusive), never
// compared as such.
//
// The operations take numbers, not range objects, so that any record with a start and a size (a
// Region's gpa and size, an IovaMapping's iova and size, a memory-table entry) is checked without
// allocating, in lookups too. (The per-buffer translation of clients/memory.ts and clients/ioas-table.ts
// searches flat tables of starts and ends, [start, end), with its own branch-free code.) Addresses and
// sizes are integers below 2^53 whose sums stay exact (the protocol keeps addresses below GPA_LIMIT = 2^52).
import type { IovaRange } from './messages.js';
import { hex } from './units.js';

declare const kind: unique symbol;
/** A number that is an address (or offset) of kind `K`. */
export type Address<K extends string> = number & { readonly [kind]: K };

export type Gpa = Address<'gpa'>;
export type Hva = Address<'hva'>;
export type Iova = Address<'iova'>;
export type Offset = Address<'offset'>;

/** Brands a number the caller knows to be a guest-physical address (no check, no cost). */
export const asGpa = (n: number): Gpa => n as Gpa;
/** Brands a number the caller knows to be a host virtual address. */
export const asHva = (n: number): Hva => n as Hva;
/** Brands a number the caller knows to be an I/O virtual address. */
export const asIova = (n: number): Iova => n as Iova;
/** Brands a number the caller knows to be an offset inside a backing. */
export const asOffset = (n: number): Offset => n as Offset;

/**
 * The one place two kinds meet: a passthrough device without a guest IOMMU uses the GPA as its IOVA (the
 * vfio-like client maps each region at IOVA = GPA, and a reserved IOVA is a GPA RAM must not take).
 */
export const iovaOfGpa = (gpa: Gpa): Iova => gpa as number as Iova;
/** See iovaOfGpa. */
export const gpaOfIova = (iova: Iova): Gpa => iova as number as Gpa;

/** The half-open range [start, start + size) of addresses of one kind. */
export interface Range<A extends number = number> {
  readonly start: A;
  readonly size: number;
}

/** The first address after [start, start + size), of the same kind. */
export const rangeEnd = <A extends number>(start: A, size: number): A => (start + size) as A;

/**
 * Whether [aStart, aStart + aSize) and [bStart, bStart + bSize) share an address. Empty ranges share
 * none; adjacent ranges (one ends where the other starts) share none. Both must be of one kind.
 */
export function rangesOverlap<A extends number>(aStart: A, aSize: number, bStart: A, bSize: number): boolean {
  return aSize > 0 && bSize > 0 && aStart < bStart + bSize && bStart < aStart + aSize;
}

/**
 * Whether [start, start + size) lies inside [outerStart, outerStart + outerSize). An empty range is
 * inside when its start is in [outerStart, outerStart + outerSize].
 */
export function rangeContains<A extends number>(outerStart: A, outerSize: number, start: A, size: number): boolean {
  return start >= outerStart && start + size <= outerStart + outerSize;
}

/** Whether the address `at` is in [start, start + size). */
export function rangeHas<A extends number>(start: A, size: number, at: A): boolean {
  return at >= start && at < start + size;
}

/** The addresses both ranges have, or undefined when they share none. */
export function rangeIntersection<A extends number>(aStart: A, aSize: number, bStart: A, bSize: number): Range<A> | undefined {
  const start = Math.max(aStart, bStart);
  const end = Math.min(aStart + aSize, bStart + bSize);
  return end > start ? { start: start as A, size: end - start } : undefined;
}

/** Sorted, merged copy of ranges: ranges that overlap or touch become one; empty ones go. */
export function mergeRanges<A extends number>(ranges: readonly Range<A>[]): Range<A>[] {
  const sorted = ranges.filter((r) => r.size > 0).sort((a, b) => a.start - b.start);
  const out: { start: A; size: number }[] = [];
  for (const r of sorted) {
    const last = out[out.length - 1];
    if (last && r.start <= rangeEnd(last.start, last.size)) last.size = Math.max(rangeEnd(last.start, last.size), rangeEnd(r.start, r.size)) - last.start;
    else out.push({ start: r.start, size: r.size });
  }
  return out;
}

/** Whether [start, start + size) lies inside one of `merged` (mergeRanges' output: the union, so inside the union). */
export function rangesCover<A extends number>(merged: readonly Range<A>[], start: A, size: number): boolean {
  return merged.some((r) => rangeContains(r.start, r.size, start, size));
}

/** A range in the kernel's and the wire's inclusive form as a half-open one (where that form arrives). */
export function fromInclusive<A extends number = number>(r: IovaRange): Range<A> {
  return { start: r.start as A, size: r.last - r.start + 1 };
}

/** A non-empty half-open range in the kernel's and the wire's inclusive form (where that form leaves). */
export function toInclusive(r: Range): IovaRange {
  return { start: r.start, last: r.start + r.size - 1 };
}

/** `[0x…, 0x…]`: a non-empty range as the kernel and sysfs print reserved regions (first and last byte). */
export const inclusiveText = (start: number, size: number): string => `[${hex(start)}, ${hex(start + size - 1)}]`;

/** `[0x…, 0x…)`: a half-open range as messages print it. */
export const rangeText = (start: number, size: number): string => `[${hex(start)}, ${hex(start + size)})`;
