// The embedded transport: a broker and a client in the same process, with the socket's semantics and
// none of its syscalls. Each message goes through the same msgpack codec and frame-size limit (so what
// works in-process works over a socket, and neither side can share mutable objects with the other), each
// fd is dup()ed so the receiver owns its copy as it would after SCM_RIGHTS, and delivery is asynchronous
// and in order.
import { EventEmitter } from 'eventemitter3';
import { native } from '../native/index.js';
import {
  DEFAULT_PROTOCOL_LIMITS,
  FrameTooLargeError,
  HEADER_SIZE,
  MSG_NAMES,
  decodeBody,
  encodeBody,
  toMmbError,
  type Frame,
  type MmbError,
} from '../protocol/index.js';
import type { Credentials, InboundLimits, Transport, TransportEvents } from './transport.js';
import { closeAll } from './fds.js';
import { afterCorked } from './cork.js';

const self: Credentials = {
  pid: process.pid,
  uid: process.getuid?.() ?? 0,
  gid: process.getgid?.() ?? 0,
};

export class InProcessTransport extends EventEmitter<TransportEvents> implements Transport {
  readonly kind = 'inproc' as const;
  readonly peer: Credentials = self;
  private other: InProcessTransport | undefined;
  private inbox: Frame[] = [];
  private scheduled = false;
  private _closed = false;
  private closing = false;

  private constructor(private maxFrameBytes: number) {
    super();
  }

  /** Two connected ends. */
  static pair(maxFrameBytes: number = DEFAULT_PROTOCOL_LIMITS.maxFrameBytes): [InProcessTransport, InProcessTransport] {
    const a = new InProcessTransport(maxFrameBytes);
    const b = new InProcessTransport(maxFrameBytes);
    a.other = b;
    b.other = a;
    return [a, b];
  }

  get closed(): boolean {
    return this._closed;
  }

  send(message: object, fds: readonly number[] = []): void {
    if (this._closed || this.closing) return;
    const bytes = encodeBody(message);
    if (bytes.length > this.maxFrameBytes) {
      const name = MSG_NAMES[(message as { t?: number }).t ?? -1] ?? 'message';
      throw new FrameTooLargeError(`${name} of ${bytes.length} bytes exceeds the frame limit of ${this.maxFrameBytes}`);
    }
    const body = decodeBody(bytes) as Record<string, unknown>;
    const peer = this.other;
    if (!peer || peer._closed) return;
    peer.deliver({ type: body.t as number, body, fds: fds.map((fd) => native.dup(fd)), size: HEADER_SIZE + bytes.length });
  }

  sendFrame(frame: Uint8Array, fds: readonly number[] = []): void {
    if (this._closed || this.closing) return;
    const bytes = frame.subarray(HEADER_SIZE);
    const body = decodeBody(bytes) as Record<string, unknown>;
    const peer = this.other;
    if (!peer || peer._closed) return;
    peer.deliver({ type: body.t as number, body, fds: fds.map((fd) => native.dup(fd)), size: frame.length });
  }

  end(last?: object): void {
    if (last) this.send(last);
    this.closing = true;
    // Close after everything already sent has been delivered to the other side.
    queueMicrotask(() => {
      const peer = this.other;
      if (peer && !peer._closed && peer.inbox.length > 0) peer.afterDrain = () => this.destroy();
      else this.destroy();
    });
  }

  destroy(reason?: MmbError): void {
    if (this._closed) return;
    this._closed = true;
    for (const f of this.inbox) closeAll(f.fds);
    this.inbox = [];
    const peer = this.other;
    this.other = undefined;
    this.emit('close', reason);
    if (peer && !peer._closed) {
      // The other end sees an orderly EOF after it has drained what was already delivered.
      if (peer.inbox.length > 0) peer.afterDrain = () => peer.destroy();
      else queueMicrotask(() => peer.destroy());
    }
  }

  /** Nothing is corked in-process: delivery is already in order with what was sent before. */
  flush(): void {}

  setRef(_ref: boolean): void {
    // Nothing keeps the event loop alive here: there is no handle.
  }

  /** The peer is this process: nothing to defend against (see Transport.setInboundLimits). */
  setInboundLimits(_limits: InboundLimits): void {}

  setLimits(limits: { maxFrameBytes?: number; maxFdsPerFrame?: number }): void {
    if (limits.maxFrameBytes !== undefined) this.maxFrameBytes = limits.maxFrameBytes;
  }

  private afterDrain: (() => void) | undefined;

  private deliver(frame: Frame): void {
    this.inbox.push(frame);
    if (this.scheduled) return;
    this.scheduled = true;
    // Not before what this process corked on its sockets earlier (cork.ts): order is kept across transports.
    if (!afterCorked(() => this.drain())) queueMicrotask(() => this.drain());
  }

  private drain(): void {
    this.scheduled = false;
    while (this.inbox.length > 0 && !this._closed) {
      const frame = this.inbox.shift() as Frame;
      try {
        this.emit('frame', frame);
      } catch (err) {
        this.destroy(toMmbError(err));
        return;
      }
    }
    const after = this.afterDrain;
    this.afterDrain = undefined;
    after?.();
  }
}
