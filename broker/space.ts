// One address space: the versioned map, its backings, its owner and subscribers, and the machinery that
// makes every change all-or-nothing and "done" mean done.
//
// Work on a space is serial: commits, attaches and publishes run one at a time from a queue, so a
// subscriber's initial sync never interleaves with a transaction in flight.
//
// A commit, in order (docs/protocol.md, "Guarantees"):
//   1. plan: validate the ops against the committed map and every subscriber's declared limits; any
//      problem is a typed error and nothing was sent to anyone;
//   2. vote: send each subscriber the backings it lacks (EV_BACKINGS, fds attached), then EV_TXN, to all
//      at once, and wait for every answer up to the ack deadline. A two-phase subscriber (feature
//      TWO_PHASE) only adds in this phase (maps and pins new memory); one without the feature applies
//      everything. A subscriber that misses the deadline is evicted (and, under the kill policy, killed);
//   3. fence: every client whose connection ended while it may still reach memory this transaction takes
//      away (a removal, a region made read-only) must be fenced first (broker/fence.ts); if one cannot
//      be, the transaction fails with MMB_ERR_NOT_FENCED and is rolled back;
//   4a. commit: the map changes, the generation advances; EV_COMMITTED goes out, and two-phase subscribers
//      now remove and reshape and ack that; one that fails is evicted and fenced; the owner gets the new
//      generation only then, with the backings nobody can reach any more;
//   4b. any refusal: EV_ROLLBACK to everyone who applied it, wait for their acks (evicting and fencing who
//      fails), and the owner gets one typed error naming the refusing client and its cause.
//
// A space starts published (an embedded broker shares its owner's fate) or unpublished (a broker
// process that may restart under running clients): until its owner publishes, attaching subscribers
// keep what they hold and wait, and the owner's commits change only the map.
import { randomBytes } from 'node:crypto';
import type { Logger } from 'pino';
import {
  ClientLimitError,
  ClientTimeoutError,
  CommittedUnfencedError,
  Feature,
  NotFencedError,
  DEFAULT_PROTOCOL_LIMITS,
  DisconnectedError,
  Msg,
  NotOwnerError,
  OwnerExistsError,
  PinBudgetError,
  StateError,
  StaleGenerationError,
  TooBusyError,
  createError,
  exposedPrefix,
  isErrorCode,
  type Attach,
  type AttachResult,
  type BackingAddResult,
  type BackingDropResult,
  type CommitOp,
  type ClientRef,
  type CommitResult,
  type DirtySyncResult,
  type PauseResult,
  type PublishResult,
  type ErrorCode,
  type FindFree,
  type FindFreeResult,
  type Report,
  type ReportResult,
  type MmbError,
  type Region,
  type SpaceLimits,
  type StatusSpace,
  type Iova,
  fromInclusive,
  iovaOfGpa,
  rangesOverlap,
  toInclusive,
} from '../protocol/index.js';
import { BackingTable, type Backing } from './backings.js';
import { History } from './history.js';
import { MemoryMap, type Plan } from './map.js';
import { SharedEvent, describeClient, type AckResult, type Session, type SubscriberSession } from './session.js';
import { splitSync } from './sync.js';
import { coalesce, viewOps } from './coalesce.js';
import { findFree } from './placement.js';
import { backingPrefixError, checkSubscribers, type FromZero } from './policy.js';
import { DirtyLogging } from './dirty-log.js';
import { DEFAULT_FENCE_OPTIONS, Fences, type FenceOptions, type Holder, type HolderReason } from './fence.js';
import { IoSpaces } from './ioas.js';
import { Pipeline, type FanOutResult } from './pipeline.js';
import { PAGE_SIZE } from '../native/index.js';
import { SpaceEvents } from './watch.js';

const sum = (rs: readonly Region[]) => rs.reduce((n, r) => n + r.size, 0);

/** The backings `regions` use, each with whether a writable region among them needs it. */
function accessOf(regions: readonly Region[]): Map<number, boolean> {
  const out = new Map<number, boolean>();
  for (const r of regions) out.set(r.backing, (out.get(r.backing) ?? false) || !r.readonly);
  return out;
}

/** Codes a subscriber's nack may carry through to the owner unchanged; anything else becomes CLIENT_REFUSED. */
const LOCAL_ONLY: ReadonlySet<ErrorCode> = new Set<ErrorCode>([
  'MMB_ERR_CONNECT',
  'MMB_ERR_DISCONNECTED',
  'MMB_ERR_TIMEOUT',
  'MMB_ERR_INVALID_ARG',
  'MMB_ERR_SHUTDOWN',
]);

export interface SpaceOptions {
  limits: SpaceLimits;
  maxFrameBytes?: number;
  maxFdsPerFrame?: number;
  log: Logger;
  /** How clients that may still reach memory are fenced (default: kill, 10 s). */
  fence?: FenceOptions;
  /**
   * Whether the map is authoritative from the start (default true: an embedded broker dies with its
   * owner). A broker process that can restart under running clients starts unpublished: see PUBLISH.
   */
  published?: boolean;
  /**
   * The most transactions in flight at once (feature PIPELINE, broker/pipeline.ts). 1 (the default): one at
   * a time, and the feature is not offered.
   */
  pipeline?: number;
}

/** The backings whose memory a transaction takes away: removed regions', and regions made read-only. */
function takenBackings(plan: Plan): Set<number> {
  const out = new Set(plan.removes.map((r) => r.backing));
  for (const x of plan.sets) if (x.after.readonly && !x.before.readonly) out.add(x.after.backing);
  return out;
}

interface Vote {
  results: Map<SubscriberSession, AckResult>;
  views: Map<SubscriberSession, Region[]>;
  /** The subscribers whose ops only added: their vote established everything, no finish round for them. */
  addOnly: Set<SubscriberSession>;
  /** Rolled back because a client dropped holding what the transaction takes away: vote again. */
  retry?: true;
}

const describeHolders = (hs: readonly Holder[]) =>
  hs
    .map(
      (h) => `${h.ref.kind} client ${JSON.stringify(h.ref.name)} (#${h.ref.id}, pid ${h.ref.pid}${h.alive.length > 0 ? `; alive: ${h.alive.join(', ')}` : ''})`,
    )
    .join(', ');

export class AddressSpace {
  /** Changes whenever the space is (re)created: generations are only comparable within one epoch. */
  readonly epoch: string = `${Date.now().toString(36)}-${randomBytes(6).toString('hex')}`;
  private _generation = 0;
  private readonly map = new MemoryMap();
  readonly backings: BackingTable;
  private readonly history: History;
  private owner: Session | undefined;
  private readonly subscribers = new Set<SubscriberSession>();
  private tail: Promise<unknown> = Promise.resolve();
  private queued = 0;
  /** Work items (commits, attaches) queued or running. */
  private pendingWork = 0;
  private readonly log: Logger;
  private readonly limits: SpaceLimits;
  private readonly maxFrameBytes: number;
  private readonly maxFdsPerFrame: number;
  private closed = false;
  private readonly dirtyLog: DirtyLogging;
  private _published: boolean;
  /** Subscribers attached to the space while it is unpublished, with their ATTACH, waiting for PUBLISH. */
  private readonly waiting = new Map<SubscriberSession, { requestId: number; msg: Attach; replied: boolean }>();
  /** Clients whose connection ended while they may still reach memory (broker/fence.ts). */
  readonly fences: Fences;
  /** The I/O address spaces beside the map (feature IOAS, broker/ioas.ts): they share this queue and fences. */
  readonly ioas: IoSpaces;
  /** Holders of subscribers that sent DETACH, fenced when their connection closes. */
  private readonly leaving = new Map<SubscriberSession, Holder>();
  /**
   * Set while a commit waits for holders to be fenced (before its vote, and after its finish round): a
   * holder that reconnects then is synced at once instead of queueing behind that commit (its reconcile is
   * what the commit waits for). See resumeHolder().
   */
  private fenceWindow = false;
  /** Syncs of resuming holders that arrived while a transaction ran outside its fence window (resumeHolder()). */
  private readonly resumers = new Set<() => Promise<unknown>>();
  /** What happens here, as it happens: for watchers, HISTORY and metrics (broker/watch.ts, broker/metrics.ts). */
  readonly events: SpaceEvents;
  /** Pipelined transactions in flight (feature PIPELINE): the map holds their plans until they commit or are void. */
  private readonly pipeline: Pipeline;

  constructor(
    readonly name: string,
    opts: SpaceOptions,
  ) {
    this.limits = opts.limits;
    this.maxFrameBytes = opts.maxFrameBytes ?? DEFAULT_PROTOCOL_LIMITS.maxFrameBytes;
    this.maxFdsPerFrame = opts.maxFdsPerFrame ?? DEFAULT_PROTOCOL_LIMITS.maxFdsPerFrame;
    this.backings = new BackingTable(opts.limits.maxBackings);
    this.history = new History(opts.limits.historyLength);
    this.log = opts.log.child({ space: name });
    this._published = opts.published ?? true;
    this.events = new SpaceEvents(this, opts.limits.historyLength, this.maxFrameBytes);
    this.fences = new Fences(opts.fence ?? DEFAULT_FENCE_OPTIONS, this.log, (h) => (this.events.emit('fenced', h), this.releaseUnused(h.backings)));
    // eslint-disable-next-line @typescript-eslint/no-this-alias
    const space = this;
    this.dirtyLog = new DirtyLogging({
      log: this.log,
      maxFrameBytes: this.maxFrameBytes,
      maxFdsPerFrame: this.maxFdsPerFrame,
      subscribers: () => this.subscribers,
      lookup: (ref) => this.map.lookup(ref),
      fanOut: async (targets, send, generation) => (await this.fanOut(targets, send, generation)).results,
      evict: (s, err) => this.evict(s, err),
      get generation() {
        return space._generation;
      },
    });
    this.ioas = new IoSpaces({
      name,
      log: this.log,
      limits: this.limits,
      maxFrameBytes: this.maxFrameBytes,
      fences: this.fences,
      regions: () => this.map.regions(),
      isSubscriber: (s) => this.isAttached(s, false),
      isOwner: (s) => this.owner === s,
      admitCommit: () => this.admitCommit(),
      enqueue: (work, counted) => this.enqueue(work, counted),
      resumeHolder: (session, run) => this.resumeHolder(session, run),
      fenceHolders: (holders, generation) => this.fenceHolders(holders, generation),
      runVote: (...args) => this.runVote(...args),
      finish: (...args) => this.finish(...args),
      committedUnfenced: (...args) => this.committedUnfenced(...args),
      evict: (s, err) => this.evict(s, err),
      refusal: (client, cause, generation) => this.refusal(client, cause, generation),
    });
    this.pipeline = new Pipeline(
      {
        log: this.log,
        ackTimeoutMs: this.limits.ackTimeoutMs,
        map: this.map,
        fences: this.fences,
        subscribers: () => this.subscribers,
        isSubscribed: (s) => this.subscribers.has(s),
        fanOut: (...args) => this.fanOut(...args),
        maxFrameBytes: this.maxFrameBytes,
        access: (plan) => accessOf(plan.adds),
        sendBackings: (s, access) => this.sendBackings(s, access),
        evict: (s, err) => this.evict(s, err),
        refusal: (...args) => this.refusal(...args),
        committedUnfenced: (...args) => this.committedUnfenced(...args),
        describeHolders,
        committed: (plan, generation) => this.apply(plan, generation, false),
        ended: (plan) => this.ended(plan),
        unreferenced: (plan) => this.unreferenced(plan),
        taken: takenBackings,
      },
      Math.max(1, opts.pipeline ?? 1),
    );
  }

  get generation(): number {
    return this._generation;
  }

  /** The committed map's regions (pipelined transactions in flight are not in it yet). */
  regions(): readonly Region[] {
    return this.pipeline.length === 0 ? this.map.regions() : this.map.regionsBefore(this.pipeline.plans());
  }

  get published(): boolean {
    return this._published;
  }

  /** Work waiting or running on the serial queue: commits, and all items (attaches, publishes, syncs). */
  get queue(): { commits: number; work: number } {
    return { commits: this.queued, work: this.pendingWork };
  }

  // --- attach / detach ------------------------------------------------------------------------------

  /**
   * The owner's ATTACH. The seat is taken at once (a second owner is refused, and commits a previous
   * owner left queued will not run), but the reply waits for the work already queued: a transaction a
   * disconnected owner left in flight completes or rolls back first, so the generation in the reply (and
   * any STATUS after it) tells the new owner whether that transaction happened. With nothing queued it
   * is answered at once (in order with what the owner sends right after it).
   */
  attachOwner(session: Session): AttachResult | Promise<AttachResult> {
    if (this.owner && !this.owner.closed) {
      throw new OwnerExistsError(`address space ${JSON.stringify(this.name)} already has an owner: ${this.owner.describe()}`);
    }
    this.owner = session;
    session.state = 'owner';
    session.spaceName = this.name;
    this.log.info({ client: session.ref() }, 'owner attached');
    this.events.emit('joined', session.ref(), 'owner');
    // An owner that cannot publish (no PUBLISH feature) publishes by attaching, as before the feature.
    const publishes = !this._published && (session.features & Feature.PUBLISH) === 0;
    const reply = (): AttachResult => ({
      client: session.id,
      epoch: this.epoch,
      generation: this._generation,
      sync: 'none',
      ...((session.features & Feature.PUBLISH) !== 0 ? { published: this._published } : {}),
    });
    if (publishes) return this.enqueue(async () => (this.doPublish(), reply()), false);
    return this.pendingWork === 0 ? reply() : this.enqueue(async () => reply(), false);
  }

  /**
   * PUBLISH (owner): the map as it stands is authoritative. Runs after the work already queued; every
   * subscriber that attached meanwhile is synced to it (and reconciles by key, keeping what is unchanged).
   */
  publish(session: Session): Promise<PublishResult> {
    this.requireOwner(session);
    return this.enqueue(async () => {
      this.doPublish();
      return { generation: this._generation };
    }, false);
  }

  private doPublish(): void {
    if (this._published) return;
    this._published = true;
    this.log.info({ generation: this._generation, regions: this.map.size, waiting: this.waiting.size }, 'published');
    this.events.emit('published', this._generation);
    for (const [s, w] of this.waiting) {
      s.subscriber.waiting = false;
      if (!s.closed) void this.enqueue(() => this.runAttach(s, w.requestId, w.msg, w.replied), false);
    }
    this.waiting.clear();
  }

  /**
   * Queues a subscriber's attach: between transactions it gets the ATTACH reply, then the backings and
   * the map (a snapshot, or a delta when it resumes), and from then on every transaction.
   */
  attachSubscriber(joining: Session, requestId: number, msg: Attach): Promise<void> {
    const session = joining.becomeSubscriber(msg);
    session.spaceName = this.name;
    if (!this._published) {
      // A client that maps from offset 0 waits only on a map it may follow (later commits keep it so).
      const exposed = this.prefixRefusal(session);
      if (exposed) {
        session.unattach();
        session.replyError(requestId, exposed);
        return Promise.resolve();
      }
      // It keeps what it holds until the owner republished: a map still being rebuilt is never applied.
      const replied = (session.features & Feature.PUBLISH) !== 0;
      if (replied) session.reply(requestId, { client: session.id, epoch: this.epoch, generation: this._generation, sync: 'wait' });
      session.subscriber.waiting = true;
      this.waiting.set(session, { requestId, msg, replied });
      this.log.info({ client: session.ref() }, 'subscriber waits for the space to be published');
      return Promise.resolve();
    }
    return this.resumeHolder(session, () => this.runAttach(session, requestId, msg, false));
  }

  /**
   * Runs `run` (a sync of `session`) between transactions. A session resuming a connection that is still
   * a holder (its reconcile is what a running transaction may wait for: the reconnect grace of
   * docs/protocol.md "Guarantees") is synced as soon as that transaction opens its fence window (before
   * its vote, or after its finish round: nothing of it is in flight then, so that is syncing between two
   * transactions), or after it ended if it opens none; waiting in the queue behind it, its reconcile could
   * never come within the grace and it would be killed although it came back in time.
   */
  private resumeHolder<T>(session: SubscriberSession, run: () => Promise<T>): Promise<T> {
    const resumes = session.subscriber.resumes;
    if (resumes === undefined || !this.fences.awaiting(resumes, session.pid)) return this.enqueue(run, false);
    if (this.fenceWindow) return run();
    let started: Promise<T> | undefined;
    const once = () => (started ??= run());
    this.resumers.add(once);
    this.log.info(
      { client: session.ref(), resumes },
      'a holder came back while a transaction runs: it is synced as soon as that transaction waits for fencing',
    );
    return this.enqueue(() => (this.resumers.delete(once), once()), false);
  }

  /** Opens the fence window: resuming holders parked by resumeHolder() are synced now. */
  private openFenceWindow(): void {
    this.fenceWindow = true;
    const parked = [...this.resumers];
    this.resumers.clear();
    // Its caller (the queued fallback in resumeHolder) gets the outcome; here it is only started.
    for (const sync of parked) void sync().catch(() => undefined);
  }

  /** An observer (feature DIRTY): receives EV_DIRTY after each sync; maps nothing, acks nothing. */
  attachObserver(session: Session): AttachResult {
    session.state = 'observer';
    session.spaceName = this.name;
    this.dirtyLog.observers.add(session);
    this.events.emit('joined', session.ref(), 'observer');
    return { client: session.id, epoch: this.epoch, generation: this._generation, sync: 'none' };
  }

  /**
   * The session is gone from the space. A subscriber that may still reach memory it was given becomes a
   * holder until it is fenced (broker/fence.ts): `reason` says why its connection ended.
   */
  detach(session: Session, reason: HolderReason = 'disconnected'): void {
    this.events.left(session, reason);
    this.dirtyLog.observers.delete(session);
    if (session.isSubscriber()) this.waiting.delete(session);
    if (this.owner === session) {
      this.owner = undefined;
      for (const b of this.backings.all()) b.held = false;
      this.releaseUnused([...this.backings.all()].map((b) => b.id));
      this.log.info({ client: session.ref() }, 'owner detached');
    }
    const leaver = session.isSubscriber() ? this.leaving.get(session) : undefined;
    if (leaver && session.isSubscriber()) {
      // It sent DETACH and released everything before closing: a clean leave.
      this.leaving.delete(session);
      leaver.fence('detached');
    } else if (session.isSubscriber() && this.subscribers.delete(session)) {
      this.log.info({ client: session.ref(), reason }, 'subscriber detached');
      this.hold(session, reason);
    }
    session.close();
  }

  /** Removes a subscriber that broke its contract, telling it why; it is fenced (killed, under the kill policy). */
  evict(session: Session, err: MmbError): Holder | undefined {
    this.log.warn({ client: session.ref(), code: err.code, err: err.message }, 'evicting client');
    this.events.emit('evicted', session.ref(), err);
    const before = new Set(this.fences.all());
    this.detach(session, 'evicted');
    session.goodbye(err);
    return this.fences.all().find((h) => !before.has(h) && h.ref.id === session.id);
  }

  /**
   * DETACH (feature FENCE): the subscriber leaves; it gets no more transactions, and once its connection
   * closes it holds nothing (it releases everything first). Until then it counts as holding what it had.
   */
  leave(session: Session): object {
    if (!this.isAttached(session, false)) throw new StateError('only an attached subscriber detaches');
    this.events.left(session, 'leaving');
    this.subscribers.delete(session);
    this.dirtyLog.observers.delete(session);
    session.state = 'leaving';
    // Acks it owes resolve as 'gone': a transaction in flight goes on without it (and fences it if needed).
    session.abandon();
    const h = this.hold(session, 'leaving');
    if (h) this.leaving.set(session, h);
    this.log.info({ client: session.ref() }, 'subscriber leaving');
    return {};
  }

  /** DELEGATE (feature FENCE): processes a subscriber handed memory to; fenced with it. */
  delegate(session: Session, names: readonly string[], pidfds: number[]): object {
    if (!this.isAttached(session, true)) throw new StateError('only an attached subscriber names delegates');
    session.delegates.push(...names.map((name, i) => ({ name, pidfd: pidfds[i] as number })));
    this.log.info({ client: session.ref(), delegates: names }, 'delegates named');
    return {};
  }

  private hold(session: Session, reason: HolderReason): Holder | undefined {
    if (session.sentBackings.size === 0) {
      this.ioas.released(session, undefined);
      return undefined;
    }
    // A subscriber in the owner's own process (a VMM's own device model on the socket) is never signalled:
    // killing it would kill the VMM, and the guest with it. Like an in-process one, only its reconcile fences it.
    const ownersProcess = this.owner !== undefined && !this.owner.closed && this.owner.pid === session.pid;
    const holder = this.events.held(
      this.fences.add(session.ref(), reason, new Set(session.sentBackings.keys()), session.local || ownersProcess, session.takePidfds()),
    );
    holder.mapsFromZero = session.isSubscriber() && session.subscriber.mapsFromZero;
    // Through its host IOMMU it may also reach what its IOASes map.
    this.ioas.released(session, holder);
    return holder;
  }

  // --- owner requests -------------------------------------------------------------------------------

  /** `unsealed` (feature TRUSTED_FILE): the owner vouches for a file that cannot be sealed (docs/security.md). */
  addBacking(session: Session, fd: number, name: string | undefined, unsealed = false): BackingAddResult {
    this.requireOwner(session);
    const b = this.backings.add(fd, name, unsealed);
    this.log.debug({ backing: b.id, size: b.size, name: b.name, pageSize: b.pageSize, sealed: b.sealed }, 'backing registered');
    return { backing: b.id, size: b.size, ...((session.features & Feature.TRUSTED_FILE) !== 0 ? { pageSize: b.pageSize, sealed: b.sealed } : {}) };
  }

  dropBacking(session: Session, id: number): BackingDropResult {
    this.requireOwner(session);
    const b = this.backings.require(id);
    b.held = false;
    return { released: this.releaseUnused([id]).length > 0 };
  }

  commit(session: Session, ops: readonly CommitOp[], expect: number | undefined): Promise<CommitResult> {
    this.requireOwner(session);
    this.admitCommit();
    return this.enqueue(
      (release) => this.events.commit(session.ref(), ops, this._generation, () => this.runCommit(session, ops, expect, release)),
      true,
      this.pipeline.size > 1,
    );
  }

  /** Refuses one more transaction when the queue is full (map commits and IOAS commits alike). */
  private admitCommit(): void {
    if (this.queued >= this.limits.maxQueuedCommits) {
      throw new TooBusyError(`${this.queued} transactions are already queued on ${JSON.stringify(this.name)}`);
    }
  }

  /** A subscriber's REPORT: what its IOMMU or pinning looks like now. */
  report(session: Session, msg: Report): ReportResult {
    if (!this.isAttached(session, true)) throw new StateError('only an attached subscriber reports');
    const reported = session.subscriber.reported;
    if (msg.reserved) reported.reserved = msg.reserved.map(fromInclusive<Iova>);
    if (msg.dmaAvailable !== undefined) reported.dmaAvailable = msg.dmaAvailable;
    if (msg.pinned !== undefined) reported.pinned = msg.pinned;
    if (msg.coherent !== undefined) reported.coherent = msg.coherent;
    if (msg.backend !== undefined) reported.backend = msg.backend;
    if (msg.dirtyTracking !== undefined) reported.dirtyTracking = msg.dirtyTracking;
    if (msg.migration !== undefined) reported.migration = { ...msg.migration };
    if (msg.devices) reported.devices = [...msg.devices];
    this.events.reported(session, msg.pinned, this.map.bytes);
    if (msg.reserved) {
      const clash = this.map.regions().filter((r) => reported.reserved.some((x) => rangesOverlap(iovaOfGpa(r.gpa), r.size, x.start, x.size)));
      if (clash.length > 0)
        this.log.warn({ client: session.ref(), regions: clash.map((r) => r.name) }, 'existing regions cover ranges this client reports as reserved');
    }
    return {};
  }

  /** The lowest free GPA range of that size and alignment, avoiding every region and reserved range. */
  findFree(msg: Omit<FindFree, 't' | 'id'>): FindFreeResult {
    const reserved = [...this.subscribers].flatMap((s) => s.subscriber.reported.reserved);
    return { gpa: findFree(msg, this.map.regions(), reserved, PAGE_SIZE) };
  }

  /** Clients that map from offset 0 and may reach memory without being attached: waiting for a publish, or holding. */
  private absentFromZero(): FromZero[] {
    const out: FromZero[] = [];
    for (const s of this.waiting.keys())
      if (s.subscriber.mapsFromZero) out.push({ who: `${s.describe()}, waiting for the space to be published,`, client: s.ref() });
    for (const h of this.fences.all())
      if (h.mapsFromZero) out.push({ who: `${describeClient(h.ref)}, whose connection ended while it holds memory,`, client: h.ref });
    return out;
  }

  /** Why `s`, which maps from offset 0 (if it does), cannot follow the map as it is. */
  private prefixRefusal(s: SubscriberSession): MmbError | undefined {
    const exposed = s.subscriber.mapsFromZero ? exposedPrefix(this.map.regions()) : undefined;
    return exposed && backingPrefixError({ who: s.describe(), client: s.ref() }, exposed, 'the map');
  }

  /** Why a subscriber cannot attach to the map as it is (its region limit, its pin limit, the budget). */
  private attachRefusal(s: SubscriberSession, count: number): MmbError | undefined {
    const { maxRegions, pins, pinLimit } = s.subscriber;
    if (count > maxRegions) {
      return new ClientLimitError(`the map has ${count} regions; ${s.describe()} declared a limit of ${maxRegions}`, { client: s.ref() });
    }
    const exposed = this.prefixRefusal(s);
    if (exposed) return exposed;
    if (!pins) return undefined;
    if (this.map.bytes > pinLimit) {
      return new PinBudgetError(`${s.describe()} would have to pin ${this.map.bytes} bytes; its limit is ${pinLimit}`, { client: s.ref() });
    }
    const pinners = [...this.subscribers].filter((x) => x.subscriber.pins).length + 1;
    if (pinners * this.map.bytes > this.limits.pinBudgetBytes) {
      return new PinBudgetError(`one more pinning client would pin ${pinners * this.map.bytes} bytes in all; the pin budget is ${this.limits.pinBudgetBytes}`, {
        client: s.ref(),
      });
    }
    return undefined;
  }

  /**
   * DIRTY_SYNC (owner only: collecting clears the bits, so anyone else would steal them from the
   * migration): takes ownership of `fd`, the buffer the cleared bits are ORed into.
   */
  dirtySync(session: Session, refs: readonly (number | string)[] | undefined, fd: number): Promise<DirtySyncResult> {
    this.requireOwner(session);
    return this.enqueue(() => this.events.dirtySync(() => this.dirtyLog.sync(refs, fd)), false);
  }

  /** PAUSE (owner only): every writer stops, or resumes, writing guest memory. */
  pause(session: Session, paused: boolean): Promise<PauseResult> {
    this.requireOwner(session);
    return this.enqueue(() => this.dirtyLog.pause(paused).then(() => ({})), false);
  }

  // --- acks -----------------------------------------------------------------------------------------

  /** Returns false when the session was not waited on for `seq`. */
  settle(session: Session, seq: number, result: AckResult): boolean {
    return session.settle(seq, result);
  }

  // --- status / shutdown ----------------------------------------------------------------------------

  status(): StatusSpace {
    // The committed map: transactions of a pipeline window show only once committed.
    const regions = this.regions();
    const bytes = sum(regions);
    const clients = [
      ...(this.owner && !this.owner.closed ? [this.owner] : []),
      ...this.subscribers,
      ...this.waiting.keys(),
      ...this.leaving.keys(),
      ...this.dirtyLog.observers,
    ].map((s) => ({
      id: s.id,
      role: s === this.owner ? ('owner' as const) : s.state === 'observer' ? ('observer' as const) : ('subscriber' as const),
      kind: s.kind,
      name: s.name,
      pid: s.pid,
      uid: s.uid,
      transport: s.transport.kind,
      ackedGeneration: s === this.owner ? this._generation : (s.subscriber?.ackedGeneration ?? 0),
      state:
        s.state === 'leaving'
          ? ('leaving' as const)
          : s.subscriber?.waiting
            ? ('waiting' as const)
            : s.subscriber?.syncing
              ? ('syncing' as const)
              : s.subscriber?.applying
                ? ('applying' as const)
                : ('ready' as const),
      ...(s !== this.owner && s.isSubscriber() ? this.subscriberStatus(s, regions.length, bytes) : {}),
    }));
    const pinners = [...this.subscribers].filter((s) => s.subscriber.pins);
    return {
      name: this.name,
      epoch: this.epoch,
      generation: this._generation,
      published: this._published,
      bytes,
      paused: this.dirtyLog.paused,
      logging: this.dirtyLog.bitmaps.size,
      pinBudget: {
        ...(Number.isFinite(this.limits.pinBudgetBytes) ? { limit: this.limits.pinBudgetBytes } : {}),
        predicted: pinners.length * bytes,
        actual: pinners.reduce((n, s) => n + (s.subscriber.reported.pinned ?? 0), 0),
      },
      regions: regions.map((r) => ({ ...r })),
      backings: [...this.backings.all()].map((b) => ({
        backing: b.id,
        name: b.name,
        size: b.size,
        regions: b.refs,
        held: b.held,
        pageSize: b.pageSize,
        sealed: b.sealed,
      })),
      clients,
      holders: this.fences.status(),
      ...(this.ioas.size > 0 ? { ioas: this.ioas.status() } : {}),
    };
  }

  private subscriberStatus({ subscriber: s }: SubscriberSession, count: number, bytes: number): Record<string, unknown> {
    const r = s.reported;
    return {
      regions: s.coalesce ? s.view.length : count,
      ...(Number.isFinite(s.maxRegions) ? { maxRegions: s.maxRegions } : {}),
      coalesce: s.coalesce,
      ...(s.mapsFromZero ? { mapsFromZero: true } : {}),
      writes: s.writes,
      ...(s.pins
        ? { pin: { ...(Number.isFinite(s.pinLimit) ? { limit: s.pinLimit } : {}), predicted: bytes, ...(r.pinned !== undefined ? { actual: r.pinned } : {}) } }
        : {}),
      ...(r.reserved.length > 0 ? { reserved: r.reserved.map(toInclusive) } : {}),
      ...(r.dmaAvailable !== undefined ? { dmaAvailable: r.dmaAvailable } : {}),
      ...(r.coherent !== undefined ? { coherent: r.coherent } : {}),
      ...(r.backend !== undefined ? { backend: r.backend } : {}),
      ...(r.dirtyTracking !== undefined ? { dirtyTracking: r.dirtyTracking } : {}),
      ...(r.dma !== undefined ? { dma: r.dma } : {}),
      ...(r.migration !== undefined ? { migration: r.migration } : {}),
      ...(r.devices.length > 0 ? { devices: r.devices } : {}),
    };
  }

  /** Whether `session` is one of this space's subscribers (or, with `waiting`, waits to be one). */
  private isAttached(session: Session, waiting: boolean): session is SubscriberSession {
    return session.isSubscriber() && (this.subscribers.has(session) || (waiting && this.waiting.has(session)));
  }

  close(err: MmbError): void {
    if (this.closed) return;
    this.closed = true;
    for (const s of [...this.subscribers, ...(this.owner ? [this.owner] : [])]) {
      this.detach(s);
      s.goodbye(err);
    }
    this.backings.closeAll();
    this.dirtyLog.close();
    this.fences.close();
  }

  // --- internals ------------------------------------------------------------------------------------

  private requireOwner(session: Session): void {
    if (this.owner !== session) throw new NotOwnerError(`only the owner of ${JSON.stringify(this.name)} may change it`);
  }

  /**
   * Runs `work` after the work queued before it. Work that is not `pipelined` also waits until every
   * pipelined transaction was answered; pipelined work lets the queue go on when it calls `release` (it
   * sent its transaction), and counts as queued until it is done.
   */
  private enqueue<T>(work: (release: () => void) => Promise<T>, counted: boolean, pipelined = false): Promise<T> {
    if (counted) this.queued++;
    this.pendingWork++;
    let release = () => {};
    const released = pipelined ? new Promise<void>((r) => (release = r)) : undefined;
    const run = this.tail.then(async () => {
      if (!pipelined && !this.pipeline.idle) await this.pipeline.drained();
      return work(release);
    });
    const done = run
      .catch(() => undefined)
      .finally(() => {
        if (counted) this.queued--;
        this.pendingWork--;
      });
    this.tail = released ? Promise.race([released, done]) : done;
    return run;
  }

  /** `replied`: the ATTACH was already answered (`sync: "wait"`), this is the sync after PUBLISH. */
  private async runAttach(session: SubscriberSession, requestId: number, msg: Attach, replied: boolean): Promise<void> {
    if (session.closed || this.closed) return;
    const view = session.subscriber.coalesce ? coalesce(this.map.regions()) : undefined;
    const refusal = this.attachRefusal(session, view?.length ?? this.map.size);
    if (refusal) {
      if (replied) {
        // It already holds a map from before the restart and the republished one does not fit it.
        session.goodbye(refusal);
        return;
      }
      session.unattach();
      session.replyError(requestId, refusal);
      return;
    }
    const resume = msg.resume;
    // A coalescing client always gets a snapshot of its view; its reconciliation keeps what is unchanged.
    const delta =
      resume && resume.epoch === this.epoch && !view ? this.history.delta(resume.generation, this._generation, (id) => this.map.get(id)) : undefined;
    const mode = delta ? 'delta' : 'snapshot';
    const regions = view ?? (delta ? delta.upserts : this.map.regions());
    const removed = delta ? delta.removed : [];
    if (view) session.subscriber.view = view;

    // Backings the client still holds from its earlier connection stay valid within one epoch.
    const gone: number[] = [];
    if (delta && resume) {
      for (const id of resume.backings) {
        // What it holds may be read-only: a writable region will bring the read-write fd.
        if (this.backings.get(id)) session.sentBackings.set(id, false);
        else gone.push(id);
      }
    }
    if (!replied) session.reply(requestId, { client: session.id, epoch: this.epoch, generation: this._generation, sync: mode });
    if (gone.length > 0) session.send({ t: Msg.EV_BACKINGS_GONE, backings: gone });
    this.sendBackings(session, accessOf(regions));
    this.dirtyLog.send(session, this.dirtyLog.bitmaps.all());

    const { seq, done } = session.expectAck();
    const generation = this._generation;
    for (const part of splitSync(regions, removed, this.maxFrameBytes)) {
      session.send({ t: Msg.EV_SYNC, seq, epoch: this.epoch, generation, mode, ...part });
    }
    session.subscriber.syncing = true;
    this.subscribers.add(session);
    this.events.emit('joined', session.ref(), 'subscriber');
    this.log.info({ client: session.ref(), mode, generation, regions: regions.length, removed: removed.length }, 'subscriber attached');

    const timer = setTimeout(() => session.settle(seq, { kind: 'timeout' }), this.limits.ackTimeoutMs);
    void done.then((r) => {
      clearTimeout(timer);
      session.subscriber.syncing = false;
      if (r.kind === 'ack') {
        session.subscriber.ackedGeneration = Math.max(session.subscriber.ackedGeneration, generation);
        // It holds exactly the current map now: what it held through its previous connection is let go.
        // (Unless the connection it resumes was attached to IOASes: then also once it re-synced those.)
        if (session.subscriber.resumes !== undefined) this.ioas.reconciled(session, undefined);
      } else if (r.kind === 'nack') {
        this.evict(session, this.refusal(session.ref(), r.error, generation));
      } else if (r.kind === 'timeout') {
        this.evict(
          session,
          new ClientTimeoutError(`${session.describe()} did not ack its sync within ${this.limits.ackTimeoutMs} ms`, { client: session.ref(), generation }),
        );
      }
    });
  }

  private async runCommit(owner: Session, ops: readonly CommitOp[], expect: number | undefined, release: () => void): Promise<CommitResult> {
    if (this.pipeline.size > 1) {
      const sent = await this.pipelined(owner, ops, expect);
      if (sent) {
        release();
        return sent.answer;
      }
      // Not for the window: it runs alone, on the committed map.
      if (!this.pipeline.idle) await this.pipeline.drained();
    }
    if (owner.closed || this.owner !== owner) throw new DisconnectedError('the owner disconnected before its commit ran');
    if (expect !== undefined && expect !== this._generation) {
      throw new StaleGenerationError(`expected generation ${expect}, the space is at ${this._generation}`, { generation: this._generation });
    }
    const plan = this.map.plan(ops, this.backings, this.limits.maxRegions);
    if (plan.ops.length === 0) return { generation: this._generation, added: [], unreferenced: [] };
    this.ioas.checkCommit(plan);
    const generation = this._generation + 1;
    const started = performance.now();
    // Backings the transaction needs, and whether a writable region needs them.
    const access = accessOf([...plan.adds, ...plan.sets.filter((x) => !x.after.readonly).map((x) => x.after)]);
    const taken = takenBackings(plan);
    const bitmaps = this.dirtyLog.create(plan);
    let committed = false;
    for (const r of plan.adds) (this.backings.get(r.backing) as Backing).inflight++;
    try {
      // A client whose connection dropped during the vote may hold what this takes away and come back at
      // once: the vote (which disturbed nothing, for two-phase clients) is rolled back and run again after
      // it reconciled. Twice at most: the second time, a holder that is not fenced fails the transaction.
      const holders = () => (taken.size > 0 ? this.fences.holding(taken) : []);
      let vote: Vote;
      for (let attempt = 1; ; attempt++) {
        await this.fenceHolders(holders, generation);
        this.events.emit('vote', generation, owner.ref(), plan, attempt);
        vote = await this.vote(plan, generation, access, bitmaps, holders, attempt === 1);
        if (vote.retry === undefined) break;
      }
      const { results, views, addOnly } = vote;

      // --- commit ---
      this.apply(plan, generation);
      this.dirtyLog.commit(plan, bitmaps);
      committed = true;
      for (const [s, r] of results) if (r.kind === 'ack') s.subscriber.ackedGeneration = generation;
      for (const [s, view] of views) s.subscriber.view = view;
      // Two-phase subscribers remove and reshape now, and ack that; the others did it in the vote.
      // A subscriber whose ops only added established all of it in its vote: nothing to finish, no round.
      const twoPhase = [...this.subscribers].filter((s) => (s.features & Feature.TWO_PHASE) !== 0 && !addOnly.has(s));
      // Each event encoded once for every subscriber (SharedEvent).
      const notice = new SharedEvent({ t: Msg.EV_COMMITTED, generation }, this.maxFrameBytes);
      notice.sendToAll([...this.subscribers].filter((s) => (s.features & Feature.TWO_PHASE) === 0 || addOnly.has(s)));
      const unfenced = await this.finish(twoPhase, (s, seq) => notice.sendTo(s, seq), generation, holders);
      this.log.info(
        {
          generation,
          removes: plan.removes.length,
          sets: plan.sets.length,
          adds: plan.adds.length,
          clients: results.size,
          ms: +(performance.now() - started).toFixed(3),
        },
        'transaction committed',
      );
      if (unfenced.length > 0) throw this.committedUnfenced(unfenced, generation, 'the backings it may reach stay held until it is');
      const touched = new Set(plan.removes.map((r) => r.backing));
      return {
        generation,
        added: plan.adds.map((r) => ({ id: r.id, name: r.name })),
        unreferenced: [...touched].filter((id) => this.backings.get(id)?.refs === 0 && !this.fences.holds(id)),
      };
    } finally {
      if (!committed) this.dirtyLog.discard(bitmaps);
      for (const r of plan.adds) {
        const b = this.backings.get(r.backing);
        if (b) b.inflight--;
      }
      this.releaseUnused([...plan.backings, ...plan.removes.map((r) => r.backing)]);
    }
  }

  /**
   * After the commit (shared with broker/ioas.ts): `send` asks `targets` to finish it (remove what the vote
   * left) and every answer is awaited; who nacks is evicted. Who did not finish (nack, deadline) may still
   * reach what was taken away, and so may any of `holders()`: all of them are fenced. Returns those that
   * could not be.
   */
  private async finish(
    targets: readonly SubscriberSession[],
    send: (s: SubscriberSession, seq: number) => void,
    generation: number,
    holders: () => Holder[],
  ): Promise<Holder[]> {
    const finished = await this.fanOut(targets, send, generation);
    const unfinished = [...finished.timedOut];
    for (const [s, r] of finished.results) {
      if (r.kind !== 'nack') continue;
      const h = this.evict(s, this.refusal(s.ref(), r.error, generation));
      if (h) unfinished.push(h);
    }
    // The change is committed: a holder that reconnects now is synced at once, to the map as committed (it
    // is no target of the finish round, which went out before it came back), and its reconcile fences it.
    this.openFenceWindow();
    try {
      // (A client that did not finish is usually also a holder of what was taken: each is named once.)
      return await this.fences.settle([...new Set([...unfinished, ...holders()])], this.limits.ackTimeoutMs);
    } finally {
      this.fenceWindow = false;
    }
  }

  /** The owner's error when a committed transaction left holders that could not be fenced. */
  private committedUnfenced(unfenced: readonly Holder[], generation: number, held: string): MmbError {
    const h = unfenced[0] as Holder;
    return new CommittedUnfencedError(
      `generation ${generation} is committed, but ${describeHolders(unfenced)} did not finish it and could not be fenced (fence policy ${this.fences.policy}): ${held}`,
      { client: h.ref, generation },
    );
  }

  /**
   * Before anything is sent (shared with broker/ioas.ts): every client whose connection ended and that may
   * still reach what the transaction takes away (`holders()`) is fenced (broker/fence.ts). One that
   * reconnects meanwhile is synced at once (nothing of this transaction was sent yet, so that is syncing
   * between two transactions): its reconcile is what fences it.
   */
  private async fenceHolders(holders: () => Holder[], generation: number): Promise<void> {
    if (holders().length === 0) return;
    this.openFenceWindow();
    let unfenced: Holder[];
    try {
      unfenced = await this.fences.settle(holders(), this.limits.ackTimeoutMs);
    } finally {
      this.fenceWindow = false;
    }
    if (unfenced.length > 0) {
      const h = unfenced[0] as Holder;
      throw new NotFencedError(
        `${describeHolders(unfenced)} may still reach memory this transaction takes away and could not be fenced (fence policy ${this.fences.policy})`,
        { client: h.ref, generation },
      );
    }
  }

  /**
   * The vote: the transaction to every subscriber at once, every answer collected. At the first nack it
   * is void: everyone else gets EV_ROLLBACK at once, so a client still busy applying it (pinning
   * gigabytes) can stop instead of finishing work that is undone. Throws the owner's error for a refusal;
   * returns `retry` when it was rolled back only because a client dropped holding what it takes away.
   */
  private async vote(
    plan: Plan,
    generation: number,
    access: ReadonlyMap<number, boolean>,
    bitmaps: ReturnType<DirtyLogging['create']>,
    holders: () => Holder[],
    mayRetry: boolean,
  ): Promise<Vote> {
    let regionsAfter: Region[] | undefined;
    const views = checkSubscribers(
      plan,
      {
        count: this.map.size - plan.removes.length + plan.adds.length,
        bytes: this.map.bytes - sum(plan.removes) + sum(plan.adds),
        regions: () => (regionsAfter ??= this.map.regionsAfter(plan)),
      },
      this.subscribers,
      this.limits.pinBudgetBytes,
      this.absentFromZero(),
    );
    const addOnly = new Set<SubscriberSession>();
    // Everyone who follows the map itself gets the same EV_TXN, encoded once; a coalescing client its own.
    const txn = new SharedEvent({ t: Msg.EV_TXN, generation, ops: plan.ops }, this.maxFrameBytes);
    const planAddsOnly = plan.ops.every((op) => op.op === 'add');
    const rollback = new SharedEvent({ t: Msg.EV_ROLLBACK, generation }, this.maxFrameBytes);
    const { results, retry } = await this.runVote(
      [...this.subscribers],
      (s, seq) => {
        this.sendBackings(s, access);
        this.dirtyLog.send(s, bitmaps);
        const view = views.get(s);
        if (view) {
          const ops = viewOps(s.subscriber.view, view);
          if (ops.every((op) => op.op === 'add')) addOnly.add(s);
          s.send({ t: Msg.EV_TXN, seq, generation, ops });
          return;
        }
        if (planAddsOnly) addOnly.add(s);
        txn.sendTo(s, seq);
      },
      (s, seq) => rollback.sendTo(s, seq),
      generation,
      holders,
      mayRetry,
    );
    return { results, views, addOnly, ...(retry ? { retry } : {}) };
  }

  /**
   * The vote of a transaction, whatever it changes (shared with broker/ioas.ts): `send` goes to every one
   * of `targets` at once and every answer is collected. At the first nack it is void: everyone else gets
   * `rollback` at once, so a client still busy applying it (pinning gigabytes) can stop instead of
   * finishing work that is undone. Throws the owner's error for a refusal; returns `retry` when it was
   * rolled back only because a client dropped holding what it takes away (`holders()`).
   */
  private async runVote(
    targets: readonly SubscriberSession[],
    send: (s: SubscriberSession, seq: number) => void,
    rollbackOf: (s: SubscriberSession, seq: number) => void,
    generation: number,
    holders: () => Holder[],
    mayRetry: boolean,
  ): Promise<{ results: Map<SubscriberSession, AckResult>; retry?: true }> {
    let rollback: Promise<FanOutResult> | undefined;
    const refused: [ClientRef, MmbError][] = [];
    const rollBack = (except: SubscriberSession | undefined) => {
      const others = targets.filter((t) => t !== except && !t.closed && this.subscribers.has(t));
      rollback = this.fanOut(others, rollbackOf, generation);
    };
    const { results } = await this.fanOut(targets, send, generation, (s, r) => {
      if (r.kind !== 'nack') return;
      refused.push([s.ref(), r.error]);
      if (!rollback) rollBack(s);
    });
    let retry = false;
    const holding = rollback ? [] : holders();
    if (holding.length > 0) {
      // Clients whose connection ended during the vote (missed its deadline, dropped) and that may still
      // reach what this transaction takes away: nothing is taken away until they are fenced. A dropped one
      // may be back in a moment: then vote again once it reconciled.
      if (mayRetry && holding.some((h) => h.state !== 'fenced' && h.reason === 'disconnected')) {
        retry = true;
        rollBack(undefined);
      } else {
        const unfenced = await this.fences.settle(holding, this.limits.ackTimeoutMs);
        if (unfenced.length > 0) {
          const h = unfenced[0] as Holder;
          refused.push([
            h.ref,
            new NotFencedError(
              `it may still reach memory this transaction takes away and could not be fenced (fence policy ${this.fences.policy}): ${describeHolders(unfenced)}`,
              { client: h.ref, generation },
            ),
          ]);
          rollBack(undefined);
        }
      }
    }
    if (!rollback) return { results };
    const undone = await rollback;
    // Who failed to undo it (or missed the rollback's deadline) may still map what was undone: fence it.
    const failed = [...undone.timedOut];
    for (const [s, r] of undone.results) {
      if (r.kind !== 'nack') continue;
      const h = this.evict(s, this.refusal(s.ref(), r.error, generation));
      if (h) failed.push(h);
    }
    const unfenced = await this.fences.settle(failed, this.limits.ackTimeoutMs);
    if (retry && unfenced.length === 0) {
      this.log.info({ generation }, 'vote rolled back: a client that may still reach what it takes away dropped; voting again once it is fenced');
      return { results, retry: true };
    }
    // A client that stopped because of the rollback is not the cause: report the first real refusal.
    const real = refused.filter(([, e]) => e.code !== 'MMB_ERR_CANCELLED');
    const [who, error] = real[0] ??
      refused[0] ?? [unfenced[0]?.ref as ClientRef, new NotFencedError('it dropped during the vote and could not be fenced', { generation })];
    const err = this.refusal(who, error, generation, real.length || 1, unfenced);
    this.log.warn({ generation, client: err.client, code: err.code, cause: error.message }, 'transaction refused and rolled back');
    throw err;
  }

  /**
   * Sends an ackable event to every subscriber at once and waits for all of them, at most ackTimeoutMs.
   * Subscribers that miss the deadline are evicted here (their holders are in `timedOut`); the results
   * say how each one answered.
   */
  private async fanOut(
    targets: readonly SubscriberSession[],
    send: (s: SubscriberSession, seq: number) => void,
    generation: number,
    onResult?: (s: SubscriberSession, r: AckResult) => void,
  ): Promise<FanOutResult> {
    const results = new Map<SubscriberSession, AckResult>();
    // One promise and one deadline timer per fan-out, none per subscriber: each answer is counted as it
    // comes (Session.expect), and the last one resolves the fan-out.
    const seqs: number[] = new Array<number>(targets.length);
    let timer: NodeJS.Timeout | undefined;
    await new Promise<void>((resolve) => {
      let left = targets.length;
      let sending = true;
      // Answers known while the event is still being sent (a closed session, a send that failed) are
      // handed on once it went to everyone: a refusal's rollback must not overtake the event itself.
      const early: [SubscriberSession, AckResult][] = [];
      const answered = (s: SubscriberSession, r: AckResult) => {
        if (sending) {
          early.push([s, r]);
          return;
        }
        s.subscriber.applying = false;
        results.set(s, r);
        onResult?.(s, r);
        if (--left === 0) resolve();
      };
      for (let i = 0; i < targets.length; i++) {
        const s = targets[i] as SubscriberSession;
        const seq = s.expect((r) => answered(s, r));
        seqs[i] = seq;
        s.subscriber.applying = true;
        try {
          send(s, seq);
        } catch (err) {
          s.settle(seq, { kind: 'nack', error: err as MmbError });
        }
      }
      sending = false;
      if (left === 0) {
        resolve();
        return;
      }
      timer = setTimeout(() => {
        targets.forEach((s, i) => {
          if (!results.has(s)) s.settle(seqs[i] as number, { kind: 'timeout' });
        });
      }, this.limits.ackTimeoutMs);
      for (const [s, r] of early.splice(0)) answered(s, r);
    });
    clearTimeout(timer);
    const timedOut: Holder[] = [];
    for (const [s, r] of results) {
      if (r.kind !== 'timeout') continue;
      const h = this.evict(
        s,
        new ClientTimeoutError(`${s.describe()} did not ack generation ${generation} within ${this.limits.ackTimeoutMs} ms`, { client: s.ref(), generation }),
      );
      if (h) timedOut.push(h);
    }
    return { results, timedOut };
  }

  /**
   * A commit as the next transaction of the pipeline window (feature PIPELINE), when it may join it: planned
   * against the map the window leaves, committed to it speculatively, and sent. Undefined when it may not
   * (it then runs alone once the window drained); throws the typed error of a plan that fails.
   */
  private async pipelined(owner: Session, ops: readonly CommitOp[], expect: number | undefined): Promise<{ answer: Promise<CommitResult> } | undefined> {
    await this.pipeline.room();
    if (owner.closed || this.owner !== owner) throw new DisconnectedError('the owner disconnected before its commit ran');
    const projected = this._generation + this.pipeline.length;
    if (expect !== undefined && expect !== projected) {
      throw new StaleGenerationError(
        `expected generation ${expect}, the space is at ${projected}${projected !== this._generation ? ` once the ${this.pipeline.length} transactions in flight commit` : ''}`,
        { generation: projected },
      );
    }
    const plan = this.map.plan(ops, this.backings, this.limits.maxRegions);
    if (plan.ops.length === 0 || !this.pipelineable(plan)) return undefined;
    checkSubscribers(
      plan,
      {
        count: this.map.size - plan.removes.length + plan.adds.length,
        bytes: this.map.bytes - sum(plan.removes) + sum(plan.adds),
        regions: () => this.map.regionsAfter(plan),
      },
      this.subscribers,
      this.limits.pinBudgetBytes,
      this.absentFromZero(),
    );
    const generation = projected + 1;
    this.map.commit(plan);
    for (const r of plan.adds) (this.backings.get(r.backing) as Backing).inflight++;
    this.events.emit('vote', generation, owner.ref(), plan, 1);
    return { answer: this.pipeline.send(plan, generation) };
  }

  /**
   * Whether a planned transaction may join the pipeline window. Kept to what the window's guarantees were
   * made for: every subscriber negotiated PIPELINE and follows the map itself (no coalesced view); no dirty
   * logging and no flag changes (the bitmaps follow the committed map); no IOAS (its mappings are checked
   * against the committed map); and nobody whose connection ended holds what it takes away (the fence
   * before the vote, with its retry, is the one-at-a-time path's).
   */
  private pipelineable(plan: Plan): boolean {
    if (plan.sets.length > 0 || plan.adds.some((r) => r.logDirty) || this.dirtyLog.bitmaps.size > 0 || this.ioas.size > 0) return false;
    for (const s of this.subscribers) if ((s.features & Feature.PIPELINE) === 0 || s.subscriber.coalesce) return false;
    const taken = takenBackings(plan);
    return taken.size === 0 || this.fences.holding(taken).length === 0;
  }

  /** A pipelined transaction ended, committed or not: what it held in flight may be released. */
  private ended(plan: Plan): void {
    for (const r of plan.adds) {
      const b = this.backings.get(r.backing);
      if (b) b.inflight--;
    }
    this.releaseUnused([...plan.backings, ...plan.removes.map((r) => r.backing)]);
  }

  private unreferenced(plan: Plan): number[] {
    const touched = new Set(plan.removes.map((r) => r.backing));
    return [...touched].filter((id) => this.backings.get(id)?.refs === 0 && !this.fences.holds(id));
  }

  /** `map`: false when the map holds the plan already (a pipelined transaction's). */
  private apply(plan: Plan, generation: number, map = true): void {
    if (map) this.map.commit(plan);
    for (const r of plan.removes) (this.backings.get(r.backing) as Backing).refs--;
    for (const r of plan.adds) (this.backings.get(r.backing) as Backing).refs++;
    this._generation = generation;
    this.history.record(generation, [...plan.removes.map((r) => r.id), ...plan.sets.map((s) => s.after.id), ...plan.adds.map((r) => r.id)]);
  }

  /**
   * Sends `s` the backings among `need` it lacks (or holds only read-only while a writable region now
   * needs them), at most maxFdsPerFrame per frame. A backing only read-only regions use is sent as a
   * read-only descriptor.
   */
  private sendBackings(s: Session, need: ReadonlyMap<number, boolean>): void {
    const missing: [Backing, boolean][] = [];
    for (const [id, writable] of need) {
      const held = s.sentBackings.get(id);
      if (held === true || (held === false && !writable)) continue;
      const b = this.backings.get(id);
      if (b) missing.push([b, writable]);
    }
    for (let i = 0; i < missing.length; i += this.maxFdsPerFrame) {
      const chunk = missing.slice(i, i + this.maxFdsPerFrame);
      s.send(
        { t: Msg.EV_BACKINGS, backings: chunk.map(([b]) => this.backings.info(b)) },
        chunk.map(([b, w]) => this.backings.fdFor(b, w)),
      );
      for (const [b, w] of chunk) s.sentBackings.set(b.id, w);
    }
  }

  /** Closes the backings among `ids` that nothing can use any more and tells subscribers that had them. */
  private releaseUnused(ids: Iterable<number>): Backing[] {
    const released: Backing[] = [];
    for (const id of new Set(ids)) {
      const b = this.backings.get(id);
      // A backing a holder may still reach stays: its memory is not free to reuse until that client is fenced.
      if (b && this.backings.isUnused(b) && !this.fences.holds(b.id)) released.push(this.backings.release(b));
    }
    if (released.length === 0) return released;
    for (const s of this.subscribers) {
      const gone = released.filter((b) => s.sentBackings.delete(b.id)).map((b) => b.id);
      if (gone.length > 0) s.send({ t: Msg.EV_BACKINGS_GONE, backings: gone });
    }
    this.log.debug({ backings: released.map((b) => b.id) }, 'backings released');
    return released;
  }

  /** The owner's error for a subscriber's nack: the subscriber's own code when it is one of ours. */
  private refusal(client: ClientRef, cause: MmbError, generation: number, count = 1, unfenced: readonly Holder[] = []): MmbError {
    const code: ErrorCode = isErrorCode(cause.code) && !LOCAL_ONLY.has(cause.code) ? cause.code : 'MMB_ERR_CLIENT_REFUSED';
    const others = count > 1 ? ` (and ${count - 1} other client${count > 2 ? 's' : ''})` : '';
    const held = unfenced.length > 0 ? `; ${describeHolders(unfenced)} failed to undo it and could not be fenced: the backings it may reach stay held` : '';
    return createError(code, `${describeClient(client)}${others} refused generation ${generation}: ${cause.message}${held}`, {
      client,
      generation,
      cause,
      errno: cause.errno,
    });
  }
}
