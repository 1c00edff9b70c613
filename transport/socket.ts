// A framed message stream over a non-blocking Unix stream socket, driven by uv_poll on the event loop.
// Reads: recvmsg into one reusable buffer, fds with MSG_CMSG_CLOEXEC, MSG_CTRUNC is fatal. Writes: a frame
// with fds goes out in a sendmsg of its own, so its fds always travel with its first byte (see
// protocol/frame.ts); of small frames without fds, the first of a turn goes out at once and those that
// follow it in the same turn are corked and leave together in one sendmsg at its end (cork.ts): a subscriber that applies several
// transactions per wake-up acks them in one write, a broker sends a window's EV_COMMITTED and the next
// EV_TXN together. What does not fit is queued (with dup()ed fds) and flushed when the socket turns
// writable; a peer that lets more than maxOutboundBytes pile up is disconnected (MMB_ERR_SLOW_READER)
// instead of growing our memory.
import { EventEmitter } from 'eventemitter3';
import { constants, native, type PollHandle } from '../native/index.js';
import {
  DEFAULT_CONNECTION_LIMITS,
  DEFAULT_PROTOCOL_LIMITS,
  DisconnectedError,
  FdsTruncatedError,
  MmbError,
  Msg,
  FrameDecoder,
  SlowReaderError,
  encodeFrame,
  toMmbError,
} from '../protocol/index.js';
import type { Credentials, InboundLimits, Transport, TransportEvents } from './transport.js';
import { closeAll } from './fds.js';
import { corkUntilTurnEnds, type Corked } from './cork.js';

export interface SocketTransportOptions {
  maxFrameBytes?: number;
  maxFdsPerFrame?: number;
  maxPendingFds?: number;
  maxOutboundBytes?: number;
  /** Builds a last message (e.g. EV_GOODBYE) to send when the inbound stream breaks. */
  farewell?: (reason: MmbError) => object | undefined;
}

interface Pending {
  data: Buffer;
  offset: number;
  /** Our own duplicates of the frame's fds, closed once the first byte went out. */
  fds: number[];
}

const READ_BUFFER_BYTES = 256 * 1024;
/** recvmsg calls per readable event before yielding to other connections. */
const READS_PER_EVENT = 32;
const END_GRACE_MS = 2000;
/** Frames up to this size (most of a transaction's: EV_TXN, ACK, EV_COMMITTED, replies) are corked. */
const CORK_MAX_BYTES = 16 * 1024;
const CORK_INITIAL_BYTES = 1024;
const EV_GOODBYE: number = Msg.EV_GOODBYE;

export class SocketTransport extends EventEmitter<TransportEvents> implements Transport, Corked {
  readonly kind = 'socket' as const;
  readonly peer: Credentials;
  private readonly fd: number;
  private poll: PollHandle | undefined;
  private readonly decoder: FrameDecoder;
  private readonly readBuf = Buffer.allocUnsafe(READ_BUFFER_BYTES);
  private readonly queue: Pending[] = [];
  private queuedBytes = 0;
  /** Frames without fds sent this turn, not written yet (cork.ts): corkBuf[0, corkedBytes). They go out before anything later. */
  private corkBuf = Buffer.allocUnsafe(CORK_INITIAL_BYTES);
  private corkedBytes = 0;
  /** A frame went out uncorked in this turn: the next ones are corked until it ends. */
  private wroteThisTurn = false;
  private ending = false;
  /** Why the connection closes once what is queued is out (set when the peer ended its stream). */
  private endReason: MmbError | undefined;
  /** The peer ended its stream and replies to what it sent may still be on their way (one turn). */
  private answering = false;
  private endTimer: NodeJS.Timeout | undefined;
  private events = 0;
  private _closed = false;
  private maxFrameBytes: number;
  /** Descriptors one inbound frame may carry: recvmsg has room for exactly that many. */
  private maxFdsPerFrame: number;
  /** Why more descriptors than that are refused (setInboundLimits), for the error. */
  private fdRefusal: string | undefined;
  private readonly maxOutboundBytes: number;
  private readonly farewell: ((reason: MmbError) => object | undefined) | undefined;

  /**
   * Takes ownership of `fd`, a connected, non-blocking, close-on-exec Unix stream socket, and of
   * `peer.pidfd` when set (closed with the transport).
   */
  constructor(fd: number, peer: Credentials, opts: SocketTransportOptions = {}) {
    super();
    this.fd = fd;
    this.peer = peer;
    this.maxFrameBytes = opts.maxFrameBytes ?? DEFAULT_PROTOCOL_LIMITS.maxFrameBytes;
    this.maxFdsPerFrame = opts.maxFdsPerFrame ?? DEFAULT_PROTOCOL_LIMITS.maxFdsPerFrame;
    this.maxOutboundBytes = opts.maxOutboundBytes ?? DEFAULT_CONNECTION_LIMITS.maxOutboundBytes;
    this.farewell = opts.farewell;
    this.decoder = new FrameDecoder({
      maxFrameBytes: this.maxFrameBytes,
      maxFdsPerFrame: this.maxFdsPerFrame,
      maxPendingFds: opts.maxPendingFds ?? DEFAULT_CONNECTION_LIMITS.maxPendingFds,
    });
    this.events = constants.POLL_READABLE;
    this.poll = native.pollStart(fd, this.events, (status, events) => this.onPoll(status, events));
  }

  get closed(): boolean {
    return this._closed;
  }

  send(message: object, fds: readonly number[] = []): void {
    if (this._closed) return;
    this.write(encodeFrame(message, fds.length, this.maxFrameBytes), fds, true);
  }

  sendFrame(frame: Uint8Array, fds: readonly number[] = []): void {
    if (this._closed) return;
    this.write(frame, fds, false);
  }

  /** `owned`: `frame` is ours to keep (else it is copied before it is held past this call). */
  private write(frame: Uint8Array, fds: readonly number[], owned: boolean): void {
    if (fds.length === 0 && this.queue.length === 0 && frame.length <= CORK_MAX_BYTES) {
      if (this.corkedBytes > 0 || this.wroteThisTurn) {
        this.cork(frame);
        return;
      }
      // The first frame of a turn goes out at once: a lone frame (one transaction at a time) pays no
      // delay, and on a shared CPU its receiver may run before this process sleeps. Only what follows it
      // in the same turn is corked.
      this.wroteThisTurn = true;
      corkUntilTurnEnds(this);
    } else {
      this.uncork();
      if (this._closed) return;
    }
    if (this.queue.length === 0) {
      let sent: number | null;
      try {
        sent = native.sendmsg(this.fd, frame, fds);
      } catch (err) {
        this.sendFailed(err);
        return;
      }
      if (sent === frame.length) return;
      if (sent !== null && sent > 0) {
        this.enqueue({ data: Buffer.from(frame.subarray(sent)), offset: 0, fds: [] });
        return;
      }
    }
    this.enqueue({ data: owned ? (frame as Buffer) : Buffer.from(frame), offset: 0, fds: fds.map((fd) => native.dup(fd)) });
  }

  /** Copies `frame` into the cork buffer (grown as needed, kept between turns: no allocation per frame). */
  private cork(frame: Uint8Array): void {
    if (this.corkedBytes === 0) corkUntilTurnEnds(this);
    const need = this.corkedBytes + frame.length;
    if (need > this.corkBuf.length) {
      const next = Buffer.allocUnsafe(Math.max(need, 2 * this.corkBuf.length));
      this.corkBuf.copy(next, 0, 0, this.corkedBytes);
      this.corkBuf = next;
    }
    this.corkBuf.set(frame, this.corkedBytes);
    this.corkedBytes = need;
  }

  flush(): void {
    this.uncork();
  }

  /** Writes the corked frames in one sendmsg (cork.ts), queueing (a copy of) what the socket does not take. */
  uncork(): void {
    this.wroteThisTurn = false;
    const n = this.corkedBytes;
    if (n === 0) return;
    this.corkedBytes = 0;
    if (this._closed) return;
    const data = this.corkBuf.subarray(0, n);
    if (this.queue.length > 0) {
      this.enqueue({ data: Buffer.from(data), offset: 0, fds: [] });
      return;
    }
    let sent: number | null;
    try {
      sent = native.sendmsg(this.fd, data, []);
    } catch (err) {
      this.sendFailed(err);
      return;
    }
    if (sent !== n) this.enqueue({ data: Buffer.from(data.subarray(sent ?? 0)), offset: 0, fds: [] });
  }

  end(last?: object): void {
    if (this._closed || this.ending) return;
    if (last) {
      try {
        this.send(last);
      } catch {
        // A farewell that cannot be encoded is not worth keeping the connection for.
      }
    }
    this.uncork();
    if (this._closed) return;
    this.ending = true;
    this.stopReading();
    if (this.queue.length === 0) {
      this.discardInput();
      this.destroy();
      return;
    }
    this.endTimer = setTimeout(() => this.destroy(), END_GRACE_MS);
    this.endTimer.unref();
  }

  destroy(reason?: MmbError): void {
    if (this._closed) return;
    // What was sent this turn goes out first, as it would have without the cork (best effort: a socket
    // that does not take it now never will).
    if (this.corkedBytes > 0) {
      try {
        native.sendmsg(this.fd, this.corkBuf.subarray(0, this.corkedBytes), []);
      } catch {
        // The peer is gone: nothing to tell it.
      }
      this.corkedBytes = 0;
    }
    this._closed = true;
    if (this.endTimer) clearTimeout(this.endTimer);
    if (this.poll) native.pollClose(this.poll);
    this.poll = undefined;
    for (const p of this.queue) closeAll(p.fds);
    this.queue.length = 0;
    this.queuedBytes = 0;
    closeAll(this.decoder.dispose());
    closeAll([this.fd]);
    // The pidfd outlives the 'close' listeners, so one that must watch the process longer can dup() it.
    try {
      this.emit('close', reason);
    } finally {
      if (this.peer.pidfd !== undefined) closeAll([this.peer.pidfd]);
    }
  }

  setRef(ref: boolean): void {
    if (this.poll) native.pollRef(this.poll, ref);
  }

  setLimits(limits: { maxFrameBytes?: number; maxFdsPerFrame?: number }): void {
    if (limits.maxFrameBytes !== undefined) this.maxFrameBytes = limits.maxFrameBytes;
    if (limits.maxFdsPerFrame !== undefined) this.maxFdsPerFrame = limits.maxFdsPerFrame;
    this.decoder.setLimits({ maxFrameBytes: this.maxFrameBytes, maxFdsPerFrame: this.maxFdsPerFrame });
  }

  setInboundLimits(limits: InboundLimits): void {
    if (limits.maxFdsPerFrame !== undefined) this.maxFdsPerFrame = limits.maxFdsPerFrame;
    this.fdRefusal = limits.reason;
    const { maxFrameBytes, maxFdsPerFrame, maxPendingFds } = limits;
    this.decoder.setLimits({
      ...(maxFrameBytes !== undefined ? { maxFrameBytes } : {}),
      ...(maxFdsPerFrame !== undefined ? { maxFdsPerFrame } : {}),
      ...(maxPendingFds !== undefined ? { maxPendingFds } : {}),
    });
  }

  private enqueue(p: Pending): void {
    this.queue.push(p);
    this.queuedBytes += p.data.length - p.offset;
    if (this.queuedBytes > this.maxOutboundBytes) {
      this.destroy(new SlowReaderError(`peer left ${this.queuedBytes} bytes unread (limit ${this.maxOutboundBytes})`));
      return;
    }
    this.want(constants.POLL_WRITABLE, true);
  }

  private want(bit: number, on: boolean): void {
    const next = on ? this.events | bit : this.events & ~bit;
    if (next === this.events || !this.poll) return;
    this.events = next;
    native.pollUpdate(this.poll, next);
  }

  private stopReading(): void {
    this.want(constants.POLL_READABLE, false);
  }

  private onPoll(status: number, events: number): void {
    try {
      if (this._closed) return;
      if (status < 0) {
        // POLLERR: typically ECONNRESET, which a Unix socket gets when its peer closed with data of ours
        // unread. Frames the peer sent before closing (an EV_GOODBYE saying why) are still queued, and
        // recvmsg returns them before the error: read them first.
        if (!this.ending) this.readAfterError();
        this.destroy(this.lastGoodbye ?? new DisconnectedError(`the connection failed (poll status ${status})`));
        return;
      }
      if (events & constants.POLL_WRITABLE) this.writeQueued();
      if (!this._closed && events & (constants.POLL_READABLE | constants.POLL_DISCONNECT) && !this.ending) this.read();
    } catch (err) {
      this.destroy(toMmbError(err));
    }
  }

  private writeQueued(): void {
    while (this.queue.length > 0 && !this._closed) {
      const p = this.queue[0] as Pending;
      const chunk = p.offset === 0 ? p.data : p.data.subarray(p.offset);
      let sent: number | null;
      try {
        sent = native.sendmsg(this.fd, chunk, p.fds);
      } catch (err) {
        this.sendFailed(err);
        return;
      }
      if (sent === null) return;
      if (p.fds.length > 0) {
        closeAll(p.fds);
        p.fds = [];
      }
      p.offset += sent;
      this.queuedBytes -= sent;
      if (p.offset < p.data.length) return;
      this.queue.shift();
    }
    if (this.queue.length === 0) {
      this.want(constants.POLL_WRITABLE, false);
      if (this.ending && !this.answering) {
        this.discardInput();
        this.destroy(this.endReason);
      }
    }
  }

  private read(): void {
    for (let i = 0; i < READS_PER_EVENT && !this._closed && !this.ending; i++) {
      const r = native.recvmsg(this.fd, this.readBuf, this.maxFdsPerFrame);
      if (r === null) return;
      if (r.ctrunc) {
        this.broken(
          new FdsTruncatedError(
            this.fdRefusal !== undefined
              ? `${this.fdRefusal}; the kernel discarded the descriptors sent (MSG_CTRUNC)`
              : 'the kernel truncated the descriptors of a message (MSG_CTRUNC)',
          ),
        );
        return;
      }
      if (r.bytes === 0) {
        closeAll(r.fds);
        this.peerEnded(this.decoder.idle ? undefined : new DisconnectedError('peer closed the connection in the middle of a frame'));
        return;
      }
      this.decoder.push(this.readBuf.subarray(0, r.bytes), r.fds);
      this.drain();
      // A short read emptied the socket (or stopped at a message carrying descriptors): asking again
      // would mostly cost a syscall that says EAGAIN, on every message of every round trip. Whatever is
      // left, or arrives, makes the level-triggered poll report readable again on the next turn.
      if (r.bytes < this.readBuf.length) return;
    }
  }

  private drain(): void {
    for (;;) {
      let frame;
      try {
        frame = this.decoder.next();
      } catch (err) {
        this.broken(toMmbError(err));
        return;
      }
      if (!frame) return;
      this.emit('frame', frame);
      if (this._closed || this.ending) return;
    }
  }

  /**
   * EOF: the peer sends no more, but may still be reading (it half-closed with shutdown(SHUT_WR)). The
   * requests it sent are answered (handlers reply within the turn, or from a promise settled in it), what
   * is queued goes out within END_GRACE_MS, then the connection closes. A peer that closed both ways
   * makes the first send fail, which closes at once.
   */
  private peerEnded(reason: MmbError | undefined): void {
    this.ending = true;
    this.endReason = reason;
    this.answering = true;
    this.stopReading();
    setImmediate(() => {
      this.answering = false;
      this.uncork();
      if (this._closed) return;
      if (this.queue.length === 0) {
        this.destroy(reason);
        return;
      }
      this.endTimer = setTimeout(() => this.destroy(reason), END_GRACE_MS);
      this.endTimer.unref();
    });
  }

  /** A send failed (EPIPE, ECONNRESET): after the peer's EOF that is how it ends, else a disconnection. */
  private sendFailed(err: unknown): void {
    this.destroy(
      this.answering || this.endReason !== undefined || this.ending
        ? this.endReason
        : new DisconnectedError(`send failed: ${(err as Error).message}`, { cause: err }),
    );
  }

  /** Reads whatever is still queued after the socket reported an error, until the error itself. */
  private readAfterError(): void {
    this.on('frame', this.noteGoodbye);
    try {
      for (let i = 0; i < READS_PER_EVENT && !this._closed; i++) {
        const r = native.recvmsg(this.fd, this.readBuf, this.maxFdsPerFrame);
        if (r === null || r.bytes === 0 || r.ctrunc) {
          if (r) closeAll(r.fds);
          return;
        }
        this.decoder.push(this.readBuf.subarray(0, r.bytes), r.fds);
        this.drain();
      }
    } catch {
      // The error itself (ECONNRESET): everything before it has been read.
    } finally {
      this.off('frame', this.noteGoodbye);
    }
  }

  private lastGoodbye: MmbError | undefined;
  private readonly noteGoodbye = (frame: { type: number; body: Record<string, unknown> }): void => {
    if (frame.type !== EV_GOODBYE) return;
    const e = frame.body.error as { code?: unknown; message?: unknown } | undefined;
    if (e && typeof e.code === 'string' && typeof e.message === 'string') this.lastGoodbye = MmbError.fromWire(e as never);
  };

  /** Discards what the peer sent that nobody will read, so closing does not reset the peer (ECONNRESET). */
  private discardInput(): void {
    try {
      for (let i = 0; i < READS_PER_EVENT; i++) {
        const r = native.recvmsg(this.fd, this.readBuf, this.maxFdsPerFrame);
        if (r === null || r.bytes === 0) return;
        closeAll(r.fds);
      }
    } catch {
      // Nothing more to discard.
    }
  }

  /** The inbound stream cannot be trusted any more: say why (best effort) and close. */
  private broken(reason: MmbError): void {
    const last = this.farewell?.(reason);
    if (last) {
      try {
        this.send(last);
      } catch {
        // ignore: we are closing anyway
      }
    }
    this.destroy(reason);
  }
}
