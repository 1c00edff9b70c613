// Fencing: a subscriber whose connection ended (evicted, dropped, or leaving) may still reach the memory
// it was given, through its own mappings, pins and memslots and through the processes it handed memory
// to (a vhost-user back-end, a child). Until it is *fenced*, the broker counts it as a holder of every
// backing it was sent: memory it may still reach is never reported unreferenced, and a change that takes
// that memory away (a removal, a region made read-only) completes only once the holder is fenced.
//
// A holder is fenced when
//   - every process that got memory through it has exited (its pidfd, taken at accept with SO_PEERPIDFD,
//     and the pidfds it named with DELEGATE poll readable: the kernel has torn down its mm and files), or
//   - it reconnected from the same live process and acked a sync of the current map (it reconciled and
//     let go of everything the map no longer has), or
//   - it sent DETACH before its connection closed (it released everything itself: a clean leave).
//
// Policy (`mmbroker serve --fence`):
//   kill  a holder that broke its contract (missed a deadline, failed to apply or roll back) is sent
//         SIGKILL through its pidfds at once; one whose connection merely dropped is sent it when a change
//         needs it fenced. Then the broker waits for the exit, at most the fence timeout.
//   wait  nobody is signalled; a change that needs a holder fenced waits for its exit (or reconcile), at
//         most the fence timeout.
// A holder that cannot be fenced within the bound (no pidfd, the broker's own process, an in-process
// subscriber, EPERM from pidfd_send_signal, a process that does not exit) makes the change fail; the
// broker never signals a pid number (pids are reused) and never its own process.
import fs from 'node:fs';
import type { Logger } from 'pino';
import { constants, native, type PollHandle } from '../native/index.js';
import { FdMismatchError, type ClientRef } from '../protocol/index.js';

export type FencePolicy = 'kill' | 'wait';

/** Throws unless every one of `fds` is a pidfd (DELEGATE): the broker will poll and may signal them. */
export function checkPidfds(fds: readonly number[]): void {
  for (const fd of fds) {
    let target = '';
    try {
      target = fs.readlinkSync(`/proc/self/fd/${fd}`);
    } catch {
      // Unreadable: refused below.
    }
    // anon_inode:[pidfd] until Linux 6.9; pidfd:[ino] on pidfs since.
    if (target !== 'anon_inode:[pidfd]' && !target.startsWith('pidfd:')) {
      throw new FdMismatchError(`DELEGATE takes pidfds (pidfd_open(2), SO_PEERPIDFD); descriptor ${fd} is ${target || 'unreadable'}`);
    }
  }
}

export interface FenceOptions {
  policy: FencePolicy;
  /** How long a change waits for a holder to be fenced before it fails. */
  timeoutMs: number;
}

/** kill: a client that stops answering must not be able to hold hotplug and unplug hostage (see docs/protocol.md). */
export const DEFAULT_FENCE_OPTIONS: Readonly<FenceOptions> = Object.freeze({ policy: 'kill', timeoutMs: 10_000 });

/** Why a holder's connection ended. */
export type HolderReason = 'evicted' | 'disconnected' | 'leaving';

export type HolderState = 'holding' | 'signalled' | 'fenced';

const SIGKILL = 9;

/** Resolves when every one of `waits` did, or after `ms`. */
async function within(ms: number, waits: Promise<void>[]): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  await Promise.race([Promise.all(waits), new Promise<void>((resolve) => (timer = setTimeout(resolve, ms)))]);
  clearTimeout(timer);
}

/** One process a holder may reach memory through, watched for its exit. */
interface Watched {
  readonly name: string;
  readonly pidfd: number;
  poll: PollHandle | undefined;
  exited: boolean;
}

export class Holder {
  state: HolderState = 'holding';
  /** How it was fenced, once it is. */
  how: 'exited' | 'reconciled' | 'detached' | undefined;
  /** It (or its back-end) maps each backing from offset 0 (ATTACH.limits.mapsFromZero): the rule still holds for it. */
  mapsFromZero = false;
  readonly since = Date.now();
  readonly fenced: Promise<void>;
  private markFenced!: () => void;
  private readonly watched: Watched[] = [];

  constructor(
    readonly ref: ClientRef,
    public reason: HolderReason,
    /** Backings it was sent (and may have mapped, pinned or handed on). */
    readonly backings: ReadonlySet<number>,
    /** Whether it lives in the broker's own process (in-process, or a socket client of the embedding process). */
    readonly local: boolean,
    pidfds: readonly { name: string; pidfd: number }[],
    private readonly onFenced: (h: Holder) => void,
  ) {
    this.fenced = new Promise((resolve) => (this.markFenced = resolve));
    for (const { name, pidfd } of pidfds) {
      const w: Watched = { name, pidfd, poll: undefined, exited: false };
      this.watched.push(w);
      try {
        w.poll = native.pollStart(pidfd, constants.POLL_READABLE, () => this.exitedOne(w));
      } catch {
        // A pidfd that cannot be polled cannot prove an exit: the holder stays unfenceable by exit.
      }
    }
  }

  /** True when the broker can make it let go within a bound: it has processes to watch, none of them ours. */
  get signallable(): boolean {
    return !this.local && this.watched.length > 0 && this.watched.every((w) => w.poll !== undefined);
  }

  /** The processes (client, delegates) that have not exited yet, for messages and status. */
  get alive(): string[] {
    return this.watched.filter((w) => !w.exited).map((w) => w.name);
  }

  /**
   * Sends SIGKILL to every process it may reach memory through. Returns the error of the first refusal
   * (EPERM: the broker may not signal it), after which the holder can only be fenced by its own exit.
   */
  kill(): Error | undefined {
    if (this.state !== 'holding' || !this.signallable) return undefined;
    this.state = 'signalled';
    let refused: Error | undefined;
    for (const w of this.watched) {
      if (w.exited) continue;
      try {
        native.pidfdSendSignal(w.pidfd, SIGKILL);
      } catch (err) {
        // ESRCH: it exited meanwhile (its poll fires); anything else means it may live on.
        if ((err as { code?: string }).code !== 'ESRCH') refused ??= err as Error;
      }
    }
    return refused;
  }

  /** It proved it let go (reconciled, or detached cleanly), or every process behind it exited. */
  fence(how: 'exited' | 'reconciled' | 'detached'): void {
    if (this.state === 'fenced') return;
    this.state = 'fenced';
    this.how = how;
    this.release();
    this.markFenced();
    this.onFenced(this);
  }

  /** Stops watching and closes the pidfds (fenced, or the broker is closing). */
  release(): void {
    for (const w of this.watched) {
      if (w.poll) native.pollClose(w.poll);
      w.poll = undefined;
      native.close(w.pidfd);
    }
    this.watched.length = 0;
  }

  private exitedOne(w: Watched): void {
    if (w.exited) return;
    w.exited = true;
    if (w.poll) native.pollClose(w.poll);
    w.poll = undefined;
    if (this.watched.every((x) => x.exited)) this.fence('exited');
  }
}

export interface HolderStatus {
  client: ClientRef;
  reason: HolderReason;
  state: HolderState;
  /** Milliseconds since its connection ended. */
  ms: number;
  backings: number[];
  /** Processes not known to have exited. */
  alive: string[];
}

/** The holders of one address space. */
export class Fences {
  private readonly holders = new Set<Holder>();

  constructor(
    private readonly opts: FenceOptions,
    private readonly log: Logger,
    /** Called once a holder is fenced, with the backings it held (they may be released now). */
    private readonly onFenced: (h: Holder) => void,
  ) {}

  get policy(): FencePolicy {
    return this.opts.policy;
  }

  /**
   * Records a holder for a subscriber whose connection ended while it may still reach memory. Takes
   * ownership of `pidfds`. A holder that broke its contract is killed at once under the kill policy.
   */
  add(ref: ClientRef, reason: HolderReason, backings: ReadonlySet<number>, local: boolean, pidfds: { name: string; pidfd: number }[]): Holder {
    const h = new Holder(ref, reason, backings, local, pidfds, (x) => {
      this.holders.delete(x);
      this.log.info({ client: x.ref, how: x.how, ms: Date.now() - x.since }, 'client fenced');
      this.onFenced(x);
    });
    this.holders.add(h);
    this.log.warn({ client: ref, reason, backings: [...backings], signallable: h.signallable }, 'client holds memory until fenced');
    if (reason === 'evicted' && this.opts.policy === 'kill') this.signal(h);
    return h;
  }

  /** Holders that may reach any of `backings`. */
  holding(backings: Iterable<number>): Holder[] {
    const set = new Set(backings);
    return [...this.holders].filter((h) => [...h.backings].some((b) => set.has(b)));
  }

  /** Whether some unfenced holder may reach `backing`. */
  holds(backing: number): boolean {
    for (const h of this.holders) if (h.backings.has(backing)) return true;
    return false;
  }

  /**
   * Fences every one of `holders` it can, within bounds, and returns those still not fenced:
   *   1. holders that may let go on their own (their connection dropped, or they are leaving) get `graceMs`
   *      to reconnect and reconcile, or to finish leaving;
   *   2. under the kill policy every one still holding and signallable (not a leaving one) is killed;
   *   3. then it waits for the exits, at most the fence timeout.
   * A holder that cannot be fenced in bounded time (in our own process, no pidfd) is waited for only in
   * step 1, since nothing but its reconcile can fence it.
   */
  async settle(holders: readonly Holder[], graceMs: number): Promise<Holder[]> {
    const open = () => holders.filter((h) => h.state !== 'fenced');
    const patient = open().filter((h) => h.reason !== 'evicted');
    if (patient.length > 0)
      await within(
        graceMs,
        patient.map((h) => h.fenced),
      );
    if (this.opts.policy === 'kill') for (const h of open()) if (h.reason !== 'leaving') this.signal(h);
    const waitable = open().filter((h) => h.signallable);
    if (waitable.length > 0)
      await within(
        this.opts.timeoutMs,
        waitable.map((h) => h.fenced),
      );
    return open();
  }

  /** Whether a holder of connection `client` from process `pid` is waiting to be fenced by a reconcile. */
  awaiting(client: number, pid: number): boolean {
    for (const h of this.holders) if (h.ref.id === client && h.ref.pid === pid && h.reason !== 'leaving') return true;
    return false;
  }

  /**
   * A subscriber that reconnected from process `pid` acked a sync of the current map: the holder of the
   * connection it resumes (`client`) let go of everything the map no longer has.
   */
  reconciled(client: number, pid: number): void {
    for (const h of this.holders) if (h.ref.id === client && h.ref.pid === pid && h.reason !== 'leaving') h.fence('reconciled');
  }

  status(): HolderStatus[] {
    const now = Date.now();
    return [...this.holders].map((h) => ({ client: h.ref, reason: h.reason, state: h.state, ms: now - h.since, backings: [...h.backings], alive: h.alive }));
  }

  all(): readonly Holder[] {
    return [...this.holders];
  }

  close(): void {
    for (const h of this.holders) h.release();
    this.holders.clear();
  }

  private signal(h: Holder): void {
    const refused = h.kill();
    if (refused) this.log.warn({ client: h.ref, err: refused.message }, 'cannot signal a client that holds memory: waiting for it to exit');
    else if (h.state === 'signalled') this.log.warn({ client: h.ref, alive: h.alive }, 'fencing: sent SIGKILL through pidfds');
  }
}
