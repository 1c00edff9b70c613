// Pipelined transactions (feature PIPELINE, docs/protocol.md "Pipelined transactions"): the window of
// transactions a space has sent to its subscribers and not yet committed or rolled back.
//
// What is guaranteed:
//   - order: transaction N+1 is planned against the map N leaves (the space's map holds the window's plans
//     speculatively), is sent after N on every connection, and commits only after N committed; the owner's
//     replies come in the order of its commits;
//   - all or nothing: the first refusal of N (a nack, or a holder that cannot be fenced) voids N and every
//     later transaction of the window at once: the map takes them back, every subscriber they were sent to
//     gets EV_ROLLBACK newest first, and each owner call is answered with its own typed error (N: the
//     refusal; the later ones: MMB_ERR_CANCELLED naming N) only once every rollback was acked (or its
//     client evicted and fenced);
//   - "done" means done, as without pipelining: a commit's reply comes after its own finish round (two-phase
//     subscribers ack every EV_COMMITTED of a window) and after every holder of what it takes away is fenced.
//     The next transaction may commit while an earlier one's finish round is still out: the earlier one is
//     committed already and can no longer be refused.
// Only transactions the space admits join a window (AddressSpace.pipelineable): everything else, and every
// other kind of work (attaches, publishes, dirty syncs, IOAS), waits for the window to drain first.
import type { Logger } from 'pino';
import { CancelledError, Feature, Msg, NotFencedError, type ClientRef, type CommitResult, type MmbError } from '../protocol/index.js';
import type { Holder, Fences } from './fence.js';
import type { MemoryMap, Plan } from './map.js';
import { SharedEvent, type AckResult, type SubscriberSession } from './session.js';

export interface FanOutResult {
  results: Map<SubscriberSession, AckResult>;
  /** Holders of the subscribers evicted for missing the deadline. */
  timedOut: Holder[];
}

/** What the pipeline needs from its address space (broker/space.ts). */
export interface PipelineHost {
  readonly log: Logger;
  readonly ackTimeoutMs: number;
  /** The frame limit events are encoded against (each encoded once for every subscriber: SharedEvent). */
  readonly maxFrameBytes: number;
  readonly map: MemoryMap;
  readonly fences: Fences;
  subscribers(): Iterable<SubscriberSession>;
  isSubscribed(s: SubscriberSession): boolean;
  fanOut(
    targets: readonly SubscriberSession[],
    send: (s: SubscriberSession, seq: number) => void,
    generation: number,
    onResult?: (s: SubscriberSession, r: AckResult) => void,
  ): Promise<FanOutResult>;
  /** The backings `plan` needs, each with whether a writable region needs it (made once per transaction). */
  access(plan: Plan): ReadonlyMap<number, boolean>;
  /** EV_BACKINGS for those of `access` that `s` lacks. */
  sendBackings(s: SubscriberSession, access: ReadonlyMap<number, boolean>): void;
  evict(s: SubscriberSession, err: MmbError): Holder | undefined;
  refusal(client: ClientRef, cause: MmbError, generation: number, count?: number, unfenced?: readonly Holder[]): MmbError;
  committedUnfenced(unfenced: readonly Holder[], generation: number, held: string): MmbError;
  describeHolders(hs: readonly Holder[]): string;
  /** The committed side of a commit whose plan the map already holds: refcounts, generation, history. */
  committed(plan: Plan, generation: number): void;
  /** A transaction of the window ended (committed or not): its in-flight backings may be released. */
  ended(plan: Plan): void;
  /** The backings `plan` removed regions of that no region uses and no unfenced client can reach. */
  unreferenced(plan: Plan): number[];
  /** The backings `plan` takes away (removed regions, regions made read-only). */
  taken(plan: Plan): Set<number>;
}

interface Entry {
  generation: number;
  plan: Plan;
  targets: SubscriberSession[];
  taken: Set<number>;
  /** Every target answered its EV_TXN (or missed the deadline and was evicted). */
  voted: Promise<FanOutResult>;
  /** Nacks of this transaction, in arrival order. */
  refused: [ClientRef, MmbError][];
  /** Set when the transaction is void (it, or an earlier one of its window, was refused). */
  void?: { first: Entry; undone: Promise<Holder[]> };
  /** Resolves once this transaction is committed or void: the next one may then commit. */
  settled: Promise<void>;
  settle: () => void;
}

export class Pipeline {
  /** Sent, not yet committed nor void, oldest first. */
  private readonly window: Entry[] = [];
  /** The last owner reply of a pipelined transaction (never rejects): replies come in order. */
  private lastReply: Promise<unknown> = Promise.resolve();
  /** Rollbacks of a void run still out: no transaction joins the window until they are acked. */
  private aborting: Promise<unknown> | undefined;
  /** Pipelined transactions whose owner was not answered yet. */
  private unanswered = 0;

  constructor(
    private readonly host: PipelineHost,
    /** The most transactions in flight at once. */
    readonly size: number,
  ) {}

  /** Transactions in flight (sent, not yet committed or void). */
  get length(): number {
    return this.window.length;
  }

  /** The plans in flight, oldest first (the space's map holds them). */
  plans(): Plan[] {
    return this.window.map((e) => e.plan);
  }

  /** Resolves when the window has room for one more transaction and no rollback is out. */
  async room(): Promise<void> {
    for (;;) {
      if (this.aborting) await this.aborting;
      else if (this.window.length >= this.size) await (this.window[0] as Entry).settled;
      else return;
    }
  }

  /** Nothing pipelined is in flight or unanswered (then drained() has nothing to wait for). */
  get idle(): boolean {
    return this.unanswered === 0 && this.window.length === 0 && this.aborting === undefined;
  }

  /** Resolves once every pipelined transaction was answered: the map is then the committed map. */
  async drained(): Promise<void> {
    for (;;) {
      const last = this.lastReply;
      const aborting = this.aborting;
      await last;
      if (aborting) await aborting;
      if (last === this.lastReply && this.window.length === 0 && !this.aborting) return;
      // (Replies come in order, so the last one settles after every transaction of the window.)
      const newest = this.window[this.window.length - 1];
      if (last === this.lastReply && newest) await newest.settled;
    }
  }

  /**
   * Sends `plan` (already committed to the map, speculatively) as transaction `generation` to every
   * subscriber, synchronously, and returns the owner's answer, which settles once it is committed and
   * finished, or void and rolled back.
   */
  send(plan: Plan, generation: number): Promise<CommitResult> {
    let settle!: () => void;
    const settled = new Promise<void>((r) => (settle = r));
    const targets = [...this.host.subscribers()];
    const entry: Entry = {
      generation,
      plan,
      targets,
      taken: this.host.taken(plan),
      voted: undefined as unknown as Promise<FanOutResult>,
      refused: [],
      settled,
      settle,
    };
    this.window.push(entry);
    const access = this.host.access(plan);
    const txn = new SharedEvent({ t: Msg.EV_TXN, generation, ops: plan.ops }, this.host.maxFrameBytes);
    entry.voted = this.host.fanOut(
      targets,
      (s, seq) => {
        this.host.sendBackings(s, access);
        txn.sendTo(s, seq);
      },
      generation,
      (s, r) => {
        if (r.kind !== 'nack') return;
        entry.refused.push([s.ref(), r.error]);
        this.abort(entry);
      },
    );
    const previous = this.lastReply;
    this.unanswered++;
    const answer = this.run(entry, previous);
    this.lastReply = answer.catch(() => undefined).finally(() => this.unanswered--);
    return answer;
  }

  private async run(entry: Entry, previous: Promise<unknown>): Promise<CommitResult> {
    const { host } = this;
    const { plan, generation } = entry;
    try {
      const { results } = await entry.voted;
      const before = this.window[this.window.indexOf(entry) - 1];
      if (before) await before.settled;
      // Clients whose connection ended during the vote (missed its deadline, dropped) and that may still
      // reach what this transaction takes away: nothing is taken away until they are fenced.
      const holding = entry.void || entry.taken.size === 0 ? [] : host.fences.holding(entry.taken);
      if (holding.length > 0) {
        const unfenced = await host.fences.settle(holding, host.ackTimeoutMs);
        const h = unfenced[0];
        if (h && !entry.void) {
          entry.refused.push([
            h.ref,
            new NotFencedError(
              `it may still reach memory this transaction takes away and could not be fenced (fence policy ${host.fences.policy}): ${host.describeHolders(unfenced)}`,
              { client: h.ref, generation },
            ),
          ]);
          this.abort(entry);
        }
      }
      if (entry.void) throw await this.voidError(entry, previous);

      // --- commit: the one before is committed, every target voted yes, every holder is fenced ---
      this.window.shift();
      host.committed(plan, generation);
      for (const [s, r] of results) if (r.kind === 'ack') s.subscriber.ackedGeneration = generation;
      // A two-phase subscriber acks every commit of a window: its vote may have left adds for the commit
      // (they replace memory an earlier transaction of the window removes at its own commit).
      const twoPhase: SubscriberSession[] = [];
      const onePhase: SubscriberSession[] = [];
      for (const s of host.subscribers()) ((s.features & Feature.TWO_PHASE) !== 0 ? twoPhase : onePhase).push(s);
      const notice = new SharedEvent({ t: Msg.EV_COMMITTED, generation }, host.maxFrameBytes);
      notice.sendToAll(onePhase);
      const finishing = host.fanOut(twoPhase, (s, seq) => notice.sendTo(s, seq), generation);
      entry.settle();
      const finished = await finishing;
      const unfinished = [...finished.timedOut];
      for (const [s, r] of finished.results) {
        if (r.kind !== 'nack') continue;
        const h = host.evict(s, host.refusal(s.ref(), r.error, generation));
        if (h) unfinished.push(h);
      }
      const unfenced = await host.fences.settle(
        [...new Set([...unfinished, ...(entry.taken.size > 0 ? host.fences.holding(entry.taken) : [])])],
        host.ackTimeoutMs,
      );
      await previous;
      if (unfenced.length > 0) throw host.committedUnfenced(unfenced, generation, 'the backings it may reach stay held until it is');
      return { generation, added: plan.adds.map((r) => ({ id: r.id, name: r.name })), unreferenced: host.unreferenced(plan) };
    } finally {
      entry.settle();
      host.ended(plan);
    }
  }

  /**
   * Voids `entry` and every later transaction of the window: the map takes them back and every subscriber
   * they went to is told EV_ROLLBACK, newest first, all at once (a client still working on one stops).
   */
  private abort(entry: Entry): void {
    if (entry.void) return;
    const i = this.window.indexOf(entry);
    if (i < 0) return;
    const run = this.window.splice(i);
    const newestFirst = [...run].reverse();
    for (const e of newestFirst) this.host.map.revert(e.plan);
    const rollbacks = newestFirst.map((e) => {
      const rollback = new SharedEvent({ t: Msg.EV_ROLLBACK, generation: e.generation }, this.host.maxFrameBytes);
      return this.host.fanOut(
        e.targets.filter((s) => !s.closed && this.host.isSubscribed(s)),
        (s, seq) => rollback.sendTo(s, seq),
        e.generation,
      );
    });
    const undone = (async () => {
      const failed: Holder[] = [];
      for (const [k, undo] of rollbacks.entries()) {
        const r = await undo;
        failed.push(...r.timedOut);
        const g = (newestFirst[k] as Entry).generation;
        for (const [s, a] of r.results) {
          if (a.kind !== 'nack') continue;
          const h = this.host.evict(s, this.host.refusal(s.ref(), a.error, g));
          if (h) failed.push(h);
        }
      }
      // Who failed to undo (or missed the rollback's deadline) may still map what was undone: fence it.
      return this.host.fences.settle(failed, this.host.ackTimeoutMs);
    })();
    const aborting = Promise.all([this.aborting, undone]).catch(() => undefined);
    this.aborting = aborting;
    void aborting.then(() => {
      if (this.aborting === aborting) this.aborting = undefined;
    });
    for (const e of run) {
      e.void = { first: entry, undone };
      e.settle();
    }
    this.host.log.warn({ generations: run.map((e) => e.generation) }, 'pipelined transactions void: rolled back newest first');
  }

  /** The owner's error for a void transaction, once its rollback was acked everywhere and after the replies before it. */
  private async voidError(entry: Entry, previous: Promise<unknown>): Promise<MmbError> {
    const { first, undone } = entry.void as NonNullable<Entry['void']>;
    await entry.voted;
    const unfenced = await undone;
    await previous;
    const real = first.refused.filter(([, e]) => e.code !== 'MMB_ERR_CANCELLED');
    const [who, error] = real[0] ?? first.refused[0] ?? [undefined, undefined];
    const refusal = who && error ? this.host.refusal(who, error, first.generation, real.length || 1, unfenced) : undefined;
    if (entry === first) {
      if (!refusal) throw new Error('a void transaction without a refusal');
      this.host.log.warn(
        { generation: entry.generation, client: refusal.client, code: refusal.code, cause: error?.message },
        'transaction refused and rolled back',
      );
      return refusal;
    }
    return new CancelledError(
      `generation ${entry.generation} was rolled back: it followed generation ${first.generation} in the pipeline${refusal ? `, which was refused (${refusal.code})` : ''}`,
      {
        generation: entry.generation,
        ...(refusal ? { cause: refusal, client: refusal.client } : {}),
      },
    );
  }
}
