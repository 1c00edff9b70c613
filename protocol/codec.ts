// The msgpack body codec. Only plain msgpack leaves this module: maps with string keys, arrays, ints,
// strings, bools and nil. msgpackr's JS-only extensions (records, undefined as fixext, structured
// clones) are switched off so a C or Rust peer with a stock library reads every byte.
//
// Received bodies are checked to be plain msgpack before they are decoded: no floats, no bin, no
// extensions, strings valid UTF-8 (msgpackr would turn a timestamp extension into a Date and invalid
// UTF-8 into U+FFFD; a strict C peer refuses both, and so do we). The one exception is a bin in a field of
// a feature-gated extension that defines one (EV_SYNC.columns, feature COMPACT_SYNC): the scan reports bins
// apart, and validate.ts refuses them everywhere else.
//
// One fix-up: msgpackr writes a JS number that is an integer beyond 32 bits as float64 (0xcb). GPAs,
// sizes and offsets are such integers, and a C peer must read them as integers, so after packing we walk
// the encoded value and rewrite every integer-valued float64 as uint64 (0xcf) or int64 (0xd3). All three
// tokens are 9 bytes long, so the rewrite happens in place.
import { isUtf8 } from 'node:buffer';
import { Packr, Unpackr } from 'msgpackr';
import { BadFrameError } from './errors.js';

const packr = new Packr({
  useRecords: false,
  moreTypes: false,
  structuredClone: false,
  encodeUndefinedAsNil: true,
  variableMapSize: true,
});

const unpackr = new Unpackr({
  useRecords: false,
  mapsAsObjects: true,
  // u64 beyond 2^53 decodes as an inexact number, which every range check then refuses.
  int64AsType: 'number',
  // A bin is copied out: the bytes it would otherwise view are the frame decoder's buffer, reused for the
  // next frames.
  copyBuffers: true,
});

const TWO_32 = 2 ** 32;
const TWO_63 = 2 ** 63;
const TWO_64 = 2 ** 64;

/**
 * Walks one msgpack value in `b` token by token, calling `visit(code, offset)` for every token before
 * moving past it. Keeps a count of values still to read, so string and bin payloads are skipped, never
 * misread as tokens. Throws on truncation or the reserved byte 0xc1.
 */
function walk(b: Uint8Array, visit: (code: number, at: number, dv: DataView, b: Uint8Array) => void): void {
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  let i = 0;
  let remaining = 1;
  while (remaining > 0) {
    if (i >= b.length) throw new Error('truncated msgpack value');
    const c = b[i] as number;
    visit(c, i, dv, b);
    remaining--;
    // One msgpack type byte (or range) per line, read as a table: not reflowed by Prettier.
    // prettier-ignore
    if (c <= 0x7f || c >= 0xe0 || c === 0xc0 || c === 0xc2 || c === 0xc3) i += 1;
    else if (c <= 0x8f) (remaining += 2 * (c & 0x0f)), (i += 1);
    else if (c <= 0x9f) (remaining += c & 0x0f), (i += 1);
    else if (c <= 0xbf) i += 1 + (c & 0x1f);
    else
      switch (c) {
        case 0xc4: i += 2 + dv.getUint8(i + 1); break;
        case 0xc5: i += 3 + dv.getUint16(i + 1); break;
        case 0xc6: i += 5 + dv.getUint32(i + 1); break;
        case 0xc7: i += 3 + dv.getUint8(i + 1); break;
        case 0xc8: i += 4 + dv.getUint16(i + 1); break;
        case 0xc9: i += 6 + dv.getUint32(i + 1); break;
        case 0xca: i += 5; break;
        case 0xcb: i += 9; break;
        case 0xcc: case 0xd0: i += 2; break;
        case 0xcd: case 0xd1: i += 3; break;
        case 0xce: case 0xd2: i += 5; break;
        case 0xcf: case 0xd3: i += 9; break;
        case 0xd4: i += 3; break;
        case 0xd5: i += 4; break;
        case 0xd6: i += 6; break;
        case 0xd7: i += 10; break;
        case 0xd8: i += 18; break;
        case 0xd9: i += 2 + dv.getUint8(i + 1); break;
        case 0xda: i += 3 + dv.getUint16(i + 1); break;
        case 0xdb: i += 5 + dv.getUint32(i + 1); break;
        case 0xdc: (remaining += dv.getUint16(i + 1)), (i += 3); break;
        case 0xdd: (remaining += dv.getUint32(i + 1)), (i += 5); break;
        case 0xde: (remaining += 2 * dv.getUint16(i + 1)), (i += 3); break;
        case 0xdf: (remaining += 2 * dv.getUint32(i + 1)), (i += 5); break;
        default: throw new Error(`reserved msgpack byte 0x${c.toString(16)}`);
      }
  }
}

/** Rewrites integer-valued float64 tokens of one msgpack value in `b` as uint64 / int64, in place. */
export function integerizeFloats(b: Uint8Array): void {
  walk(b, (c, i, dv) => {
    if (c !== 0xcb) return;
    const v = dv.getFloat64(i + 1);
    if (!Number.isInteger(v)) return;
    if (v >= TWO_32 && v < TWO_64) {
      b[i] = 0xcf;
      dv.setBigUint64(i + 1, BigInt(v));
    } else if (v < -(TWO_32 / 2) && v >= -TWO_63) {
      b[i] = 0xd3;
      dv.setBigInt64(i + 1, BigInt(v));
    }
  });
}

/** Where a string token's payload starts and how long it is. */
function strPayload(c: number, i: number, dv: DataView): [number, number] | undefined {
  if (c >= 0xa0 && c <= 0xbf) return [i + 1, c & 0x1f];
  if (c === 0xd9) return [i + 2, dv.getUint8(i + 1)];
  if (c === 0xda) return [i + 3, dv.getUint16(i + 1)];
  if (c === 0xdb) return [i + 5, dv.getUint32(i + 1)];
  return undefined;
}

/** Whether b[start, start + length) is valid UTF-8; plain ASCII (every key, most names) needs no native call. */
function utf8At(b: Uint8Array, start: number, length: number): boolean {
  const end = start + length;
  for (let i = start; i < end; i++) if ((b[i] as number) >= 0x80) return isUtf8(b.subarray(start, end));
  return true;
}

/** What the protocol says of a bin where no extension defines one. */
export const BIN_PROBLEM = 'msgpack type bin is not used by the protocol';

/** The visitor of scanBody(): throws at the first token the protocol does not use; counts bins. */
function visitor(seen: { bins: number }): (c: number, i: number, dv: DataView, b: Uint8Array) => void {
  return (c, i, dv, b) => {
    if (c === 0xca || c === 0xcb) throw new Error('floats are not used by the protocol');
    if (c >= 0xc4 && c <= 0xc6) {
      seen.bins++;
      return;
    }
    if ((c >= 0xc7 && c <= 0xc9) || (c >= 0xd4 && c <= 0xd8)) {
      throw new Error(`msgpack type 0x${c.toString(16)} (extension) is not used by the protocol`);
    }
    const s = strPayload(c, i, dv);
    if (s && s[1] > 0 && !utf8At(b, s[0], s[1])) throw new Error('a string is not valid UTF-8');
  };
}

/**
 * Scans a body: `problem` says what makes it not plain msgpack (floats 0xca-0xcb, extension types
 * 0xc7-0xc9 and 0xd4-0xd8, strings that are not valid UTF-8); `bin` whether it holds bin values
 * (0xc4-0xc6), which only a feature-gated field may (validate.ts decides).
 */
export function scanBody(b: Uint8Array): { problem: string | undefined; bin: boolean } {
  const seen = { bins: 0 };
  try {
    walk(b, visitor(seen));
    return { problem: undefined, bin: seen.bins > 0 };
  } catch (err) {
    return { problem: (err as Error).message, bin: seen.bins > 0 };
  }
}

/**
 * What makes a body not plain msgpack, or undefined: floats (0xca, 0xcb), bin (0xc4-0xc6) and extension
 * types (0xc7-0xc9, 0xd4-0xd8) are not part of the base protocol, and strings must be valid UTF-8.
 */
export function plainProblem(b: Uint8Array): string | undefined {
  const s = scanBody(b);
  return s.problem ?? (s.bin ? BIN_PROBLEM : undefined);
}

/** The scratch of encodeSmallMap(): its bytes are valid until the next encodeBody(), as packr's are. */
const small = new Uint8Array(256);

/**
 * The msgpack of a flat map whose keys are short ASCII strings and whose values are integers in
 * [0, 2^32) or booleans (ACK, EV_COMMITTED, EV_ROLLBACK, EV_DIRTY_FLUSH: the messages of every transaction,
 * sent once per subscriber), written byte for byte as msgpackr writes it (test/codec.test.ts compares the
 * two), or undefined for any other value. Such a message needs neither msgpackr's general path nor the
 * search for float64 tokens.
 */
function encodeSmallMap(value: object): Uint8Array | undefined {
  if (Object.getPrototypeOf(value) !== Object.prototype) return undefined;
  const o = value as Record<string, unknown>;
  let n = 0;
  let at = 1;
  for (const k in o) {
    if (++n > 15 || k.length > 31 || at + 1 + k.length + 5 > small.length) return undefined;
    small[at++] = 0xa0 | k.length;
    for (let i = 0; i < k.length; i++) {
      const c = k.charCodeAt(i);
      if (c >= 0x80) return undefined;
      small[at++] = c;
    }
    const v = o[k];
    if (v === true) small[at++] = 0xc3;
    else if (v === false) small[at++] = 0xc2;
    else if (typeof v === 'number' && v >>> 0 === v) {
      if (v < 0x80) small[at++] = v;
      else if (v < 0x100) {
        small[at++] = 0xcc;
        small[at++] = v;
      } else if (v < 0x10000) {
        small[at++] = 0xcd;
        small[at++] = v >> 8;
        small[at++] = v & 0xff;
      } else {
        small[at++] = 0xce;
        small[at++] = v >>> 24;
        small[at++] = (v >> 16) & 0xff;
        small[at++] = (v >> 8) & 0xff;
        small[at++] = v & 0xff;
      }
    } else return undefined;
  }
  small[0] = 0x80 | n;
  return small.subarray(0, at);
}

/** Encodes one message body. The returned bytes are only valid until the next call: copy them. */
export function encodeBody(value: unknown): Uint8Array {
  if (typeof value === 'object' && value !== null) {
    const fast = encodeSmallMap(value);
    if (fast) return fast;
  }
  const bytes = packr.pack(value);
  // Only a float64 token needs rewriting, and it starts with the byte 0xcb: without that byte anywhere
  // (most messages), there is nothing to look for token by token.
  if (bytes.indexOf(0xcb) >= 0) integerizeFloats(bytes);
  return bytes;
}

/**
 * The inverse of encodeSmallMap(): a body that is a fixmap of ASCII fixstr keys and unsigned integer (up to
 * 32 bits) or boolean values, and nothing else, as the object msgpackr would decode (the last of two equal
 * keys wins); undefined for any other body, which then takes the general path (msgpackr, the plain-msgpack
 * scan). Such a body is plain msgpack by construction: nothing in it needs the scan.
 */
export function decodeSmallMap(b: Uint8Array): Record<string, unknown> | undefined {
  const h = b[0] as number;
  if (h < 0x80 || h > 0x8f) return undefined;
  const n = h & 0x0f;
  const out: Record<string, unknown> = {};
  let at = 1;
  for (let i = 0; i < n; i++) {
    const kh = b[at] as number;
    if (kh < 0xa0 || kh > 0xbf) return undefined;
    const len = kh & 0x1f;
    if (at + 1 + len >= b.length) return undefined;
    let key = '';
    for (let k = at + 1; k <= at + len; k++) {
      const c = b[k] as number;
      if (c >= 0x80) return undefined;
      key += String.fromCharCode(c);
    }
    if (key === '__proto__') return undefined;
    at += 1 + len;
    const v = b[at] as number;
    if (v < 0x80) {
      out[key] = v;
      at += 1;
    } else if (v === 0xc2 || v === 0xc3) {
      out[key] = v === 0xc3;
      at += 1;
    } else if (v === 0xcc && at + 1 < b.length) {
      out[key] = b[at + 1];
      at += 2;
    } else if (v === 0xcd && at + 2 < b.length) {
      out[key] = ((b[at + 1] as number) << 8) | (b[at + 2] as number);
      at += 3;
    } else if (v === 0xce && at + 4 < b.length) {
      out[key] = (b[at + 1] as number) * 0x100_0000 + (((b[at + 2] as number) << 16) | ((b[at + 3] as number) << 8) | (b[at + 4] as number));
      at += 5;
    } else return undefined;
  }
  return at === b.length ? out : undefined;
}

/** Decodes exactly one msgpack value filling `bytes`; anything else is MMB_ERR_BAD_FRAME. */
export function decodeBody(bytes: Uint8Array): unknown {
  try {
    return unpackr.unpack(bytes);
  } catch (err) {
    throw new BadFrameError(`frame body is not one msgpack value: ${(err as Error).message.slice(0, 120)}`);
  }
}
