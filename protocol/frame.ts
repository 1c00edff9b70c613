// Framing: an 8-byte little-endian header {u32 body length, u16 fd count, u16 flags = 0} followed by one
// msgpack map. Descriptors ride with the frame that references them: the sender passes them in the same
// sendmsg(2) whose data begins with the frame's header, one fd-carrying frame per sendmsg.
//
// On a stream socket the kernel hands a batch of fds to the recvmsg(2) call that first reads bytes of the
// segment they were sent with, and it never returns two fd batches from one call. So for every batch we
// know the byte range of the stream it arrived with, and a frame claims the batch whose range contains
// the frame's first byte. A batch nobody can claim any more, a frame whose batch is missing or has the
// wrong count, is a protocol error (MMB_ERR_FD_MISMATCH): the fds are closed and the connection dropped.
import { HEADER_SIZE, MSG_NAMES } from './constants.js';
import { decodeBody, decodeSmallMap, encodeBody, scanBody } from './codec.js';
import { BadFrameError, BadMessageError, FdMismatchError, FrameTooLargeError, TooManyFdsError, type MmbError } from './errors.js';
import { isPlainMap } from './schema.js';

export interface FrameLimits {
  maxFrameBytes: number;
  maxFdsPerFrame: number;
  /** Descriptors received but not yet claimed by a complete frame. */
  maxPendingFds: number;
}

/** Encodes a message body into header + body. Throws FrameTooLargeError past the limit. */
export function encodeFrame(message: object, nfds: number, maxFrameBytes: number): Buffer {
  const body = encodeBody(message);
  if (body.length > maxFrameBytes) {
    const name = MSG_NAMES[(message as { t?: number }).t ?? -1] ?? 'message';
    throw new FrameTooLargeError(`${name} of ${body.length} bytes exceeds the frame limit of ${maxFrameBytes}`);
  }
  const frame = Buffer.allocUnsafe(HEADER_SIZE + body.length);
  frame.writeUInt32LE(body.length, 0);
  frame.writeUInt16LE(nfds, 4);
  frame.writeUInt16LE(0, 6);
  frame.set(body, HEADER_SIZE);
  return frame;
}

/**
 * A frame encoded once for every recipient of one event that differs between them only in `seq` (EV_TXN,
 * EV_COMMITTED, EV_ROLLBACK: each session numbers its own acks). `frame` is the message with `seq` as its
 * second key, always as a msgpack uint32 (0xce: valid for any decoder, only not the shortest form), so
 * setSeq() patches those 4 bytes in place. Undefined when the message does not encode that way (its first
 * key is not a one-byte `t`): the caller then encodes per recipient.
 */
export interface SeqFrame {
  readonly frame: Buffer;
  /** Offset of the seq's 4 big-endian bytes in `frame`. */
  readonly at: number;
}

const SEQ_KEY = [0xa3, 0x73, 0x65, 0x71, 0xce];

/** `message` (with `t` and without `seq`) as a SeqFrame; throws FrameTooLargeError like encodeFrame. */
export function encodeSeqFrame(message: { t: number } & Record<string, unknown>, maxFrameBytes: number): SeqFrame | undefined {
  const { t, ...rest } = message;
  if (!Number.isInteger(t) || t < 0 || t > 0x7f || 'seq' in rest) return undefined;
  const frame = encodeFrame({ t, seq: 0xffff_ffff, ...rest }, 0, maxFrameBytes);
  // fixmap header, fixstr "t", its fixint value, then the seq key and its uint32 token.
  const at = HEADER_SIZE + 1 + 2 + 1;
  const h = frame[HEADER_SIZE] as number;
  if (h < 0x80 || h > 0x8f || frame[HEADER_SIZE + 1] !== 0xa1 || frame[HEADER_SIZE + 2] !== 0x74 || frame[HEADER_SIZE + 3] !== t) return undefined;
  for (let i = 0; i < SEQ_KEY.length; i++) if (frame[at + i] !== SEQ_KEY[i]) return undefined;
  return { frame, at: at + SEQ_KEY.length };
}

/** The frame of `f` for `seq`: the same buffer, patched (valid until the next setSeq on it). */
export function setSeq(f: SeqFrame, seq: number): Buffer {
  if (seq >>> 0 !== seq) throw new RangeError(`seq ${seq} is not a uint32`);
  // Byte by byte: Buffer.writeUInt32BE's argument checks showed in the broker's profile.
  const b = f.frame;
  b[f.at] = seq >>> 24;
  b[f.at + 1] = (seq >>> 16) & 0xff;
  b[f.at + 2] = (seq >>> 8) & 0xff;
  b[f.at + 3] = seq & 0xff;
  return b;
}

/** A complete frame: its message id, decoded body and the descriptors it carried (now owned by the caller). */
export interface Frame {
  type: number;
  body: Record<string, unknown>;
  fds: number[];
  /** Total bytes on the wire, header included. */
  size: number;
  /** Set when the body decoded but is not plain msgpack (a float, an extension, bad UTF-8): the frame
   *  boundary is intact, so the message is refused (MMB_ERR_BAD_MESSAGE) without dropping the stream. */
  invalid?: MmbError;
  /** The body holds bin values: refused (MMB_ERR_BAD_MESSAGE) unless its message defines a bin field under
   *  a negotiated feature (validate.ts). */
  bin?: boolean;
}

interface FdBatch {
  /** Stream offset of the first byte received with the batch (inclusive) and of the last + 1. */
  start: number;
  end: number;
  fds: number[];
}

const enum State {
  Header = 0,
  Body = 1,
  Failed = 2,
}

/**
 * Incremental frame decoder: push() what recvmsg returned, then call next() until it returns null
 * ("incomplete"). After a thrown error the decoder stays failed; dispose() returns every fd it still holds
 * so the caller can close them.
 */
export class FrameDecoder {
  private state: State = State.Header;
  private buf: Buffer = Buffer.alloc(0);
  /** Read and write positions inside `buf`. */
  private rd = 0;
  private wr = 0;
  /** Stream offset of buf[rd]. */
  private streamPos = 0;
  private batches: FdBatch[] = [];
  private pendingFds = 0;
  // Header of the frame being read.
  private bodyLength = 0;
  private frameFds = 0;
  private frameStart = 0;
  private failure: MmbError | undefined;
  /** Fds of a frame that failed after claiming them. */
  private orphans: number[] = [];

  constructor(private limits: FrameLimits) {}

  /** Changes the limits for frames not started yet. */
  setLimits(limits: Partial<FrameLimits>): void {
    this.limits = { ...this.limits, ...limits };
  }

  /** Appends bytes (copied) and the fds that arrived with them. Takes ownership of `fds`. */
  push(bytes: Uint8Array, fds: readonly number[] = []): void {
    if (fds.length > 0) {
      this.batches.push({ start: this.streamPos + (this.wr - this.rd), end: this.streamPos + (this.wr - this.rd) + bytes.length, fds: [...fds] });
      this.pendingFds += fds.length;
    }
    if (this.state === State.Failed) return;
    if (fds.length > 0 && bytes.length === 0) {
      this.fail(new FdMismatchError('descriptors arrived without data'));
    }
    if (this.pendingFds > this.limits.maxPendingFds) {
      this.fail(new TooManyFdsError(`${this.pendingFds} descriptors pending, limit ${this.limits.maxPendingFds}`));
    }
    this.append(bytes);
  }

  /** The next complete frame, or null if more bytes are needed. Throws the MmbError that broke the stream. */
  next(): Frame | null {
    for (;;) {
      switch (this.state) {
        case State.Failed:
          throw this.failure as MmbError;
        case State.Header: {
          if (this.wr - this.rd < HEADER_SIZE) return null;
          const len = this.buf.readUInt32LE(this.rd);
          const nfds = this.buf.readUInt16LE(this.rd + 4);
          const flags = this.buf.readUInt16LE(this.rd + 6);
          if (flags !== 0) this.fail(new BadFrameError(`reserved header flags 0x${flags.toString(16)} must be zero`));
          if (len === 0) this.fail(new BadFrameError('empty frame body'));
          if (len > this.limits.maxFrameBytes) {
            this.fail(new FrameTooLargeError(`frame body of ${len} bytes exceeds the limit of ${this.limits.maxFrameBytes}`));
          }
          if (nfds > this.limits.maxFdsPerFrame) {
            this.fail(new TooManyFdsError(`frame declares ${nfds} descriptors, limit ${this.limits.maxFdsPerFrame}`));
          }
          this.frameStart = this.streamPos;
          if (nfds > 0) this.checkBatch(nfds);
          this.bodyLength = len;
          this.frameFds = nfds;
          this.state = State.Body;
          continue;
        }
        case State.Body: {
          const total = HEADER_SIZE + this.bodyLength;
          if (this.wr - this.rd < total) return null;
          const bodyBytes = this.buf.subarray(this.rd + HEADER_SIZE, this.rd + total);
          this.consume(total);
          const fds = this.frameFds > 0 ? (this.batches.shift() as FdBatch).fds : [];
          this.pendingFds -= fds.length;
          this.state = State.Header;
          // The messages of every transaction (ACK, EV_COMMITTED, ...) are small flat maps: decoded without
          // msgpackr, and plain msgpack by construction.
          const small = decodeSmallMap(bodyBytes);
          let body: unknown;
          try {
            body = small ?? decodeBody(bodyBytes);
            if (!isPlainMap(body)) throw new BadFrameError('frame body is not a msgpack map');
            if (typeof body.t !== 'number' || !Number.isInteger(body.t) || body.t < 0) {
              throw new BadFrameError('frame body lacks an integer message id "t"');
            }
            this.checkUnclaimed();
          } catch (err) {
            // The frame's fds were already claimed: keep them for dispose() so the caller closes them.
            this.orphans.push(...fds);
            this.fail(err as MmbError);
          }
          const map = body as Record<string, unknown>;
          const frame: Frame = { type: map.t as number, body: map, fds, size: total };
          if (small) return frame;
          const scan = scanBody(bodyBytes);
          if (scan.problem) frame.invalid = new BadMessageError(scan.problem);
          if (scan.bin) frame.bin = true;
          return frame;
        }
      }
    }
  }

  /** True when no partial frame is buffered (a clean place for the stream to end). */
  get idle(): boolean {
    return this.state === State.Header && this.wr === this.rd;
  }

  /** Stops the decoder and hands back every descriptor it still holds (the caller closes them). */
  dispose(): number[] {
    const fds = this.batches.flatMap((b) => b.fds).concat(this.orphans);
    this.batches = [];
    this.orphans = [];
    this.pendingFds = 0;
    if (this.state !== State.Failed) {
      this.state = State.Failed;
      this.failure = new BadFrameError('decoder disposed');
    }
    return fds;
  }

  private fail(err: MmbError): never {
    this.state = State.Failed;
    this.failure = err;
    throw err;
  }

  /** The frame starting at frameStart declares nfds: its batch must be the first and contain that byte. */
  private checkBatch(nfds: number): void {
    const b = this.batches[0];
    if (!b || b.start > this.frameStart || b.end <= this.frameStart) {
      this.fail(new FdMismatchError(`frame declares ${nfds} descriptors but none arrived with its first byte`));
    }
    if (b.fds.length !== nfds) {
      this.fail(new FdMismatchError(`frame declares ${nfds} descriptors but ${b.fds.length} arrived with it`));
    }
  }

  /** After a frame ends, a batch that arrived entirely with bytes already consumed was never claimed. */
  private checkUnclaimed(): void {
    const b = this.batches[0];
    if (b && b.end <= this.streamPos) {
      throw new FdMismatchError(`${b.fds.length} descriptors arrived with a frame that declares none`);
    }
  }

  private append(bytes: Uint8Array): void {
    const need = this.wr - this.rd + bytes.length;
    if (this.wr + bytes.length > this.buf.length) {
      if (need <= this.buf.length && this.rd > 0) {
        this.buf.copy(this.buf, 0, this.rd, this.wr);
      } else {
        const next = Buffer.allocUnsafe(Math.max(need, Math.min(this.buf.length * 2, need + (1 << 20)), 4096));
        this.buf.copy(next, 0, this.rd, this.wr);
        this.buf = next;
      }
      this.wr -= this.rd;
      this.rd = 0;
    }
    this.buf.set(bytes, this.wr);
    this.wr += bytes.length;
  }

  private consume(n: number): void {
    this.rd += n;
    this.streamPos += n;
    if (this.rd === this.wr) this.rd = this.wr = 0;
  }
}
