// The back-end's request channel (VHOST_USER_PROTOCOL_F_BACKEND_REQ): our end of a socketpair whose other
// end the back-end got with SET_BACKEND_REQ_FD. The back-end sends requests on it (with a guest IOMMU:
// IOTLB misses and access failures, VHOST_USER_BACKEND_IOTLB_MSG); the front-end answers a request that
// carries NEED_REPLY with a u64 (0: done, non-zero: failed), in the order the requests came.
//
// Requests are handled one at a time: the answer to a miss is an IOTLB update on the main connection,
// confirmed before the reply goes out here (the spec's "completed operation"). A handler failure is
// answered with a non-zero reply; a malformed stream closes the channel and reports it (`onBroken`): the
// back-end can no longer be answered, which the front-end treats as a dead back-end.
import { constants, native, type PollHandle } from '../../native/index.js';
import { DisconnectedError, ProtocolError, toMmbError, type MmbError, hex } from '../../protocol/index.js';
import { closeAll } from '../../transport/index.js';
import { Flag, HEADER_BYTES, MAX_PAYLOAD_BYTES, decodeHeader, encode, u64Payload } from './messages.js';

/**
 * Handles one back-end request: resolves with the reply's u64 (sent only when the back-end asked for a
 * reply), 0 for success. A rejection is answered with 1.
 */
export type BackendRequestHandler = (request: number, payload: Buffer) => bigint | Promise<bigint>;

export interface BackendChannelStats {
  /** Requests received, and replies sent (those that carried NEED_REPLY). */
  requests: number;
  replies: number;
}

export class BackendChannel {
  private poll: PollHandle | undefined;
  private inbuf: Buffer = Buffer.alloc(0);
  private readonly readBuf = Buffer.allocUnsafe(8 * 1024);
  /** Requests are answered in order: each waits for the one before. */
  private chain: Promise<void> = Promise.resolve();
  private _closed = false;
  private handler: BackendRequestHandler = () => 1n;
  readonly stats: BackendChannelStats = { requests: 0, replies: 0 };

  /** `fd`: our end of the socketpair (non-blocking), owned from now on. */
  constructor(
    private readonly fd: number,
    private readonly onBroken: (reason: MmbError) => void,
  ) {
    this.poll = native.pollStart(fd, constants.POLL_READABLE, (status, events) => this.onPoll(status, events));
    // The channel alone does not keep the process alive.
    native.pollRef(this.poll, false);
  }

  /** Who answers the back-end's requests from now on (until then, every request is answered with 1). */
  setHandler(handler: BackendRequestHandler): void {
    this.handler = handler;
  }

  get closed(): boolean {
    return this._closed;
  }

  private onPoll(status: number, events: number): void {
    if (this._closed) return;
    try {
      if (status < 0) throw new DisconnectedError(`poll on the vhost-user back-end request channel failed (${status})`);
      if (events & (constants.POLL_READABLE | constants.POLL_DISCONNECT)) this.read();
    } catch (err) {
      this.break(toMmbError(err));
    }
  }

  private read(): void {
    for (;;) {
      const r = native.recvmsg(this.fd, this.readBuf, 8);
      if (r === null) return;
      // No request we handle carries descriptors (a host notifier would): drop any.
      closeAll(r.fds);
      if (r.ctrunc) throw new ProtocolError('the vhost-user back-end sent descriptors on its request channel that were truncated');
      if (r.bytes === 0) throw new DisconnectedError('the vhost-user back-end closed its request channel');
      const chunk = this.readBuf.subarray(0, r.bytes);
      this.inbuf = this.inbuf.length === 0 ? Buffer.from(chunk) : Buffer.concat([this.inbuf, chunk]);
      this.parse();
      if (this._closed) return;
    }
  }

  private parse(): void {
    let at = 0;
    while (this.inbuf.length - at >= HEADER_BYTES) {
      const { request, flags, size } = decodeHeader(this.inbuf, at);
      if (size > MAX_PAYLOAD_BYTES) throw new ProtocolError(`the vhost-user back-end sent a ${size}-byte request ${request} on its request channel`);
      if ((flags & 0x3) !== Flag.VERSION || flags & Flag.REPLY) {
        throw new ProtocolError(`the vhost-user back-end sent request ${request} with flags ${hex(flags)} on its request channel`);
      }
      if (this.inbuf.length - at < HEADER_BYTES + size) break;
      const payload = Buffer.from(this.inbuf.subarray(at + HEADER_BYTES, at + HEADER_BYTES + size));
      at += HEADER_BYTES + size;
      this.stats.requests++;
      const needReply = (flags & Flag.NEED_REPLY) !== 0;
      this.chain = this.chain.then(() => this.handle(request, payload, needReply));
    }
    this.inbuf = at === this.inbuf.length ? Buffer.alloc(0) : this.inbuf.subarray(at);
  }

  private async handle(request: number, payload: Buffer, needReply: boolean): Promise<void> {
    let status: bigint;
    try {
      status = await this.handler(request, payload);
    } catch {
      status = 1n;
    }
    if (!needReply || this._closed) return;
    try {
      // A reply: the request's id, VERSION | REPLY, a u64.
      if (native.sendmsg(this.fd, encode(request, Flag.VERSION | Flag.REPLY, u64Payload(status)), []) === null) {
        throw new DisconnectedError('the vhost-user back-end does not read its request channel (its buffer is full)');
      }
      this.stats.replies++;
    } catch (err) {
      this.break(toMmbError(err));
    }
  }

  private break(reason: MmbError): void {
    if (this._closed) return;
    this.close();
    this.onBroken(reason);
  }

  /** Stops listening and closes our end (the back-end sees EOF on its next request). */
  close(): void {
    if (this._closed) return;
    this._closed = true;
    if (this.poll) native.pollClose(this.poll);
    this.poll = undefined;
    try {
      native.close(this.fd);
    } catch {
      // Already gone.
    }
  }
}
