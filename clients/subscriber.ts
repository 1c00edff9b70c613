// The base subscriber: attaches to an address space, receives backings and map changes, has its kind's
// applier establish them, and acks or nacks every transaction. It reconnects by itself and resumes from
// its last committed generation.
//
// Events, in the order a transaction produces them:
//   'backings'  new backing fds arrived (before the change that needs them);
//   'change'    a change was established; listeners may call event.waitUntil(promise): the ack waits for
//               every such promise, and a rejection turns the ack into a nack (the change is undone);
//   'committed' / 'rolledBack'  the broker's verdict on the transaction;
//   'synced'    an initial sync or a resume was applied;
//   'waiting'   attached to an unpublished space (a restarted broker): everything established is kept
//               until the owner republishes, then a sync reconciles it by key;
//   'disconnected' / 'reconnected', 'goodbye' (the broker said why it closed us), 'error'.
//
// With the broker's TWO_PHASE feature a transaction is applied in two steps: the vote (EV_TXN) only
// establishes new memory that overlaps nothing being removed, so a refusal elsewhere disturbs nothing
// that runs; removals, updates and replacements follow once the broker says every client voted yes
// (EV_COMMITTED with a seq, acked when done). See clients/view.ts splitChange.
import { EventEmitter } from 'eventemitter3';
import { native } from '../native/index.js';
import {
  CancelledError,
  DisconnectedError,
  Feature,
  InvalidArgError,
  UnsupportedError,
  MmbError,
  Msg,
  isMmbError,
  toMmbError,
  type AttachResult,
  type EvSync,
  type IovaMapping,
  type Report,
  type Region,
  type ToClient,
  type TxnOp,
} from '../protocol/index.js';
import { closeAll } from '../transport/index.js';
import { Connection, type BrokerTarget, type ConnectionOptions } from './connection.js';
import { DirtyLog } from './dirty.js';
import { IoasFollower, type IoasEvent } from './ioas.js';
import type { IoasApplier, IoasChange } from './ioas-view.js';
import {
  applyOps,
  applyOpsTo,
  changeAfter,
  changeFromOps,
  diff,
  diffRegions,
  diffSnapshot,
  inverse,
  isEmpty,
  splitChange,
  undoneViews,
  type Applier,
  type ApplyContext,
  type Change,
  type LocalBacking,
  type ViewRegion,
} from './view.js';

/** Attempts of the first attach when the broker evicts the client while it applies the initial map. */
const START_ATTEMPTS = 5;

export interface SubscriberOptions extends ConnectionOptions {
  space: string;
  /** What this client is, for status and logs ("plain", "kvm", "vhost", "vfio"). */
  kind?: string;
  /** The most regions this client can follow; the broker refuses changes beyond it. */
  maxRegions?: number;
  /** Follow a coalesced view: adjacent regions contiguous in one backing arrive merged (few slots). */
  coalesce?: boolean;
  /** This client (or a process it hands memory to) maps each region's backing from offset 0 through the
   *  region's end, as vhost-user back-ends do: the broker then gives it no region whose backing prefix
   *  holds memory the map does not give it writable (feature MAPS_FROM_ZERO; an older broker is refused). */
  mapsFromZero?: boolean;
  /** This client pins every region it maps; `limit` bytes at most (the broker refuses changes beyond). */
  pin?: { limit?: number };
  /** false: this client never writes guest memory (dirty logging then needs nothing from it). Default true. */
  writes?: boolean;
  /** The space's token, when it has one (feature AUTH; see docs/security.md). */
  token?: string;
  /** Reconnect and resume after the connection drops. Default true. */
  reconnect?: boolean;
  /** Delay before the first reconnect attempt; doubles up to 1 s. Default 20 ms. */
  reconnectDelayMs?: number;
}

export interface ChangeEvent {
  readonly change: Change;
  /** Aborted if the change becomes void before it is acked (rolled back, or the subscriber closes). */
  readonly signal: AbortSignal;
  /** Delays the ack until `p` settles; a rejection nacks the transaction with that error. */
  waitUntil(p: Promise<unknown>): void;
}

export interface PauseEvent {
  readonly paused: boolean;
  /** Delays the ack until `p` settles (stop the writers first); a rejection refuses the pause. */
  waitUntil(p: Promise<unknown>): void;
}

export interface SubscriberEvents {
  backings: [backings: LocalBacking[]];
  change: [event: ChangeEvent];
  committed: [generation: number];
  rolledBack: [generation: number];
  synced: [info: { generation: number; mode: 'snapshot' | 'delta'; epoch: string; change: Change }];
  /** Attached to an unpublished space: what is established stays until the owner publishes. */
  waiting: [info: { epoch: string }];
  /** Migration asks this client to stop (or resume) writing guest memory; the ack waits for waitUntil(). */
  pause: [event: PauseEvent];
  disconnected: [reason: MmbError | undefined];
  reconnected: [result: AttachResult];
  goodbye: [reason: MmbError];
  error: [err: MmbError];
  /** An IOAS change was established (feature IOAS; kinds that follow IOASes). */
  ioas: [change: IoasChange];
}

type Event = Exclude<ToClient, { t: typeof Msg.REPLY }>;

export type ClientReport = Omit<Report, 't' | 'id'>;

/** `r` without the fields the connection did not negotiate (an older broker refuses them). */
function reportFor(conn: Connection, r: ClientReport): ClientReport {
  let out = r;
  if ((conn.features & Feature.MIGRATION) === 0) {
    const { migration: _m, dirtyTracking: _d, ...rest } = out;
    out = rest;
  }
  if ((conn.features & Feature.DMA_RULES) === 0) {
    const { dma: _dma, ...rest } = out;
    out = rest;
  }
  return out;
}

/** A promise that rejects with the signal's reason once it is aborted. */
function aborted(signal: AbortSignal): Promise<never> {
  return new Promise((_, reject) => {
    if (signal.aborted) reject(signal.reason);
    else signal.addEventListener('abort', () => reject(signal.reason), { once: true });
  });
}

/** For undoing a change: that must run to the end. */
const NO_CANCEL: ApplyContext = { signal: new AbortController().signal, cancelled: () => false };

/**
 * An AbortController made only when someone asks for its signal. Most changes are established and acked
 * without anyone looking at the signal, and an AbortController costs microseconds to create: on the
 * path of every transaction, that was a tenth of a subscriber's work.
 */
class LazyAbort {
  private controller: AbortController | undefined;
  private reason: unknown;
  private done = false;

  get signal(): AbortSignal {
    if (!this.controller) {
      this.controller = new AbortController();
      if (this.done) this.controller.abort(this.reason);
    }
    return this.controller.signal;
  }

  abort(reason: unknown): void {
    if (this.done) return;
    this.done = true;
    this.reason = reason;
    this.controller?.abort(reason);
  }
}

export class Subscriber extends EventEmitter<SubscriberEvents> {
  readonly space: string;
  readonly kind: string;
  private conn: Connection | undefined;
  private epoch: string | undefined;
  private _generation = 0;
  /** The broker's committed map at `_generation`, by region id. */
  private committed = new Map<number, Region>();
  /** What the applier has established, by region key. */
  private actual = new Map<string, ViewRegion>();
  /** Region id -> key of what is established (what a transaction's ops name). */
  private readonly keyById = new Map<number, string>();
  /**
   * Transactions applied (voted on) and acked but not yet committed or rolled back, oldest first: at most
   * one, unless the broker pipelines (feature PIPELINE). For a two-phase transaction, `commit` is what is
   * left to establish once it is committed; `vote` what its vote established; `after` the map once it is
   * committed (made when a later transaction needs it).
   */
  private pending: { generation: number; ops: readonly TxnOp[]; vote: Change; commit?: Change; after?: Map<number, Region> }[] = [];
  /**
   * Feature PIPELINE: the generation this client refused; later ones are refused too, until it is rolled back
   * or a transaction reuses its number.
   */
  private refused: number | undefined;
  private readonly backings = new Map<number, LocalBacking>();
  /** Dirty bitmaps and the paused state (feature DIRTY). */
  readonly dirty = new DirtyLog();
  private syncParts: EvSync[] = [];
  private chain: Promise<void> = Promise.resolve();
  /** Events queued on `chain` and not yet handled, the one being handled included. */
  private queued = 0;
  private closing = false;
  private syncWaiters: { resolve: () => void; reject: (e: MmbError) => void }[] = [];
  private clientId = 0;
  private lastReport: ClientReport | undefined;
  /** The change the applier is working on right now, and how to stop it. */
  /** The change being established; `unheard()` ends the wait for its listeners (its connection closed). */
  private inflight: { change: Change; abort: LazyAbort; cancelledKeys: Set<string>; unheard: () => void } | undefined;
  private markClosed!: (reason: MmbError) => void;
  /** Rejects when close() is called; aborts waits on listeners' promises. */
  private readonly closed = new Promise<never>((_, reject) => (this.markClosed = reject));
  /** Backing ids received on the current connection (to drop stale ones when the epoch changes). */
  private readonly receivedSinceAttach = new Set<number>();
  /** Dirty bitmaps received on the current connection: every attach brings all the current ones. */
  private readonly bitmapsSinceAttach = new Set<number>();
  private reconnecting = false;
  private starting = false;
  /** Processes named with delegate(): pidfds this subscriber owns, sent again on every connection. */
  private readonly delegates: { name: string; pidfd: number }[] = [];
  /** The I/O address spaces this client's devices are attached to (feature IOAS), when its kind follows them. */
  private ioasFollower: IoasFollower | undefined;

  protected constructor(
    private readonly target: BrokerTarget,
    readonly applier: Applier,
    private readonly opts: SubscriberOptions,
  ) {
    super();
    this.closed.catch(() => undefined);
    this.space = opts.space;
    this.kind = opts.kind ?? 'plain';
  }

  /**
   * Connects with `applier` establishing the map, attaches, and resolves once the initial map has been
   * established and acked.
   */
  static async create(target: BrokerTarget, applier: Applier, opts: SubscriberOptions): Promise<Subscriber> {
    const sub = new Subscriber(target, applier, opts);
    await sub.start();
    return sub;
  }

  /**
   * The first attach. Evicted while establishing the initial map (pinning gigabytes can outlast the ack
   * deadline), it tries again: what it established stays, so the next sync finds nothing left to do and is
   * acked at once. Any other failure closes everything: no connection, mapping or reconnect outlives a
   * failed attach.
   */
  protected async start(): Promise<void> {
    this.starting = true;
    try {
      for (let attempt = 1; ; attempt++) {
        try {
          await this.connect(attempt > 1);
          return;
        } catch (err) {
          if (!isMmbError(err, 'MMB_ERR_DISCONNECTED') || this.opts.reconnect === false || this.closing || attempt >= START_ATTEMPTS) throw err;
          await new Promise((r) => setTimeout(r, this.opts.reconnectDelayMs ?? 20));
        }
      }
    } catch (err) {
      await this.close();
      throw err;
    } finally {
      this.starting = false;
    }
  }

  /** The last generation the broker committed and this client applied. */
  get generation(): number {
    return this._generation;
  }

  /** The broker's id for this connection (changes on reconnect). */
  get id(): number {
    return this.clientId;
  }

  get connected(): boolean {
    return this.conn !== undefined && !this.conn.closed;
  }

  /** Regions as established now, sorted by gpa. */
  regions(): ViewRegion[] {
    return [...this.actual.values()].sort((a, b) => a.gpa - b.gpa);
  }

  backing(id: number): LocalBacking | undefined {
    return this.backings.get(id);
  }

  /**
   * Tells the broker what this client's IOMMU or pinning looks like (feature REPORT): reserved IOVA
   * ranges, remaining DMA mappings, bytes actually pinned, coherency, backend, devices. Remembered and
   * re-sent after a reconnect.
   */
  async report(r: ClientReport): Promise<void> {
    this.lastReport = { ...this.lastReport, ...r };
    if (this.conn && !this.conn.closed) await this.conn.request({ t: Msg.REPORT, ...reportFor(this.conn, r) });
  }

  /**
   * Names processes this client handed guest memory to (feature FENCE): a vhost-user back-end (its pidfd
   * from native.peerPidfd on the back-end's socket), a child (native.pidfdOpen). Should this client's
   * connection end without a clean close(), the broker counts the memory as reachable until they exited
   * too, and under its kill policy kills them with it. Takes ownership of `pidfds`; remembered and named
   * again after a reconnect.
   */
  async delegate(delegates: readonly { name: string; pidfd: number }[]): Promise<void> {
    this.delegates.push(...delegates);
    await this.sendDelegates(this.conn, delegates);
  }

  private async sendDelegates(conn: Connection | undefined, delegates: readonly { name: string; pidfd: number }[]): Promise<void> {
    if (!conn || conn.closed || (conn.features & Feature.FENCE) === 0 || delegates.length === 0) return;
    await conn.request(
      { t: Msg.DELEGATE, names: delegates.map((d) => d.name) },
      delegates.map((d) => d.pidfd),
    );
  }

  /** Kinds whose applier follows I/O address spaces (feature IOAS) call this before start(). */
  protected followIoas(applier: IoasApplier): void {
    this.ioasFollower = new IoasFollower(applier, (c) => this.emit('ioas', c));
  }

  /**
   * Attaches devices to an I/O address space (feature IOAS, docs/ioas.md); resolves with its generation
   * once what it maps is established here. A client follows each IOAS its devices are in.
   */
  attachIoas(ioas: string, devices: readonly string[]): Promise<number> {
    return this.ioasFollowing().attach(this.attachedConnection(), ioas, devices);
  }

  /** Detaches devices from an IOAS; after the last one nothing of it is established here. */
  detachIoas(ioas: string, devices: readonly string[]): Promise<void> {
    return this.ioasFollowing().detach(this.attachedConnection(), ioas, devices);
  }

  /** The IOASes followed, with their devices. */
  ioasAttachments(): ReturnType<IoasFollower['attachments']> {
    return this.ioasFollower?.attachments() ?? [];
  }

  /** The IOVA mappings of `ioas` established here, sorted by IOVA. */
  ioasMappings(ioas: string): IovaMapping[] {
    return this.ioasFollower?.mappings(ioas) ?? [];
  }

  private ioasFollowing(): IoasFollower {
    if (!this.ioasFollower) throw new InvalidArgError(`a ${this.kind} subscriber does not follow I/O address spaces`);
    return this.ioasFollower;
  }

  private attachedConnection(): Connection {
    if (!this.conn || this.conn.closed) throw new DisconnectedError('the subscriber is not connected');
    return this.conn;
  }

  /** Drops the connection without unmapping anything (as a crash of the link would); it reconnects if enabled. */
  dropConnection(): void {
    this.conn?.transport.destroy();
  }

  /**
   * Detaches: has the applier release everything, closes backing fds, then the connection. With the
   * broker's FENCE feature it first says DETACH, so the broker sends nothing more and knows that once the
   * connection closes this client holds nothing (it is not fenced; without DETACH the broker counts a
   * closed connection of a live process as holding what it had).
   */
  async close(): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    this.markClosed(new DisconnectedError('the subscriber is closing'));
    this.inflight?.abort.abort(new CancelledError('the subscriber is closing'));
    const conn = this.conn;
    const detaching = conn !== undefined && !conn.closed && (conn.features & Feature.FENCE) !== 0;
    if (detaching) await conn.request({ t: Msg.DETACH }).catch(() => undefined);
    else conn?.close();
    await this.chain;
    await this.applier.close?.();
    this.ioasFollower?.close();
    this.actual.clear();
    this.keyById.clear();
    closeAll([...this.backings.values()].map((b) => b.fd));
    this.backings.clear();
    this.dirty.close();
    closeAll(this.delegates.splice(0).map((d) => d.pidfd));
    if (detaching) conn.close();
    for (const w of this.syncWaiters) w.reject(new DisconnectedError('the subscriber was closed'));
    this.syncWaiters = [];
  }

  // --- connection management ------------------------------------------------------------------------

  private async connect(resume: boolean): Promise<void> {
    const conn = await Connection.open(this.target, this.opts);
    this.receivedSinceAttach.clear();
    this.bitmapsSinceAttach.clear();
    if (this.closing) {
      conn.close();
      throw new DisconnectedError('the subscriber was closed while connecting');
    }
    if (this.opts.mapsFromZero && (conn.features & Feature.MAPS_FROM_ZERO) === 0) {
      conn.close();
      throw new UnsupportedError(
        'the broker is older: it does not offer MAPS_FROM_ZERO, so it could give this client regions whose backing prefix (which it maps from offset 0) holds memory the map does not give it',
      );
    }
    this.conn = conn;
    conn.on('event', (msg, fds) => this.onEvent(conn, msg, fds));
    conn.on('close', (reason) => this.onClose(conn, reason));
    const synced = new Promise<void>((resolve, reject) => this.syncWaiters.push({ resolve, reject }));
    synced.catch(() => undefined);
    let result: AttachResult;
    try {
      const useResume = resume && this.epoch !== undefined && (conn.features & Feature.RESUME) !== 0;
      result = (await conn.request({
        t: Msg.ATTACH,
        space: this.space,
        role: 'subscriber',
        kind: this.kind,
        ...(this.opts.token !== undefined ? { token: this.opts.token } : {}),
        ...(this.opts.maxRegions !== undefined || this.opts.coalesce || this.opts.mapsFromZero
          ? {
              limits: {
                ...(this.opts.maxRegions !== undefined ? { maxRegions: this.opts.maxRegions } : {}),
                ...(this.opts.coalesce ? { coalesce: true } : {}),
                ...(this.opts.mapsFromZero ? { mapsFromZero: true } : {}),
              },
            }
          : {}),
        ...(this.opts.pin ? { pin: this.opts.pin.limit !== undefined ? { limit: this.opts.pin.limit } : {} } : {}),
        ...(this.opts.writes === false && (conn.features & Feature.DIRTY) !== 0 ? { writes: false } : {}),
        ...(useResume
          ? {
              resume: {
                epoch: this.epoch as string,
                generation: this._generation,
                backings: [...this.backings.keys()],
                // So the broker knows the connection this one resumes is let go once this sync is acked.
                ...((conn.features & Feature.FENCE) !== 0 && this.clientId !== 0 ? { client: this.clientId } : {}),
              },
            }
          : {}),
      })) as AttachResult;
    } catch (err) {
      this.syncWaiters = [];
      conn.close();
      throw err;
    }
    this.clientId = result.client;
    if (result.sync === 'wait') this.emit('waiting', { epoch: result.epoch });
    try {
      // Before the sync is acked, so the broker knows this client's constraints from the first transaction on.
      if (this.lastReport) await conn.request({ t: Msg.REPORT, ...reportFor(conn, this.lastReport) });
      await this.sendDelegates(conn, this.delegates);
    } catch (err) {
      // No connection outlives a failed attach (the reconnect loop opens the next one).
      this.syncWaiters = [];
      conn.close();
      throw err;
    }
    await synced;
    try {
      // Its IOASes too, after the map their mappings point into.
      await this.ioasFollower?.reattach(conn);
    } catch (err) {
      if (!isMmbError(err, 'MMB_ERR_NO_IOAS')) {
        conn.close();
        throw err;
      }
      this.emit('error', toMmbError(err));
    }
    if (resume) this.emit('reconnected', result);
  }

  private onClose(conn: Connection, reason: MmbError | undefined): void {
    if (conn !== this.conn) return;
    this.syncParts = [];
    for (const w of this.syncWaiters) w.reject(new DisconnectedError('the connection closed before the sync completed', reason ? { cause: reason } : {}));
    this.syncWaiters = [];
    if (this.closing) return;
    // Nobody can hear the ack of a change of that connection: its listeners are no longer waited for, so
    // the resync after the reconnect is not queued behind a listener that holds it (the reconcile the
    // broker waits for would never come). What it established stays: the resync reconciles it by key,
    // keeping what the map still has and undoing the rest, as after any connection lost mid-change.
    this.inflight?.unheard();
    this.emit('disconnected', reason);
    // During the first attach, start() decides whether to try again.
    if (this.opts.reconnect === false || this.starting) return;
    void this.reconnectLoop();
  }

  /**
   * One loop at a time: a connection that closes while the loop is still connecting (evicted during its
   * resync) makes onClose call here again, and a second loop would attach a second connection.
   */
  private async reconnectLoop(): Promise<void> {
    if (this.reconnecting) return;
    this.reconnecting = true;
    try {
      let delay = this.opts.reconnectDelayMs ?? 20;
      while (!this.closing) {
        await new Promise((r) => setTimeout(r, delay));
        if (this.closing) return;
        try {
          await this.connect(true);
          // It may have closed again right after its sync was acked: then go on trying.
          if (this.connected) return;
        } catch (err) {
          if (!isMmbError(err, 'MMB_ERR_CONNECT') && !isMmbError(err, 'MMB_ERR_DISCONNECTED')) this.emit('error', toMmbError(err));
        }
        delay = Math.min(delay * 2, 1000);
      }
    } finally {
      this.reconnecting = false;
    }
  }

  // --- events ---------------------------------------------------------------------------------------

  private enqueue(work: () => void | Promise<void>): void {
    this.queued++;
    this.chain = this.chain
      .then(work)
      .catch((err) => {
        this.emit('error', toMmbError(err));
      })
      .then(() => {
        this.queued--;
      });
  }

  private onEvent(conn: Connection, msg: Event, fds: number[]): void {
    if (this.closing) {
      // Leaving: nothing more is applied (the broker stopped waiting for us when we said DETACH).
      closeAll(fds);
      return;
    }
    switch (msg.t) {
      case Msg.EV_BACKINGS:
        this.enqueue(() => this.addBackings(msg.backings, fds));
        return;
      case Msg.EV_BACKINGS_GONE:
        this.enqueue(() => {
          for (const id of msg.backings) {
            const b = this.backings.get(id);
            if (!b) continue;
            this.backings.delete(id);
            closeAll([b.fd]);
          }
        });
        return;
      case Msg.EV_SYNC:
        this.syncParts.push(msg);
        if (!msg.last) return;
        {
          const parts = this.syncParts;
          this.syncParts = [];
          this.enqueue(() => this.onSync(conn, parts));
        }
        return;
      case Msg.EV_TXN:
        // Not with PIPELINE: a transaction of a window may still be rolled back, and a region it removes
        // must then be fully established (pinned) after all.
        if ((conn.features & Feature.PIPELINE) === 0) this.cancelRemoved(msg.ops);
        this.enqueue(() => this.onTxn(conn, msg.seq, msg.generation, msg.ops));
        return;
      case Msg.EV_ROLLBACK:
        // The transaction being applied right now is void: stop it early (its nack is then truthful).
        if (this.inflight?.change.cause === 'txn' && this.inflight.change.generation === msg.generation) {
          this.inflight.abort.abort(new CancelledError(`generation ${msg.generation} was rolled back`));
        }
        this.enqueue(() => this.onRollback(conn, msg.seq, msg.generation));
        return;
      case Msg.EV_COMMITTED:
        this.enqueue(() => this.onCommitted(conn, msg.generation, msg.seq));
        return;
      case Msg.EV_BITMAPS:
        this.enqueue(() => {
          this.dirty.add(msg.bitmaps, fds);
          for (const b of msg.bitmaps) this.bitmapsSinceAttach.add(b.bitmap);
        });
        return;
      case Msg.EV_BITMAPS_GONE:
        this.enqueue(() => this.dirty.remove(msg.bitmaps));
        return;
      case Msg.EV_DIRTY_FLUSH:
        this.enqueue(async () => {
          try {
            await this.dirty.flush(() => this.applier.flushDirty?.(this.dirty));
            this.ack(conn, msg.seq);
          } catch (err) {
            this.nack(conn, msg.seq, err);
          }
        });
        return;
      case Msg.EV_PAUSE:
        this.enqueue(() => this.onPause(conn, msg.seq, msg.paused));
        return;
      case Msg.EV_DIRTY:
        return;
      case Msg.EV_IOAS_SYNC:
      case Msg.EV_IOAS_TXN:
      case Msg.EV_IOAS_COMMITTED:
      case Msg.EV_IOAS_ROLLBACK: {
        const follower = this.ioasFollower;
        if (follower) this.enqueue(() => follower.handle(conn, msg as IoasEvent));
        else if ('seq' in msg && msg.seq !== undefined)
          this.nack(conn, msg.seq, new InvalidArgError(`a ${this.kind} subscriber does not follow I/O address spaces`));
        return;
      }
      case Msg.EV_GOODBYE:
        this.emit('goodbye', MmbError.fromWire(msg.error));
        return;
      case Msg.EV_ERROR:
        this.emit('error', MmbError.fromWire(msg.error));
        return;
    }
  }

  private async onPause(conn: Connection, seq: number, paused: boolean): Promise<void> {
    const was = this.dirty.paused;
    this.dirty.setPaused(paused);
    const waits: Promise<unknown>[] = [];
    this.emit('pause', { paused, waitUntil: (p) => void waits.push(p) });
    try {
      if (waits.length > 0) await Promise.race([Promise.all(waits), this.closed]);
      this.ack(conn, seq);
    } catch (err) {
      this.dirty.setPaused(was);
      this.nack(conn, seq, err);
    }
  }

  /** A queued transaction removes regions the in-flight change is still establishing: tell the applier. */
  private cancelRemoved(ops: readonly TxnOp[]): void {
    const inflight = this.inflight;
    if (!inflight) return;
    for (const op of ops) {
      if (op.op !== 'remove') continue;
      for (const r of inflight.change.added) if (r.id === op.region) inflight.cancelledKeys.add(r.key);
    }
  }

  private addBackings(infos: { backing: number; size: number; name: string }[], fds: number[]): void {
    const added: LocalBacking[] = [];
    infos.forEach((info, i) => {
      const fd = fds[i] as number;
      const st = native.fstat(fd);
      const old = this.backings.get(info.backing);
      if (old) closeAll([old.fd]);
      const b: LocalBacking = { id: info.backing, name: info.name, size: info.size, fd, dev: st.dev, ino: st.ino };
      this.backings.set(b.id, b);
      this.receivedSinceAttach.add(b.id);
      added.push(b);
    });
    this.emit('backings', added);
  }

  private async onSync(conn: Connection, parts: EvSync[]): Promise<void> {
    const first = parts[0] as EvSync;
    const { seq, generation, mode, epoch } = first;
    if (epoch !== this.epoch) {
      // A new epoch (first attach, or the broker restarted): ids from before mean nothing. Established
      // regions are matched by backing inode instead, so the old fds are not needed.
      for (const [id, b] of this.backings) {
        if (this.receivedSinceAttach.has(id)) continue;
        this.backings.delete(id);
        closeAll([b.fd]);
      }
    }
    let target = new Map<number, Region>();
    const change = await this.establish(conn, seq, () => {
      // A snapshot (the large syncs: a new subscriber, a broker restart) in one pass (view.ts diffSnapshot).
      const snapshot = mode === 'snapshot' ? diffSnapshot(this.actual, parts, this.backings, generation) : undefined;
      if (snapshot) {
        target = snapshot.target;
        return snapshot.change;
      }
      if (mode === 'delta') {
        target = new Map(this.committed);
        for (const p of parts) for (const id of p.removed) target.delete(id);
      }
      for (const p of parts) {
        for (const r of p.regions) target.set(r.id, r);
        // Feature COMPACT_SYNC: the part's regions came as columns (decoded and checked by the protocol layer).
        if (p.columns) for (const r of p.columns) target.set(r.id, r);
      }
      return this.fullChange(target, generation, 'sync');
    });
    if (!change) return;
    // The broker sent every current bitmap before this sync; any other is from an earlier connection
    // (a region that stopped logging meanwhile, or a broker that restarted) and nobody collects it.
    this.dirty.retain(this.bitmapsSinceAttach);
    this.committed = target;
    this._generation = generation;
    this.pending = [];
    this.refused = undefined;
    this.epoch = epoch;
    this.emit('synced', { generation, mode, epoch, change });
    const w = this.syncWaiters.shift();
    w?.resolve();
  }

  private async onTxn(conn: Connection, seq: number, generation: number, ops: readonly TxnOp[]): Promise<void> {
    const twoPhase = (conn.features & Feature.TWO_PHASE) !== 0;
    const pipelined = (conn.features & Feature.PIPELINE) !== 0;
    if (this.refused !== undefined && generation > this.refused) {
      // It follows one we refused: the broker rolls both back. Nothing is done for it.
      this.nack(conn, seq, new CancelledError(`generation ${generation} follows generation ${this.refused}, which this client refused`));
      return;
    }
    // A transaction that reuses the refused number: that one is over (a refusal the broker ran alone, not
    // in a window, gets its refuser no EV_ROLLBACK).
    this.refused = undefined;
    const ahead = pipelined && this.pending.length > 0;
    // Pipelined behind transactions not committed yet: the change is made against the map they leave, and
    // (two-phase) adds where their commits remove something wait for this one's commit.
    const base = ahead ? this.mapAfter(this.pending.length - 1) : undefined;
    const removing = ahead && twoPhase ? this.pending.flatMap((p) => p.commit?.removed ?? []) : [];
    let commit: Change | undefined;
    // The common case costs O(ops): what is established is the committed map, so the change follows from
    // the ops alone. Anything unusual (a transaction still pending) falls back to a full diff.
    const change = await this.establish(
      conn,
      seq,
      () => {
        const full = base
          ? changeAfter(ops, base, this.backings, generation)
          : this.pending.length === 0
            ? changeFromOps(ops, this.committed, this.actual, this.keyById, this.backings, generation)
            : this.fullChange(applyOps(this.committed, ops), generation, 'txn');
        if (!twoPhase) return full;
        const phases = splitChange(full, (this.opts.maxRegions ?? Number.POSITIVE_INFINITY) - this.actual.size, removing);
        commit = phases.commit;
        return phases.vote;
        // One 'change' event per part that does something, and one for a transaction that does nothing.
      },
      () => commit !== undefined && !isEmpty(commit),
      () => commit,
    );
    if (!change) {
      if (pipelined) this.refused = generation;
      return;
    }
    const entry = { generation, ops, vote: change, ...(commit ? { commit } : {}) };
    if (ahead) this.pending.push(entry);
    else this.pending = [entry];
  }

  /** Feature PIPELINE: the map once pending transaction `i` and those before it are committed. */
  private mapAfter(i: number): Map<number, Region> {
    const p = this.pending[i] as (typeof this.pending)[number];
    p.after ??= applyOps(i === 0 ? this.committed : this.mapAfter(i - 1), p.ops);
    return p.after;
  }

  /**
   * The broker committed `generation`. A two-phase transaction (`seq` set) now gets the rest of its change
   * established (removals, updates, replacements) and acked; a failure there nacks, and the broker fences
   * this client, since it may still reach what it failed to remove.
   */
  private async onCommitted(conn: Connection, generation: number, seq: number | undefined): Promise<void> {
    // Commits come in order: it is the oldest pending transaction.
    const pending = this.pending[0]?.generation === generation ? this.pending[0] : undefined;
    if (seq !== undefined) {
      if (pending?.commit && !isEmpty(pending.commit)) {
        const rest = pending.commit;
        if (!(await this.establish(conn, seq, () => rest))) return;
      } else this.ack(conn, seq);
    }
    if (!pending) return;
    applyOpsTo(this.committed, pending.ops);
    this._generation = generation;
    this.pending.shift();
    this.emit('committed', generation);
  }

  private async onRollback(conn: Connection, seq: number, generation: number): Promise<void> {
    if (this.refused !== undefined && generation <= this.refused) this.refused = undefined;
    const i = this.pending.findIndex((p) => p.generation === generation);
    if (i < 0) {
      // Nothing of that transaction is established here: acking is truthful.
      this.ack(conn, seq);
      return;
    }
    // Feature PIPELINE: rollbacks come newest first, so this one is the newest pending; were newer ones still
    // pending, they would be void too (they were voted on against the map this one leaves).
    const undone = this.pending.slice(i).reverse();
    const staged = undone.flatMap((p) => p.commit?.added ?? []);
    // What their votes staged (mapped, pinned) for the commits goes first: once the broker has this ack, the
    // owner hears of the refusal, and nothing of the rolled-back transactions may be mapped or pinned here.
    if (staged.length > 0) await this.applier.unstage?.(staged);
    const change = await this.establish(conn, seq, () =>
      this.pending.length === 1
        ? this.fullChange(this.committed, generation, 'rollback')
        : diff(
            this.actual,
            undoneViews(
              this.actual,
              undone.map((p) => p.vote),
            ),
            generation,
            'rollback',
          ),
    );
    if (change) {
      this.pending.splice(i);
      for (const p of undone) this.emit('rolledBack', p.generation);
    }
  }

  /** The change that makes what is established equal `target` (O(map)). */
  private fullChange(target: ReadonlyMap<number, Region>, generation: number, cause: Change['cause']): Change {
    return diffRegions(this.actual, target.values(), this.backings, generation, cause);
  }

  /**
   * Establishes the change `compute` returns and acks `seq`; on failure (computing or applying) leaves
   * everything as it was and nacks. Returns the change on success.
   */
  /**
   * `quiet()`: true when an empty change should not be announced (another part of the transaction will be).
   * `later()`: for a two-phase vote, the commit's part, which the applier checks now (Applier.check).
   */
  private async establish(
    conn: Connection,
    seq: number,
    compute: () => Change,
    quiet?: () => boolean,
    later?: () => Change | undefined,
  ): Promise<Change | undefined> {
    let change: Change;
    const abort = new LazyAbort();
    const cancelledKeys = new Set<string>();
    let unheard = () => {};
    const connectionLost = new Promise<void>((resolve) => (unheard = resolve));
    try {
      change = compute();
      this.inflight = { change, abort, cancelledKeys, unheard };
      const ctx: ApplyContext = {
        get signal() {
          return abort.signal;
        },
        cancelled: (key) => cancelledKeys.has(key),
      };
      // IOVA mappings into memory going away go first (only after a re-sync: the broker refuses that otherwise).
      if (this.ioasFollower && change.removed.length > 0) await this.ioasFollower.letGo(change.removed);
      if (!isEmpty(change)) await this.applier.apply(change, this.backings, ctx);
      const commit = later?.();
      if ((change.staged?.length && this.applier.stage) || (commit && !isEmpty(commit) && this.applier.check)) {
        let staged = false;
        try {
          if (change.staged?.length && this.applier.stage) {
            await this.applier.stage(change.staged, this.backings, ctx);
            staged = true;
          }
          if (commit && !isEmpty(commit)) await this.applier.check?.(commit, this.backings);
        } catch (err) {
          if (staged) await this.applier.unstage?.(change.staged ?? []);
          if (!isEmpty(change)) await this.applier.apply(inverse(change), this.backings, NO_CANCEL);
          throw err;
        }
      }
    } catch (err) {
      this.inflight = undefined;
      this.nack(conn, seq, err);
      return undefined;
    }
    const waits: Promise<unknown>[] = [];
    if (!(isEmpty(change) && !change.staged?.length && quiet?.()))
      this.emit('change', {
        change,
        get signal() {
          return abort.signal;
        },
        waitUntil: (p) => void waits.push(p),
      });
    try {
      // A listener's promise that never settles must not keep close() or a rollback waiting forever.
      if (waits.length > 0) await Promise.race([Promise.all(waits), this.closed, aborted(abort.signal), connectionLost]);
    } catch (err) {
      try {
        if (!isEmpty(change)) await this.applier.apply(inverse(change), this.backings, NO_CANCEL);
        if (change.staged?.length) await this.applier.unstage?.(change.staged);
      } catch (undoErr) {
        this.emit('error', toMmbError(undoErr));
      }
      this.nack(conn, seq, err);
      return undefined;
    } finally {
      this.inflight = undefined;
    }
    for (const r of change.removed) {
      this.actual.delete(r.key);
      if (this.keyById.get(r.id) === r.key) this.keyById.delete(r.id);
    }
    for (const { before, after } of change.updated) {
      this.actual.set(after.key, after);
      if (this.keyById.get(before.id) === before.key) this.keyById.delete(before.id);
      this.keyById.set(after.id, after.key);
    }
    for (const r of change.added) {
      this.actual.set(r.key, r);
      this.keyById.set(r.id, r.key);
    }
    this.ack(conn, seq);
    return change;
  }

  private ack(conn: Connection, seq: number): void {
    if (conn.closed) return;
    conn.send({ t: Msg.ACK, seq });
    this.answered(conn);
  }

  private nack(conn: Connection, seq: number, err: unknown): void {
    const e = toMmbError(err);
    if (conn.closed) return;
    conn.send({ t: Msg.NACK, seq, error: e.toWire() });
    this.answered(conn);
  }

  /**
   * Answers are batched only while more events wait in the queue (transactions that arrived together, as a
   * pipelined window's do: their acks leave in one write); the last one goes out at once, before this
   * client emits anything about it ('synced', 'committed'), so whoever hears of it can count on the broker
   * having the answer on its way.
   */
  private answered(conn: Connection): void {
    if (this.queued <= 1) conn.flush();
  }
}
