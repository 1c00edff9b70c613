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
import { Feature, Msg, type ClientRef, type DmaRules, type IovaRange, type MmbError, type Region } from '../protocol/index.js';
import { compactSyncPart } from './sync.js';

export type AckResult =
  | { kind: 'ack' }
  | { kind: 'nack'; error: MmbError }
  | { kind: 'timeout' }
  | { kind: 'gone' };

export type SessionState = 'new' | 'ready' | 'owner' | 'subscriber' | 'observer' | 'leaving' | 'closed';

export class Session {
  state: SessionState = 'new';
  features = 0;
  name = 'anonymous';
  kind = 'unknown';
  spaceName: string | undefined;
  /** Generation this subscriber is known to have applied (its sync, or the last commit it acked). */
  ackedGeneration = 0;
  /** A subscriber that has not acked its initial sync yet. */
  syncing = false;
  /** A subscriber that is applying a transaction right now. */
  applying = false;
  /** A subscriber attached to an unpublished space, waiting for its sync (feature PUBLISH). */
  waiting = false;
  /** The connection this one resumes (ATTACH.resume.client, feature FENCE). */
  resumes: number | undefined;
  /** Processes this client handed memory to (DELEGATE, feature FENCE): pidfds this session owns. */
  readonly delegates: { name: string; pidfd: number }[] = [];
  /** Backings this connection was sent an fd for (and has not been told are gone): true if read-write. */
  readonly sentBackings = new Map<number, boolean>();
  /** Dirty bitmaps this connection was sent (feature DIRTY). */
  readonly sentBitmaps = new Set<number>();
  /** Whether this subscriber writes guest memory (ATTACH.writes, default true). */
  writes = true;
  /** The most regions this subscriber can follow (declared at ATTACH). */
  maxRegions = Number.POSITIVE_INFINITY;
  /** Follows a coalesced view (feature COALESCE); `view` is that view as last committed to it. */
  coalesce = false;
  view: Region[] = [];
  /** Pins every region it maps (feature PIN), at most `pinLimit` bytes. */
  pins = false;
  pinLimit = Number.POSITIVE_INFINITY;
  // What the client reported (feature REPORT).
  reserved: IovaRange[] = [];
  dmaAvailable: number | undefined;
  pinnedActual: number | undefined;
  coherent: boolean | undefined;
  backend: string | undefined;
  /** Feature MIGRATION: how its writes reach the dirty log; what it says about migrating its devices. */
  dirtyTracking: string | undefined;
  migration: { quiesce: boolean; deviceState: boolean } | undefined;
  devices: string[] = [];
  /** Feature DMA_RULES: how it cuts regions into DMA mappings and their IOVA alignment (broker/policy.ts). */
  dma: DmaRules | undefined;
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
    return `${this.kind} client ${JSON.stringify(this.name)} (#${this.id}, pid ${this.pid})`;
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
    const seq = ++this.seq;
    if (this.closed) return { seq, done: Promise.resolve({ kind: 'gone' }) };
    const done = new Promise<AckResult>((resolve) => this.waiters.set(seq, resolve));
    return { seq, done };
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
