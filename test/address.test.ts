// The address vocabulary's one range rule: half-open [start, start + size). Adjacent ranges do not
// overlap, empty ranges overlap nothing, and the arithmetic stays exact at and beyond the protocol's
// 2^52 limit (sums up to 2^53 are exact in a double).
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import {
  GPA_LIMIT,
  asGpa,
  asIova,
  fromInclusive,
  mergeRanges,
  rangeContains,
  rangesCover,
  rangeEnd,
  rangeHas,
  rangeIntersection,
  rangeText,
  rangesOverlap,
  toInclusive,
  type Gpa,
  type Iova,
} from '../protocol/index.js';

const KiB4 = 0x1000;

describe('address ranges', () => {
  it('adjacent ranges do not overlap, one shared byte does', () => {
    expect(rangesOverlap(0, KiB4, KiB4, KiB4)).toBe(false);
    expect(rangesOverlap(KiB4, KiB4, 0, KiB4)).toBe(false);
    expect(rangesOverlap(0, KiB4 + 1, KiB4, KiB4)).toBe(true);
    expect(rangesOverlap(KiB4, KiB4, 0, KiB4 + 1)).toBe(true);
    expect(rangeIntersection(0, KiB4, KiB4, KiB4)).toBeUndefined();
    expect(rangeIntersection(0, KiB4 + 1, KiB4, KiB4)).toEqual({ start: KiB4, size: 1 });
  });

  it('an empty range overlaps nothing, not even a range around it, and lies inside a range that reaches it', () => {
    expect(rangesOverlap(KiB4, 0, 0, 2 * KiB4)).toBe(false);
    expect(rangesOverlap(0, 2 * KiB4, KiB4, 0)).toBe(false);
    expect(rangesOverlap(KiB4, 0, KiB4, 0)).toBe(false);
    expect(rangeIntersection(0, 2 * KiB4, KiB4, 0)).toBeUndefined();
    expect(rangeContains(0, KiB4, KiB4, 0)).toBe(true);
    expect(rangeContains(0, KiB4, KiB4 + 1, 0)).toBe(false);
    expect(rangeHas(KiB4, 0, KiB4)).toBe(false);
  });

  it('containment includes both ends of the outer range, and the end is not in the range', () => {
    expect(rangeContains(KiB4, KiB4, KiB4, KiB4)).toBe(true);
    expect(rangeContains(KiB4, KiB4, KiB4 - 1, KiB4)).toBe(false);
    expect(rangeContains(KiB4, KiB4, KiB4 + 1, KiB4)).toBe(false);
    expect(rangeHas(KiB4, KiB4, KiB4)).toBe(true);
    expect(rangeHas(KiB4, KiB4, rangeEnd(KiB4, KiB4) - 1)).toBe(true);
    expect(rangeHas(KiB4, KiB4, rangeEnd(KiB4, KiB4))).toBe(false);
    expect(rangeHas(KiB4, KiB4, KiB4 - 1)).toBe(false);
  });

  it('stays exact at 2^52 and beyond GPA_LIMIT', () => {
    const top = GPA_LIMIT - KiB4;
    expect(rangeEnd(top, KiB4)).toBe(GPA_LIMIT);
    // A range ending at the limit and one starting there are adjacent.
    expect(rangesOverlap(top, KiB4, GPA_LIMIT, KiB4)).toBe(false);
    expect(rangesOverlap(top, KiB4 + 1, GPA_LIMIT, KiB4)).toBe(true);
    expect(rangeContains(0, GPA_LIMIT, top, KiB4)).toBe(true);
    expect(rangeContains(0, GPA_LIMIT, top, KiB4 + 1)).toBe(false);
    expect(rangeHas(0, GPA_LIMIT, GPA_LIMIT)).toBe(false);
    // Above the limit, up to 2^53: one byte apart is still told apart.
    const high = GPA_LIMIT + 1;
    expect(rangesOverlap(high, GPA_LIMIT - 2, 2 ** 53 - 1, 1)).toBe(false);
    expect(rangesOverlap(high, GPA_LIMIT - 2, 2 ** 53 - 2, 1)).toBe(true);
    expect(rangeIntersection(GPA_LIMIT, GPA_LIMIT, high, 10)).toEqual({ start: high, size: 10 });
    expect(rangeText(top, KiB4)).toBe('[0xffffffffff000, 0x10000000000000)');
  });

  it('the inclusive form converts both ways at the edge, one byte and the whole 52-bit space included', () => {
    expect(fromInclusive({ start: 0xfee0_0000, last: 0xfeef_ffff })).toEqual({ start: 0xfee0_0000, size: 0x10_0000 });
    expect(fromInclusive({ start: 5, last: 5 })).toEqual({ start: 5, size: 1 });
    expect(toInclusive({ start: 0, size: GPA_LIMIT })).toEqual({ start: 0, last: GPA_LIMIT - 1 });
    fc.assert(
      fc.property(fc.nat({ max: GPA_LIMIT - 1 }), fc.nat({ max: GPA_LIMIT - 1 }), (a, b) => {
        const r = { start: Math.min(a, b), last: Math.max(a, b) };
        expect(toInclusive(fromInclusive(r))).toEqual(r);
      }),
    );
  });

  it('overlap, containment and intersection agree with each other and with a byte-by-byte definition', () => {
    const small = fc.tuple(fc.nat({ max: 40 }), fc.nat({ max: 12 }));
    fc.assert(
      fc.property(small, small, ([as, an], [bs, bn]) => {
        const bytes = (s: number, n: number) => new Set(Array.from({ length: n }, (_, i) => s + i));
        const a = bytes(as, an);
        const shared = [...bytes(bs, bn)].filter((x) => a.has(x));
        const i = rangeIntersection(as, an, bs, bn);
        expect(rangesOverlap(as, an, bs, bn)).toBe(shared.length > 0);
        expect(rangesOverlap(bs, bn, as, an)).toBe(shared.length > 0);
        expect(i ? [...bytes(i.start, i.size)] : []).toEqual(shared.sort((x, y) => x - y));
        if (bn > 0) expect(rangeContains(as, an, bs, bn)).toBe(shared.length === bn);
        for (let x = bs - 1; x <= bs + bn; x++) expect(rangeHas(bs, bn, x)).toBe(bytes(bs, bn).has(x));
      }),
    );
  });

  it('the kinds are plain numbers at run time and distinct types to the checker', () => {
    const gpa: Gpa = asGpa(0x1000);
    const iova: Iova = asIova(0x1000);
    expect(typeof gpa).toBe('number');
    expect(gpa).toBe(iova);
    expect(rangeEnd(gpa, KiB4)).toBe(0x2000);
    // @ts-expect-error an IOVA is not a guest-physical address
    const wrong: Gpa = iova;
    // @ts-expect-error one range operation compares addresses of one kind only
    rangesOverlap(gpa, KiB4, iova, KiB4);
    expect(wrong).toBe(gpa);
  });

  it('mergeRanges joins overlapping and touching ranges, drops empty ones; rangesCover asks the union', () => {
    const g = (start: number, size: number) => ({ start: asGpa(start), size });
    const merged = mergeRanges([g(0x5000, 0x1000), g(0, 0x1000), g(0x1000, 0x1000), g(0x9000, 0), g(0x1800, 0x1000)]);
    expect(merged).toEqual([g(0, 0x2800), g(0x5000, 0x1000)]);
    expect(rangesCover(merged, asGpa(0x800), 0x2000)).toBe(true); // across what were three ranges
    expect(rangesCover(merged, asGpa(0x2000), 0x1000)).toBe(false); // runs past the end of the first
    expect(rangesCover(merged, asGpa(0x4000), 0x2000)).toBe(false); // the hole before the second
    expect(rangesCover(merged, asGpa(0x5000), 0x1000)).toBe(true);
    expect(mergeRanges([])).toEqual([]);
  });
});
