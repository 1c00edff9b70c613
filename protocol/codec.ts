// The msgpack body codec. Only plain msgpack leaves this module: maps with string keys, arrays, ints,
// strings, bools and nil. msgpackr's JS-only extensions (records, undefined as fixext, structured
// clones) are switched off so a C or Rust peer with a stock library reads every byte.
//
// One fix-up: msgpackr writes a JS number that is an integer beyond 32 bits as float64 (0xcb). GPAs,
// sizes and offsets are such integers, and a C peer must read them as integers, so after packing we walk
// the encoded value and rewrite every integer-valued float64 as uint64 (0xcf) or int64 (0xd3). All three
// tokens are 9 bytes long, so the rewrite happens in place.
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
});

const TWO_32 = 2 ** 32;
const TWO_63 = 2 ** 63;
const TWO_64 = 2 ** 64;

/**
 * Rewrites integer-valued float64 tokens of one msgpack value in `b` as uint64 / int64.
 * Walks the structure with a count of values still to read, so string and bin payloads are skipped,
 * never misread as tokens.
 */
export function integerizeFloats(b: Uint8Array): void {
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  let i = 0;
  let remaining = 1;
  while (remaining > 0) {
    if (i >= b.length) throw new Error('integerizeFloats: truncated msgpack value');
    const c = b[i] as number;
    remaining--;
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
        case 0xcb: {
          const v = dv.getFloat64(i + 1);
          if (Number.isInteger(v)) {
            if (v >= TWO_32 && v < TWO_64) {
              b[i] = 0xcf;
              dv.setBigUint64(i + 1, BigInt(v));
            } else if (v < -(TWO_32 / 2) && v >= -TWO_63) {
              b[i] = 0xd3;
              dv.setBigInt64(i + 1, BigInt(v));
            }
          }
          i += 9;
          break;
        }
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
        default: throw new Error(`integerizeFloats: reserved msgpack byte 0x${c.toString(16)}`);
      }
  }
}

/** Encodes one message body. The returned bytes are only valid until the next call: copy them. */
export function encodeBody(value: unknown): Uint8Array {
  const bytes = packr.pack(value);
  integerizeFloats(bytes);
  return bytes;
}

/** Decodes exactly one msgpack value filling `bytes`; anything else is MMB_ERR_BAD_FRAME. */
export function decodeBody(bytes: Uint8Array): unknown {
  try {
    return unpackr.unpack(bytes);
  } catch (err) {
    throw new BadFrameError(`frame body is not one msgpack value: ${(err as Error).message.slice(0, 120)}`);
  }
}
