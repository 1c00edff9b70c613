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
import { Flag, encode, u64Payload } from './messages.js';
import { MessageReader } from './reader.js';

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
  /** Requests are answered in order: each waits for the one before. */
  private chain: Promise<void> = Promise.resolve();
  private _closed = false;
  private readonly reader: MessageReader;
  private handler: BackendRequestHandler = () => 1n;
  readonly stats: BackendChannelStats = { requests: 0, replies: 0 };

  /** `fd`: our end of the socketpair (non-blocking), owned from now on. */
  constructor(
    private readonly fd: number,
    private readonly onBroken: (reason: MmbError) => void,
  ) {
    this.reader = new MessageReader(
      fd,
      {
        who: 'the vhost-user back-end on its request channel',
        eof: 'the vhost-user back-end closed its request channel',
        tooBig: (request, size) => `the vhost-user back-end sent a ${size}-byte request ${request} on its request channel`,
      },
      8 * 1024,
    );
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
    // No request we handle carries descriptors (a host notifier would): the reader drops any.
    this.reader.read(
      ({ request, flags, payload }) => {
        if ((flags & 0x3) !== Flag.VERSION || flags & Flag.REPLY) {
          throw new ProtocolError(`the vhost-user back-end sent request ${request} with flags ${hex(flags)} on its request channel`);
        }
        this.stats.requests++;
        const needReply = (flags & Flag.NEED_REPLY) !== 0;
        this.chain = this.chain.then(() => this.handle(request, payload, needReply));
      },
      () => this._closed,
    );
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
