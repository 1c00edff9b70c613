// Placing hotplugged memory: the lowest GPA range of a given size and alignment that overlaps no region
// and no IOVA range a subscriber reported as reserved (for a passthrough VM, IOVA = GPA, so RAM over the
// MSI doorbell window or a PCI hole could never be DMA-mapped).
import {
  GPA_LIMIT,
  InvalidArgError,
  NoFreeRangeError,
  type FindFree,
  type Gpa,
  type Iova,
  type Range,
  type Region,
  asGpa,
  gpaOfIova,
  hex,
  rangeEnd,
  rangeText,
  rangesOverlap,
} from '../protocol/index.js';

export function findFree(req: Omit<FindFree, 't' | 'id'>, regions: readonly Region[], reserved: readonly Range<Iova>[], pageSize: number): Gpa {
  const align = req.align ?? pageSize;
  const min = req.min ?? 0;
  const max = Math.min(req.max ?? GPA_LIMIT, GPA_LIMIT);
  if (align < pageSize || (align & (align - 1)) !== 0 || align > GPA_LIMIT) {
    throw new InvalidArgError(`alignment ${hex(align)} must be a power of two of at least ${hex(pageSize)}`);
  }
  if (req.size === 0 || req.size % pageSize !== 0) throw new InvalidArgError(`size ${hex(req.size)} must be a non-zero multiple of ${hex(pageSize)}`);
  // Busy ranges, sorted by start; a reserved IOVA is the GPA a passthrough device would use for it.
  const busy: Range<Gpa>[] = [
    ...regions.map((r): Range<Gpa> => ({ start: r.gpa, size: r.size })),
    ...reserved.map((r): Range<Gpa> => ({ start: gpaOfIova(r.start), size: r.size })),
  ];
  busy.sort((a, b) => a.start - b.start);
  const up = (n: number) => asGpa(Math.ceil(n / align) * align);
  let candidate = up(min);
  for (const b of busy) {
    if (rangeEnd(candidate, req.size) <= b.start) break;
    if (rangesOverlap(candidate, req.size, b.start, b.size)) candidate = up(rangeEnd(b.start, b.size));
  }
  if (rangeEnd(candidate, req.size) > max) {
    throw new NoFreeRangeError(`no ${hex(req.size)}-byte range aligned to ${hex(align)} is free in ${rangeText(min, max - min)}`);
  }
  return candidate;
}
