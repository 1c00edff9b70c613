// The running vrings of one back-end connection, stopped and restarted as one: around a reshape of memory
// the back-end has (the applier), and while migration pauses the writers (the subscriber). Two reasons can
// overlap (a reshape during a pause): the rings run again only when neither holds them.
//
// What "stopped" guarantees: every queue stopped at the back-end (GET_VRING_BASE answered), after the
// requests it had taken completed where the queue drains (virtqueue.ts); requests made meanwhile wait in
// this process. A stopped back-end therefore neither reads nor writes guest memory for these rings: it
// logs nothing, and a region it has can be remapped under it without a request in flight into it.
//
// The queues are this process's own virtio drivers (VirtioBlk, VirtioNet): the bridge is the back-end's
// only front-end, so these are all the rings the back-end runs.
import { toMmbError } from '../../protocol/index.js';
import type { GuestRange } from './memtable.js';

/** What a queue offers: virtqueue.ts. */
export interface RingQueue {
  readonly index: number;
  /** Guest-physical range of the descriptor table, available and used ring. */
  readonly ringRange: GuestRange;
  halt(): Promise<void>;
  resume(logging: boolean): Promise<void>;
  setLogging(on: boolean): Promise<void>;
}

export type HoldReason = 'reshape' | 'pause';

export class Rings {
  private readonly queues = new Set<RingQueue>();
  private readonly holds = new Map<HoldReason, number>();
  private _logging = false;
  /** Times the rings were stopped and started again, by reason. */
  readonly stats = { stops: 0, restarts: 0, reshapeStops: 0, pauseStops: 0 };

  /** Whether the back-end logs its used-ring writes (VRING_F_LOG in SET_VRING_ADDR). */
  get logging(): boolean {
    return this._logging;
  }

  /** Whether anything holds the rings stopped now. */
  get stopped(): boolean {
    return this.holds.size > 0;
  }

  get size(): number {
    return this.queues.size;
  }

  /** Where the rings are in guest-physical memory. */
  ranges(): GuestRange[] {
    return [...this.queues].map((q) => q.ringRange);
  }

  /** A queue that started: stopped at once if the rings are stopped now. */
  async add(q: RingQueue): Promise<void> {
    this.queues.add(q);
    if (this.stopped) await q.halt();
  }

  delete(q: RingQueue): void {
    this.queues.delete(q);
  }

  /**
   * Stops the rings for `reason` (counted: every hold needs its release). Resolves once every queue is
   * stopped at the back-end; a failure (the back-end gone) leaves the hold taken, to be released.
   */
  async hold(reason: HoldReason): Promise<void> {
    const was = this.stopped;
    this.holds.set(reason, (this.holds.get(reason) ?? 0) + 1);
    if (was || this.queues.size === 0) return;
    this.stats.stops++;
    if (reason === 'reshape') this.stats.reshapeStops++;
    else this.stats.pauseStops++;
    // Every queue drains at once; GET_VRING_BASE goes out for each as soon as its requests completed.
    const results = await Promise.allSettled([...this.queues].map((q) => q.halt()));
    const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed) throw toMmbError(failed.reason);
  }

  /** Releases one hold for `reason`; when none is left, every queue is set up again and runs. */
  async release(reason: HoldReason): Promise<void> {
    const n = this.holds.get(reason) ?? 0;
    if (n === 0) return;
    if (n > 1) this.holds.set(reason, n - 1);
    else this.holds.delete(reason);
    if (this.stopped || this.queues.size === 0) return;
    this.stats.restarts++;
    for (const q of [...this.queues]) await q.resume(this._logging);
  }

  /** Whether a hold for `reason` is taken (pause is not counted twice). */
  holding(reason: HoldReason): boolean {
    return this.holds.has(reason);
  }

  /** Turns used-ring logging on or off on every running queue (stopped ones get it when they restart). */
  async setLogging(on: boolean): Promise<void> {
    if (this._logging === on) return;
    this._logging = on;
    if (this.stopped) return;
    for (const q of [...this.queues]) await q.setLogging(on);
  }
}
