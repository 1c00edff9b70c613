// A vhost-user front-end connection: the connecting side of a back-end's Unix socket, driven on uv_poll.
//
// Requests go out in order and may be pipelined; the back-end answers in order, so replies are matched to a
// FIFO of waiters (a reply naming another request is a protocol error and closes the connection: the
// stream can no longer be trusted). Every wait has a deadline; a request that times out closes the
// connection too, since a late reply would otherwise be taken for the next request's.
//
// How a message is confirmed ("ack" below):
//   - with REPLY_ACK negotiated: NEED_REPLY is set and the back-end's u64 reply must be 0;
//   - without it: a GET_FEATURES follows as a barrier (QEMU's enforce_reply): every back-end answers it,
//     after having processed everything before it.
// A reply of 0 means "processed", not "worked": libvhost-user 7.2 acks an ADD_MEM_REG beyond its slots and
// then stops working. Limits are enforced by the caller (memtable.ts), never discovered by trial.
//
// Behind a guest IOMMU (negotiate's `iommu`): VIRTIO_F_ACCESS_PLATFORM, BACKEND_REQ and REPLY_ACK are
// required, the back-end gets its request channel (SET_BACKEND_REQ_FD; backend-channel.ts), and iotlb()
// sends IOTLB updates and invalidations, each confirmed.
import { EventEmitter } from 'eventemitter3';
import { constants, isNativeError, native, type PollHandle } from '../../native/index.js';
import {
  ClientRefusedError,
  ConnectError,
  DisconnectedError,
  InvalidArgError,
  ProtocolError,
  TimeoutError,
  UnsupportedError,
  toMmbError,
  type MmbError,
  hex,
} from '../../protocol/index.js';
import { closeAll } from '../../transport/index.js';
import { BackendChannel } from './backend-channel.js';
import { MessageReader } from './reader.js';
import {
  Feature,
  Flag,
  CONFIG_HEADER_BYTES,
  IOTLB_PROTOCOL_FEATURES,
  MAX_RAM_SLOTS,
  MEM_TABLE_MAX_REGIONS,
  ProtocolFeature,
  Req,
  WANTED_PROTOCOL_FEATURES,
  bit,
  configPayload,
  readVringState,
  encode,
  iotlbMessages,
  logPayload,
  memReg,
  memTable,
  readU64,
  reqName,
  u64Payload,
  vringAddr,
  vringFdPayload,
  vringState,
  type IotlbMsg,
  type MemRegion,
} from './messages.js';

export interface FrontendOptions {
  /** Deadline of every request, in ms. Default 5000. */
  timeoutMs?: number;
  /** Keep retrying connect() while the socket does not exist or refuses, up to this many ms. Default 0. */
  connectTimeoutMs?: number;
}

export interface FrontendEvents {
  /** The connection is gone (the back-end closed it, a request timed out, or close() was called). */
  close: [reason: MmbError | undefined];
}

/** What was negotiated with the back-end. */
export interface Negotiated {
  /** Virtio / vhost features the back-end offered (GET_FEATURES). */
  offeredFeatures: bigint;
  /** Features set with SET_FEATURES. */
  features: bigint;
  /** Protocol features offered, 0 without VHOST_USER_F_PROTOCOL_FEATURES. */
  offeredProtocolFeatures: bigint;
  /** Protocol features set with SET_PROTOCOL_FEATURES. */
  protocolFeatures: bigint;
  /**
   * The back-end can log its writes the way the spec defines it: it offered VHOST_F_LOG_ALL and
   * VHOST_USER_PROTOCOL_F_LOG_SHMFD was negotiated. Otherwise its writes cannot be seen.
   */
  canLog: boolean;
  /** GET_QUEUE_NUM (with MQ), else undefined. */
  queueNum: number | undefined;
  /** GET_MAX_MEM_SLOTS with CONFIGURE_MEM_SLOTS, else 8 (SET_MEM_TABLE only). */
  maxMemSlots: number;
  /** 'slots': ADD_MEM_REG / REM_MEM_REG (CONFIGURE_MEM_SLOTS); 'table': SET_MEM_TABLE only, at most 8 regions. */
  memMode: 'slots' | 'table';
  /**
   * VIRTIO_F_ACCESS_PLATFORM was negotiated: the back-end translates every ring and buffer address through
   * its IOTLB (IOVAs), and has a request channel for its misses.
   */
  iommu: boolean;
}

export interface NegotiateOptions {
  /**
   * Put the device behind a guest IOMMU: VIRTIO_F_ACCESS_PLATFORM, BACKEND_REQ and REPLY_ACK must be
   * offered (else MMB_ERR_UNSUPPORTED, before anything is set), and the back-end gets its request channel.
   */
  iommu?: boolean;
}

/**
 * What a request waits for: nothing, its confirmation (reply-ack or barrier), its own reply, or
 * 'confirm': its confirmation and a GET_FEATURES round trip behind it, written in the same sendmsg.
 */
type Expect = 'none' | 'ack' | 'reply' | 'confirm';

interface Waiter {
  request: number;
  resolve: (payload: Buffer) => void;
  reject: (err: MmbError) => void;
  /** The deadline; a batch (iotlb()) has one, on its last message (replies come in order). */
  timer: NodeJS.Timeout | undefined;
}

interface Outbound {
  data: Buffer;
  offset: number;
  fds: number[];
}

export interface FrontendStats {
  /** Messages sent. */
  sent: number;
  /** Replies received. */
  replies: number;
  /** Barrier GET_FEATURES sent because REPLY_ACK was not negotiated. */
  barriers: number;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export class VhostUserFrontend extends EventEmitter<FrontendEvents> {
  private readonly fd: number;
  private readonly reader: MessageReader;
  private poll: PollHandle | undefined;
  private readonly timeoutMs: number;
  private readonly waiters: Waiter[] = [];
  private readonly outq: Outbound[] = [];
  private pollEvents = 0;
  private _closed = false;
  private _negotiated: Negotiated | undefined;
  private channel: BackendChannel | undefined;
  readonly stats: FrontendStats = { sent: 0, replies: 0, barriers: 0 };

  /** The back-end's pidfd (SO_PEERPIDFD on our socket; -1 where the kernel has none), owned by the caller. */
  backendPidfd(): number {
    return native.peerPidfd(this.fd);
  }

  private constructor(
    fd: number,
    readonly path: string,
    opts: FrontendOptions,
  ) {
    super();
    this.fd = fd;
    this.reader = new MessageReader(
      fd,
      {
        who: 'the vhost-user back-end',
        eof: `the vhost-user back-end at ${path} closed the connection`,
        tooBig: (request, size) => `the vhost-user back-end sent a ${size}-byte payload for ${reqName(request)}`,
      },
      64 * 1024,
    );
    this.timeoutMs = opts.timeoutMs ?? 5000;
    this.pollEvents = constants.POLL_READABLE;
    this.poll = native.pollStart(fd, this.pollEvents, (status, events) => this.onPoll(status, events));
    // The connection alone does not keep the process alive; pending requests do (their timers).
    native.pollRef(this.poll, false);
  }

  /** Connects to the back-end listening on `path` (the front-end is the connecting side). */
  static async connect(path: string, opts: FrontendOptions = {}): Promise<VhostUserFrontend> {
    const until = Date.now() + (opts.connectTimeoutMs ?? 0);
    for (;;) {
      try {
        return new VhostUserFrontend(native.socketConnect(path), path, opts);
      } catch (err) {
        const retry = isNativeError(err) && ['ENOENT', 'ECONNREFUSED', 'EAGAIN'].includes(err.code);
        if (!retry || Date.now() >= until) {
          throw new ConnectError(`cannot connect to the vhost-user back-end at ${path}: ${(err as Error).message}`, {
            cause: err,
            ...(isNativeError(err) ? { errno: err.code } : {}),
          });
        }
        await sleep(20);
      }
    }
  }

  get closed(): boolean {
    return this._closed;
  }

  /** What negotiate() settled; throws before it ran. */
  get negotiated(): Negotiated {
    if (!this._negotiated) throw new InvalidArgError('the vhost-user connection is not negotiated yet');
    return this._negotiated;
  }

  /** The back-end's request channel (negotiated with `iommu`), where its IOTLB misses arrive. */
  get backendChannel(): BackendChannel | undefined {
    return this.channel;
  }

  hasProtocolFeature(n: number): boolean {
    return this._negotiated !== undefined && (this._negotiated.protocolFeatures & bit(n)) !== 0n;
  }

  /**
   * The session start: GET_FEATURES, GET/SET_PROTOCOL_FEATURES (MQ, REPLY_ACK, CONFIG, CONFIGURE_MEM_SLOTS,
   * LOG_SHMFD where offered; never STATUS), GET_QUEUE_NUM, GET_MAX_MEM_SLOTS, SET_OWNER, SET_FEATURES with
   * `want` (masked by what is offered; VHOST_USER_F_PROTOCOL_FEATURES added when offered; VHOST_F_LOG_ALL
   * never here: setLogAll() turns it on while dirty logging is wanted, as QEMU does at migration).
   * With `iommu`: also VIRTIO_F_ACCESS_PLATFORM and BACKEND_REQ, and SET_BACKEND_REQ_FD before SET_OWNER
   * (QEMU's vhost_user_backend_init sets the channel up there too).
   */
  async negotiate(want: bigint, opts: NegotiateOptions = {}): Promise<Negotiated> {
    const iommu = opts.iommu === true;
    if (iommu) want |= bit(Feature.ACCESS_PLATFORM);
    const offered = readU64(await this.request(Req.GET_FEATURES, undefined, [], 'reply'), 'GET_FEATURES');
    let offeredPf = 0n;
    let pf = 0n;
    if (offered & bit(Feature.PROTOCOL_FEATURES)) {
      offeredPf = readU64(await this.request(Req.GET_PROTOCOL_FEATURES, undefined, [], 'reply'), 'GET_PROTOCOL_FEATURES');
      pf = offeredPf & (WANTED_PROTOCOL_FEATURES | (iommu ? IOTLB_PROTOCOL_FEATURES : 0n));
    }
    if (iommu) this.checkIommu(offered, pf);
    if (offered & bit(Feature.PROTOCOL_FEATURES)) {
      // Not acked: REPLY_ACK is not in force until this message has been processed.
      await this.request(Req.SET_PROTOCOL_FEATURES, u64Payload(pf), [], 'none');
    }
    const n: Negotiated = {
      offeredFeatures: offered,
      features: 0n,
      offeredProtocolFeatures: offeredPf,
      protocolFeatures: pf,
      queueNum: undefined,
      maxMemSlots: MEM_TABLE_MAX_REGIONS,
      memMode: 'table',
      iommu,
      canLog: (offered & bit(Feature.LOG_ALL)) !== 0n && (pf & bit(ProtocolFeature.LOG_SHMFD)) !== 0n,
    };
    this._negotiated = n;
    if (pf & bit(ProtocolFeature.MQ)) {
      n.queueNum = Number(readU64(await this.request(Req.GET_QUEUE_NUM, undefined, [], 'reply'), 'GET_QUEUE_NUM'));
    }
    if (pf & bit(ProtocolFeature.CONFIGURE_MEM_SLOTS)) {
      const slots = Number(readU64(await this.request(Req.GET_MAX_MEM_SLOTS, undefined, [], 'reply'), 'GET_MAX_MEM_SLOTS'));
      if (!Number.isSafeInteger(slots) || slots < 1) throw this.fail(new ProtocolError(`the back-end reports ${slots} memory slots`));
      n.maxMemSlots = Math.min(slots, MAX_RAM_SLOTS);
      n.memMode = 'slots';
    }
    if (iommu) await this.openBackendChannel();
    await this.request(Req.SET_OWNER, undefined, [], 'ack');
    const features = (want & offered & ~bit(Feature.LOG_ALL)) | (offered & bit(Feature.PROTOCOL_FEATURES));
    await this.request(Req.SET_FEATURES, u64Payload(features), [], 'ack');
    n.features = features;
    return n;
  }

  /** Refuses a back-end that cannot translate IOVAs, naming what it lacks. */
  private checkIommu(offered: bigint, pf: bigint): void {
    const lacks: string[] = [];
    if (!(offered & bit(Feature.ACCESS_PLATFORM))) lacks.push('VIRTIO_F_ACCESS_PLATFORM (IOMMU_PLATFORM, bit 33)');
    if (!(pf & bit(ProtocolFeature.BACKEND_REQ))) lacks.push('the protocol feature BACKEND_REQ (its request channel, for IOTLB misses)');
    if (!(pf & bit(ProtocolFeature.REPLY_ACK))) lacks.push('the protocol feature REPLY_ACK (confirmed invalidations)');
    if (lacks.length === 0) return;
    throw new UnsupportedError(
      `the vhost-user back-end at ${this.path} cannot follow an I/O address space: it does not offer ${lacks.join(', nor ')}. ` +
        'It can only be given all of guest memory: attach it without an IOAS (qemu-storage-daemon 7.2 is such a back-end; dpdk-testpmd offers it with iommu-support=1)',
    );
  }

  /** SET_BACKEND_REQ_FD with one end of a new socketpair; the other end becomes the request channel. */
  private async openBackendChannel(): Promise<void> {
    const [ours, theirs] = native.socketPair();
    const channel = new BackendChannel(ours, (reason) => this.fail(reason));
    try {
      await this.request(Req.SET_BACKEND_REQ_FD, undefined, [theirs], 'ack');
    } catch (err) {
      channel.close();
      throw err;
    } finally {
      native.close(theirs);
    }
    this.channel = channel;
  }

  // --- device IOTLB ---------------------------------------------------------------------------------

  /**
   * VHOST_USER_IOTLB_MSG for each of `msgs` (updates and invalidations), written in one sendmsg, each with
   * NEED_REPLY; resolves once the back-end confirmed every one (DPDK inserts or drops the entries, and
   * re-translates or invalidates a ring they cover, before it replies). A non-zero reply-ack fails it
   * (MMB_ERR_CLIENT_REFUSED). Needs `iommu` (REPLY_ACK is then in force).
   */
  iotlb(msgs: readonly IotlbMsg[]): Promise<void> {
    if (msgs.length === 0) return Promise.resolve();
    if (this._closed) return Promise.reject(new DisconnectedError(`the vhost-user back-end at ${this.path} is disconnected`));
    if (!this._negotiated?.iommu) return Promise.reject(new InvalidArgError('IOTLB messages need a back-end negotiated with iommu'));
    const flags = Flag.VERSION | Flag.NEED_REPLY;
    // One deadline and one promise for the batch (a guest's batch is hundreds of messages): every reply
    // is awaited, also after a refusal, so that the stream stays in step.
    const done = new Promise<void>((resolve, reject) => {
      let left = msgs.length;
      let refused: MmbError | undefined;
      const timer = setTimeout(() => {
        this.fail(new TimeoutError(`the vhost-user back-end at ${this.path} did not answer ${msgs.length} IOTLB message(s) within ${this.timeoutMs} ms`));
      }, this.timeoutMs);
      const onReply = (reply: Buffer) => {
        let status: bigint;
        try {
          status = readU64(reply, 'IOTLB_MSG reply-ack');
        } catch (err) {
          status = 1n;
          refused ??= toMmbError(err);
        }
        if (status !== 0n) refused ??= new ClientRefusedError(`the vhost-user back-end refused an IOTLB message (reply-ack ${status})`);
        if (--left === 0) {
          if (refused) reject(refused);
          else resolve();
        }
      };
      msgs.forEach((_, i) => this.waiters.push({ request: Req.IOTLB_MSG, resolve: onReply, reject, timer: i === msgs.length - 1 ? timer : undefined }));
    });
    this.stats.sent += msgs.length - 1; // send() counts the write as one message
    this.send(iotlbMessages(msgs, flags), []);
    return done;
  }

  // --- memory table ---------------------------------------------------------------------------------

  // `confirm`: also wait for a round trip behind the message (see barrier()), sent with it.

  /** SET_MEM_TABLE: the whole table (at most 8 regions), one fd per region in the same order. */
  setMemTable(regions: readonly MemRegion[], fds: readonly number[], confirm = false): Promise<void> {
    if (fds.length !== regions.length) throw new InvalidArgError(`SET_MEM_TABLE: ${regions.length} regions but ${fds.length} fds`);
    return this.request(Req.SET_MEM_TABLE, memTable(regions), fds, confirm ? 'confirm' : 'ack').then(() => undefined);
  }

  /** ADD_MEM_REG: one region and exactly one fd. */
  addMemReg(region: MemRegion, fd: number, confirm = false): Promise<void> {
    return this.request(Req.ADD_MEM_REG, memReg(region), [fd], confirm ? 'confirm' : 'ack').then(() => undefined);
  }

  /** REM_MEM_REG: identified by gpa, size and user address; no fd (as the spec says). */
  remMemReg(region: MemRegion, confirm = false): Promise<void> {
    return this.request(Req.REM_MEM_REG, memReg(region), [], confirm ? 'confirm' : 'ack').then(() => undefined);
  }

  // --- dirty log -----------------------------------------------------------------------------------

  /**
   * SET_LOG_BASE with LOG_SHMFD: the back-end maps `size` bytes of the log memfd `fd` (from offset 0) and
   * sets bits there from now on. Every back-end answers it with a reply of its own (libvhost-user: a u64,
   * DPDK: empty), so it is sent without NEED_REPLY and waits for that reply.
   */
  setLogBase(fd: number, size: number): Promise<void> {
    return this.request(Req.SET_LOG_BASE, logPayload(size), [fd], 'reply').then(() => undefined);
  }

  /**
   * SET_FEATURES with or without VHOST_F_LOG_ALL on top of the negotiated features: the one feature a
   * back-end accepts changing while its rings run (DPDK refuses any other change then).
   */
  setLogAll(on: boolean): Promise<void> {
    const n = this.negotiated;
    return this.request(Req.SET_FEATURES, u64Payload(n.features | (on ? bit(Feature.LOG_ALL) : 0n)), [], 'ack').then(() => undefined);
  }

  /**
   * A round trip (GET_FEATURES): resolves once the back-end processed everything sent before it. A
   * back-end that broke on an earlier message (libvhost-user acks it, then closes on its panic) fails it.
   * The memory-table methods take `confirm` to send one right behind their message in the same write.
   */
  barrier(): Promise<void> {
    return this.request(Req.GET_FEATURES, undefined, [], 'reply').then(() => undefined);
  }

  // --- vrings and config ----------------------------------------------------------------------------

  setVringNum(index: number, num: number): Promise<void> {
    return this.request(Req.SET_VRING_NUM, vringState(index, num), [], 'ack').then(() => undefined);
  }

  setVringBase(index: number, base: number): Promise<void> {
    return this.request(Req.SET_VRING_BASE, vringState(index, base), [], 'ack').then(() => undefined);
  }

  /**
   * Ring addresses are in the back-end's "user address" space (MemRegion.uaddr), not GPAs. `logGpa` is
   * the used ring's guest-physical address, where the back-end logs its used-ring writes; `flags`
   * VRING_F_LOG asks it to.
   */
  setVringAddr(index: number, desc: bigint, used: bigint, avail: bigint, flags = 0, logGpa = 0n): Promise<void> {
    return this.request(Req.SET_VRING_ADDR, vringAddr(index, desc, used, avail, flags, logGpa), [], 'ack').then(() => undefined);
  }

  setVringKick(index: number, eventfd: number): Promise<void> {
    return this.request(Req.SET_VRING_KICK, vringFdPayload(index), [eventfd], 'ack').then(() => undefined);
  }

  setVringCall(index: number, eventfd: number): Promise<void> {
    return this.request(Req.SET_VRING_CALL, vringFdPayload(index), [eventfd], 'ack').then(() => undefined);
  }

  setVringEnable(index: number, enable: boolean): Promise<void> {
    return this.request(Req.SET_VRING_ENABLE, vringState(index, enable ? 1 : 0), [], 'ack').then(() => undefined);
  }

  /** GET_VRING_BASE: stops the ring and returns its next avail index. */
  async getVringBase(index: number): Promise<number> {
    const p = await this.request(Req.GET_VRING_BASE, vringState(index, 0), [], 'reply');
    if (p.length < 8) throw this.fail(new ProtocolError(`GET_VRING_BASE: reply of ${p.length} bytes`));
    return readVringState(p).num;
  }

  /** GET_CONFIG (CONFIG protocol feature): `size` bytes of the device's config space at `offset`. */
  async getConfig(offset: number, size: number): Promise<Buffer> {
    if (!this.hasProtocolFeature(ProtocolFeature.CONFIG)) throw new InvalidArgError('the back-end did not negotiate VHOST_USER_PROTOCOL_F_CONFIG');
    const p = await this.request(Req.GET_CONFIG, configPayload(offset, size), [], 'reply');
    // A back-end signals an error with an empty payload.
    if (p.length !== CONFIG_HEADER_BYTES + size) throw new ClientRefusedError(`the vhost-user back-end refused GET_CONFIG (reply of ${p.length} bytes)`);
    return p.subarray(CONFIG_HEADER_BYTES);
  }

  // --- the request machinery ------------------------------------------------------------------------

  /**
   * Sends one message. `expect`: 'reply' waits for the message's own reply and returns its payload;
   * 'ack' waits until the back-end confirmed it (reply-ack 0, or a GET_FEATURES barrier); 'confirm'
   * also waits for a GET_FEATURES round trip behind it, written with the message in one sendmsg (one
   * wake-up of the back-end, not two); 'none' only sends. `fds` are sent with the message and stay ours.
   */
  request(request: number, payload: Uint8Array | undefined, fds: readonly number[], expect: Expect): Promise<Buffer> {
    if (this._closed) return Promise.reject(new DisconnectedError(`the vhost-user back-end at ${this.path} is disconnected`));
    const replyAck = this.hasProtocolFeature(ProtocolFeature.REPLY_ACK);
    if (expect === 'confirm' && !replyAck) expect = 'ack'; // its confirmation is a round trip already
    const acked = expect === 'ack' || expect === 'confirm';
    const flags = Flag.VERSION | (acked && replyAck ? Flag.NEED_REPLY : 0);
    const p = expect === 'reply' || (acked && replyAck) ? this.wait(request) : undefined;
    if (expect === 'confirm') {
      const behind = this.wait(Req.GET_FEATURES);
      this.stats.barriers++;
      this.send(Buffer.concat([encode(request, flags, payload), encode(Req.GET_FEATURES, Flag.VERSION)]), fds);
      return Promise.all([this.checkAck(request, p as Promise<Buffer>), behind]).then(([reply]) => reply);
    }
    this.send(encode(request, flags, payload), fds);
    if (expect === 'ack' && !replyAck) {
      // The barrier: its reply comes after the back-end processed `request`.
      this.stats.barriers++;
      const barrier = this.wait(Req.GET_FEATURES);
      this.send(encode(Req.GET_FEATURES, Flag.VERSION), []);
      return barrier.then(() => Buffer.alloc(0));
    }
    if (!p) return Promise.resolve(Buffer.alloc(0));
    if (expect === 'reply') return p;
    return this.checkAck(request, p);
  }

  /** A reply-ack must be 0. */
  private checkAck(request: number, p: Promise<Buffer>): Promise<Buffer> {
    return p.then((reply) => {
      const status = readU64(reply, `${reqName(request)} reply-ack`);
      if (status !== 0n) throw new ClientRefusedError(`the vhost-user back-end refused ${reqName(request)} (reply-ack ${status})`);
      return reply;
    });
  }

  private wait(request: number): Promise<Buffer> {
    return new Promise<Buffer>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.fail(new TimeoutError(`the vhost-user back-end at ${this.path} did not answer ${reqName(request)} within ${this.timeoutMs} ms`));
      }, this.timeoutMs);
      this.waiters.push({ request, resolve, reject, timer });
    });
  }

  private send(data: Buffer, fds: readonly number[]): void {
    this.stats.sent++;
    if (this.outq.length === 0) {
      let sent: number | null;
      try {
        sent = native.sendmsg(this.fd, data, fds);
      } catch (err) {
        this.fail(new DisconnectedError(`send to the vhost-user back-end failed: ${(err as Error).message}`, { cause: err }));
        return;
      }
      if (sent === data.length) return;
      if (sent !== null && sent > 0) {
        this.enqueue({ data, offset: sent, fds: [] });
        return;
      }
    }
    this.enqueue({ data, offset: 0, fds: fds.map((fd) => native.dup(fd)) });
  }

  private enqueue(o: Outbound): void {
    this.outq.push(o);
    this.setPoll(this.pollEvents | constants.POLL_WRITABLE);
  }

  private setPoll(events: number): void {
    if (events === this.pollEvents || !this.poll) return;
    this.pollEvents = events;
    native.pollUpdate(this.poll, events);
  }

  private onPoll(status: number, events: number): void {
    if (this._closed) return;
    try {
      if (status < 0) throw new DisconnectedError(`poll on the vhost-user socket failed (${status})`);
      if (events & constants.POLL_WRITABLE) this.flush();
      if (events & (constants.POLL_READABLE | constants.POLL_DISCONNECT)) this.read();
    } catch (err) {
      this.fail(toMmbError(err));
    }
  }

  private flush(): void {
    while (this.outq.length > 0) {
      const o = this.outq[0] as Outbound;
      const sent = native.sendmsg(this.fd, o.offset === 0 ? o.data : o.data.subarray(o.offset), o.fds);
      if (sent === null) return;
      closeAll(o.fds);
      o.fds = [];
      o.offset += sent;
      if (o.offset < o.data.length) return;
      this.outq.shift();
    }
    this.setPoll(constants.POLL_READABLE);
  }

  private read(): void {
    // Replies this front-end asks for never carry descriptors: the reader drops any.
    this.reader.read(
      ({ request, flags, payload }) => {
        const w = this.waiters.shift();
        if (!w) throw new ProtocolError(`the vhost-user back-end sent ${reqName(request)} that nobody asked for`);
        if ((flags & Flag.REPLY) === 0 || (flags & 0x3) !== Flag.VERSION || request !== w.request) {
          this.waiters.unshift(w);
          throw new ProtocolError(`expected the reply to ${reqName(w.request)}, got ${reqName(request)} with flags ${hex(flags)}`);
        }
        clearTimeout(w.timer);
        this.stats.replies++;
        w.resolve(payload);
      },
      () => this._closed,
    );
  }

  /** Closes the connection with `reason`, failing every pending request with it. Returns the reason. */
  private fail(reason: MmbError): MmbError {
    this.shutdown(reason);
    return reason;
  }

  /** Closes the connection; a back-end drops its state (and unmaps its memory) when its front-end goes. */
  close(): void {
    this.shutdown(undefined);
  }

  private shutdown(reason: MmbError | undefined): void {
    if (this._closed) return;
    this._closed = true;
    this.channel?.close();
    if (this.poll) native.pollClose(this.poll);
    this.poll = undefined;
    for (const o of this.outq) closeAll(o.fds);
    this.outq.length = 0;
    try {
      native.close(this.fd);
    } catch {
      // Already gone.
    }
    const err = reason ?? new DisconnectedError(`the vhost-user connection to ${this.path} was closed`);
    for (const w of this.waiters.splice(0)) {
      clearTimeout(w.timer);
      w.reject(err);
    }
    this.emit('close', reason);
  }
}
