// A vhost-user back-end scripted by a test: a Unix socket served through the addon, so that descriptors
// are counted; it records every message and answers what a well-behaved back-end answers, unless the
// test overrides it per message. For the front-end's wire-format tests and for back-ends with features
// the real ones here always have (a back-end that cannot log).
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
  private pendingFds = 0;
  conn: number | undefined;
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
        this.conn = a.fd;
        this.fds.push(a.fd);
        this.polls.push(native.pollStart(a.fd, constants.POLL_READABLE, () => this.onReadable(a.fd)));
      }),
    );
  }

  private onReadable(fd: number): void {
    const buf = Buffer.alloc(65536);
    for (;;) {
      let r;
      try {
        r = native.recvmsg(fd, buf, 16);
      } catch {
        return;
      }
      if (r === null || r.bytes === 0) return;
      for (const f of r.fds) native.close(f);
      this.pendingFds += r.fds.length;
      this.inbuf = Buffer.concat([this.inbuf, buf.subarray(0, r.bytes)]);
      while (this.inbuf.length >= 12) {
        const size = this.inbuf.readUInt32LE(8);
        if (this.inbuf.length < 12 + size) break;
        const m: Message = {
          request: this.inbuf.readUInt32LE(0),
          flags: this.inbuf.readUInt32LE(4),
          payload: Buffer.from(this.inbuf.subarray(12, 12 + size)),
          fds: this.pendingFds,
          at: performance.now(),
        };
        this.pendingFds = 0;
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

  names(from = 0): string[] {
    const byId = new Map(Object.entries(Req).map(([k, v]) => [v as number, k]));
    return this.messages.slice(from).map((m) => byId.get(m.request) ?? String(m.request));
  }

  close(): void {
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

