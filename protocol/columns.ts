// Feature COMPACT_SYNC: the regions of an EV_SYNC part as columns in one msgpack bin (`columns`), instead
// of one msgpack map per region. A 65,536-region snapshot is then a few hundred kilobytes of fixed-width
// integers that a receiver reads without a decoder, instead of half a million map keys and values to
// decode, check and copy one by one. docs/protocol.md (EV_SYNC) is the specification of the layout:
//
//   u32 count, u32 reserved (0),
//   u64 gpa[count], u64 size[count], u64 offset[count], u32 id[count], u32 backing[count],
//   u8 flags[count] (bit 0 readonly, bit 1 logDirty, other bits 0), u8 nameLength[count] (1..64),
//   the names' UTF-8 bytes, one after the other; nothing after them.
//
// Little-endian. Every u64 is below 2^53 (as every integer of the protocol). The checks on decoding are the
// plain form's (protocol/messages.ts `region`): a name is 1 to 64 bytes of valid UTF-8 without control
// characters; what breaks a rule is MMB_ERR_BAD_MESSAGE.
import { isUtf8 } from 'node:buffer';
import { BadMessageError } from './errors.js';
import type { Gpa, Offset } from './address.js';
import type { Region } from './messages.js';

/** count and a reserved u32. */
export const COLUMNS_HEADER_BYTES = 8;
/** Fixed bytes per region: three u64, two u32, flags and a name length. */
export const COLUMNS_BYTES_PER_REGION = 34;
/** The longest name (protocol/limits.ts maxNameBytes; version 1 never changes it). */
const MAX_NAME_BYTES = 64;
const TWO_32 = 0x1_0000_0000;
/** The high u32 of a u64 below 2^53. */
const MAX_HIGH = 0x1f_ffff;
const READONLY = 1;
const LOG_DIRTY = 2;

function fail(path: string, what: string): never {
  throw new BadMessageError(`${path}: ${what}`);
}

/** Bytes of `name` in UTF-8, without a native call for ASCII (every generated name, most given ones). */
function utf8Length(name: string): number {
  for (let i = 0; i < name.length; i++) if (name.charCodeAt(i) >= 0x80) return Buffer.byteLength(name, 'utf8');
  return name.length;
}

/** The columns of `regions` (the broker side). Throws on a name the protocol does not allow. */
export function encodeRegionColumns(regions: readonly Region[]): Uint8Array {
  const n = regions.length;
  const lengths = new Uint8Array(n);
  let nameBytes = 0;
  for (let i = 0; i < n; i++) {
    const len = utf8Length((regions[i] as Region).name);
    if (len < 1 || len > MAX_NAME_BYTES) throw new RangeError(`region name of ${len} bytes cannot be sent`);
    lengths[i] = len;
    nameBytes += len;
  }
  const namesAt = COLUMNS_HEADER_BYTES + COLUMNS_BYTES_PER_REGION * n;
  const out = Buffer.alloc(namesAt + nameBytes);
  const dv = new DataView(out.buffer, out.byteOffset, out.byteLength);
  dv.setUint32(0, n, true);
  const gpaAt = COLUMNS_HEADER_BYTES;
  const sizeAt = gpaAt + 8 * n;
  const offsetAt = sizeAt + 8 * n;
  const idAt = offsetAt + 8 * n;
  const backingAt = idAt + 4 * n;
  const flagsAt = backingAt + 4 * n;
  const lengthAt = flagsAt + n;
  out.set(lengths, lengthAt);
  let at = namesAt;
  for (let i = 0; i < n; i++) {
    const r = regions[i] as Region;
    dv.setUint32(gpaAt + 8 * i, r.gpa >>> 0, true);
    dv.setUint32(gpaAt + 8 * i + 4, Math.floor(r.gpa / TWO_32), true);
    dv.setUint32(sizeAt + 8 * i, r.size >>> 0, true);
    dv.setUint32(sizeAt + 8 * i + 4, Math.floor(r.size / TWO_32), true);
    dv.setUint32(offsetAt + 8 * i, r.offset >>> 0, true);
    dv.setUint32(offsetAt + 8 * i + 4, Math.floor(r.offset / TWO_32), true);
    dv.setUint32(idAt + 4 * i, r.id, true);
    dv.setUint32(backingAt + 4 * i, r.backing, true);
    out[flagsAt + i] = (r.readonly ? READONLY : 0) | (r.logDirty ? LOG_DIRTY : 0);
    const len = lengths[i] as number;
    const name = r.name;
    if (len === name.length) for (let k = 0; k < len; k++) out[at + k] = name.charCodeAt(k);
    else out.write(name, at, len, 'utf8');
    at += len;
  }
  return out;
}

/** Typed arrays read the host's byte order; the columns are little-endian. */
const LITTLE_ENDIAN = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;

/**
 * The fixed-width part of `bin` (the header and every column but the names) as u32 words in host order:
 * a view of the bytes when they are 4-byte aligned on a little-endian host (msgpack's copy of a bin always
 * is), else a converted copy.
 */
function words(bin: Uint8Array, bytes: number): Uint32Array {
  if (LITTLE_ENDIAN && bin.byteOffset % 4 === 0) return new Uint32Array(bin.buffer, bin.byteOffset, bytes / 4);
  const dv = new DataView(bin.buffer, bin.byteOffset, bytes);
  const w = new Uint32Array(bytes / 4);
  for (let i = 0; i < w.length; i++) w[i] = dv.getUint32(4 * i, true);
  return w;
}

/** Word index of the gpa column in RegionColumns' words (after the two header words). */
const GPA_AT = 2;

/**
 * A sync part's regions as they arrived: checked, and read in place rather than copied into one object per
 * region. A 65,536-region snapshot made of Region objects cost the new subscriber 65,536 objects (and a
 * heap number each for gpa) that it only read once to build its own view of each region, and the garbage
 * collector copied them all; a receiver reads the fields it needs by index instead (clients/view.ts
 * diffSnapshot). Iterating it, or region(i), makes Region objects for code that wants them.
 *
 * It keeps views of the bytes it was decoded from (when they are 4-byte aligned on a little-endian host,
 * as msgpack's copy of a bin always is): they must not change afterwards.
 */
export class RegionColumns implements Iterable<Region> {
  /** How many regions. */
  readonly length: number;
  /** The header and the fixed-width columns but the u8 ones, as u32 words in host order. */
  private readonly w: Uint32Array;
  private readonly bytes: Uint8Array;
  private readonly names: string[];
  /** Word indexes of the u64 columns (low word first) and the u32 columns; byte offset of the flags. */
  private readonly sizeAt: number;
  private readonly offsetAt: number;
  private readonly idAt: number;
  private readonly backingAt: number;
  private readonly flagsAt: number;

  /** Only decodeRegionColumns() makes one: what it holds is checked there. */
  constructor(n: number, w: Uint32Array, bytes: Uint8Array, names: string[]) {
    this.length = n;
    this.w = w;
    this.bytes = bytes;
    this.names = names;
    this.sizeAt = GPA_AT + 2 * n;
    this.offsetAt = this.sizeAt + 2 * n;
    this.idAt = this.offsetAt + 2 * n;
    this.backingAt = this.idAt + n;
    this.flagsAt = COLUMNS_HEADER_BYTES + 32 * n;
  }

  id(i: number): number {
    return this.w[this.idAt + i] as number;
  }
  name(i: number): string {
    return this.names[i] as string;
  }
  gpa(i: number): Gpa {
    return ((this.w[GPA_AT + 2 * i + 1] as number) * TWO_32 + (this.w[GPA_AT + 2 * i] as number)) as Gpa;
  }
  size(i: number): number {
    return (this.w[this.sizeAt + 2 * i + 1] as number) * TWO_32 + (this.w[this.sizeAt + 2 * i] as number);
  }
  backing(i: number): number {
    return this.w[this.backingAt + i] as number;
  }
  offset(i: number): Offset {
    return ((this.w[this.offsetAt + 2 * i + 1] as number) * TWO_32 + (this.w[this.offsetAt + 2 * i] as number)) as Offset;
  }
  readonly(i: number): boolean {
    return ((this.bytes[this.flagsAt + i] as number) & READONLY) !== 0;
  }
  logDirty(i: number): boolean {
    return ((this.bytes[this.flagsAt + i] as number) & LOG_DIRTY) !== 0;
  }

  /** Region i as the plain form's object (its key order, so both give V8 the same shape). */
  region(i: number): Region {
    return {
      id: this.id(i),
      name: this.name(i),
      gpa: this.gpa(i),
      size: this.size(i),
      backing: this.backing(i),
      offset: this.offset(i),
      readonly: this.readonly(i),
      logDirty: this.logDirty(i),
    };
  }

  *[Symbol.iterator](): Iterator<Region> {
    for (let i = 0; i < this.length; i++) yield this.region(i);
  }
}

/**
 * The regions in `bin` (the client side), checked as the plain form is. Throws BadMessageError naming
 * `path` and what is wrong. The result reads `bin` in place (see RegionColumns).
 */
export function decodeRegionColumns(bin: Uint8Array, path = 'columns'): RegionColumns {
  if (bin.length < COLUMNS_HEADER_BYTES) fail(path, `${bin.length} bytes, shorter than the ${COLUMNS_HEADER_BYTES}-byte header`);
  const head = words(bin, COLUMNS_HEADER_BYTES);
  const n = head[0] as number;
  if (head[1] !== 0) fail(path, 'the reserved header word is not 0');
  const namesAt = COLUMNS_HEADER_BYTES + COLUMNS_BYTES_PER_REGION * n;
  if (namesAt > bin.length) fail(path, `${n} regions need at least ${namesAt} bytes, ${bin.length} arrived`);
  const w = words(bin, COLUMNS_HEADER_BYTES + 32 * n);
  const flagsAt = COLUMNS_HEADER_BYTES + 32 * n;
  const lengthAt = flagsAt + n;
  // Every loop is a function of its own: V8 compiles a long loop while it runs (on-stack replacement),
  // and code after it that had not run yet made that compiled code give up at the end of every call.
  checkHighs(w, n, path);
  checkFlags(bin, flagsAt, n, path);

  // One string for every name, cut per region: latin1 maps bytes to characters one to one, which is the
  // name itself when it is ASCII. The common case is checked in bulk: the lengths add up to the bytes that
  // arrived, and one scan of the string finds no control character and nothing beyond ASCII; then each
  // name is a cut. Anything else takes the loop that checks name by name (and names what is wrong).
  const buf = Buffer.from(bin.buffer, bin.byteOffset, bin.byteLength);
  const all = buf.toString('latin1', namesAt);
  const names = new Array<string>(n);
  if (namesLength(bin, lengthAt, n) === all.length && !NOT_PLAIN_ASCII.test(all)) cutNames(bin, all, lengthAt, names);
  else checkNames(bin, buf, all, names, namesAt, lengthAt, path);
  return new RegionColumns(n, w, bin, names);
}

/** The u64 columns are one run of 3n (low, high) word pairs: every high word must be below 2^21. */
function checkHighs(w: Uint32Array, n: number, path: string): void {
  for (let k = 0; k < 3 * n; k++) {
    if ((w[GPA_AT + 1 + 2 * k] as number) > MAX_HIGH) fail(path, `${U64_COLUMNS[Math.floor(k / n)]}[${k % n}] is 2^53 or more`);
  }
}

function checkFlags(bin: Uint8Array, flagsAt: number, n: number, path: string): void {
  for (let i = 0; i < n; i++) {
    const flags = bin[flagsAt + i] as number;
    if (flags > (READONLY | LOG_DIRTY)) fail(path, `flags[${i}] 0x${flags.toString(16)} has bits other than readonly (1) and logDirty (2)`);
  }
}

/** The names' lengths added up, or -1 when one is outside 1..64. */
function namesLength(bin: Uint8Array, lengthAt: number, n: number): number {
  let total = 0;
  let ok = true;
  for (let i = 0; i < n; i++) {
    const len = bin[lengthAt + i] as number;
    ok = ok && len >= 1 && len <= MAX_NAME_BYTES;
    total += len;
  }
  return ok ? total : -1;
}

/** Each name cut from `all` (names checked in bulk). */
function cutNames(bin: Uint8Array, all: string, lengthAt: number, names: string[]): void {
  let at = 0;
  for (let i = 0; i < names.length; i++) {
    const stop = at + (bin[lengthAt + i] as number);
    names[i] = all.slice(at, stop);
    at = stop;
  }
}

/** A control character or a byte beyond ASCII (in the latin1 string of the names' bytes). */
// eslint-disable-next-line no-control-regex -- control characters are what it looks for
const NOT_PLAIN_ASCII = /[\u0000-\u001f\u007f-\u00ff]/;

/**
 * The names one by one into `names`, each checked: its length, that it arrived, no control characters,
 * valid UTF-8 when it has bytes beyond ASCII; nothing after the last. Throws naming the first one wrong.
 */
function checkNames(bin: Uint8Array, buf: Buffer, all: string, names: string[], namesAt: number, lengthAt: number, path: string): void {
  let at = namesAt;
  for (let i = 0; i < names.length; i++) {
    const len = bin[lengthAt + i] as number;
    if (len < 1 || len > MAX_NAME_BYTES) fail(path, `name[${i}] of ${len} bytes is outside 1..${MAX_NAME_BYTES}`);
    const stop = at + len;
    if (stop > bin.length) fail(path, `the names need more than the ${bin.length} bytes that arrived`);
    let high = false;
    for (let k = at; k < stop; k++) {
      const c = bin[k] as number;
      if (c < 0x20 || c === 0x7f) fail(path, `name[${i}]: control characters are not allowed`);
      if (c >= 0x80) high = true;
    }
    names[i] = high ? utf8Name(bin, buf, at, len, path, i) : all.slice(at - namesAt, stop - namesAt);
    at = stop;
  }
  if (at !== bin.length) fail(path, `${bin.length - at} bytes after the last name`);
}

/** The u64 columns in their order, for errors. */
const U64_COLUMNS = ['gpa', 'size', 'offset'] as const;

/** A name with bytes beyond ASCII: checked to be valid UTF-8, then decoded. */
function utf8Name(bin: Uint8Array, buf: Buffer, at: number, len: number, path: string, i: number): string {
  if (!isUtf8(bin.subarray(at, at + len))) fail(path, `name[${i}] is not valid UTF-8`);
  return buf.toString('utf8', at, at + len);
}
