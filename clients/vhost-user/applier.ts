// The vhost-user front-end's Applier: a map change becomes memory-table messages to the back-end, and the
// change is acked to the broker only once the back-end confirmed every one of them. One change runs as:
//   1. plan (memtable.ts): refuse, before anything is sent, what would not fit the back-end's slots;
//   2. map the added regions in this process (GuestMemory: the virtqueue driver needs them too);
//   3. send the steps (REM_MEM_REG, ADD_MEM_REG or SET_MEM_TABLE), each waiting for its reply-ack;
//   4. unmap the removed regions here.
// A removal is therefore complete only after the back-end confirmed REM_MEM_REG (or a table without the
// region): "nothing is freed while in use" holds for the back-end's mappings too.
// A failure at step 3 undoes the steps already confirmed (in reverse), unmaps step 2's mappings and throws:
// the subscriber nacks and the broker rolls the transaction back everywhere.
import type { Logger } from 'pino';
import { CancelledError, DisconnectedError, NoBackingError, toMmbError } from '../../protocol/index.js';
import { GuestMemory } from '../memory.js';
import type { Applier, ApplyContext, Change, LocalBacking, ViewRegion } from '../view.js';
import type { VhostUserFrontend } from './frontend.js';
import { planMemTable, undoSteps, type MemMode, type Step, type TableEntry } from './memtable.js';

export interface MemTableStats {
  /** Changes applied (confirmed by the back-end). */
  applied: number;
  setMemTable: number;
  addMemReg: number;
  remMemReg: number;
  /** Changes undone after a failure. */
  undone: number;
}

const hex = (n: number) => `0x${n.toString(16)}`;

export class VhostUserApplier implements Applier {
  /** This process's own mappings of guest memory (undefined with mapMemory: false). */
  readonly memory: GuestMemory | undefined;
  private table = new Map<string, TableEntry>();
  readonly stats: MemTableStats = { applied: 0, setMemTable: 0, addMemReg: 0, remMemReg: 0, undone: 0 };

  constructor(
    readonly frontend: VhostUserFrontend,
    readonly mode: MemMode,
    /** The most regions the back-end is given (its slots, or fewer by choice). */
    readonly maxSlots: number,
    opts: { mapMemory?: boolean; logger?: Logger } = {},
  ) {
    this.memory = opts.mapMemory === false ? undefined : new GuestMemory();
    this.log = opts.logger;
  }

  private readonly log: Logger | undefined;

  /** The back-end's memory table as confirmed by it, sorted by gpa. */
  entries(): TableEntry[] {
    return [...this.table.values()].sort((a, b) => a.gpa - b.gpa);
  }

  async apply(change: Change, backings: ReadonlyMap<number, LocalBacking>, ctx: ApplyContext): Promise<void> {
    const before = this.table;
    const plan = planMemTable(before, change, this.mode, this.maxSlots);
    this.memory?.apply({ ...change, removed: [], updated: [] }, backings);
    const done: Step[] = [];
    try {
      for (const step of plan.steps) {
        if (ctx.signal.aborted) throw toMmbError(ctx.signal.reason ?? new CancelledError('the change was cancelled'));
        await this.exec(step, backings);
        done.push(step);
      }
    } catch (err) {
      await this.undo(before, done, backings);
      this.memory?.apply({ generation: change.generation, cause: 'undo', removed: change.added, updated: [], added: [] }, backings);
      throw toMmbError(err);
    }
    this.table = plan.after;
    this.stats.applied++;
    this.memory?.apply({ ...change, added: [] }, backings);
  }

  private async undo(before: ReadonlyMap<string, TableEntry>, done: Step[], backings: ReadonlyMap<number, LocalBacking>): Promise<void> {
    if (done.length === 0) return;
    this.stats.undone++;
    for (const step of undoSteps(before, done, this.mode)) {
      try {
        await this.exec(step, backings);
      } catch (err) {
        // The back-end is in an unknown state: it must not keep memory we believe it gave up. Dropping the
        // connection makes it unmap everything; the subscriber then detaches (see subscriber.ts).
        this.log?.error({ err: toMmbError(err).message, backend: this.frontend.path }, 'vhost-user: undo failed, dropping the back-end connection');
        this.frontend.close();
        return;
      }
    }
  }

  private async exec(step: Step, backings: ReadonlyMap<number, LocalBacking>): Promise<void> {
    const fdOf = (e: TableEntry) => {
      const b = backings.get(e.backing);
      if (!b) throw new NoBackingError(`region ${JSON.stringify(e.name)} references backing ${e.backing}, which this client does not hold`);
      return b.fd;
    };
    if (this.frontend.closed) throw new DisconnectedError(`the vhost-user back-end at ${this.frontend.path} is disconnected`);
    switch (step.op) {
      case 'table':
        this.stats.setMemTable++;
        await this.frontend.setMemTable(step.entries, step.entries.map(fdOf));
        this.log?.debug({ regions: step.entries.map((e) => `${e.name}@${hex(e.gpa)}+${hex(e.size)}`) }, 'vhost-user: SET_MEM_TABLE confirmed');
        return;
      case 'add':
        this.stats.addMemReg++;
        await this.frontend.addMemReg(step.entry, fdOf(step.entry));
        this.log?.debug({ region: step.entry.name, gpa: step.entry.gpa, size: step.entry.size }, 'vhost-user: ADD_MEM_REG confirmed');
        return;
      case 'rem':
        this.stats.remMemReg++;
        await this.frontend.remMemReg(step.entry);
        this.log?.debug({ region: step.entry.name, gpa: step.entry.gpa, size: step.entry.size }, 'vhost-user: REM_MEM_REG confirmed');
        return;
    }
  }

  /** Two-phase votes: maps now what the commit adds in place of what it removes (Applier.stage). */
  stage(regions: readonly ViewRegion[], backings: ReadonlyMap<number, LocalBacking>): void {
    this.memory?.stage(regions, backings);
  }

  unstage(regions: readonly ViewRegion[]): void {
    this.memory?.unstage(regions);
  }

  close(): void {
    // The back-end drops its memory table (and unmaps it) when its front-end goes away.
    this.frontend.close();
    this.table = new Map();
    this.memory?.close();
  }
}
