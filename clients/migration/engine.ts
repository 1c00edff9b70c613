// Iterative pre-copy migration of an address space (the classic live-migration loop):
//   1. turn dirty logging on for every region, and clear what the bitmaps hold;
//   2. round 0 copies everything;
//   3. each further round syncs (get-and-clear of every writer's dirty bits) and copies what got dirty,
//      until what is left is small (stopBytes), the dirty set stops shrinking (a writer dirtying as fast
//      as we copy, or one that reports everything, like VFIO without dirty tracking), or the round limit
//      is hit;
//   4. the writers are paused (PAUSE: every writing subscriber stops and acks), a last sync is copied,
//      and the destination is verified byte for byte against the source;
//   5. the writers resume (unless asked to stay paused), logging goes back to how it was.
// The map must not change meanwhile: a transaction during the migration aborts it (MMB_ERR_STALE_GENERATION).
import { DIRTY_PAGE_SIZE, InternalError, StaleGenerationError, forEachBitRun, type Region } from '../../protocol/index.js';
import type { MappingSubscriber } from '../plain.js';
import type { OwnerClient } from '../owner.js';
import type { Destination } from './destination.js';
import { dataExtents, unionExtents } from './extents.js';

export interface MigrationOptions {
  /** Most dirty rounds after the first full copy. Default 30. */
  maxRounds?: number;
  /** Stop iterating once a round leaves at most this many dirty bytes. Default 1 MiB. */
  stopBytes?: number;
  /** Leave the writers paused at the end (the source stops for good). Default false: they resume. */
  keepPaused?: boolean;
  /** Compare the destination with the source while paused. Default true. */
  verify?: boolean;
  onProgress?: (p: MigrationProgress) => void;
}

export interface MigrationProgress {
  round: number;
  phase: 'full' | 'dirty' | 'final';
  /** Pages copied in this round. */
  pages: number;
  bytes: number;
  totalBytes: number;
  /** Bytes that got dirty per second since the previous round. */
  dirtyRate: number;
  ms: number;
}

export interface MigrationResult {
  rounds: MigrationProgress[];
  /** Bytes sent in all rounds. */
  totalBytes: number;
  /** Bytes of guest memory migrated. */
  memoryBytes: number;
  /** How long the writers were paused (verification included). */
  pausedMs: number;
  /** Downtime: from the pause until the last dirty page was copied (before verification). */
  downtimeMs: number;
  verified: boolean | undefined;
  converged: boolean;
  /** Why iteration stopped: little left, no more progress, or the round limit. */
  stopReason: 'converged' | 'not-shrinking' | 'round-limit';
  ms: number;
}

const PAGE = DIRTY_PAGE_SIZE;
const COPY_CHUNK = 1 << 20;

const ZERO_PAGE = Buffer.alloc(PAGE);

export class Migration {
  constructor(
    private readonly owner: OwnerClient,
    /** Reads the source: a subscriber attached with writes: false. */
    private readonly reader: MappingSubscriber,
    private readonly dest: Destination & { skipsZeroPages?: boolean },
  ) {}

  async run(opts: MigrationOptions = {}): Promise<MigrationResult> {
    const maxRounds = opts.maxRounds ?? 30;
    const stopBytes = opts.stopBytes ?? 1 << 20;
    const started = performance.now();
    const st = (await this.owner.status(this.owner.space)).spaces[0];
    if (!st) throw new InternalError(`no status for ${this.owner.space}`);
    const regions: Region[] = st.regions.map((r) => ({ ...r }));
    const generation0 = st.generation;
    const wasLogging = new Set(regions.filter((r) => r.logDirty).map((r) => r.id));
    const result: MigrationResult = { rounds: [], totalBytes: 0, memoryBytes: regions.reduce((n, r) => n + r.size, 0), pausedMs: 0, downtimeMs: 0, verified: undefined, converged: false, stopReason: 'round-limit', ms: 0 };
    const toLog = regions.filter((r) => !wasLogging.has(r.id));
    let generation = generation0;
    if (toLog.length > 0) generation = (await this.owner.commit(toLog.map((r) => ({ op: 'set' as const, region: r.id, logDirty: true })))).generation;
    await this.waitFor(generation);
    let paused = false;
    try {
      (await this.owner.dirtySync()).release(); // start from a clean slate: what follows is dirtier than round 0
      await this.dest.prepare(regions);
      let last = performance.now();
      const record = (round: number, phase: MigrationProgress['phase'], pages: number, dirtyBytes: number) => {
        const now = performance.now();
        const p: MigrationProgress = {
          round,
          phase,
          pages,
          bytes: pages * PAGE,
          totalBytes: (result.totalBytes += pages * PAGE),
          dirtyRate: phase === 'full' ? 0 : Math.round(dirtyBytes / Math.max(1e-3, (now - last) / 1000)),
          ms: +(now - last).toFixed(1),
        };
        last = now;
        result.rounds.push(p);
        opts.onProgress?.(p);
        return p;
      };

      // Round 0: everything, reading only where the backing holds data (holes are zero, and faulting
      // them in through a shared mapping would allocate them in the source).
      let pages = 0;
      for (const r of regions) {
        for (const [from, to] of this.sourceExtents(r)) pages += this.copy(from, to - from, this.dest.skipsZeroPages === true);
      }
      record(0, 'full', pages, 0);

      // Dirty rounds.
      let previous = Number.POSITIVE_INFINITY;
      for (let round = 1; round <= maxRounds; round++) {
        const copied = await this.copyDirty(generation);
        record(round, 'dirty', copied, copied * PAGE);
        if (copied * PAGE <= stopBytes) {
          result.converged = true;
          result.stopReason = 'converged';
          break;
        }
        if (round >= 3 && copied >= 0.9 * previous) {
          result.stopReason = 'not-shrinking';
          break;
        }
        previous = copied;
      }

      // Stop the writers, copy the rest, verify.
      const pauseStart = performance.now();
      await this.owner.pause();
      paused = true;
      const copied = await this.copyDirty(generation);
      record(result.rounds.length, 'final', copied, copied * PAGE);
      result.downtimeMs = +(performance.now() - pauseStart).toFixed(1);
      if (opts.verify !== false) result.verified = this.verify(regions);
      if (!opts.keepPaused) {
        await this.owner.resume();
        paused = false;
      }
      result.pausedMs = +(performance.now() - pauseStart).toFixed(1);
    } finally {
      if (paused && !opts.keepPaused) await this.owner.resume().catch(() => undefined);
      if (toLog.length > 0) await this.owner.commit(toLog.map((r) => ({ op: 'set' as const, region: r.id, logDirty: false }))).catch(() => undefined);
      await this.dest.finish();
    }
    result.ms = +(performance.now() - started).toFixed(1);
    return result;
  }

  /** Waits until the reader follows `generation`. */
  private async waitFor(generation: number): Promise<void> {
    while (this.reader.generation < generation) await new Promise((r) => setTimeout(r, 1));
  }

  /** One sync, then the dirty pages copied; returns how many. */
  private async copyDirty(generation: number): Promise<number> {
    const snap = await this.owner.dirtySync();
    try {
      const now = (await this.owner.status(this.owner.space)).spaces[0]?.generation;
      if (now !== generation) throw new StaleGenerationError(`the map changed during the migration (generation ${generation} -> ${now})`);
      let pages = 0;
      for (const r of snap.regions) {
        forEachBitRun(r.bits, r.pages, (first, count) => {
          pages += this.copy(r.gpa + first * PAGE, count * PAGE, false);
        });
      }
      return pages;
    } finally {
      snap.release();
    }
  }

  /** GPA extents of region `r` where its backing holds data. */
  private sourceExtents(r: Region): [number, number][] {
    const b = this.reader.backing(r.backing);
    if (!b) return [[r.gpa, r.gpa + r.size]];
    return dataExtents(b.fd, r.offset, r.offset + r.size).map(([a, z]) => [a - r.offset + r.gpa, z - r.offset + r.gpa]);
  }

  /** Copies [gpa, gpa + size) to the destination, page aligned; returns the pages sent. */
  private copy(gpa: number, size: number, skipZero: boolean): number {
    let pages = 0;
    const first = Math.floor(gpa / PAGE) * PAGE;
    const end = Math.ceil((gpa + size) / PAGE) * PAGE;
    for (let at = first; at < end; at += COPY_CHUNK) {
      let pos = at;
      for (const view of this.reader.memory.segments(at, Math.min(COPY_CHUNK, end - at))) {
        if (!skipZero) {
          this.dest.write(pos, view);
          pages += view.length / PAGE;
        } else {
          for (let p = 0; p < view.length; p += PAGE) {
            const page = view.subarray(p, p + PAGE);
            if (ZERO_PAGE.compare(page) === 0) continue;
            this.dest.write(pos + p, page);
            pages++;
          }
        }
        pos += view.length;
      }
    }
    return pages;
  }

  /** True when every byte of every region reads the same at the source and the destination. */
  private verify(regions: readonly Region[]): boolean {
    for (const r of regions) {
      // Outside the data of both sides, both read zero.
      for (const [from, to] of unionExtents(this.sourceExtents(r), this.dest.dataExtents(r.gpa, r.size))) {
        for (let at = from; at < to; at += COPY_CHUNK) {
          const n = Math.min(COPY_CHUNK, to - at);
          let pos = at;
          for (const view of this.reader.memory.segments(at, n)) {
            const theirs = this.dest.read(pos, view.length);
            if (Buffer.from(view.buffer, view.byteOffset, view.byteLength).compare(theirs) !== 0) return false;
            pos += view.length;
          }
        }
      }
    }
    return true;
  }
}
