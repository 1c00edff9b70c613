// One address space: the versioned map, its backings, its owner and subscribers, and the machinery that
// makes every change all-or-nothing.
//
// Work on a space is serial: commits and subscriber attaches run one at a time from a queue, so a
// subscriber's initial sync never interleaves with a transaction in flight.
//
// A commit, in order:
//   1. validate the ops against the committed map and every subscriber's declared limits; any problem
//      is a typed error and nothing was sent to anyone;
//   2. send each subscriber the backings it lacks (EV_BACKINGS, fds attached), then EV_TXN, to all
//      subscribers at once;
//   3. wait for every ack, up to the ack deadline; a subscriber that misses it is evicted and does not
//      hold up the others; one that disconnects is simply gone (it will resume);
//   4a. all acked: the map changes, the generation advances, EV_COMMITTED goes out, the owner gets the
//      new generation; backings no region needs any more are closed and subscribers told so;
//   4b. any nack: EV_ROLLBACK to everyone who applied it, wait for their acks (evicting who fails), and
//      the owner gets one typed error naming the refusing client and its cause.
import { randomBytes } from 'node:crypto';
import type { Logger } from 'pino';
import {
  ClientLimitError,
  ClientTimeoutError,
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
  isErrorCode,
  type Attach,
  type AttachResult,
  type BackingAddResult,
  type BackingDropResult,
  type CommitOp,
  type CommitResult,
  type DirtySyncResult,
  type PauseResult,
  type ErrorCode,
  type FindFree,
  type FindFreeResult,
  type Report,
  type ReportResult,
  type MmbError,
  type Region,
  type SpaceLimits,
  type StatusSpace,
} from '../protocol/index.js';
import { BackingTable, type Backing } from './backings.js';
import { History } from './history.js';
import { MemoryMap, type Plan } from './map.js';
import type { AckResult, Session } from './session.js';
import { splitSync } from './sync.js';
import { coalesce, viewOps } from './coalesce.js';
import { findFree } from './placement.js';
import { checkSubscribers } from './policy.js';
import { Logging } from './logging.js';
import { PAGE_SIZE } from '../native/index.js';

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
}

export class AddressSpace {
  /** Changes whenever the space is (re)created: generations are only comparable within one epoch. */
  readonly epoch: string = `${Date.now().toString(36)}-${randomBytes(6).toString('hex')}`;
  private _generation = 0;
  private readonly map = new MemoryMap();
  readonly backings: BackingTable;
  private readonly history: History;
  private owner: Session | undefined;
  private readonly subscribers = new Set<Session>();
  private tail: Promise<unknown> = Promise.resolve();
  private queued = 0;
  /** Work items (commits, attaches) queued or running. */
  private pendingWork = 0;
  private readonly log: Logger;
  private readonly limits: SpaceLimits;
  private readonly maxFrameBytes: number;
  private readonly maxFdsPerFrame: number;
  private closed = false;
  private readonly logging: Logging;

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
    // eslint-disable-next-line @typescript-eslint/no-this-alias
    const space = this;
    this.logging = new Logging({
      log: this.log,
      maxFrameBytes: this.maxFrameBytes,
      maxFdsPerFrame: this.maxFdsPerFrame,
      subscribers: () => this.subscribers,
      lookup: (ref) => this.map.lookup(ref),
      fanOut: (targets, send, generation) => this.fanOut(targets, send, generation),
      evict: (s, err) => this.evict(s, err),
      get generation() {
        return space._generation;
      },
    });
  }

  get generation(): number {
    return this._generation;
  }

  regions(): readonly Region[] {
    return this.map.regions();
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
    const reply = (): AttachResult => ({ client: session.id, epoch: this.epoch, generation: this._generation, sync: 'none' });
    return this.pendingWork === 0 ? reply() : this.enqueue(async () => reply(), false);
  }

  /**
   * Queues a subscriber's attach: between transactions it gets the ATTACH reply, then the backings and
   * the map (a snapshot, or a delta when it resumes), and from then on every transaction.
   */
  attachSubscriber(session: Session, requestId: number, msg: Attach): Promise<void> {
    session.state = 'subscriber';
    session.spaceName = this.name;
    session.maxRegions = msg.limits?.maxRegions ?? Number.POSITIVE_INFINITY;
    session.coalesce = msg.limits?.coalesce ?? false;
    session.pins = msg.pin !== undefined;
    session.pinLimit = msg.pin?.limit ?? Number.POSITIVE_INFINITY;
    session.writes = msg.writes ?? true;
    return this.enqueue(() => this.runAttach(session, requestId, msg), false);
  }

  /** An observer (feature DIRTY): receives EV_DIRTY after each sync; maps nothing, acks nothing. */
  attachObserver(session: Session): AttachResult {
    session.state = 'observer';
    session.spaceName = this.name;
    this.logging.observers.add(session);
    return { client: session.id, epoch: this.epoch, generation: this._generation, sync: 'none' };
  }

  detach(session: Session): void {
    this.logging.observers.delete(session);
    if (this.owner === session) {
      this.owner = undefined;
      for (const b of this.backings.all()) b.held = false;
      this.releaseUnused([...this.backings.all()].map((b) => b.id));
      this.log.info({ client: session.ref() }, 'owner detached');
    }
    if (this.subscribers.delete(session)) this.log.info({ client: session.ref() }, 'subscriber detached');
    session.close();
  }

  /** Removes a subscriber that broke its contract, telling it why. */
  evict(session: Session, err: MmbError): void {
    this.log.warn({ client: session.ref(), code: err.code, err: err.message }, 'evicting client');
    this.detach(session);
    session.goodbye(err);
  }

  // --- owner requests -------------------------------------------------------------------------------

  addBacking(session: Session, fd: number, name: string | undefined): BackingAddResult {
    this.requireOwner(session);
    const b = this.backings.add(fd, name);
    this.log.debug({ backing: b.id, size: b.size, name: b.name }, 'backing registered');
    return { backing: b.id, size: b.size };
  }

  dropBacking(session: Session, id: number): BackingDropResult {
    this.requireOwner(session);
    const b = this.backings.require(id);
    b.held = false;
    return { released: this.releaseUnused([id]).length > 0 };
  }

  commit(session: Session, ops: readonly CommitOp[], expect: number | undefined): Promise<CommitResult> {
    this.requireOwner(session);
    if (this.queued >= this.limits.maxQueuedCommits) {
      throw new TooBusyError(`${this.queued} transactions are already queued on ${JSON.stringify(this.name)}`);
    }
    return this.enqueue(() => this.runCommit(session, ops, expect), true);
  }

  /** A subscriber's REPORT: what its IOMMU or pinning looks like now. */
  report(session: Session, msg: Report): ReportResult {
    if (!this.subscribers.has(session)) throw new StateError('only an attached subscriber reports');
    if (msg.reserved) session.reserved = msg.reserved.map(({ start, last }) => ({ start, last }));
    if (msg.dmaAvailable !== undefined) session.dmaAvailable = msg.dmaAvailable;
    if (msg.pinned !== undefined) session.pinnedActual = msg.pinned;
    if (msg.coherent !== undefined) session.coherent = msg.coherent;
    if (msg.backend !== undefined) session.backend = msg.backend;
    if (msg.devices) session.devices = [...msg.devices];
    if (msg.reserved) {
      const clash = this.map.regions().filter((r) => session.reserved.some((x) => r.gpa <= x.last && x.start < r.gpa + r.size));
      if (clash.length > 0) this.log.warn({ client: session.ref(), regions: clash.map((r) => r.name) }, 'existing regions cover ranges this client reports as reserved');
    }
    return {};
  }

  /** The lowest free GPA range of that size and alignment, avoiding every region and reserved range. */
  findFree(msg: Omit<FindFree, 't' | 'id'>): FindFreeResult {
    const reserved = [...this.subscribers].flatMap((s) => s.reserved);
    return { gpa: findFree(msg, this.map.regions(), reserved, PAGE_SIZE) };
  }

  /** Why a subscriber cannot attach to the map as it is (its region limit, its pin limit, the budget). */
  private attachRefusal(s: Session, count: number): MmbError | undefined {
    if (count > s.maxRegions) {
      return new ClientLimitError(`the map has ${count} regions; ${s.describe()} declared a limit of ${s.maxRegions}`, { client: s.ref() });
    }
    if (!s.pins) return undefined;
    if (this.map.bytes > s.pinLimit) {
      return new PinBudgetError(`${s.describe()} would have to pin ${this.map.bytes} bytes; its limit is ${s.pinLimit}`, { client: s.ref() });
    }
    const pinners = [...this.subscribers].filter((x) => x.pins).length + 1;
    if (pinners * this.map.bytes > this.limits.pinBudgetBytes) {
      return new PinBudgetError(`one more pinning client would pin ${pinners * this.map.bytes} bytes in all; the pin budget is ${this.limits.pinBudgetBytes}`, { client: s.ref() });
    }
    return undefined;
  }

  /**
   * DIRTY_SYNC (owner only: collecting clears the bits, so anyone else would steal them from the
   * migration): takes ownership of `fd`, the buffer the cleared bits are ORed into.
   */
  dirtySync(session: Session, refs: readonly (number | string)[] | undefined, fd: number): Promise<DirtySyncResult> {
    this.requireOwner(session);
    return this.enqueue(() => this.logging.sync(refs, fd), false);
  }

  /** PAUSE (owner only): every writer stops, or resumes, writing guest memory. */
  pause(session: Session, paused: boolean): Promise<PauseResult> {
    this.requireOwner(session);
    return this.enqueue(() => this.logging.pause(paused).then(() => ({})), false);
  }

  // --- acks -----------------------------------------------------------------------------------------

  /** Returns false when the session was not waited on for `seq`. */
  settle(session: Session, seq: number, result: AckResult): boolean {
    return session.settle(seq, result);
  }

  // --- status / shutdown ----------------------------------------------------------------------------

  status(): StatusSpace {
    const clients = [...(this.owner && !this.owner.closed ? [this.owner] : []), ...this.subscribers, ...this.logging.observers].map((s) => ({
      id: s.id,
      role: s === this.owner ? ('owner' as const) : s.state === 'observer' ? ('observer' as const) : ('subscriber' as const),
      kind: s.kind,
      name: s.name,
      pid: s.pid,
      uid: s.uid,
      transport: s.transport.kind,
      ackedGeneration: s === this.owner ? this._generation : s.ackedGeneration,
      state: s.syncing ? ('syncing' as const) : s.applying ? ('applying' as const) : ('ready' as const),
      ...(s === this.owner || s.state === 'observer' ? {} : this.subscriberStatus(s)),
    }));
    const pinners = [...this.subscribers].filter((s) => s.pins);
    return {
      name: this.name,
      epoch: this.epoch,
      generation: this._generation,
      bytes: this.map.bytes,
      paused: this.logging.paused,
      logging: this.logging.bitmaps.size,
      pinBudget: {
        ...(Number.isFinite(this.limits.pinBudgetBytes) ? { limit: this.limits.pinBudgetBytes } : {}),
        predicted: pinners.length * this.map.bytes,
        actual: pinners.reduce((n, s) => n + (s.pinnedActual ?? 0), 0),
      },
      regions: this.map.regions().map((r) => ({ ...r })),
      backings: [...this.backings.all()].map((b) => ({ backing: b.id, name: b.name, size: b.size, regions: b.refs, held: b.held })),
      clients,
    };
  }

  private subscriberStatus(s: Session): Record<string, unknown> {
    return {
      regions: s.coalesce ? s.view.length : this.map.size,
      ...(Number.isFinite(s.maxRegions) ? { maxRegions: s.maxRegions } : {}),
      coalesce: s.coalesce,
      writes: s.writes,
      ...(s.pins
        ? { pin: { ...(Number.isFinite(s.pinLimit) ? { limit: s.pinLimit } : {}), predicted: this.map.bytes, ...(s.pinnedActual !== undefined ? { actual: s.pinnedActual } : {}) } }
        : {}),
      ...(s.reserved.length > 0 ? { reserved: s.reserved } : {}),
      ...(s.dmaAvailable !== undefined ? { dmaAvailable: s.dmaAvailable } : {}),
      ...(s.coherent !== undefined ? { coherent: s.coherent } : {}),
      ...(s.backend !== undefined ? { backend: s.backend } : {}),
      ...(s.devices.length > 0 ? { devices: s.devices } : {}),
    };
  }

  close(err: MmbError): void {
    if (this.closed) return;
    this.closed = true;
    for (const s of [...this.subscribers, ...(this.owner ? [this.owner] : [])]) {
      this.detach(s);
      s.goodbye(err);
    }
    this.backings.closeAll();
    this.logging.close();
  }

  // --- internals ------------------------------------------------------------------------------------

  private requireOwner(session: Session): void {
    if (this.owner !== session) throw new NotOwnerError(`only the owner of ${JSON.stringify(this.name)} may change it`);
  }

  private enqueue<T>(work: () => Promise<T>, counted: boolean): Promise<T> {
    if (counted) this.queued++;
    this.pendingWork++;
    const run = this.tail.then(work);
    this.tail = run.catch(() => undefined).finally(() => {
      if (counted) this.queued--;
      this.pendingWork--;
    });
    return run;
  }

  private async runAttach(session: Session, requestId: number, msg: Attach): Promise<void> {
    if (session.closed || this.closed) return;
    const view = session.coalesce ? coalesce(this.map.regions()) : undefined;
    const refusal = this.attachRefusal(session, view?.length ?? this.map.size);
    if (refusal) {
      session.state = 'ready';
      session.spaceName = undefined;
      session.replyError(requestId, refusal);
      return;
    }
    const resume = msg.resume;
    // A coalescing client always gets a snapshot of its view; its reconciliation keeps what is unchanged.
    const delta =
      resume && resume.epoch === this.epoch && !view
        ? this.history.delta(resume.generation, this._generation, (id) => this.map.get(id))
        : undefined;
    const mode = delta ? 'delta' : 'snapshot';
    const regions = view ?? (delta ? delta.upserts : this.map.regions());
    const removed = delta ? delta.removed : [];
    if (view) session.view = view;

    // Backings the client still holds from its earlier connection stay valid within one epoch.
    const gone: number[] = [];
    if (delta && resume) {
      for (const id of resume.backings) {
        // What it holds may be read-only: a writable region will bring the read-write fd.
        if (this.backings.get(id)) session.sentBackings.set(id, false);
        else gone.push(id);
      }
    }
    session.reply(requestId, { client: session.id, epoch: this.epoch, generation: this._generation, sync: mode });
    if (gone.length > 0) session.send({ t: Msg.EV_BACKINGS_GONE, backings: gone });
    this.sendBackings(session, accessOf(regions));
    this.logging.send(session, this.logging.bitmaps.all());

    const { seq, done } = session.expectAck();
    const generation = this._generation;
    for (const part of splitSync(regions, removed, this.maxFrameBytes)) {
      session.send({ t: Msg.EV_SYNC, seq, epoch: this.epoch, generation, mode, ...part });
    }
    session.syncing = true;
    this.subscribers.add(session);
    this.log.info({ client: session.ref(), mode, generation, regions: regions.length, removed: removed.length }, 'subscriber attached');

    const timer = setTimeout(() => session.settle(seq, { kind: 'timeout' }), this.limits.ackTimeoutMs);
    void done.then((r) => {
      clearTimeout(timer);
      session.syncing = false;
      if (r.kind === 'ack') {
        session.ackedGeneration = Math.max(session.ackedGeneration, generation);
      } else if (r.kind === 'nack') {
        this.evict(session, this.refusal(session, r.error, generation));
      } else if (r.kind === 'timeout') {
        this.evict(session, new ClientTimeoutError(`${session.describe()} did not ack its sync within ${this.limits.ackTimeoutMs} ms`, { client: session.ref(), generation }));
      }
    });
  }

  private async runCommit(owner: Session, ops: readonly CommitOp[], expect: number | undefined): Promise<CommitResult> {
    if (owner.closed || this.owner !== owner) throw new DisconnectedError('the owner disconnected before its commit ran');
    if (expect !== undefined && expect !== this._generation) {
      throw new StaleGenerationError(`expected generation ${expect}, the space is at ${this._generation}`, { generation: this._generation });
    }
    const plan = this.map.plan(ops, this.backings, this.limits.maxRegions);
    if (plan.ops.length === 0) return { generation: this._generation, added: [], unreferenced: [] };
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
    );
    const generation = this._generation + 1;
    const started = performance.now();
    // Backings the transaction needs, and whether a writable region needs them.
    const access = accessOf([...plan.adds, ...plan.sets.filter((x) => !x.after.readonly).map((x) => x.after)]);
    const bitmaps = this.logging.create(plan);
    let committed = false;
    for (const r of plan.adds) (this.backings.get(r.backing) as Backing).inflight++;
    try {
      // At the first nack the transaction is void: everyone else gets EV_ROLLBACK at once, so a client
      // still busy applying it (pinning gigabytes) can stop instead of finishing work that is undone.
      let rollback: Promise<Map<Session, AckResult>> | undefined;
      const refused: [Session, MmbError][] = [];
      const targets = [...this.subscribers];
      const results = await this.fanOut(
        targets,
        (s, seq) => {
          this.sendBackings(s, access);
          this.logging.send(s, bitmaps);
          const view = views.get(s);
          s.send({ t: Msg.EV_TXN, seq, generation, ops: view ? viewOps(s.view, view) : plan.ops });
        },
        generation,
        (s, r) => {
          if (r.kind !== 'nack') return;
          refused.push([s, r.error]);
          if (!rollback) {
            const others = targets.filter((t) => t !== s && !t.closed);
            rollback = this.fanOut(others, (t, seq) => t.send({ t: Msg.EV_ROLLBACK, seq, generation }), generation);
          }
        },
      );
      if (rollback) {
        for (const [s, r] of await rollback) if (r.kind === 'nack') this.evict(s, this.refusal(s, r.error, generation));
        // A client that stopped because of the rollback is not the cause: report the first real refusal.
        const [who, error] = refused.find(([, e]) => e.code !== 'MMB_ERR_CANCELLED') ?? (refused[0] as [Session, MmbError]);
        const err = this.refusal(who, error, generation, refused.filter(([, e]) => e.code !== 'MMB_ERR_CANCELLED').length || 1);
        this.log.warn({ generation, client: who.ref(), code: err.code, cause: error.message }, 'transaction refused and rolled back');
        throw err;
      }
      this.apply(plan, generation);
      this.logging.commit(plan, bitmaps);
      committed = true;
      for (const [s, r] of results) if (r.kind === 'ack') s.ackedGeneration = generation;
      for (const [s, view] of views) s.view = view;
      for (const s of this.subscribers) s.send({ t: Msg.EV_COMMITTED, generation });
      this.log.info(
        { generation, removes: plan.removes.length, sets: plan.sets.length, adds: plan.adds.length, clients: results.size, ms: +(performance.now() - started).toFixed(3) },
        'transaction committed',
      );
      const touched = new Set(plan.removes.map((r) => r.backing));
      return {
        generation,
        added: plan.adds.map((r) => ({ id: r.id, name: r.name })),
        unreferenced: [...touched].filter((id) => this.backings.get(id)?.refs === 0),
      };
    } finally {
      if (!committed) this.logging.discard(bitmaps);
      for (const r of plan.adds) {
        const b = this.backings.get(r.backing);
        if (b) b.inflight--;
      }
      this.releaseUnused([...plan.backings, ...plan.removes.map((r) => r.backing)]);
    }
  }

  /**
   * Sends an ackable event to every subscriber at once and waits for all of them, at most ackTimeoutMs.
   * Subscribers that miss the deadline are evicted here; the result says how each one answered.
   */
  private async fanOut(
    targets: readonly Session[],
    send: (s: Session, seq: number) => void,
    generation: number,
    onResult?: (s: Session, r: AckResult) => void,
  ): Promise<Map<Session, AckResult>> {
    const results = new Map<Session, AckResult>();
    const pending = new Map<Session, number>();
    const waits = targets.map((s) => {
      const { seq, done } = s.expectAck();
      pending.set(s, seq);
      s.applying = true;
      try {
        send(s, seq);
      } catch (err) {
        s.settle(seq, { kind: 'nack', error: err as MmbError });
      }
      return done.then((r) => {
        s.applying = false;
        pending.delete(s);
        results.set(s, r);
        onResult?.(s, r);
      });
    });
    const timer = setTimeout(() => {
      for (const [s, seq] of pending) s.settle(seq, { kind: 'timeout' });
    }, this.limits.ackTimeoutMs);
    await Promise.all(waits);
    clearTimeout(timer);
    for (const [s, r] of results) {
      if (r.kind === 'timeout') {
        this.evict(s, new ClientTimeoutError(`${s.describe()} did not ack generation ${generation} within ${this.limits.ackTimeoutMs} ms`, { client: s.ref(), generation }));
      }
    }
    return results;
  }

  private apply(plan: Plan, generation: number): void {
    this.map.commit(plan);
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
      s.send({ t: Msg.EV_BACKINGS, backings: chunk.map(([b]) => this.backings.info(b)) }, chunk.map(([b, w]) => this.backings.fdFor(b, w)));
      for (const [b, w] of chunk) s.sentBackings.set(b.id, w);
    }
  }

  /** Closes the backings among `ids` that nothing can use any more and tells subscribers that had them. */
  private releaseUnused(ids: Iterable<number>): Backing[] {
    const released: Backing[] = [];
    for (const id of new Set(ids)) {
      const b = this.backings.get(id);
      if (b && this.backings.isUnused(b)) released.push(this.backings.release(b));
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
  private refusal(s: Session, cause: MmbError, generation: number, count = 1): MmbError {
    const code: ErrorCode = isErrorCode(cause.code) && !LOCAL_ONLY.has(cause.code) ? cause.code : 'MMB_ERR_CLIENT_REFUSED';
    const others = count > 1 ? ` (and ${count - 1} other client${count > 2 ? 's' : ''})` : '';
    return createError(code, `${s.describe()}${others} refused generation ${generation}: ${cause.message}`, {
      client: s.ref(),
      generation,
      cause,
      errno: cause.errno,
    });
  }
}
