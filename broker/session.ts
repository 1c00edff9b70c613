// One connected client as the broker sees it: its transport, what it negotiated, what it holds, and the
// acks it owes. The protocol state machine of a connection:
//
//   NEW --HELLO--> READY --ATTACH(owner)--> OWNER
//                        |-ATTACH(subscriber)--> SUBSCRIBER --DETACH--> LEAVING
//                        \-ATTACH(observer)--> OBSERVER
//   any --close / eviction / protocol error--> CLOSED
//
// STATUS is allowed from READY on; BACKING_ADD / BACKING_DROP / COMMIT only as OWNER; ACK / NACK only as
// SUBSCRIBER, and only for an event the broker is waiting on.
import { native } from '../native/index.js';
import type { Transport } from '../transport/index.js';
import {
  Feature,
  Msg,
  encodeFrame,
  encodeSeqFrame,
  setSeq,
  type SeqFrame,
  type Attach,
  type ClientRef,
  type DmaRules,
  type Iova,
  type MmbError,
  type Range,
  type Region,
} from '../protocol/index.js';
import { compactSyncPart } from './sync.js';

export type AckResult = { kind: 'ack' } | { kind: 'nack'; error: MmbError } | { kind: 'timeout' } | { kind: 'gone' };

export type SessionState = 'new' | 'ready' | 'owner' | 'subscriber' | 'observer' | 'leaving' | 'closed';

/** What a subscriber last said with REPORT (feature REPORT); each REPORT replaces only what it names. */
export interface Reported {
  /** IOVA ranges it cannot map, half-open (the wire's inclusive REPORT.reserved, converted as it arrives). */
  reserved: Range<Iova>[];
  dmaAvailable?: number;
  /** Bytes it says it has pinned now. */
  pinned?: number;
  coherent?: boolean;
  /** The wire's REPORT.backend: what holds its memory, in its kind's word (docs/protocol.md, REPORT). */
  backend?: string;
  /** Feature MIGRATION: how its writes reach the dirty log; what it says about migrating its devices. */
  dirtyTracking?: string;
  migration?: { quiesce: boolean; deviceState: boolean };
  devices: string[];
  /** Feature DMA_RULES: how it cuts regions into DMA mappings and their IOVA alignment (broker/policy.ts). */
  dma?: DmaRules;
}

/**
 * What only a subscriber session has: what it declared at ATTACH (fixed for the connection), where it
 * stands in the space's transactions, the view it follows, and what it reported. Made at ATTACH as a
 * subscriber; owners and observers have none.
 */
export class SubscriberState {
  /** The most regions it can follow (ATTACH.limits.maxRegions). */
  readonly maxRegions: number;
  /** Follows a coalesced view (feature COALESCE); `view` is that view as last committed to it. */
  readonly coalesce: boolean;
  /** Maps each region's backing from offset 0 (feature MAPS_FROM_ZERO): a vhost-user back-end's mmap. */
  readonly mapsFromZero: boolean;
  /** Pins every region it maps (feature PIN), at most `pinLimit` bytes. */
  readonly pins: boolean;
  readonly pinLimit: number;
  /** Whether it writes guest memory (ATTACH.writes, default true). */
  readonly writes: boolean;
  /** The connection it resumes (ATTACH.resume.client, feature FENCE). */
  readonly resumes: number | undefined;
  /** Generation it is known to have applied (its sync, or the last commit it acked). */
  ackedGeneration = 0;
  /** It has not acked its initial sync yet. */
  syncing = false;
  /** It is applying a transaction right now. */
  applying = false;
  /** Attached to an unpublished space, waiting for its sync (feature PUBLISH). */
  waiting = false;
  view: Region[] = [];
  readonly reported: Reported = { reserved: [], devices: [] };

  constructor(msg: Attach) {
    this.maxRegions = msg.limits?.maxRegions ?? Number.POSITIVE_INFINITY;
    this.coalesce = msg.limits?.coalesce ?? false;
    this.mapsFromZero = msg.limits?.mapsFromZero ?? false;
    this.pins = msg.pin !== undefined;
    this.pinLimit = msg.pin?.limit ?? Number.POSITIVE_INFINITY;
    this.writes = msg.writes ?? true;
    this.resumes = msg.resume?.client;
  }
}

/** A session attached as a subscriber: it has its SubscriberState. */
export type SubscriberSession = Session & { readonly subscriber: SubscriberState };

/** A client as messages name it: "vhost client \"backend0\" (#4, pid 1234)". */
export function describeClient(c: ClientRef): string {
  return `${c.kind} client ${JSON.stringify(c.name)} (#${c.id}, pid ${c.pid})`;
}

/**
 * One connection: its transport, state, what it negotiated, the descriptors it was sent, the acks it owes
 * and the request rate. What only subscribers have is in `subscriber`.
 */
export class Session {
  state: SessionState = 'new';
  features = 0;
  name = 'anonymous';
  kind = 'unknown';
  spaceName: string | undefined;
  /** Set by ATTACH as a subscriber (becomeSubscriber); undefined for every other role. */
  subscriber: SubscriberState | undefined;
  /** Processes this client handed memory to (DELEGATE, feature FENCE): pidfds this session owns. */
  readonly delegates: { name: string; pidfd: number }[] = [];
  /** Backings this connection was sent an fd for (and has not been told are gone): true if read-write. */
  readonly sentBackings = new Map<number, boolean>();
  /** Dirty bitmaps this connection was sent (feature DIRTY). */
  readonly sentBitmaps = new Set<number>();
  private seq = 0;
  private readonly waiters = new Map<number, (r: AckResult) => void>();
  // The request rate limit: a token bucket (acks and nacks do not draw from it).
  private tokens: number;
  private refilled = performance.now();

  constructor(
    readonly id: number,
    readonly transport: Transport,
    private readonly rate: { requestsPerSecond: number; requestBurst: number } = { requestsPerSecond: Infinity, requestBurst: Infinity },
  ) {
    this.tokens = rate.requestBurst;
  }

  /** Takes one request from the bucket; false when the connection is over its rate. */
  admitRequest(): boolean {
    const now = performance.now();
    this.tokens = Math.min(this.rate.requestBurst, this.tokens + ((now - this.refilled) / 1000) * this.rate.requestsPerSecond);
    this.refilled = now;
    if (this.tokens < 1) return false;
    this.tokens -= 1;
    return true;
  }

  /** ATTACH as a subscriber: the session takes the role and a fresh SubscriberState from `msg`. */
  becomeSubscriber(msg: Attach): SubscriberSession {
    this.state = 'subscriber';
    this.subscriber = new SubscriberState(msg);
    return this as SubscriberSession;
  }

  /** An ATTACH that was refused after the role was taken: back to READY, with no role state left. */
  unattach(): void {
    this.state = 'ready';
    this.spaceName = undefined;
    this.subscriber = undefined;
  }

  isSubscriber(): this is SubscriberSession {
    return this.subscriber !== undefined;
  }

  get pid(): number {
    return this.transport.peer.pid;
  }

  get uid(): number {
    return this.transport.peer.uid;
  }

  /** Whether this client lives in the broker's own process (in-process, or a socket peer that is us). */
  get local(): boolean {
    return this.transport.kind === 'inproc' || this.transport.peer.pid === process.pid;
  }

  /**
   * The processes this client may reach memory through, as pidfds the caller owns: the peer's own
   * (SO_PEERPIDFD, dup()ed) and its delegates' (handed over). Empty for in-process clients.
   */
  takePidfds(): { name: string; pidfd: number }[] {
    const out: { name: string; pidfd: number }[] = [];
    const own = this.transport.peer.pidfd;
    if (own !== undefined && own >= 0) {
      try {
        out.push({ name: `${this.name} (pid ${this.pid})`, pidfd: native.dup(own) });
      } catch {
        // Out of descriptors: the holder is then fenced only by reconcile, never by an exit it cannot see.
      }
    }
    out.push(...this.delegates.splice(0));
    return out;
  }

  get closed(): boolean {
    return this.state === 'closed' || this.transport.closed;
  }

  ref(): ClientRef {
    return { id: this.id, kind: this.kind, name: this.name, pid: this.pid };
  }

  /** "vhost client 'backend0' (#4, pid 1234)" for messages. */
  describe(): string {
    return describeClient(this.ref());
  }

  send(message: object, fds?: readonly number[]): void {
    // Feature COMPACT_SYNC: every EV_SYNC part goes out through here (space.ts builds them in the plain
    // form), as columns to a client that negotiated it.
    if ((this.features & Feature.COMPACT_SYNC) !== 0 && (message as { t?: unknown }).t === Msg.EV_SYNC) {
      message = compactSyncPart(message as { regions: readonly Region[] });
    }
    this.transport.send(message, fds);
  }

  reply(id: number, result: object): void {
    this.transport.send({ t: Msg.REPLY, id, result });
  }

  replyError(id: number, err: MmbError): void {
    this.transport.send({ t: Msg.REPLY, id, error: err.toWire() });
  }

  /** Allocates the sequence number of an event this session must ack, and returns the ack's promise. */
  expectAck(): { seq: number; done: Promise<AckResult> } {
    let seq = 0;
    const done = new Promise<AckResult>((resolve) => (seq = this.expect(resolve)));
    return { seq, done };
  }

  /**
   * Allocates the sequence number of an event this session must ack; `answered` is called once with how it
   * was answered (at once with 'gone' if the session is closed). No promise: a fan-out counts its answers.
   */
  expect(answered: (r: AckResult) => void): number {
    const seq = ++this.seq;
    if (this.closed) answered({ kind: 'gone' });
    else this.waiters.set(seq, answered);
    return seq;
  }

  /** Sends a frame encoded once for many sessions (SharedEvent). */
  sendFrame(frame: Uint8Array): void {
    this.transport.sendFrame(frame);
  }

  /** Resolves the wait for `seq`; false if nothing waited for it (a stale or duplicate ack). */
  settle(seq: number, result: AckResult): boolean {
    const resolve = this.waiters.get(seq);
    if (!resolve) return false;
    this.waiters.delete(seq);
    resolve(result);
    return true;
  }

  /** Everything it owes resolves as 'gone', the connection staying open (a subscriber that sent DETACH). */
  abandon(): void {
    for (const resolve of this.waiters.values()) resolve({ kind: 'gone' });
    this.waiters.clear();
  }

  /** The connection is gone: everything it owed resolves as 'gone'. */
  close(): void {
    if (this.state === 'closed') return;
    this.state = 'closed';
    for (const d of this.delegates.splice(0)) native.close(d.pidfd);
    for (const resolve of this.waiters.values()) resolve({ kind: 'gone' });
    this.waiters.clear();
  }

  /** Tells the client why (EV_GOODBYE) and closes the connection once that is flushed. */
  goodbye(err: MmbError): void {
    this.transport.end({ t: Msg.EV_GOODBYE, error: err.toWire() });
  }
}

/**
 * One event for many sessions, encoded once (issue 18: the fan-out's cost per subscriber): `sendTo` gives
 * each its own seq by patching the shared frame (protocol/frame.ts SeqFrame), `sendToAll` sends the same
 * bytes to each. A message that does not encode that way is encoded per session, as send() would; one
 * over the frame limit throws FrameTooLargeError for each session, as send() would.
 */
export class SharedEvent {
  private seqFrame: SeqFrame | undefined | null = null;
  private plain: Buffer | undefined;

  constructor(
    private readonly message: { t: number } & Record<string, unknown>,
    private readonly maxFrameBytes: number,
  ) {}

  /** The event with `seq` (the ack `s` owes for it). */
  sendTo(s: Session, seq: number): void {
    if (this.seqFrame === null) this.seqFrame = encodeSeqFrame(this.message, this.maxFrameBytes);
    // (A seq beyond 32 bits, after 4 billion acks on one connection, does not fit the shared frame.)
    if (this.seqFrame === undefined || seq > 0xffff_ffff) s.send({ ...this.message, seq });
    else s.sendFrame(setSeq(this.seqFrame, seq));
  }

  /** The event as it is (nothing to ack). */
  sendToAll(sessions: Iterable<Session>): void {
    for (const s of sessions) {
      this.plain ??= encodeFrame(this.message, 0, this.maxFrameBytes);
      s.sendFrame(this.plain);
    }
  }
}
