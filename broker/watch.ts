// What happens in an address space, for the people who run the broker (feature WATCH). The space reports
// each thing where it happens with a one-line call on its `events` (an emitter: joins and leaves, each
// vote, evictions, holders and their fencing, publishes, pinned-bytes reports, dirty syncs); this file
// turns commits into outcomes (committed, rolled back, refused) kept in the space's TransactionLog for
// HISTORY, and sends every event to the space's watchers as EV_WATCH. broker/metrics.ts counts the same
// events.
//
// A watcher is an observer that attached with `watch` (feature WATCH). It never acks and is never waited
// for: an event is handed to its transport and the broker moves on. One that stops reading is cut off by
// the transport's slow-reader limit (MMB_ERR_SLOW_READER) rather than slowing anyone down.
import { EventEmitter } from 'eventemitter3';
import {
  Feature,
  FeatureError,
  Msg,
  StateError,
  WATCH_MAX_OPS,
  toMmbError,
  type Attach,
  type ChangeOp,
  type ClientRef,
  type CommitOp,
  type DirtySyncResult,
  type HistoryEntry,
  type HistoryRequest,
  type HistoryResult,
  type MmbError,
  type WatchEvent,
} from '../protocol/index.js';
import type { Holder, HolderReason } from './fence.js';
import { TransactionLog } from './history.js';
import type { Plan } from './map.js';
import type { Session } from './session.js';

export type ClientRole = 'owner' | 'subscriber' | 'observer';

/** The events of one address space. Listeners run synchronously where the thing happens: keep them quick. */
export interface SpaceEventMap {
  joined: [client: ClientRef, role: ClientRole];
  left: [client: ClientRef, role: ClientRole, reason: HolderReason];
  /** A transaction goes to the subscribers' vote (attempt 2 after a vote rolled back for a dropped holder). */
  vote: [generation: number, owner: ClientRef, plan: Plan, attempt: number];
  /** A commit ran to its end (recorded in the TransactionLog). */
  outcome: [entry: HistoryEntry];
  evicted: [client: ClientRef, error: MmbError];
  holder: [holder: Holder];
  fenced: [holder: Holder];
  published: [generation: number];
  /** A pinning subscriber reported its pinned bytes; `predicted` is what the broker expects it to pin. */
  pinned: [client: ClientRef, pinned: number, predicted: number];
  'dirty-sync': [result: DirtySyncResult, us: number];
}

/** What the events need to know of their space. */
export interface WatchedSpace {
  readonly name: string;
  readonly epoch: string;
  readonly generation: number;
}

const ROLES: Readonly<Record<string, ClientRole>> = { owner: 'owner', subscriber: 'subscriber', observer: 'observer' };

/** The changes of a plan as an operator reads them: whole regions, at most WATCH_MAX_OPS. */
function changes(plan: Plan): ChangeOp[] {
  const out: ChangeOp[] = [];
  for (const region of plan.removes) out.push({ op: 'remove', region });
  for (const { after } of plan.sets) out.push({ op: 'set', region: after });
  for (const region of plan.adds) out.push({ op: 'add', region });
  return out.slice(0, WATCH_MAX_OPS);
}

const opCount = (plan: Plan) => plan.removes.length + plan.sets.length + plan.adds.length;
const sinceUs = (t0: number) => Math.max(0, Math.round((performance.now() - t0) * 1000));

/** A commit while it runs: set by its vote. */
interface Running {
  generation?: number;
  plan?: Plan;
}

export class SpaceEvents extends EventEmitter<SpaceEventMap> {
  /** The last transactions and their outcomes, for HISTORY. */
  readonly log: TransactionLog;
  private readonly watchers = new Set<Session>();
  private seq = 0;
  private running: Running | undefined;

  constructor(
    private readonly space: WatchedSpace,
    historyLength: number,
    private readonly maxFrameBytes: number,
  ) {
    super();
    this.log = new TransactionLog(historyLength);
    this.on('vote', (generation, owner, plan, attempt) => {
      if (this.running) Object.assign(this.running, { generation, plan });
      this.broadcast({ kind: 'txn', generation, owner, ops: changes(plan), opsTotal: opCount(plan), attempt });
    });
    this.on('outcome', (entry) => this.broadcast({ kind: 'outcome', entry }));
    this.on('joined', (client, role) => this.broadcast({ kind: 'joined', client, role }));
    this.on('left', (client, role, reason) => this.broadcast({ kind: 'left', client, role, reason }));
    this.on('evicted', (client, error) => this.broadcast({ kind: 'evicted', client, error: error.toWire() }));
    this.on('holder', (h) =>
      this.broadcast({
        kind: 'holder',
        client: h.ref,
        reason: h.reason,
        state: h.state,
        backings: [...h.backings].slice(0, 1 << 16),
        alive: h.alive.slice(0, 32),
      }),
    );
    this.on('fenced', (h) => this.broadcast({ kind: 'fenced', client: h.ref, how: h.how ?? 'exited', ms: Math.max(0, Date.now() - h.since) }));
    this.on('published', (generation) => this.broadcast({ kind: 'published', generation }));
    this.on('pinned', (client, pinned, predicted) => this.broadcast({ kind: 'pinned', client, pinned, predicted }));
    this.on('dirty-sync', (r, us) =>
      this.broadcast({ kind: 'dirty-sync', regions: r.regions.length, dirty: r.regions.reduce((n, x) => n + x.dirty, 0), bytes: r.bytes, us }),
    );
  }

  // --- hooks the space calls ------------------------------------------------------------------------

  /** A connection left the space (before its session closes); `reason` as for holders. */
  left(session: Session, reason: HolderReason): void {
    const role = ROLES[session.state];
    // A subscriber still waiting for PUBLISH never joined; a leaving one was reported when it sent DETACH.
    if (role === undefined || session.subscriber?.waiting) return;
    this.emit('left', session.ref(), role, reason);
  }

  /** A holder was just created: reported, and handed back. */
  held<H extends Holder | undefined>(h: H): H {
    if (h) this.emit('holder', h);
    return h;
  }

  /** A subscriber's REPORT: pinning clients' pinned bytes are relayed (long pins report as they go). */
  reported(session: Session, pinned: number | undefined, predicted: number): void {
    if (pinned !== undefined && session.subscriber?.pins) this.emit('pinned', session.ref(), pinned, predicted);
  }

  /**
   * Runs one commit (`run`, from the space's queue) and records its outcome: committed; rolled back once
   * it was voted on; refused when it failed before any vote. `generation`: the space's generation now.
   */
  async commit<T>(owner: ClientRef, ops: readonly CommitOp[], generation: number, run: () => Promise<T>): Promise<T> {
    const started = performance.now();
    const time = Date.now();
    const running: Running = {};
    this.running = running;
    const record = (outcome: HistoryEntry['outcome'], error?: MmbError) => {
      const plan = running.plan;
      const entry = this.log.record({
        generation: running.generation ?? generation + 1,
        time,
        owner,
        outcome,
        us: sinceUs(started),
        ops: plan ? changes(plan) : [],
        opsTotal: plan ? opCount(plan) : ops.length,
        ...(plan ? {} : { request: ops.slice(0, WATCH_MAX_OPS).map((op) => ({ ...op })) }),
        ...(error ? { error: error.toWire() } : {}),
      });
      this.emit('outcome', entry);
    };
    try {
      const result = await run();
      // A commit that changed nothing was never voted on: there is nothing to record.
      if (running.plan) record('committed');
      return result;
    } catch (err) {
      const e = toMmbError(err);
      record(!running.plan ? 'refused' : e.code === 'MMB_ERR_COMMITTED_UNFENCED' ? 'committed' : 'rolled-back', e);
      throw err;
    } finally {
      if (this.running === running) this.running = undefined;
    }
  }

  /** Runs a dirty sync and reports it with its duration. */
  async dirtySync(run: () => Promise<DirtySyncResult>): Promise<DirtySyncResult> {
    const started = performance.now();
    const r = await run();
    this.emit('dirty-sync', r, sinceUs(started));
    return r;
  }

  // --- watchers and HISTORY -------------------------------------------------------------------------

  /** From now on `session` (an observer that negotiated WATCH) receives EV_WATCH. */
  watch(session: Session): void {
    this.watchers.add(session);
    session.transport.once('close', () => this.watchers.delete(session));
  }

  get watching(): number {
    return this.watchers.size;
  }

  /** HISTORY: the newest entries (before `msg.before`), oldest first, as many as fit a frame. */
  history(msg: HistoryRequest): HistoryResult {
    const { entries, more } = this.log.page(msg.before, msg.limit ?? Number.MAX_SAFE_INTEGER, this.maxFrameBytes - 4096);
    return { space: this.space.name, epoch: this.space.epoch, generation: this.space.generation, entries, more };
  }

  private broadcast(event: WatchEvent): void {
    if (this.watchers.size === 0) return;
    const message = { t: Msg.EV_WATCH, space: this.space.name, seq: ++this.seq, time: Date.now(), event };
    for (const w of this.watchers) {
      if (w.closed) this.watchers.delete(w);
      // Queued by the transport: never waited for. A watcher that stops reading is cut off there.
      else w.send(message);
    }
  }
}

/**
 * ATTACH.watch: only with feature WATCH, only for observers. Throws the refusal; true when the attaching
 * client is to be a watcher.
 */
export function wantsWatch(features: number, msg: Attach): boolean {
  if (msg.watch === undefined) return false;
  if ((features & Feature.WATCH) === 0) throw new FeatureError('ATTACH.watch needs the WATCH feature');
  if (msg.role !== 'observer') throw new StateError('only an observer watches (ATTACH.watch with role "observer")');
  return msg.watch;
}
