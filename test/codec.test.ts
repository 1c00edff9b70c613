// The codec's fast path for small flat maps (ACK, EV_COMMITTED, ...) writes exactly the bytes msgpackr
// writes; everything else still goes through msgpackr, with integers beyond 32 bits as msgpack integers
// whether or not the search for float64 tokens is skipped.
import fc from 'fast-check';
import { Packr } from 'msgpackr';
import { describe, expect, it } from 'vitest';
import { decodeBody, decodeSmallMap, encodeBody, integerizeFloats, plainProblem } from '../protocol/index.js';

/** What encodeBody() wrote before its fast paths: msgpackr with the codec's options, every float64 rewritten. */
const reference = new Packr({ useRecords: false, moreTypes: false, structuredClone: false, encodeUndefinedAsNil: true, variableMapSize: true });
const slow = (v: unknown) => {
  const b = Buffer.from(reference.pack(v));
  integerizeFloats(b);
  return b.toString('hex');
};
const hex = (v: unknown) => Buffer.from(encodeBody(v)).toString('hex');

describe('encodeBody', () => {
  it('writes small flat maps of unsigned 32-bit integers and booleans exactly as msgpackr does', () => {
    // (`__proto__` aside: msgpackr's decoder renames it, whoever encoded it.)
    const key = fc.string({ minLength: 0, maxLength: 40 }).filter((k) => k !== '__proto__');
    const value = fc.oneof(fc.integer({ min: 0, max: 0xffff_ffff }), fc.boolean(), fc.constantFrom(0, 0x7f, 0x80, 0xff, 0x100, 0xffff, 0x1_0000, 0xffff_ffff));
    fc.assert(
      fc.property(fc.dictionary(key, value, { maxKeys: 20 }), (m) => {
        expect(hex(m)).toBe(slow(m));
        expect(decodeBody(encodeBody(m))).toEqual(m);
      }),
      { numRuns: 3000 },
    );
  });

  it('leaves every other value to msgpackr, integers beyond 32 bits as uint64 / int64', () => {
    const anything = fc.oneof(
      fc.integer({ min: -(2 ** 53), max: 2 ** 53 }),
      fc.constantFrom(2 ** 32, 2 ** 52 - 4096, -(2 ** 40), 203, 0xcb, 0xcb00, 1.5),
      fc.string(),
      fc.boolean(),
      fc.constant(null),
      fc.array(fc.integer({ min: -(2 ** 53), max: 2 ** 53 }), { maxLength: 4 }),
    );
    fc.assert(
      fc.property(fc.dictionary(fc.string({ maxLength: 8 }), anything, { maxKeys: 6 }), fc.array(anything, { maxLength: 4 }), (m, a) => {
        expect(hex(m)).toBe(slow(m));
        expect(hex(a)).toBe(slow(a));
      }),
      { numRuns: 3000 },
    );
    expect(hex({ t: 16, seq: 0xcb })).toBe('82a17410a3736571cccb');
    expect(hex({ t: 36, gpa: 2 ** 32 })).toBe('82a17424a3677061cf0000000100000000');
  });
});

describe('decodeSmallMap', () => {
  it('decodes what it accepts exactly as msgpackr does, and accepts only plain msgpack', () => {
    const small = fc.dictionary(fc.string({ maxLength: 31 }), fc.oneof(fc.integer({ min: 0, max: 0xffff_ffff }), fc.boolean()), { maxKeys: 15 });
    fc.assert(
      fc.property(small, fc.array(fc.tuple(fc.nat(64), fc.integer({ min: 0, max: 255 })), { maxLength: 3 }), fc.nat(64), (m, edits, cut) => {
        const bytes = Buffer.from(encodeBody(m));
        const keys = Object.keys(m);
        // eslint-disable-next-line no-control-regex -- ASCII keys only: the range starts at NUL on purpose
        if (!keys.includes('__proto__') && keys.every((k) => /^[\x00-\x7f]*$/.test(k))) expect(decodeSmallMap(bytes)).toEqual(m);
        // Damaged: whatever it still accepts is what msgpackr reads, and plain.
        const d = bytes.subarray(0, Math.max(1, bytes.length - (cut % 3)));
        for (const [at, v] of edits) if (at < d.length) d[at] = v;
        const got = decodeSmallMap(d);
        if (got !== undefined) {
          expect(got).toEqual(decodeBody(d));
          expect(plainProblem(d)).toBeUndefined();
        }
      }),
      { numRuns: 5000 },
    );
  });

  it('leaves everything else to the general path', () => {
    for (const v of [{ a: -1 }, { a: 2 ** 32 }, { a: 'x' }, { a: null }, { a: [1] }, { é: 1 }, [1, 2], 5, { a: 1.5 }]) {
      expect(decodeSmallMap(Buffer.from(encodeBody(v))), JSON.stringify(v)).toBeUndefined();
    }
    expect(decodeSmallMap(Buffer.from('81a17401c0', 'hex'))).toBeUndefined(); // trailing byte
  });
});
