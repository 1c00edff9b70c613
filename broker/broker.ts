// The broker: named address spaces, the connections to them (sockets and in-process), and the dispatch of
// every message to the space it concerns. Nothing a peer sends can throw out of here: every failure
// becomes a typed error in a REPLY (requests), an EV_ERROR (acks), or an EV_GOODBYE and a disconnect
// (a broken stream), and the broker keeps serving everyone else.
import pino, { type Logger } from 'pino';
import {
  ALL_FEATURES,
  BadMessageError,
  DEFAULT_CONNECTION_LIMITS,
  PermissionError,
  RateLimitError,
  DEFAULT_PROTOCOL_LIMITS,
  DEFAULT_SPACE_LIMITS,
  Feature,
  FeatureError,
  InvalidArgError,
  Msg,
  NoSpaceError,
  NotOwnerError,
  PROTOCOL_MAXIMA,
  PROTOCOL_VERSION,
  ShutdownError,
  StaleGenerationError,
  StateError,
  VersionError,
  MmbError,
  checkDmaRules,
  parseToBroker,
  requestIdOf,
  toMmbError,
  type Attach,
  type ConnectionLimits,
  type Frame,
  type ProtocolLimits,
  type SpaceLimits,
  type StatusResult,
  type ToBroker,
} from '../protocol/index.js';
import { InProcessTransport, PassedListener, SocketListener, closeAll, type ListenOptions, type Transport } from '../transport/index.js';
import { Access, type AccessPolicy } from './access.js';
import { Admission } from './admission.js';
import { DEFAULT_FENCE_OPTIONS, checkPidfds, type FenceOptions } from './fence.js';
import { recordDmaRules } from './policy.js';
import { Session } from './session.js';
import { AddressSpace } from './space.js';
import { BROKER_VERSION } from './version.js';
import { wantsWatch } from './watch.js';

export interface BrokerOptions {
  /** Shown to clients in the HELLO reply and in logs. */
  name?: string;
  /** Address spaces to create at once. */
  spaces?: readonly string[];
  limits?: Partial<SpaceLimits>;
  protocol?: Partial<ProtocolLimits>;
  connection?: Partial<ConnectionLimits>;
  /** Uids whose processes may attach as owner. Default: the broker's own uid. (Shorthand for access.owners.) */
  ownerUids?: readonly number[];
  /** Who may attach to the spaces, as what (per space in createSpace). Default: only the broker's uid. */
  access?: AccessPolicy;
  /** A pino logger; default: silent. */
  logger?: Logger;
  /** How clients that may still reach memory after their connection ended are fenced (broker/fence.ts). */
  fence?: Partial<FenceOptions>;
  /**
   * Whether spaces start published (default true). An embedded broker lives and dies with its owner, so
   * its map is authoritative from the start. A broker that may restart while clients keep running (the
   * `mmbroker serve` process) passes false: its spaces wait for their owner's PUBLISH, and subscribers
   * that reconnect meanwhile keep everything they hold (docs/protocol.md, "Guarantees").
   */
  published?: boolean;
  /**
   * Pipelined transactions (feature PIPELINE, docs/protocol.md): the most transactions of one space in
   * flight at once. 1 (the default): one at a time, and the feature is not offered to clients.
   */
  pipeline?: number;
}

/** Anything that can hand out in-process connections: a Broker, to the client library. */
export interface InProcessConnector {
  connectInProcess(): Transport;
}

export class Broker implements InProcessConnector {
  readonly name: string;
  readonly log: Logger;
  private readonly spaceLimits: SpaceLimits;
  private readonly protocolLimits: ProtocolLimits;
  private readonly connectionLimits: ConnectionLimits;
  private readonly access: AccessPolicy;
  private readonly fence: FenceOptions;
  private readonly published: boolean;
  private readonly pipeline: number;
  /** The feature bits this broker grants (all but PIPELINE unless it pipelines). */
  private readonly features: number;
  private readonly accessBySpace = new Map<string, Access>();
  private readonly spacesByName = new Map<string, AddressSpace>();
  private readonly sessions = new Set<Session>();
  private readonly listeners: (SocketListener | PassedListener)[] = [];
  private readonly admission: Admission;
  private nextSessionId = 1;
  private closing = false;

  constructor(opts: BrokerOptions = {}) {
    this.name = opts.name ?? 'memmap-broker';
    this.log = opts.logger ?? pino({ level: 'silent' });
    this.spaceLimits = { ...DEFAULT_SPACE_LIMITS, ...opts.limits };
    this.protocolLimits = { ...DEFAULT_PROTOCOL_LIMITS, ...opts.protocol };
    for (const [key, max] of Object.entries(PROTOCOL_MAXIMA) as [keyof ProtocolLimits, number][]) {
      const v = this.protocolLimits[key];
      if (!Number.isSafeInteger(v) || v < 1 || v > max) throw new InvalidArgError(`protocol limit ${key} must be 1..${max}, not ${v}`);
    }
    if (this.protocolLimits.maxNameBytes !== PROTOCOL_MAXIMA.maxNameBytes) {
      throw new InvalidArgError(`names are ${PROTOCOL_MAXIMA.maxNameBytes} bytes in protocol version ${PROTOCOL_VERSION}`);
    }
    this.connectionLimits = { ...DEFAULT_CONNECTION_LIMITS, ...opts.connection };
    this.fence = { ...DEFAULT_FENCE_OPTIONS, ...opts.fence };
    if (this.fence.policy !== 'kill' && this.fence.policy !== 'wait')
      throw new InvalidArgError(`fence policy must be kill or wait, not ${String(this.fence.policy)}`);
    if (!Number.isSafeInteger(this.fence.timeoutMs) || this.fence.timeoutMs < 0)
      throw new InvalidArgError(`fence timeout must be a whole number of milliseconds, not ${this.fence.timeoutMs}`);
    this.published = opts.published ?? true;
    this.pipeline = opts.pipeline ?? 1;
    if (!Number.isSafeInteger(this.pipeline) || this.pipeline < 1 || this.pipeline > this.spaceLimits.maxQueuedCommits) {
      throw new InvalidArgError(`the pipeline window must be 1..${this.spaceLimits.maxQueuedCommits} transactions, not ${this.pipeline}`);
    }
    this.features = this.pipeline > 1 ? ALL_FEATURES : ALL_FEATURES & ~Feature.PIPELINE;
    this.access = { ...opts.access, ...(opts.ownerUids ? { owners: { uids: [...opts.ownerUids], gids: [...(opts.access?.owners?.gids ?? [])] } } : {}) };
    this.admission = new Admission(this.connectionLimits, this.protocolLimits, {
      mayOwn: (peer) => [...this.accessBySpace.values()].some((a) => a.mayOwn(peer)),
      log: this.log,
    });
    for (const name of opts.spaces ?? []) this.createSpace(name);
  }

  /** Creates an address space; `access` overrides the broker's policy for it, `published` its start state. */
  createSpace(name: string, opts: { access?: AccessPolicy; published?: boolean } = {}): AddressSpace {
    if (this.spacesByName.has(name)) throw new InvalidArgError(`address space ${JSON.stringify(name)} already exists`);
    this.accessBySpace.set(name, new Access({ ...this.access, ...opts.access }));
    const space = new AddressSpace(name, {
      limits: this.spaceLimits,
      maxFrameBytes: this.protocolLimits.maxFrameBytes,
      maxFdsPerFrame: this.protocolLimits.maxFdsPerFrame,
      log: this.log,
      fence: this.fence,
      published: opts.published ?? this.published,
      pipeline: this.pipeline,
    });
    this.spacesByName.set(name, space);
    return space;
  }

  space(name: string): AddressSpace | undefined {
    return this.spacesByName.get(name);
  }

  /** Serves clients on a Unix socket as well (any number of sockets, alongside in-process clients). */
  listen(socketPath: string, opts: ListenOptions = {}): SocketListener {
    return this.serveOn(new SocketListener(socketPath, this.listenOptions(opts)));
  }

  /**
   * Serves clients on a listening socket bound by someone else and handed to this process (socket
   * activation: transport/activation.ts listenFds). Takes ownership of `fd`; never removes the socket file.
   */
  listenOn(fd: number, opts: ListenOptions = {}): PassedListener {
    return this.serveOn(new PassedListener(fd, this.listenOptions(opts)));
  }

  private listenOptions(opts: ListenOptions): ListenOptions {
    return {
      maxFrameBytes: this.protocolLimits.maxFrameBytes,
      maxFdsPerFrame: this.protocolLimits.maxFdsPerFrame,
      maxPendingFds: this.connectionLimits.maxPendingFds,
      maxOutboundBytes: this.connectionLimits.maxOutboundBytes,
      farewell: (reason) => ({ t: Msg.EV_GOODBYE, error: reason.toWire() }),
      ...opts,
    };
  }

  private serveOn<L extends SocketListener | PassedListener>(listener: L): L {
    for (const w of listener.setupWarnings) this.log.warn({ socket: listener.path }, w);
    listener.on('connection', (t) => this.accept(t));
    listener.on('warning', (message, err) => this.log.warn({ socket: listener.path, err }, message));
    this.listeners.push(listener);
    this.log.info({ socket: listener.path, spaces: [...this.spacesByName.keys()] }, 'listening');
    return listener;
  }

  /** A connection to this broker without a socket: the client end of an in-process transport pair. */
  connectInProcess(): Transport {
    if (this.closing) throw new ShutdownError('the broker is shutting down');
    const [brokerEnd, clientEnd] = InProcessTransport.pair(this.protocolLimits.maxFrameBytes);
    this.accept(brokerEnd);
    return clientEnd;
  }

  status(spaceName?: string): StatusResult {
    if (spaceName !== undefined && !this.spacesByName.has(spaceName)) {
      throw new NoSpaceError(`no address space named ${JSON.stringify(spaceName)}`);
    }
    const spaces = spaceName !== undefined ? [this.spacesByName.get(spaceName) as AddressSpace] : [...this.spacesByName.values()];
    return { spaces: spaces.map((s) => s.status()) };
  }

  /** STATUS over a connection: only the spaces the peer may see (see Access.maySee). */
  private statusFor(session: Session, spaceName: string | undefined): StatusResult {
    const visible = (name: string) =>
      (this.accessBySpace.get(name) as Access).maySee(
        session.transport.peer,
        session.spaceName === name && ['owner', 'subscriber', 'observer'].includes(session.state),
      );
    if (spaceName !== undefined && this.spacesByName.has(spaceName) && !visible(spaceName)) {
      throw new PermissionError(`uid ${session.transport.peer.uid} may not see the status of ${JSON.stringify(spaceName)}`);
    }
    const all = this.status(spaceName);
    return { spaces: all.spaces.filter((s) => visible(s.name)) };
  }

  /** Says goodbye to every client, stops listening and closes every backing. */
  async close(): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    for (const l of this.listeners) l.close();
    this.admission.close();
    const err = new ShutdownError('the broker is shutting down');
    for (const space of this.spacesByName.values()) space.close(err);
    const open = [...this.sessions].filter((s) => !s.transport.closed);
    for (const s of open) s.goodbye(err);
    await Promise.race([
      Promise.all(open.map((s) => new Promise<void>((r) => (s.transport.closed ? r() : s.transport.once('close', () => r()))))),
      new Promise((r) => setTimeout(r, 2000).unref()),
    ]);
    for (const s of open) s.transport.destroy();
    this.log.info('broker closed');
  }

  // --- connections ----------------------------------------------------------------------------------

  private accept(transport: Transport): void {
    // Counts, deadlines and descriptor allowances before ATTACH: broker/admission.ts.
    const refused = this.admission.admit(transport);
    if (refused) {
      this.log.warn({ pid: transport.peer.pid, uid: transport.peer.uid, err: refused.message }, 'connection refused: limit');
      transport.end({ t: Msg.EV_GOODBYE, error: refused.toWire() });
      return;
    }
    const session = new Session(this.nextSessionId++, transport, this.connectionLimits);
    this.sessions.add(session);
    this.log.debug({ client: session.id, pid: transport.peer.pid, uid: transport.peer.uid, transport: transport.kind }, 'connected');
    transport.on('frame', (frame) => this.onFrame(session, frame));
    transport.on('close', (reason) => {
      this.admission.release(transport);
      this.sessions.delete(session);
      if (session.spaceName !== undefined) this.spacesByName.get(session.spaceName)?.detach(session);
      session.close();
      if (reason) this.log.warn({ client: session.ref(), code: reason.code, err: reason.message }, 'connection dropped');
      else this.log.debug({ client: session.id }, 'disconnected');
    });
  }

  private onFrame(session: Session, frame: Frame): void {
    this.admission.seen(session.transport);
    let msg: ToBroker;
    try {
      msg = parseToBroker(frame, session.features);
    } catch (err) {
      closeAll(frame.fds);
      const e = toMmbError(err);
      this.log.debug({ client: session.id, code: e.code, err: e.message }, 'refused message');
      const id = requestIdOf(frame);
      if (id !== undefined) session.replyError(id, e);
      else session.send({ t: Msg.EV_ERROR, error: e.toWire() });
      return;
    }
    if (msg.t === Msg.ACK || msg.t === Msg.NACK) {
      this.onAck(session, msg);
      return;
    }
    if (!session.admitRequest()) {
      closeAll(frame.fds);
      session.replyError(msg.id, new RateLimitError(`more than ${this.connectionLimits.requestsPerSecond} requests per second`));
      return;
    }
    let result: Promise<object | undefined>;
    try {
      result = Promise.resolve(this.request(session, msg, frame.fds));
    } catch (err) {
      result = Promise.reject(err);
    }
    // HELLO and ATTACH change what the connection may send: adopt that before any reply goes out.
    this.admission.update(session);
    result.then(
      (r) => {
        if (r !== undefined) session.reply(msg.id, r);
      },
      (err) => {
        const e = toMmbError(err);
        if (!(err instanceof MmbError)) this.log.error({ client: session.id, err }, 'internal error while handling a request');
        session.replyError(msg.id, e);
      },
    );
  }

  /** Handles one request. Returns the REPLY result, or undefined when the handler replied itself. */
  private request(session: Session, msg: Exclude<ToBroker, { t: 16 | 17 }>, fds: number[]): object | Promise<object | undefined> | undefined {
    // The descriptors a request carries are ours until a handler takes them (BACKING_ADD and DELEGATE on
    // success, DIRTY_SYNC once queued): any refusal before that closes them, exactly once.
    try {
      return this.handle(session, msg, fds);
    } catch (err) {
      closeAll(fds);
      throw err;
    }
  }

  private handle(session: Session, msg: Exclude<ToBroker, { t: 16 | 17 }>, fds: number[]): object | Promise<object | undefined> | undefined {
    if (msg.t === Msg.HELLO) {
      if (session.state !== 'new') throw new StateError('HELLO was already exchanged on this connection');
      if (msg.version !== PROTOCOL_VERSION) {
        const err = new VersionError(`protocol version ${msg.version} is not supported; this broker speaks version ${PROTOCOL_VERSION}`);
        session.replyError(msg.id, err);
        session.goodbye(err);
        return undefined;
      }
      session.features = msg.features & this.features;
      session.name = msg.name ?? `pid${session.pid}`;
      session.state = 'ready';
      return {
        version: PROTOCOL_VERSION,
        features: session.features,
        broker: this.name,
        limits: { ...this.protocolLimits },
        ...((session.features & Feature.WATCH) !== 0 ? { brokerVersion: BROKER_VERSION } : {}),
      };
    }
    if (session.state === 'new') throw new StateError('the first message on a connection must be HELLO');
    switch (msg.t) {
      case Msg.STATUS:
        return this.statusFor(session, msg.space);
      case Msg.ATTACH:
        return this.attach(session, msg);
      case Msg.BACKING_ADD:
        if (msg.unsealed !== undefined && (session.features & Feature.TRUSTED_FILE) === 0)
          throw new FeatureError('BACKING_ADD.unsealed needs the TRUSTED_FILE feature');
        return this.ownedSpace(session).addBacking(session, fds[0] as number, msg.name, msg.unsealed ?? false);
      case Msg.BACKING_DROP:
        return this.ownedSpace(session).dropBacking(session, msg.backing);
      case Msg.COMMIT:
        if (msg.ops.length > this.protocolLimits.maxOpsPerCommit) {
          throw new BadMessageError(`COMMIT.ops: ${msg.ops.length} ops exceed this broker's limit of ${this.protocolLimits.maxOpsPerCommit}`);
        }
        return this.ownedSpace(session).commit(session, msg.ops, msg.expect);
      case Msg.REPORT:
        if ((msg.migration !== undefined || msg.dirtyTracking !== undefined) && (session.features & Feature.MIGRATION) === 0) {
          throw new FeatureError('REPORT.migration and REPORT.dirtyTracking need the MIGRATION feature');
        }
        if (msg.dma !== undefined) {
          if ((session.features & Feature.DMA_RULES) === 0) throw new FeatureError('REPORT.dma needs the DMA_RULES feature');
          checkDmaRules(msg.dma); // before anything of the report is taken: a refused REPORT changes nothing
        }
        return recordDmaRules(session, msg.dma, this.attachedSpace(session).report(session, msg));
      case Msg.FIND_FREE: {
        const { t: _t, id: _id, ...req } = msg;
        return this.attachedSpace(session).findFree(req);
      }
      case Msg.DIRTY_SYNC:
        return this.attachedSpace(session).dirtySync(session, msg.regions, fds[0] as number);
      case Msg.PAUSE:
        return this.attachedSpace(session).pause(session, msg.paused);
      case Msg.PUBLISH:
        return this.ownedSpace(session).publish(session);
      case Msg.DETACH:
        return this.attachedSpace(session).leave(session);
      case Msg.DELEGATE:
        checkPidfds(fds);
        return this.attachedSpace(session).delegate(session, msg.names, fds);
      case Msg.HISTORY:
        // Whoever may see a space's status may read its history (statusFor throws otherwise).
        this.statusFor(session, msg.space);
        return (this.spacesByName.get(msg.space) as AddressSpace).events.history(msg);
      case Msg.IOAS:
        if (msg.op === 'commit' && msg.ops.length > this.protocolLimits.maxOpsPerCommit) {
          throw new BadMessageError(`IOAS.ops: ${msg.ops.length} ops exceed this broker's limit of ${this.protocolLimits.maxOpsPerCommit}`);
        }
        return this.attachedSpace(session).ioas.request(session, msg);
    }
  }

  private attach(session: Session, msg: Attach): object | Promise<undefined> {
    if (session.state !== 'ready') throw new StateError('this connection is already attached to an address space');
    const space = this.spacesByName.get(msg.space);
    if (!space) throw new NoSpaceError(`no address space named ${JSON.stringify(msg.space)}`);
    if (msg.resume && (session.features & Feature.RESUME) === 0) throw new FeatureError('ATTACH.resume needs the RESUME feature');
    if (msg.limits?.coalesce && (session.features & Feature.COALESCE) === 0) throw new FeatureError('ATTACH.limits.coalesce needs the COALESCE feature');
    if (msg.limits?.mapsFromZero && (session.features & Feature.MAPS_FROM_ZERO) === 0) {
      throw new FeatureError('ATTACH.limits.mapsFromZero needs the MAPS_FROM_ZERO feature');
    }
    if (msg.pin && (session.features & Feature.PIN) === 0) throw new FeatureError('ATTACH.pin needs the PIN feature');
    if ((msg.role === 'observer' || msg.writes !== undefined) && (session.features & Feature.DIRTY) === 0) {
      throw new FeatureError('the observer role and ATTACH.writes need the DIRTY feature');
    }
    if (msg.token !== undefined && (session.features & Feature.AUTH) === 0) throw new FeatureError('ATTACH.token needs the AUTH feature');
    if (msg.resume?.client !== undefined && (session.features & Feature.FENCE) === 0) throw new FeatureError('ATTACH.resume.client needs the FENCE feature');
    const watch = wantsWatch(session.features, msg);
    (this.accessBySpace.get(msg.space) as Access).check(msg.space, msg.role, session.transport.peer, msg.token);
    session.kind = msg.kind;
    if (msg.role === 'owner') {
      if (msg.resume || msg.limits || msg.pin) throw new StateError('an owner attaches without resume, limits or pin');
      return space.attachOwner(session);
    }
    if (msg.role === 'observer') {
      if (msg.resume || msg.limits || msg.pin) throw new StateError('an observer attaches without resume, limits or pin');
      const attached = space.attachObserver(session);
      if (watch) space.events.watch(session);
      return attached;
    }
    return space.attachSubscriber(session, msg.id, msg).then(() => undefined);
  }

  private ownedSpace(session: Session): AddressSpace {
    const space = session.state === 'owner' && session.spaceName !== undefined ? this.spacesByName.get(session.spaceName) : undefined;
    if (!space) {
      throw session.state === 'subscriber'
        ? new NotOwnerError('a subscriber may not change the map')
        : new StateError('attach as owner before changing the map');
    }
    return space;
  }

  private attachedSpace(session: Session): AddressSpace {
    const space = session.spaceName !== undefined ? this.spacesByName.get(session.spaceName) : undefined;
    if (!space) throw new StateError('attach to an address space first');
    return space;
  }

  private onAck(session: Session, msg: Extract<ToBroker, { t: 16 | 17 }>): void {
    const space = session.state === 'subscriber' && session.spaceName !== undefined ? this.spacesByName.get(session.spaceName) : undefined;
    if (!space) {
      session.send({ t: Msg.EV_ERROR, error: new StateError('only an attached subscriber acks').toWire() });
      return;
    }
    const settled =
      msg.t === Msg.ACK
        ? space.settle(session, msg.seq, { kind: 'ack' })
        : space.settle(session, msg.seq, { kind: 'nack', error: MmbError.fromWire(msg.error) });
    if (!settled) {
      session.send({ t: Msg.EV_ERROR, error: new StaleGenerationError(`no event with seq ${msg.seq} is waiting for an ack`).toWire() });
    }
  }
}
