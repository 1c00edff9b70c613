// Reading vhost-user messages off a socket, for both directions: frontend.ts reads the back-end's replies,
// backend-channel.ts its requests. Whole messages are handed on in order; descriptors are dropped (none of
// the messages either side takes carries one); a payload above MAX_PAYLOAD_BYTES is refused from its
// header, before it is buffered.
import { native } from '../../native/index.js';
import { DisconnectedError, ProtocolError } from '../../protocol/index.js';
import { closeAll } from '../../transport/index.js';
import { HEADER_BYTES, MAX_PAYLOAD_BYTES, decodeHeader } from './messages.js';

export interface Message {
  request: number;
  flags: number;
  payload: Buffer;
}

export interface ReaderErrors {
  /** Who sent it, for errors ("the vhost-user back-end", "... on its request channel"). */
  who: string;
  /** The DisconnectedError's message at end of file. */
  eof: string;
  /** The ProtocolError's message for a payload of `size` bytes, above MAX_PAYLOAD_BYTES. */
  tooBig: (request: number, size: number) => string;
}

export class MessageReader {
  private inbuf: Buffer = Buffer.alloc(0);
  private readonly readBuf: Buffer;

  constructor(
    private readonly fd: number,
    private readonly errors: ReaderErrors,
    bufferBytes: number,
  ) {
    this.readBuf = Buffer.allocUnsafe(bufferBytes);
  }

  /**
   * Reads until the socket would block, handing each whole message to `onMessage`; after each read, stops
   * once `stopped()` says so. Throws ProtocolError or DisconnectedError (end of file).
   */
  read(onMessage: (m: Message) => void, stopped: () => boolean): void {
    for (;;) {
      const r = native.recvmsg(this.fd, this.readBuf, 8);
      if (r === null) return;
      closeAll(r.fds);
      if (r.ctrunc) throw new ProtocolError(`${this.errors.who} sent descriptors that were truncated`);
      if (r.bytes === 0) throw new DisconnectedError(this.errors.eof);
      const chunk = this.readBuf.subarray(0, r.bytes);
      this.inbuf = this.inbuf.length === 0 ? Buffer.from(chunk) : Buffer.concat([this.inbuf, chunk]);
      this.parse(onMessage);
      if (stopped()) return;
    }
  }

  private parse(onMessage: (m: Message) => void): void {
    let at = 0;
    try {
      while (this.inbuf.length - at >= HEADER_BYTES) {
        const { request, flags, size } = decodeHeader(this.inbuf, at);
        if (size > MAX_PAYLOAD_BYTES) throw new ProtocolError(this.errors.tooBig(request, size));
        if (this.inbuf.length - at < HEADER_BYTES + size) break;
        const payload = Buffer.from(this.inbuf.subarray(at + HEADER_BYTES, at + HEADER_BYTES + size));
        at += HEADER_BYTES + size;
        onMessage({ request, flags, payload });
      }
    } finally {
      this.inbuf = at === this.inbuf.length ? Buffer.alloc(0) : this.inbuf.subarray(at);
    }
  }
}
