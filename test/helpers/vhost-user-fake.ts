// A vhost-user back-end scripted by a test: a Unix socket served through the addon, so that descriptors
// are counted; it records every message and answers what a well-behaved back-end answers, unless the
// test overrides it per message. For the front-end's wire-format tests and for back-ends with features
// the real ones here always have (a back-end that cannot log). With BACKEND_REQ it keeps the request
// channel the front-end hands over (SET_BACKEND_REQ_FD), sends requests on it (IOTLB misses) and records
// the front-end's replies there.
import { Feature, Flag, ProtocolFeature, Req, bit } from '../../clients/vhost-user/index.js';
import { constants, native, type PollHandle } from '../../native/index.js';

export interface Message {
  request: number;
  flags: number;
  payload: Buffer;
  fds: number;
  at: number;
}

export const u64 = (n: bigint | number) => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(BigInt(n));
  return b;
};

/** A vhost-user back-end scripted by the test: records every message, answers through `handler`. */
export class FakeBackend {
  readonly messages: Message[] = [];
  private readonly listenFd: number;
  private readonly polls: PollHandle[] = [];
  private readonly fds: number[] = [];
  private inbuf = Buffer.alloc(0);
  /** Descriptors received and not yet claimed by a parsed message. */
  private pendingFds: number[] = [];
  private channelBuf = Buffer.alloc(0);
  conn: number | undefined;
  /** Connections accepted so far. */
  connections = 0;
  /** The front-end closed the current connection (EOF seen). */
  peerClosed = false;
  /** The back-end's end of its request channel, once SET_BACKEND_REQ_FD brought it. */
  backendReqFd: number | undefined;
  /** What the front-end sent on the request channel (its replies), in order. */
  readonly channelMessages: Message[] = [];
  features = bit(Feature.PROTOCOL_FEATURES) | bit(Feature.VERSION_1) | bit(Feature.BLK_FLUSH) | bit(Feature.RING_EVENT_IDX);
  protocolFeatures = bit(ProtocolFeature.MQ) | bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.CONFIGURE_MEM_SLOTS) | bit(ProtocolFeature.STATUS);
  maxSlots = 32;
  /** Answers (or swallows) a message instead of the default when it returns true. */
  override: ((m: Message, reply: (payload: Buffer) => void) => boolean) | undefined;

  constructor(readonly socket: string) {
    this.listenFd = native.socketListen(socket, 4, 0o600);
    this.fds.push(this.listenFd);
    this.polls.push(
      native.pollStart(this.listenFd, constants.POLL_READABLE, () => {
        const a = native.socketAccept(this.listenFd);
        if (!a) return;
        if (a.pidfd >= 0) native.close(a.pidfd);
        this.conn = a.fd;
        this.connections++;
        this.peerClosed = false;
        this.fds.push(a.fd);
        const poll = native.pollStart(a.fd, constants.POLL_READABLE, () => {
          // At EOF the socket stays readable: stop watching it.
          if (this.onReadable(a.fd) === 'eof') {
            native.pollClose(poll);
            this.polls.splice(this.polls.indexOf(poll), 1);
          }
        });
        this.polls.push(poll);
      }),
    );
  }

  private onReadable(fd: number): 'eof' | undefined {
    const buf = Buffer.alloc(65536);
    for (;;) {
      let r;
      try {
        r = native.recvmsg(fd, buf, 16);
      } catch {
        return;
      }
      if (r === null) return;
      if (r.bytes === 0) {
        if (fd === this.conn) this.peerClosed = true;
        return 'eof';
      }
      this.pendingFds.push(...r.fds);
      this.inbuf = Buffer.concat([this.inbuf, buf.subarray(0, r.bytes)]);
      while (this.inbuf.length >= 12) {
        const size = this.inbuf.readUInt32LE(8);
        if (this.inbuf.length < 12 + size) break;
        const m: Message = {
          request: this.inbuf.readUInt32LE(0),
          flags: this.inbuf.readUInt32LE(4),
          payload: Buffer.from(this.inbuf.subarray(12, 12 + size)),
          fds: this.pendingFds.length,
          at: performance.now(),
        };
        const fds = this.pendingFds.splice(0);
        if (m.request === Req.SET_BACKEND_REQ_FD && fds.length === 1) this.takeChannel(fds[0] as number);
        else for (const f of fds) native.close(f);
        this.inbuf = this.inbuf.subarray(12 + size);
        this.messages.push(m);
        this.dispatch(fd, m);
      }
    }
  }

  private dispatch(fd: number, m: Message): void {
    const reply = (payload: Buffer) => {
      const h = Buffer.alloc(12);
      h.writeUInt32LE(m.request, 0);
      h.writeUInt32LE(Flag.VERSION | Flag.REPLY, 4);
      h.writeUInt32LE(payload.length, 8);
      try {
        native.sendmsg(fd, Buffer.concat([h, payload]), []);
      } catch {
        // The front-end is gone.
      }
    };
    if (this.override?.(m, reply)) return;
    this.defaultReply(m, reply);
  }

  /** What a well-behaved back-end answers. */
  defaultReply(m: Message, reply: (payload: Buffer) => void): void {
    switch (m.request) {
      case Req.GET_FEATURES:
        return reply(u64(this.features));
      case Req.GET_PROTOCOL_FEATURES:
        return reply(u64(this.protocolFeatures));
      case Req.GET_QUEUE_NUM:
        return reply(u64(1));
      case Req.GET_MAX_MEM_SLOTS:
        return reply(u64(this.maxSlots));
      case Req.GET_VRING_BASE: {
        // { u32 index, u32 num }: this back-end never took a request.
        const state = Buffer.alloc(8);
        state.writeUInt32LE(m.payload.readUInt32LE(0), 0);
        return reply(state);
      }
      case Req.SET_LOG_BASE:
        // libvhost-user answers with a u64 (DPDK with nothing), whatever NEED_REPLY says.
        return reply(u64(m.payload.readBigUInt64LE(0)));
      default:
        if (m.flags & Flag.NEED_REPLY) reply(u64(0));
    }
  }

  private takeChannel(fd: number): void {
    if (this.backendReqFd !== undefined) native.close(this.backendReqFd);
    this.backendReqFd = fd;
    this.fds.push(fd);
    this.polls.push(native.pollStart(fd, constants.POLL_READABLE, () => this.onChannelReadable(fd)));
  }

  private onChannelReadable(fd: number): void {
    const buf = Buffer.alloc(4096);
    for (;;) {
      let r;
      try {
        r = native.recvmsg(fd, buf, 4);
      } catch {
        return;
      }
      if (r === null || r.bytes === 0) return;
      for (const f of r.fds) native.close(f);
      this.channelBuf = Buffer.concat([this.channelBuf, buf.subarray(0, r.bytes)]);
      while (this.channelBuf.length >= 12) {
        const size = this.channelBuf.readUInt32LE(8);
        if (this.channelBuf.length < 12 + size) break;
        this.channelMessages.push({
          request: this.channelBuf.readUInt32LE(0),
          flags: this.channelBuf.readUInt32LE(4),
          payload: Buffer.from(this.channelBuf.subarray(12, 12 + size)),
          fds: r.fds.length,
          at: performance.now(),
        });
        this.channelBuf = this.channelBuf.subarray(12 + size);
      }
    }
  }

  /** Sends a back-end request on the request channel, as the back-end would (flags: VERSION, maybe NEED_REPLY). */
  sendBackendRequest(request: number, payload: Buffer, flags: number = Flag.VERSION): void {
    if (this.backendReqFd === undefined) throw new Error('no request channel: the front-end sent no SET_BACKEND_REQ_FD');
    const h = Buffer.alloc(12);
    h.writeUInt32LE(request, 0);
    h.writeUInt32LE(flags, 4);
    h.writeUInt32LE(payload.length, 8);
    native.sendmsg(this.backendReqFd, Buffer.concat([h, payload]), []);
  }

  names(from = 0): string[] {
    const byId = new Map(Object.entries(Req).map(([k, v]) => [v as number, k]));
    return this.messages.slice(from).map((m) => byId.get(m.request) ?? String(m.request));
  }

  close(): void {
    for (const f of this.pendingFds.splice(0)) native.close(f);
    for (const p of this.polls) native.pollClose(p);
    for (const fd of this.fds) {
      try {
        native.close(fd);
      } catch {
        // Closed already.
      }
    }
  }
}
