// Iterative pre-copy migration of an address space (the classic live-migration loop), while the guest
// keeps writing and its map keeps changing:
//   1. device clients that would make the copy wrong block it (blockers.ts) unless the owner accepts the
//      risk; logging is turned on for every region, and one sync starts from a clean slate;
//   2. round 0 copies every region whole (only where its backing holds data);
//   3. each further round syncs (get-and-clear of every writer's dirty bits), then reads the map: regions
//      added since are logged and copied whole, removed ones are dropped at the destination, flag changes
//      are carried; the destination is told the map at every round; then the dirty pages are copied. It
//      goes on until what is left is small (stopBytes), the dirty set stops shrinking, or the round limit;
//   4. once the destination holds everything sent so far, the writers are paused (PAUSE: every writing
//      subscriber stops and acks), the last dirty pages (and
//      any region still to copy) are copied, until the map is the same before and after the copy; the
//      destination confirms it holds every byte (the downtime ends there), is verified against the source,
//      and commits (a space is published);
//   5. the writers resume (unless asked to stay paused); logging goes back to how it was.
// Transactions are never refused because a migration runs. A failure anywhere (a broken connection to a
// remote destination included) aborts the destination (nothing half-copied is published) and resumes the
// writers: the source goes on as if nothing happened.
//
// Correctness rests on one order: a region's logging is on (its transaction acked by every writer)
// before its whole copy starts, so every write after the copy read a page is in a later sync. Bytes are
// read with pread(2) from the reader's fd of the region's own backing, looked up for every chunk: a region
// being replaced at the same address is never read through the other one's memory, and reading a hole
// allocates nothing in the source.
import { DIRTY_PAGE_SIZE, InternalError, InvalidArgError, forEachBitRun, isMmbError, type Region, type StatusResult } from '../../protocol/index.js';
import type { MappingSubscriber } from '../plain.js';
import type { OwnerClient } from '../owner.js';
import { migrationBlockers, MigrationBlockedError, type MigrationBlocker } from './blockers.js';
import { mapChanges, type Destination, type MigrationMap } from './destination.js';
import { dataExtents } from './extents.js';
import type { StreamRegion } from './stream.js';
import { preadFull, type MemoryImage, type VerifyResult } from './verify.js';

export interface MigrationOptions {
  /** Most dirty rounds after the first full copy. Default 30. */
  maxRounds?: number;
  /** Stop iterating once a round leaves at most this many dirty bytes. Default 1 MiB. */
  stopBytes?: number;
  /** Leave the writers paused at the end of a successful migration (the source stops for good). Default false. */
  keepPaused?: boolean;
  /** Compare the destination with the source while paused. Default true. */
  verify?: boolean;
  /** Migrate although device clients block it (blockers.ts): their DMA or state may be lost. Default false. */
  acceptDeviceRisk?: boolean;
  /** Guest bytes per write to the destination. Default 1 MiB. */
  chunkBytes?: number;
  /** Each round's figures; a returned promise is awaited before the next round. */
  onProgress?: (p: MigrationProgress) => void | Promise<void>;
  /** Aborting it aborts the migration (the destination is aborted, the writers resume). */
  signal?: AbortSignal;
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
  /** The source's generation this round's map is from, and its regions. */
  generation: number;
  regions: number;
  /** Map changes since the previous round (region names). */
  added: string[];
  removed: string[];
  changed: string[];
}

export interface MigrationResult {
  rounds: MigrationProgress[];
  /** Bytes sent in all rounds. */
  totalBytes: number;
  /** Bytes of guest memory in the final map. */
  memoryBytes: number;
  /** How long the writers were paused (verification included). */
  pausedMs: number;
  /** Downtime: from the pause until the destination confirmed the last byte (verification excluded). */
  downtimeMs: number;
  verified: boolean | undefined;
  /** What verification found (the first difference, if any). */
  verification?: VerifyResult;
  converged: boolean;
  /** Why iteration stopped: little left, no more progress, or the round limit. */
  stopReason: 'converged' | 'not-shrinking' | 'round-limit';
  /** The map the destination holds at the end, and the source generation it is from. */
  finalMap: StreamRegion[];
  finalGeneration: number;
  /** Device clients migrated although they block migration (acceptDeviceRisk). */
  acceptedRisks: MigrationBlocker[];
  ms: number;
}

const PAGE = DIRTY_PAGE_SIZE;
const ZERO_PAGE = Buffer.alloc(PAGE);
/** Rounds of the paused phase before giving up on a map that keeps changing. */
const MAX_FINAL_PASSES = 20;

interface Tracked {
  region: Region;
  /** Copied whole since its logging was last turned on (or found on). */
  sent: boolean;
  /** Ever copied: the destination's region holds its bytes (a fresh one reads zero). */
  everSent: boolean;
}

const toStream = (r: Region): StreamRegion => ({ id: r.id, name: r.name, gpa: r.gpa, size: r.size, readonly: r.readonly });

export class Migration {
  private readonly tracked = new Map<number, Tracked>();
  /** Regions whose logging this migration turned on (and turns off at the end). */
  private readonly turnedOn = new Set<number>();
  private lastMap: StreamRegion[] = [];
  private chunk = 1 << 20;
  private scratch = Buffer.alloc(0);
  private signal: AbortSignal | undefined;
  private started = false;

  constructor(
    private readonly owner: OwnerClient,
    /** Reads the source: a subscriber attached with writes: false. */
    private readonly reader: MappingSubscriber,
    private readonly dest: Destination,
  ) {}

  /** Runs the migration; once per Migration (it keeps the state of the rounds). */
  async run(opts: MigrationOptions = {}): Promise<MigrationResult> {
    if (this.started) throw new InvalidArgError('a Migration runs once: make a new one (and a new destination) to migrate again');
    this.started = true;
    const maxRounds = opts.maxRounds ?? 30;
    const stopBytes = opts.stopBytes ?? 1 << 20;
    this.chunk = opts.chunkBytes ?? 1 << 20;
    this.signal = opts.signal;
    const started = performance.now();
    const st = await this.space();
    const blockers = migrationBlockers(st.clients);
    if (blockers.length > 0 && !opts.acceptDeviceRisk) throw new MigrationBlockedError(blockers);
    const result: MigrationResult = {
      rounds: [],
      totalBytes: 0,
      memoryBytes: 0,
      pausedMs: 0,
      downtimeMs: 0,
      verified: undefined,
      converged: false,
      stopReason: 'round-limit',
      finalMap: [],
      finalGeneration: st.generation,
      acceptedRisks: blockers,
      ms: 0,
    };
    let paused = false;
    let succeeded = false;
    let opened = false;
    try {
      await this.dest.open({ space: this.owner.space, epoch: st.epoch, memoryBytes: st.regions.reduce((n, r) => n + r.size, 0) });
      opened = true;
      let last = performance.now();
      const record = async (
        round: number,
        phase: MigrationProgress['phase'],
        pages: number,
        dirtyPages: number,
        map: MigrationMap,
        changes: ReturnType<typeof mapChanges>,
      ) => {
        const now = performance.now();
        const p: MigrationProgress = {
          round,
          phase,
          pages,
          bytes: pages * PAGE,
          totalBytes: (result.totalBytes += pages * PAGE),
          dirtyRate: phase === 'full' ? 0 : Math.round((dirtyPages * PAGE) / Math.max(1e-3, (now - last) / 1000)),
          ms: +(now - last).toFixed(1),
          generation: map.generation,
          regions: map.regions.length,
          added: changes.added.map((r) => r.name),
          removed: changes.removed.map((r) => r.name),
          changed: changes.flags.map((r) => r.name),
        };
        last = now;
        result.rounds.push(p);
        await opts.onProgress?.(p);
        return p;
      };

      // Round 0: logging on everywhere (refresh), a clean slate, everything whole.
      let { map, changes } = await this.refresh(0, 'full', false);
      (await this.owner.dirtySync()).release();
      this.checkAborted();
      let pages = await this.copyUnsent();
      await record(0, 'full', pages, 0, map, changes);

      // Dirty rounds.
      let previous = Number.POSITIVE_INFINITY;
      for (let round = 1; round <= maxRounds; round++) {
        const r = await this.dirtyRound(round, 'dirty', false);
        await record(round, 'dirty', r.pages, r.dirty, r.map, r.changes);
        if (r.pages * PAGE <= stopBytes) {
          result.converged = true;
          result.stopReason = 'converged';
          break;
        }
        if (round >= 3 && r.pages >= 0.9 * previous) {
          result.stopReason = 'not-shrinking';
          break;
        }
        previous = r.pages;
      }

      // Everything sent so far in place first (a remote receiver may be behind by what the socket holds),
      // so that the downtime covers only what the last round sends.
      await this.dest.flush();
      // Stop the writers; copy what is left until the map holds still; the destination confirms.
      const pauseStart = performance.now();
      await this.owner.pause();
      paused = true;
      pages = 0;
      let dirty = 0;
      const all: ReturnType<typeof mapChanges> = { added: [], removed: [], flags: [] };
      for (let pass = 0; ; pass++) {
        if (pass >= MAX_FINAL_PASSES) throw new InternalError(`the map kept changing while the writers were paused (${MAX_FINAL_PASSES} passes)`);
        const r = await this.dirtyRound(result.rounds.length, 'final', true);
        pages += r.pages;
        dirty += r.dirty;
        all.added.push(...r.changes.added);
        all.removed.push(...r.changes.removed);
        all.flags.push(...r.changes.flags);
        map = r.map;
        const now = (await this.space()).generation;
        if (now === map.generation && [...this.tracked.values()].every((t) => t.sent)) break;
      }
      await this.dest.flush();
      result.downtimeMs = +(performance.now() - pauseStart).toFixed(1);
      await record(result.rounds.length, 'final', pages, dirty, map, all);
      result.finalMap = map.regions;
      result.finalGeneration = map.generation;
      result.memoryBytes = map.regions.reduce((n, r) => n + r.size, 0);
      if (opts.verify !== false) {
        result.verification = await this.dest.verify(this.sourceImage(), map);
        result.verified = result.verification.identical;
      }
      if (result.verified === false) {
        await this.dest.abort(new InternalError(`verification failed: ${result.verification?.difference ?? ''}`));
      } else {
        await this.dest.commit();
        succeeded = true;
      }
      if (!(succeeded && opts.keepPaused)) {
        await this.owner.resume();
        paused = false;
      }
      result.pausedMs = +(performance.now() - pauseStart).toFixed(1);
    } catch (err) {
      if (opened) await this.dest.abort(err).catch(() => undefined);
      throw err;
    } finally {
      // Whatever happened, the source goes on: writers resumed (unless a successful migration keeps them
      // paused), logging back to how it was.
      if (paused && !(succeeded && opts.keepPaused)) await this.owner.resume().catch(() => undefined);
      await this.restoreLogging();
      await this.dest.close().catch(() => undefined);
    }
    result.ms = +(performance.now() - started).toFixed(1);
    return result;
  }

  private async space(): Promise<StatusResult['spaces'][number]> {
    const st = (await this.owner.status(this.owner.space)).spaces[0];
    if (!st) throw new InternalError(`no status for ${this.owner.space}`);
    return st;
  }

  private checkAborted(): void {
    if (this.signal?.aborted)
      throw isMmbError(this.signal.reason) ? this.signal.reason : new InternalError(`the migration was aborted: ${String(this.signal.reason)}`);
  }

  /** One sync, the map read after it, what is new copied whole and the dirty pages of the rest. */
  private async dirtyRound(round: number, phase: MigrationProgress['phase'], paused: boolean) {
    this.checkAborted();
    const snap = await this.owner.dirtySync();
    try {
      const { map, changes } = await this.refresh(round, phase, paused);
      await this.waitReader(map.generation);
      // Dirty pages of regions copied whole before (one copied whole now needs none).
      const sentBefore = new Set([...this.tracked.values()].filter((t) => t.sent).map((t) => t.region.id));
      let pages = await this.copyUnsent();
      let dirty = 0;
      for (const r of snap.regions) {
        if (!sentBefore.has(r.region)) continue;
        const runs: [number, number][] = [];
        forEachBitRun(r.bits, r.pages, (first, count) => {
          runs.push([first, count]);
        });
        for (const [first, count] of runs) {
          dirty += count;
          const n = await this.copy(r.region, first * PAGE, count * PAGE, false);
          if (n < 0) break; // the reader does not hold it now: the region is copied whole at the next pass
          pages += n;
        }
      }
      return { map, changes, pages, dirty };
    } finally {
      snap.release();
    }
  }

  /**
   * Reads the source's map: regions not logging have logging turned on (not while paused: nothing
   * writes) and are copied whole; removed ones are forgotten; the destination is told the map.
   */
  private async refresh(
    round: number,
    phase: MigrationProgress['phase'],
    paused: boolean,
  ): Promise<{ map: MigrationMap; changes: ReturnType<typeof mapChanges> }> {
    let st = await this.space();
    if (!paused) {
      const off = st.regions.filter((r) => !r.logDirty);
      if (off.length > 0) {
        await this.enableLogging(off);
        st = await this.space();
      }
    }
    const now = new Map(st.regions.map((r) => [r.id, r]));
    for (const id of [...this.tracked.keys()]) if (!now.has(id)) this.tracked.delete(id);
    for (const r of st.regions) {
      const t = this.tracked.get(r.id);
      if (!t) this.tracked.set(r.id, { region: r, sent: false, everSent: false });
      else {
        // Logging turned off behind our back: what was written meanwhile is unknown, copy it whole again.
        if (!r.logDirty && !paused) t.sent = false;
        t.region = r;
      }
    }
    const map: MigrationMap = { round, phase, generation: st.generation, regions: st.regions.map(toStream) };
    const changes = mapChanges(this.lastMap, map.regions);
    await this.dest.setMap(map);
    this.lastMap = map.regions;
    return { map, changes };
  }

  /** Turns logging on for `regions`, one commit; a region removed meanwhile is skipped. */
  private async enableLogging(regions: readonly Region[]): Promise<void> {
    const on = async (rs: readonly Region[]) => {
      await this.owner.commit(rs.map((r) => ({ op: 'set' as const, region: r.id, logDirty: true })));
      for (const r of rs) this.turnedOn.add(r.id);
    };
    try {
      await on(regions);
    } catch (err) {
      if (!isMmbError(err, 'MMB_ERR_NO_REGION')) throw err;
      // One of them went away meanwhile: one by one, skipping the ones gone.
      for (const r of regions) await on([r]).catch((e: unknown) => (isMmbError(e, 'MMB_ERR_NO_REGION') ? undefined : Promise.reject(e)));
    }
  }

  /** Turns off the logging this migration turned on, for the regions still there. */
  private async restoreLogging(): Promise<void> {
    const ids = [...this.turnedOn];
    this.turnedOn.clear();
    if (ids.length === 0) return;
    const present = new Set((await this.space().catch(() => undefined))?.regions.map((r) => r.id) ?? []);
    const ops = ids.filter((id) => present.has(id)).map((id) => ({ op: 'set' as const, region: id, logDirty: false }));
    if (ops.length === 0) return;
    await this.owner.commit(ops).catch(async () => {
      for (const op of ops) await this.owner.commit([op]).catch(() => undefined);
    });
  }

  /** Waits until the reader has applied generation `g` (it acked it before the broker committed it). */
  private async waitReader(g: number): Promise<void> {
    while (this.reader.generation < g) {
      this.checkAborted();
      await new Promise((r) => setTimeout(r, 1));
    }
  }

  /** Copies every tracked region not yet copied whole; returns the pages sent. */
  private async copyUnsent(): Promise<number> {
    let pages = 0;
    for (const t of [...this.tracked.values()].sort((a, b) => a.region.gpa - b.region.gpa)) {
      if (t.sent) continue;
      const b = this.reader.backing(t.region.backing);
      // Only where the backing holds data: holes read zero, and faulting them in through a shared mapping
      // would allocate them in the source. A region the destination never had reads zero there too.
      const extents = b
        ? dataExtents(b.fd, t.region.offset, t.region.offset + t.region.size).map(([a, z]) => [a - t.region.offset, z - t.region.offset] as const)
        : [[0, t.region.size] as const];
      let complete = true;
      for (const [from, to] of extents) {
        const n = await this.copy(t.region.id, from, to - from, this.dest.zeroFilled && !t.everSent);
        if (n < 0) {
          complete = false;
          break;
        }
        pages += n;
      }
      // A region the reader does not map (yet) is copied at the next pass.
      if (complete && this.tracked.get(t.region.id) === t) {
        t.sent = true;
        t.everSent = true;
      }
    }
    return pages;
  }

  /** The reader's fd of region `t`'s backing and the region's offset in it, if the reader holds it now. */
  private source(t: Tracked): { fd: number; offset: number } | undefined {
    if (this.tracked.get(t.region.id) !== t) return undefined;
    const b = this.reader.backing(t.region.backing);
    if (!b) {
      t.sent = false;
      return undefined;
    }
    return { fd: b.fd, offset: t.region.offset };
  }

  /**
   * Copies region `id`'s bytes [offset, offset + size) (page aligned) to the destination, in chunks, each
   * read with pread(2) from the reader's fd of the region's backing, looked up again for every chunk (a
   * transaction may change the map while a write waits; a region's backing never changes, and pread of a
   * hole returns zeros without allocating anything in the source). `skipZero`: pages that read all zero
   * are not sent. Returns the pages sent, or -1 when the reader does not hold the backing (the region is
   * gone, or its transaction not applied yet): the caller copies it again later.
   */
  private async copy(id: number, offset: number, size: number, skipZero: boolean): Promise<number> {
    let pages = 0;
    const first = Math.floor(offset / PAGE) * PAGE;
    const end = Math.ceil((offset + size) / PAGE) * PAGE;
    for (let at = first, n = 0; at < end; at += n) {
      n = Math.min(this.chunk, end - at);
      const t = this.tracked.get(id);
      if (!t) return pages; // removed: the destination drops it
      const src = this.source(t);
      if (!src) return -1;
      const gpa = t.region.gpa + at;
      if (!skipZero && this.dest.writeFrom) {
        // Straight from the page cache into the destination's buffer.
        await this.dest.writeFrom(gpa, n, (into) => preadFull(src.fd, into, src.offset + at));
        pages += n / PAGE;
        continue;
      }
      // The engine's own buffer holds the chunk until it is written (nothing else uses it meanwhile).
      if (this.scratch.length < n) this.scratch = Buffer.allocUnsafe(n);
      const view = this.scratch.subarray(0, n);
      preadFull(src.fd, view, src.offset + at);
      if (!skipZero) {
        await this.dest.write(gpa, view);
        pages += n / PAGE;
        continue;
      }
      // Runs of pages that are not all zero, each written at once.
      let run = -1;
      for (let p = 0; p <= n; p += PAGE) {
        const zero = p === n || ZERO_PAGE.compare(view, p, p + PAGE) === 0;
        if (!zero && run < 0) run = p;
        if (zero && run >= 0) {
          await this.dest.write(gpa + run, view.subarray(run, p));
          pages += (p - run) / PAGE;
          run = -1;
        }
      }
    }
    return pages;
  }

  /** The source as a verifier reads it: the reader's backing fds, with pread (holes stay holes). */
  private sourceImage(): MemoryImage {
    const region = (r: StreamRegion) => {
      const t = this.tracked.get(r.id);
      const b = t && this.reader.backing(t.region.backing);
      if (!t || !b) throw new InternalError(`region ${r.name} (#${r.id}): the reader holds no backing for it`);
      return { region: t.region, fd: b.fd };
    };
    return {
      extents: (r) => {
        const { region: x, fd } = region(r);
        return dataExtents(fd, x.offset, x.offset + x.size).map(([a, b]) => [a - x.offset, b - x.offset]);
      },
      read: (r, offset, into) => {
        const { region: x, fd } = region(r);
        preadFull(fd, into, x.offset + offset);
      },
    };
  }
}
