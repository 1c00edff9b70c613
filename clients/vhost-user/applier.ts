// The vhost-user front-end's Applier: a map change becomes memory-table messages to the back-end, and the
// change is acked to the broker only once the back-end confirmed every one of them. One change runs as:
//   1. plan (memtable.ts): refuse, before anything is sent, what would not fit the back-end's slots or
//      would take the memory of a running vring away;
//   2. map the added regions in this process (GuestMemory: the virtqueue driver needs them too);
//   3. dirty logging: grow the shared log to cover the new table, or turn logging on when a region of
//      the table starts logging (SET_LOG_BASE, SET_FEATURES with VHOST_F_LOG_ALL, SET_VRING_ADDR with
//      VHOST_VRING_F_LOG), before the back-end may write where the log does not reach;
//   4. a reshape (memory the back-end keeps, remapped) runs with the rings stopped: drained, then
//      GET_VRING_BASE (rings.ts);
//   5. send the steps (REM_MEM_REG, ADD_MEM_REG or SET_MEM_TABLE), each waiting for its reply-ack, and a
//      GET_FEATURES round trip behind the last one (in the same write): libvhost-user acks a message it
//      panicked on and then drops the connection, so only a later answer proves the back-end is there;
//   6. restart the rings, turn logging off when nothing logs any more, unmap the removed regions here.
// A removal is therefore complete only after the back-end confirmed REM_MEM_REG (or a table without the
// region): "nothing is freed while in use" holds for the back-end's mappings too.
// A failure at step 5 undoes the steps already confirmed (in reverse, or by rebuilding the old table),
// restarts the rings, unmaps step 2's mappings and throws: the subscriber nacks and the broker rolls the
// transaction back everywhere.
//
// Dirty logging (flushDirty, at every sync): the back-end's log is folded into the subscriber's bitmaps
// with an atomic get-and-clear (log.ts). A back-end that cannot log (no VHOST_F_LOG_ALL or no LOG_SHMFD)
// makes every page it has count as dirty at every sync, never as clean.
import type { Logger } from 'pino';
import { CancelledError, DisconnectedError, NoBackingError, toMmbError, hex, rangeEnd } from '../../protocol/index.js';
import type { DirtyLog } from '../dirty.js';
import { GuestMemory } from '../memory.js';
import type { Applier, ApplyContext, Change, LocalBacking, ViewRegion } from '../view.js';
import type { VhostUserFrontend } from './frontend.js';
import { VhostLog } from './log.js';
import { planMemTable, undoSteps, type MemMode, type Step, type TableEntry } from './memtable.js';
import { Rings } from './rings.js';

export interface MemTableStats {
  /** Changes applied (confirmed by the back-end). */
  applied: number;
  setMemTable: number;
  addMemReg: number;
  remMemReg: number;
  /** Changes undone after a failure. */
  undone: number;
  /** Reshapes applied with the rings stopped around them. */
  reshapes: number;
  /** SET_LOG_BASE sent (logging turned on, or the log grown for new memory). */
  logBases: number;
  /** Dirty syncs that took the back-end's log, and that marked everything instead (a back-end that cannot log). */
  logCollects: number;
  allDirtyFlushes: number;
}

const endOf = (entries: Iterable<TableEntry>) => {
  let end = 0;
  for (const e of entries) end = Math.max(end, rangeEnd(e.gpa, e.size));
  return end;
};

export class VhostUserApplier implements Applier {
  /** This process's own mappings of guest memory (undefined with mapMemory: false). */
  readonly memory: GuestMemory | undefined;
  /** The vrings this process drives on the back-end (its virtio drivers register their queues here). */
  readonly rings = new Rings();
  private table = new Map<string, TableEntry>();
  /** The last table sent with SET_MEM_TABLE (table mode), as the back-end holds it. */
  private sentTable: readonly TableEntry[] | undefined;
  /** Accepted during a vote without a free slot; given to the back-end by the next change. */
  private deferred = new Map<string, TableEntry>();
  private log: VhostLog | undefined;
  /** VHOST_F_LOG_ALL is on at the back-end. */
  private logging = false;
  private busy: Promise<unknown> | undefined;
  readonly stats: MemTableStats = {
    applied: 0,
    setMemTable: 0,
    addMemReg: 0,
    remMemReg: 0,
    undone: 0,
    reshapes: 0,
    logBases: 0,
    logCollects: 0,
    allDirtyFlushes: 0,
  };

  constructor(
    readonly frontend: VhostUserFrontend,
    readonly mode: MemMode,
    /** The most regions the back-end is given (its slots, or fewer by choice). */
    readonly maxSlots: number,
    opts: { mapMemory?: boolean; logger?: Logger } = {},
  ) {
    this.memory = opts.mapMemory === false ? undefined : new GuestMemory();
    this.logger = opts.logger;
  }

  private readonly logger: Logger | undefined;

  /** The back-end's memory table as confirmed by it, sorted by gpa. */
  entries(): TableEntry[] {
    return [...this.table.values()].sort((a, b) => a.gpa - b.gpa);
  }

  /** Whether the back-end logs its writes now (VHOST_F_LOG_ALL with a shared log). */
  get loggingOn(): boolean {
    return this.logging;
  }

  /** Resolves once no change is being applied (it may have failed). */
  async idle(): Promise<void> {
    while (this.busy) await this.busy.catch(() => undefined);
  }

  apply(change: Change, backings: ReadonlyMap<number, LocalBacking>, ctx: ApplyContext): Promise<void> {
    const run = this.run(change, backings, ctx);
    this.busy = run;
    void run
      .finally(() => {
        if (this.busy === run) this.busy = undefined;
      })
      .catch(() => undefined);
    return run;
  }

  private async run(change: Change, backings: ReadonlyMap<number, LocalBacking>, ctx: ApplyContext): Promise<void> {
    const before = this.table;
    const rings = this.rings.ranges();
    const plan = planMemTable(before, change, this.mode, this.maxSlots, { rings, deferred: this.deferred });
    const wantLog = this.frontend.negotiated.canLog && [...plan.after.values(), ...plan.deferred.values()].some((e) => e.logDirty);
    this.memory?.apply({ ...change, removed: [], updated: [] }, backings);
    const done: Step[] = [];
    let held = false;
    const logWasOn = this.logging;
    try {
      // While VHOST_F_LOG_ALL is on the back-end logs every write, into memory logging or not: the log must
      // reach the new table before the back-end has it (libvhost-user aborts on a write beyond its log).
      const end = endOf([...plan.after.values(), ...plan.deferred.values()]);
      if (wantLog) await this.logOn(end);
      else if (this.logging) await this.growLog(end);
      if (plan.reshape && this.rings.size > 0) {
        held = true;
        await this.rings.hold('reshape');
      }
      for (const [i, step] of plan.steps.entries()) {
        if (ctx.signal.aborted) throw toMmbError(ctx.signal.reason ?? new CancelledError('the change was cancelled'));
        // The last step carries a round trip behind it (without REPLY_ACK every step does already).
        await this.exec(step, backings, i === plan.steps.length - 1);
        done.push(step);
      }
      if (plan.reshape && done.length > 0) this.stats.reshapes++;
    } catch (err) {
      await this.undo(before, done, backings, rings);
      if (held) await this.rings.release('reshape').catch(() => undefined);
      if (this.logging && !logWasOn) await this.logOff().catch(() => undefined);
      this.memory?.apply({ generation: change.generation, cause: 'undo', removed: change.added, updated: [], added: [] }, backings);
      throw toMmbError(err);
    }
    this.table = plan.after;
    this.deferred = plan.deferred;
    if (plan.deferred.size > 0) {
      this.logger?.warn(
        { regions: [...plan.deferred.values()].map((e) => e.name) },
        'vhost-user: no free slot during the vote; the regions go to the back-end after the removals that follow',
      );
    }
    this.stats.applied++;
    try {
      if (held) await this.rings.release('reshape');
      if (!wantLog && this.logging) await this.logOff();
    } catch (err) {
      // The table is applied; a back-end that fails to restart its rings is gone (the connection drops).
      this.logger?.error(
        { err: toMmbError(err).message, backend: this.frontend.path },
        'vhost-user: restarting the rings failed, dropping the back-end connection',
      );
      this.frontend.close();
      throw toMmbError(err);
    }
    this.memory?.apply({ ...change, added: [] }, backings);
  }

  private async undo(
    before: ReadonlyMap<string, TableEntry>,
    done: Step[],
    backings: ReadonlyMap<number, LocalBacking>,
    rings: ReturnType<Rings['ranges']>,
  ): Promise<void> {
    if (done.length === 0) return;
    this.stats.undone++;
    for (const step of undoSteps(before, done, this.mode, rings)) {
      try {
        await this.exec(step, backings);
      } catch (err) {
        // The back-end is in an unknown state: it must not keep memory we believe it gave up. Dropping the
        // connection makes it unmap everything; the subscriber then detaches (see subscriber.ts).
        this.logger?.error({ err: toMmbError(err).message, backend: this.frontend.path }, 'vhost-user: undo failed, dropping the back-end connection');
        this.frontend.close();
        return;
      }
    }
  }

  private async exec(step: Step, backings: ReadonlyMap<number, LocalBacking>, confirm = false): Promise<void> {
    const fdOf = (e: TableEntry) => {
      const b = backings.get(e.backing);
      if (!b) throw new NoBackingError(`region ${JSON.stringify(e.name)} references backing ${e.backing}, which this client does not hold`);
      return b.fd;
    };
    if (this.frontend.closed) throw new DisconnectedError(`the vhost-user back-end at ${this.frontend.path} is disconnected`);
    switch (step.op) {
      case 'table':
        if (this.mode === 'table' && this.sentTable && onlyMemoryDiffers(this.sentTable, step.entries)) {
          // DPDK (vhost_memory_changed) keeps its old mappings, and closes the new fds, when a table has the
          // same regions by gpa, size and uaddr as the last one, whatever their fds and offsets: the same GPA
          // range given other memory (a replace) would go unseen. An empty table first makes it remap.
          this.stats.setMemTable++;
          await this.frontend.setMemTable([], [], true);
          this.sentTable = [];
        }
        this.stats.setMemTable++;
        await this.frontend.setMemTable(step.entries, step.entries.map(fdOf), confirm);
        if (this.mode === 'table') this.sentTable = step.entries;
        this.logger?.debug({ regions: step.entries.map((e) => `${e.name}@${hex(e.gpa)}+${hex(e.size)}`) }, 'vhost-user: SET_MEM_TABLE confirmed');
        return;
      case 'add':
        this.stats.addMemReg++;
        await this.frontend.addMemReg(step.entry, fdOf(step.entry), confirm);
        this.logger?.debug({ region: step.entry.name, gpa: step.entry.gpa, size: step.entry.size }, 'vhost-user: ADD_MEM_REG confirmed');
        return;
      case 'rem':
        this.stats.remMemReg++;
        await this.frontend.remMemReg(step.entry, confirm);
        this.logger?.debug({ region: step.entry.name, gpa: step.entry.gpa, size: step.entry.size }, 'vhost-user: REM_MEM_REG confirmed');
        return;
    }
  }

  /**
   * Two-phase votes: what the commit would refuse (the memory of a running vring taken away, a table the
   * slots cannot hold) is refused now, by planning the commit's part against the table after the vote.
   */
  check(change: Change): void {
    planMemTable(this.table, change, this.mode, this.maxSlots, { rings: this.rings.ranges(), deferred: this.deferred });
  }

  /** Two-phase votes: maps now what the commit adds in place of what it removes (Applier.stage). */
  stage(regions: readonly ViewRegion[], backings: ReadonlyMap<number, LocalBacking>): void {
    this.memory?.stage(regions, backings);
  }

  unstage(regions: readonly ViewRegion[]): void {
    this.memory?.unstage(regions);
  }

  // --- dirty logging ----------------------------------------------------------------------------------

  /**
   * Makes the back-end log every write below `end`: the shared log created or grown first (SET_LOG_BASE),
   * then VHOST_F_LOG_ALL and the rings' VHOST_VRING_F_LOG, as QEMU's vhost_dev_set_log does.
   */
  private async logOn(end: number): Promise<void> {
    const log = await this.growLog(end);
    if (this.logging) return;
    // Bits from before logging started mean nothing to the bitmaps that start now.
    log.clear();
    await this.frontend.setLogAll(true);
    this.logging = true;
    await this.rings.setLogging(true);
    this.logger?.info({ backend: this.frontend.path, logBytes: log.size }, 'vhost-user: dirty logging on');
  }

  /** Creates the log or grows it to cover [0, end), and tells the back-end (SET_LOG_BASE) if it changed. */
  private async growLog(end: number): Promise<VhostLog> {
    const fresh = !this.log;
    this.log ??= new VhostLog(end);
    if (fresh || this.log.grow(end)) {
      this.stats.logBases++;
      await this.frontend.setLogBase(this.log.fd, this.log.size);
    }
    return this.log;
  }

  private async logOff(): Promise<void> {
    if (!this.logging) return;
    await this.rings.setLogging(false);
    await this.frontend.setLogAll(false);
    this.logging = false;
    // The back-end no longer logs (both confirmed): the log goes with it, so the client holds it only while
    // something logs (a later logOn makes a new one and sends SET_LOG_BASE; the back-end's mapping of this
    // one lasts until then, as in QEMU).
    this.log?.close();
    this.log = undefined;
    this.logger?.info({ backend: this.frontend.path }, 'vhost-user: dirty logging off');
  }

  /**
   * Before a dirty sync: every page the back-end logged since the last one goes into `dirty` (get-and-clear,
   * no bit lost). A back-end that cannot log has every page it maps marked instead.
   */
  flushDirty(dirty: DirtyLog): void {
    if (this.logging && this.log) {
      this.stats.logCollects++;
      this.log.collect(dirty);
      return;
    }
    if (this.frontend.negotiated.canLog) return; // nothing logs dirty pages in its table
    this.stats.allDirtyFlushes++;
    for (const e of this.table.values()) dirty.mark(e.gpa, e.size);
  }

  close(): void {
    // The back-end drops its memory table (and unmaps it) when its front-end goes away.
    this.frontend.close();
    this.table = new Map();
    this.deferred = new Map();
    this.memory?.close();
    this.log?.close();
    this.log = undefined;
  }
}

/** Two tables with the same regions by gpa, size and uaddr in order, where some region is other memory (another key). */
function onlyMemoryDiffers(before: readonly TableEntry[], after: readonly TableEntry[]): boolean {
  if (before.length !== after.length || after.length === 0) return false;
  const same = before.every((b, i) => {
    const a = after[i] as TableEntry;
    return a.gpa === b.gpa && a.size === b.size && a.uaddr === b.uaddr;
  });
  return same && before.some((b, i) => b.key !== (after[i] as TableEntry).key);
}
