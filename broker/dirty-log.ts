// Dirty-page logging of one address space (for migration; not the broker's log output, which is pino's
// `log`): which regions log (their bitmaps), who gets the bitmaps, syncs (flush every writer, then
// get-and-clear into the requester's buffer), pausing the writers for the last round of a migration, and
// the observers that receive dirty ranges.
//
// Who writes, and how their writes reach the bitmaps:
//   - a subscriber that negotiated DIRTY and writes (ATTACH.writes, default true) gets every bitmap
//     (EV_BITMAPS) and sets bits itself; before a sync it is asked to flush what it holds
//     (EV_DIRTY_FLUSH: a KVM client copies KVM's dirty log in, a VFIO client without hardware dirty
//     tracking marks all it has mapped writable) and the sync waits for its ack;
//   - a subscriber that writes but did not negotiate DIRTY cannot say what it wrote: every writable
//     logged region is reported entirely dirty at each sync while it is attached (never a lost bit);
//   - a subscriber with writes: false, and an observer, write nothing.
import type { Logger } from 'pino';
import { constants, native, type Mapping } from '../native/index.js';
import {
  BufferInvalidError,
  BufferTooSmallError,
  ClientRefusedError,
  Feature,
  Msg,
  NotLoggingError,
  UnsupportedError,
  createError,
  isErrorCode,
  type DirtySyncResult,
  type MmbError,
  type Region,
} from '../protocol/index.js';
import { inspectMemoryFd } from './backings.js';
import { DirtyBitmaps, dirtyRanges, type Bitmap } from './dirty.js';
import type { Plan } from './map.js';
import type { AckResult, Session, SubscriberSession } from './session.js';

/** What dirty logging needs from its address space. */
export interface DirtyLogHost {
  readonly log: Logger;
  readonly maxFrameBytes: number;
  readonly maxFdsPerFrame: number;
  subscribers(): Iterable<SubscriberSession>;
  lookup(ref: number | string): Region | undefined;
  /** Sends an ackable event to `targets`, waits (evicting who misses the deadline), reports answers. */
  fanOut(
    targets: readonly SubscriberSession[],
    send: (s: SubscriberSession, seq: number) => void,
    generation: number,
  ): Promise<Map<SubscriberSession, AckResult>>;
  evict(s: Session, err: MmbError): void;
  readonly generation: number;
}

/** A subscriber that negotiated DIRTY and writes: it holds bitmaps and flushes. */
const tracksDirt = (s: SubscriberSession): boolean => s.subscriber.writes && (s.features & Feature.DIRTY) !== 0;
/** A subscriber that writes but cannot say where. */
const blindWriter = (s: SubscriberSession): boolean => s.subscriber.writes && (s.features & Feature.DIRTY) === 0;

export class DirtyLogging {
  readonly bitmaps = new DirtyBitmaps();
  readonly observers = new Set<Session>();
  private _paused = false;
  private syncs = 0;

  constructor(private readonly host: DirtyLogHost) {}

  get paused(): boolean {
    return this._paused;
  }

  // --- transactions -------------------------------------------------------------------------------

  /** Bitmaps for the regions a plan starts logging (created now, adopted only if the plan commits). */
  create(plan: Plan): Bitmap[] {
    const starting = [...plan.adds.filter((r) => r.logDirty), ...plan.sets.filter((x) => x.after.logDirty && !x.before.logDirty).map((x) => x.after)];
    const created: Bitmap[] = [];
    try {
      for (const r of starting) created.push(this.bitmaps.create(r));
    } catch (err) {
      for (const b of created) this.bitmaps.destroy(b);
      throw err;
    }
    return created;
  }

  /** Sends `s` the bitmaps among `list` it lacks, if it tracks dirt (before the event that needs them). */
  send(s: Session, list: Iterable<Bitmap>): void {
    if (!s.isSubscriber() || !tracksDirt(s)) return;
    const missing = [...list].filter((b) => !s.sentBitmaps.has(b.id));
    for (let i = 0; i < missing.length; i += this.host.maxFdsPerFrame) {
      const chunk = missing.slice(i, i + this.host.maxFdsPerFrame);
      s.send(
        { t: Msg.EV_BITMAPS, bitmaps: chunk.map((b) => this.bitmaps.info(b)) },
        chunk.map((b) => b.fd),
      );
      for (const b of chunk) s.sentBitmaps.add(b.id);
    }
  }

  /** The transaction was refused: its new bitmaps go, and whoever got them is told. */
  discard(created: readonly Bitmap[]): void {
    this.release(created);
  }

  /** The transaction committed: adopt its new bitmaps, drop those of regions that stopped logging. */
  commit(plan: Plan, created: readonly Bitmap[]): void {
    const stopped = [...plan.removes.map((r) => r.id), ...plan.sets.filter((x) => !x.after.logDirty && x.before.logDirty).map((x) => x.after.id)]
      .map((id) => this.bitmaps.forRegion(id))
      .filter((b): b is Bitmap => b !== undefined);
    for (const b of created) this.bitmaps.adopt(b);
    this.release(stopped);
  }

  private release(list: readonly Bitmap[]): void {
    if (list.length === 0) return;
    for (const s of this.host.subscribers()) {
      const gone = list.filter((b) => s.sentBitmaps.delete(b.id)).map((b) => b.id);
      if (gone.length > 0) s.send({ t: Msg.EV_BITMAPS_GONE, bitmaps: gone });
    }
    for (const b of list) this.bitmaps.destroy(b);
  }

  // --- sync ---------------------------------------------------------------------------------------

  /**
   * Retires the active halves of the bitmaps of `refs` (default: every logging region), flushes every
   * writer, then moves the retired bits into the buffer `fd` (ownership taken: closed here), one region
   * after another at 8-byte aligned offsets.
   */
  async sync(refs: readonly (number | string)[] | undefined, fd: number): Promise<DirtySyncResult> {
    let list: Bitmap[];
    try {
      list = refs === undefined ? [...this.bitmaps.all()] : refs.map((ref) => this.bitmapOf(ref));
    } catch (err) {
      native.close(fd);
      throw err;
    }
    list.sort((a, b) => a.gpa - b.gpa);
    const needed = list.reduce((n, b) => n + b.layout.bytes, 0);
    // The buffer is checked and mapped before any bit moves, so a bad buffer loses nothing; sealed against
    // shrinking, the requester cannot truncate it under our mapping (SIGBUS) while the writers flush.
    let out: Mapping | undefined;
    try {
      const { size } = inspectMemoryFd(fd, BufferInvalidError, BufferInvalidError);
      if (size < needed) throw new BufferTooSmallError(`the dirty bitmaps of ${list.length} region(s) need ${needed} bytes; the buffer has ${size}`);
      out = needed === 0 ? undefined : native.mmap(fd, 0, needed, constants.PROT_READ | constants.PROT_WRITE, constants.MAP_SHARED);
    } catch (err) {
      native.close(fd);
      throw err;
    }
    try {
      const subscribers = [...this.host.subscribers()];
      // 1. Retire the active halves: from now on writers set bits in the other halves.
      const retired = list.map((b) => this.bitmaps.flip(b));
      // 2. Writers flush what they hold (KVM's dirty log, all-writable for VFIO without dirty tracking)
      //    into the retired halves, and ack once nothing of theirs writes there any more.
      const flushers = subscribers.filter(tracksDirt);
      if (flushers.length > 0 && list.length > 0) {
        const results = await this.host.fanOut(flushers, (s, seq) => s.send({ t: Msg.EV_DIRTY_FLUSH, seq }), this.host.generation);
        for (const [s, r] of results) {
          if (r.kind === 'nack') this.host.evict(s, r.error);
        }
      }
      // 3. Writers that cannot say what they wrote make everything they could write dirty.
      if (subscribers.some(blindWriter)) {
        list.forEach((b, i) => {
          if (!this.host.lookup(b.region)?.readonly) this.bitmaps.markAll(b, retired[i] as number);
        });
      }
      // 4. Collect the retired halves (nobody writes there now) into the requester's buffer.
      const regions: DirtySyncResult['regions'] = [];
      let offset = 0;
      for (const [i, b] of list.entries()) {
        const dirty = this.bitmaps.take(b, retired[i] as number, out!, offset);
        regions.push({ region: b.region, name: this.host.lookup(b.region)?.name ?? `region${b.region}`, gpa: b.gpa, pages: b.pages, offset, dirty });
        offset += b.layout.bytes;
      }
      if (this.observers.size > 0 && out) this.notifyObservers(list, regions, new Uint8Array(out.buffer));
      this.host.log.debug({ regions: regions.length, dirty: regions.reduce((n, r) => n + r.dirty, 0) }, 'dirty sync');
      return { regions, bytes: needed };
    } finally {
      if (out) native.munmap(out);
      native.close(fd);
    }
  }

  private bitmapOf(ref: number | string): Bitmap {
    const r = this.host.lookup(ref);
    if (!r) throw createError('MMB_ERR_NO_REGION', `no region ${JSON.stringify(ref)}`);
    const b = this.bitmaps.forRegion(r.id);
    if (!b) throw new NotLoggingError(`region ${JSON.stringify(r.name)} does not log dirty pages`);
    return b;
  }

  /** EV_DIRTY to every observer: the dirty ranges of this sync, split to fit frames. */
  private notifyObservers(list: readonly Bitmap[], regions: DirtySyncResult['regions'], out: Uint8Array): void {
    const sync = ++this.syncs;
    const ranges = list.flatMap((b, i) => dirtyRanges(out.subarray((regions[i] as { offset: number }).offset), b.gpa, b.pages));
    const perPart = Math.max(1, Math.floor((this.host.maxFrameBytes - 256) / 24));
    const parts = Math.max(1, Math.ceil(ranges.length / perPart));
    for (const o of this.observers) {
      for (let p = 0; p < parts; p++) {
        o.send({ t: Msg.EV_DIRTY, sync, part: p, last: p === parts - 1, ranges: ranges.slice(p * perPart, (p + 1) * perPart) });
      }
    }
  }

  // --- pause --------------------------------------------------------------------------------------

  /** Asks every writer to stop (or resume) writing guest memory, and waits for all of them. */
  async pause(paused: boolean): Promise<void> {
    const subscribers = [...this.host.subscribers()];
    const blind = subscribers.find(blindWriter);
    if (blind) {
      throw new UnsupportedError(`${blind.describe()} writes guest memory but cannot be paused (it did not negotiate DIRTY)`, { client: blind.ref() });
    }
    const writers = subscribers.filter(tracksDirt);
    const results = await this.host.fanOut(writers, (s, seq) => s.send({ t: Msg.EV_PAUSE, seq, paused }), this.host.generation);
    const refused = [...results].find(([, r]) => r.kind === 'nack') as [SubscriberSession, { kind: 'nack'; error: MmbError }] | undefined;
    if (refused) {
      // All or nothing: those that already switched switch back.
      const switched = [...results].filter(([t, r]) => r.kind === 'ack' && !t.closed).map(([t]) => t);
      if (switched.length > 0) await this.host.fanOut(switched, (t, seq) => t.send({ t: Msg.EV_PAUSE, seq, paused: !paused }), this.host.generation);
      const [s, { error }] = refused;
      const code = isErrorCode(error.code) ? error.code : 'MMB_ERR_CLIENT_REFUSED';
      throw code === 'MMB_ERR_CLIENT_REFUSED'
        ? new ClientRefusedError(`${s.describe()} refused to ${paused ? 'pause' : 'resume'}: ${error.message}`, { client: s.ref(), cause: error })
        : createError(code, `${s.describe()} refused to ${paused ? 'pause' : 'resume'}: ${error.message}`, { client: s.ref(), cause: error });
    }
    this._paused = paused;
    this.host.log.info({ paused, writers: writers.length }, paused ? 'writers paused' : 'writers resumed');
  }

  close(): void {
    this.bitmaps.closeAll();
  }
}
