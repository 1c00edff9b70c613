// The migration stream (docs/migration.md, "The stream"): what `mmbroker migrate --to tcp://...` sends to
// `mmbroker receive` over one TCP connection. Every record is a 16-byte header and a body:
//
//   0        4        6        8        12       16
//   | length | type   | flags  | crc32  | 0      | body (length bytes)
//
// little-endian; `length` counts the body; `crc32` is CRC-32 (ISO-HDLC, zlib's) over the header's first
// 8 bytes and then the body, except for DATA without the DATA_CRC flag, where it covers the first 8 bytes
// of the body (the GPA) only and the bytes are left to TCP's checksum and the end-to-end verification.
// Control records carry one JSON object (UTF-8); DATA carries a u64 GPA and the guest bytes.
import zlib from 'node:zlib';
import { BadFrameError, BadMessageError, GPA_LIMIT, asGpa, hex, rangeEnd, rangesOverlap, type Gpa } from '../../protocol/index.js';

export const STREAM_VERSION = 1;
export const MAGIC = 'mmb-migration';
export const HEADER_BYTES = 16;
/** The GPA that starts a DATA body. */
export const DATA_PREFIX_BYTES = 8;
/** Largest guest bytes in one DATA record. */
export const MAX_DATA_BYTES = 16 << 20;
/** Largest control body (a MAP of 65,536 regions is about 6 MiB of JSON). */
export const MAX_CONTROL_BYTES = 64 << 20;
/** Largest record before the sender is authenticated (HELLO / AUTH / ERROR). */
export const MAX_UNAUTHENTICATED_BYTES = 4096;
/** DATA alignment: guest pages. */
export const DATA_ALIGN = 4096;

export const RecordType = {
  HELLO: 1,
  AUTH: 2,
  READY: 3,
  MAP: 4,
  DATA: 5,
  SYNC: 6,
  SYNCED: 7,
  VERIFY: 8,
  DIGESTS: 9,
  COMMIT: 10,
  COMMITTED: 11,
  ABORT: 12,
  ERROR: 13,
} as const;
export type RecordTypeName = keyof typeof RecordType;
export const RECORD_NAMES = new Map<number, RecordTypeName>(Object.entries(RecordType).map(([k, v]) => [v, k as RecordTypeName]));

/** Header flags. */
export const RecordFlag = {
  /** DATA: the CRC covers the guest bytes too (negotiated in AUTH: `dataCrc`). */
  DATA_CRC: 1,
} as const;

// --- bodies --------------------------------------------------------------------------------------

/** A region as the stream carries it; `id` is the source's region id, stable for the region's life. */
export interface StreamRegion {
  id: number;
  name: string;
  gpa: Gpa;
  size: number;
  readonly: boolean;
}

export interface Hello {
  magic: typeof MAGIC;
  version: number;
  /** 64 hex digits, fresh for this connection. */
  nonce: string;
  /** The receiving space. */
  space: string;
}
export interface Auth {
  version: number;
  /** HMAC-SHA256(token, nonce) in hex. */
  mac: string;
  source: { space: string; epoch: string };
  /** DATA records will carry CRCs of their bytes. */
  dataCrc: boolean;
  /** Bytes of guest memory at the start (for progress). */
  memoryBytes: number;
}
export interface Ready {
  space: string;
  generation: number;
}
export interface MapBody {
  round: number;
  phase: 'full' | 'dirty' | 'final';
  /** The source's generation this map is from. */
  generation: number;
  regions: StreamRegion[];
}
export interface Sync {
  seq: number;
}
export interface Synced {
  seq: number;
  /** Guest bytes applied since the start. */
  bytes: number;
  records: number;
}
export interface Verify {
  /** Bytes per digest block (region-relative). */
  block: number;
}
export interface Digests {
  /** The map the receiver holds. */
  regions: StreamRegion[];
  /** Per region: [block index, SHA-1 hex] for every block where the receiver holds data. */
  digests: { id: number; blocks: [number, string][] }[];
}
export interface Committed {
  space: string;
  generation: number;
}
export interface Abort {
  message: string;
}
export interface StreamErrorBody {
  code: string;
  message: string;
}

// --- encoding ------------------------------------------------------------------------------------

function header(type: number, flags: number, length: number): Buffer {
  const h = Buffer.alloc(HEADER_BYTES);
  h.writeUInt32LE(length, 0);
  h.writeUInt16LE(type, 4);
  h.writeUInt16LE(flags, 6);
  return h;
}

/** A control record: `body` as JSON. */
export function encodeControl(type: number, body: object): Buffer {
  const json = Buffer.from(JSON.stringify(body), 'utf8');
  if (json.length > MAX_CONTROL_BYTES)
    throw new BadFrameError(`a ${RECORD_NAMES.get(type)} record of ${json.length} bytes is larger than ${MAX_CONTROL_BYTES}`);
  const h = header(type, 0, json.length);
  h.writeUInt32LE(zlib.crc32(json, zlib.crc32(h.subarray(0, 8))), 8);
  return Buffer.concat([h, json]);
}

/**
 * A DATA record for `bytes` at `gpa`, in one buffer (header, GPA, a copy of the bytes): the caller's view
 * is not kept, so it may be unmapped or reused once this returns.
 */
export function encodeData(gpa: number, bytes: Uint8Array, withCrc: boolean): Buffer {
  return encodeDataWith(gpa, bytes.length, withCrc, (body) => body.set(bytes));
}

/** A DATA record of `length` bytes at `gpa` whose bytes `fill` writes into the record's body (no copy in between). */
export function encodeDataWith(gpa: number, length: number, withCrc: boolean, fill: (body: Buffer) => void): Buffer {
  const out = Buffer.allocUnsafe(HEADER_BYTES + DATA_PREFIX_BYTES + length);
  fill(out.subarray(HEADER_BYTES + DATA_PREFIX_BYTES));
  out.writeUInt32LE(DATA_PREFIX_BYTES + length, 0);
  out.writeUInt16LE(RecordType.DATA, 4);
  out.writeUInt16LE(withCrc ? RecordFlag.DATA_CRC : 0, 6);
  out.writeUInt32LE(0, 12);
  out.writeBigUInt64LE(BigInt(gpa), HEADER_BYTES);
  let crc = zlib.crc32(out.subarray(0, 8));
  crc = zlib.crc32(out.subarray(HEADER_BYTES, HEADER_BYTES + DATA_PREFIX_BYTES), crc);
  if (withCrc) crc = zlib.crc32(out.subarray(HEADER_BYTES + DATA_PREFIX_BYTES), crc);
  out.writeUInt32LE(crc, 8);
  return out;
}

// --- decoding ------------------------------------------------------------------------------------

export interface RecordSink {
  /**
   * A whole control record, its JSON parsed (not yet checked against its type). Returning true stops
   * push() right after this record (the caller has asynchronous work to do before the next one).
   */
  control(type: number, body: unknown): boolean | void;
  /** A DATA record begins: `length` guest bytes at `gpa` follow. Throw to refuse it before any byte lands. */
  dataStart(gpa: number, length: number): void;
  /** The next bytes of the current DATA record, at `gpa`; `bytes` is valid only during the call. */
  data(gpa: number, bytes: Uint8Array): void;
  /** The current DATA record is complete and its CRC checked. */
  dataEnd(): void;
}

/**
 * Parses records from a byte stream as they arrive. DATA bodies are handed over in pieces as they come (no
 * record is gathered in memory first), so each guest byte is copied once, from the socket's buffer to its
 * place. `limit` bounds the records accepted (MAX_UNAUTHENTICATED_BYTES until the peer is authenticated).
 */
export class RecordReader {
  private head = Buffer.alloc(HEADER_BYTES + DATA_PREFIX_BYTES);
  private have = 0;
  /** The record being read: its header fields, and how much of its body is still to come. */
  private type = 0;
  private flags = 0;
  private length = 0;
  private crc = 0;
  private running = 0;
  private control: Buffer[] = [];
  private remaining = -1;
  private gpa = 0;
  private offset = 0;
  limit = MAX_UNAUTHENTICATED_BYTES;
  /** Records read so far. */
  records = 0;

  constructor(private readonly sink: RecordSink) {}

  /**
   * Consumes `chunk`; returns how many bytes it took: all of them, or fewer when a control record asked to
   * stop (the caller pushes the rest later).
   */
  push(chunk: Buffer): number {
    let at = 0;
    while (at < chunk.length) {
      if (this.remaining < 0) {
        // Header (and, for DATA, the GPA after it).
        const want = this.have < HEADER_BYTES ? HEADER_BYTES : HEADER_BYTES + DATA_PREFIX_BYTES;
        const n = Math.min(want - this.have, chunk.length - at);
        chunk.copy(this.head, this.have, at, at + n);
        this.have += n;
        at += n;
        if (this.have < want) continue;
        if (this.have === HEADER_BYTES) {
          this.parseHeader();
          if (this.type === RecordType.DATA) continue; // read the GPA too
          this.remaining = this.length;
          this.control = [];
          if (this.length === 0 && this.finishControl()) return at;
          continue;
        }
        // A DATA header with its GPA.
        this.gpa = Number(this.head.readBigUInt64LE(HEADER_BYTES));
        this.running = zlib.crc32(this.head.subarray(HEADER_BYTES, HEADER_BYTES + DATA_PREFIX_BYTES), this.running);
        this.remaining = this.length - DATA_PREFIX_BYTES;
        this.offset = 0;
        if (this.gpa % DATA_ALIGN !== 0 || this.remaining % DATA_ALIGN !== 0 || !Number.isSafeInteger(this.gpa) || this.remaining === 0) {
          throw new BadFrameError(
            `DATA record at ${hex(this.gpa)} of ${this.remaining} bytes: both must be multiples of ${DATA_ALIGN}, and it must not be empty`,
          );
        }
        this.sink.dataStart(this.gpa, this.remaining);
        continue;
      }
      const n = Math.min(this.remaining, chunk.length - at);
      const piece = chunk.subarray(at, at + n);
      at += n;
      this.remaining -= n;
      if (this.type === RecordType.DATA) {
        if (this.flags & RecordFlag.DATA_CRC) this.running = zlib.crc32(piece, this.running);
        this.sink.data(this.gpa + this.offset, piece);
        this.offset += n;
        if (this.remaining === 0) {
          this.checkCrc();
          this.reset();
          this.sink.dataEnd();
        }
      } else {
        this.control.push(Buffer.from(piece)); // a copy: the socket's buffer is not ours to keep
        if (this.remaining === 0 && this.finishControl()) return at;
      }
    }
    return at;
  }

  private parseHeader(): void {
    const h = this.head;
    this.length = h.readUInt32LE(0);
    this.type = h.readUInt16LE(4);
    this.flags = h.readUInt16LE(6);
    this.crc = h.readUInt32LE(8);
    if (h.readUInt32LE(12) !== 0) throw new BadFrameError('a record header with its reserved word set');
    if (!RECORD_NAMES.has(this.type)) throw new BadFrameError(`unknown record type ${this.type}`);
    if ((this.flags & ~RecordFlag.DATA_CRC) !== 0 || (this.flags !== 0 && this.type !== RecordType.DATA))
      throw new BadFrameError(`record flags ${hex(this.flags)} on ${RECORD_NAMES.get(this.type)}`);
    const max = this.type === RecordType.DATA ? DATA_PREFIX_BYTES + MAX_DATA_BYTES : MAX_CONTROL_BYTES;
    if (this.length > Math.min(max, this.limit))
      throw new BadFrameError(`a ${RECORD_NAMES.get(this.type)} record of ${this.length} bytes is larger than allowed here (${Math.min(max, this.limit)})`);
    if (this.type === RecordType.DATA && this.length <= DATA_PREFIX_BYTES) throw new BadFrameError('a DATA record without bytes');
    this.running = zlib.crc32(h.subarray(0, 8));
  }

  private finishControl(): boolean {
    const body = Buffer.concat(this.control);
    this.running = zlib.crc32(body, this.running);
    this.checkCrc();
    const type = this.type;
    this.reset();
    let parsed: unknown;
    try {
      parsed = JSON.parse(body.toString('utf8'));
    } catch {
      throw new BadMessageError(`a ${RECORD_NAMES.get(type)} record whose body is not JSON`);
    }
    if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed))
      throw new BadMessageError(`a ${RECORD_NAMES.get(type)} record whose body is not a JSON object`);
    return this.sink.control(type, parsed) === true;
  }

  private checkCrc(): void {
    if (this.running >>> 0 !== this.crc) throw new BadFrameError(`${RECORD_NAMES.get(this.type)} record ${this.records + 1}: CRC mismatch`);
  }

  private reset(): void {
    this.records++;
    this.have = 0;
    this.remaining = -1;
    this.control = [];
  }

  /** Whether a record is partly read (a connection ending now ends mid-record). */
  get midRecord(): boolean {
    return this.have > 0 || this.remaining >= 0;
  }
}

// --- checking bodies -----------------------------------------------------------------------------

const isUint = (v: unknown): v is number => typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;
// eslint-disable-next-line no-control-regex -- control characters are what it looks for
const isName = (v: unknown): v is string => typeof v === 'string' && v.length > 0 && Buffer.byteLength(v) <= 64 && !/[\u0000-\u001f\u007f]/.test(v);

function fail(type: string, what: string): never {
  throw new BadMessageError(`${type}: ${what}`);
}

function checkRegion(r: unknown, type: string): StreamRegion {
  if (typeof r !== 'object' || r === null) fail(type, 'a region that is not an object');
  const x = r as Record<string, unknown>;
  if (!isUint(x.id) || !isName(x.name) || !isUint(x.gpa) || !isUint(x.size) || typeof x.readonly !== 'boolean')
    fail(type, `region ${JSON.stringify(r)}: needs id, name, gpa, size, readonly`);
  if (x.gpa % DATA_ALIGN !== 0 || x.size % DATA_ALIGN !== 0 || x.size === 0 || rangeEnd(x.gpa, x.size) > GPA_LIMIT)
    fail(type, `region ${x.name}: gpa and size must be page aligned, size > 0, below 2^52`);
  return { id: x.id, name: x.name, gpa: asGpa(x.gpa), size: x.size, readonly: x.readonly };
}

/** Checks a list of regions: ids and names unique, no overlaps. */
export function checkRegions(list: unknown, type: string): StreamRegion[] {
  if (!Array.isArray(list) || list.length > 65_536) fail(type, 'regions must be an array of at most 65,536');
  const regions = list.map((r) => checkRegion(r, type));
  const sorted = [...regions].sort((a, b) => a.gpa - b.gpa);
  for (let i = 1; i < sorted.length; i++) {
    const p = sorted[i - 1] as StreamRegion;
    const c = sorted[i] as StreamRegion;
    if (rangesOverlap(p.gpa, p.size, c.gpa, c.size)) fail(type, `regions ${p.name} and ${c.name} overlap`);
  }
  if (new Set(regions.map((r) => r.id)).size !== regions.length || new Set(regions.map((r) => r.name)).size !== regions.length)
    fail(type, 'region ids and names must be unique');
  return regions;
}

export function checkMap(body: unknown): MapBody {
  const b = body as Record<string, unknown>;
  if (!isUint(b.round) || !isUint(b.generation) || (b.phase !== 'full' && b.phase !== 'dirty' && b.phase !== 'final'))
    fail('MAP', 'needs round, phase (full, dirty, final), generation');
  return { round: b.round, phase: b.phase, generation: b.generation, regions: checkRegions(b.regions, 'MAP') };
}

export function checkHello(body: unknown): Hello {
  const b = body as Record<string, unknown>;
  if (b.magic !== MAGIC) fail('HELLO', `not a memmap-broker migration receiver (magic ${JSON.stringify(b.magic)})`);
  if (!isUint(b.version)) fail('HELLO', 'needs a version');
  if (typeof b.nonce !== 'string' || !/^[0-9a-f]{64}$/.test(b.nonce) || !isName(b.space)) fail('HELLO', 'needs a 64-hex-digit nonce and a space name');
  return { magic: MAGIC, version: b.version, nonce: b.nonce, space: b.space };
}

export function checkAuth(body: unknown): Auth {
  const b = body as Record<string, unknown>;
  const src = b.source as Record<string, unknown> | undefined;
  if (!isUint(b.version) || typeof b.mac !== 'string' || !/^[0-9a-f]{64}$/.test(b.mac) || typeof b.dataCrc !== 'boolean' || !isUint(b.memoryBytes))
    fail('AUTH', 'needs version, mac (64 hex digits), dataCrc, memoryBytes');
  if (typeof src !== 'object' || src === null || !isName(src.space) || typeof src.epoch !== 'string' || src.epoch.length > 64)
    fail('AUTH', 'needs source {space, epoch}');
  return { version: b.version, mac: b.mac, source: { space: src.space, epoch: src.epoch }, dataCrc: b.dataCrc, memoryBytes: b.memoryBytes };
}

export function checkSeq(body: unknown, type: string): number {
  const seq = (body as Record<string, unknown>).seq;
  if (!isUint(seq)) fail(type, 'needs seq');
  return seq;
}

export function checkDigests(body: unknown): Digests {
  const b = body as Record<string, unknown>;
  const regions = checkRegions(b.regions, 'DIGESTS');
  if (!Array.isArray(b.digests)) fail('DIGESTS', 'needs digests');
  const digests = b.digests.map((d: unknown) => {
    const x = d as Record<string, unknown>;
    if (!isUint(x.id) || !Array.isArray(x.blocks)) fail('DIGESTS', 'each entry needs id and blocks');
    const blocks = x.blocks.map((e: unknown) => {
      if (!Array.isArray(e) || !isUint(e[0]) || typeof e[1] !== 'string' || !/^[0-9a-f]{40}$/.test(e[1])) fail('DIGESTS', 'a block is [index, 40 hex digits]');
      return [e[0], e[1]] as [number, string];
    });
    return { id: x.id, blocks };
  });
  return { regions, digests };
}
