// Where a migration copies guest memory: a sparse raw image file, another address space (of this broker,
// or of the receiving broker: `receive()` feeds a SpaceDestination from the stream), or a receiver on
// another host (TcpDestination, tcp.ts). The engine tells a destination the source's map at every round
// (setMap: regions it has not seen are added, those no longer listed dropped, flag changes carried), then
// the guest bytes of that round (write), and at the end asks it to confirm everything arrived (flush),
// to compare itself with the paused source (verify), and to make the copy authoritative (commit) or to
// throw it away (abort).
import fs from 'node:fs';
import { native } from '../../native/index.js';
import { InvalidArgError, type CommitOp, hex, rangeContains, rangeEnd, rangesOverlap } from '../../protocol/index.js';
import type { BrokerTarget } from '../connection.js';
import { OwnerClient } from '../owner.js';
import { dataExtents } from './extents.js';
import type { MapBody, StreamRegion } from './stream.js';
import { compareImages, mapDifference, preadFull, type MemoryImage, type VerifyResult } from './verify.js';

/** The source's map at one round: regions by the source's ids. */
export type MigrationMap = MapBody;

export interface SourceInfo {
  space: string;
  epoch: string;
  /** Bytes of guest memory at the start. */
  memoryBytes: number;
}

export interface Destination {
  /** Describes the destination in progress lines and the summary. */
  readonly description: string;
  /** Pages never written read as zero (a new image or space): the first copy may skip all-zero pages. */
  readonly zeroFilled: boolean;
  /** Opens the destination (before the first map). */
  open(source: SourceInfo): Promise<void>;
  /**
   * The source's map at this round. Regions not seen before are added (their bytes follow), regions no
   * longer listed are dropped, flags (read-only) follow the source. Called before any byte of a region
   * it adds, and at every round.
   */
  setMap(map: MigrationMap): void | Promise<void>;
  /**
   * Guest bytes at `gpa`, inside one region of the last map. `bytes` is valid only during the synchronous
   * part of the call (it may be a view of guest memory that a later change unmaps): keep a copy if needed.
   * A returned promise asks the engine to wait (backpressure).
   */
  write(gpa: number, bytes: Uint8Array): void | Promise<void>;
  /**
   * Optional: `length` guest bytes at `gpa` that `fill` reads straight into the destination's own buffer
   * (a remote destination's record), saving a copy. Same contract as write() otherwise.
   */
  writeFrom?(gpa: number, length: number, fill: (into: Uint8Array) => void): void | Promise<void>;
  /** Resolves once everything written so far is in place at the destination (remote: acknowledged). */
  flush(): Promise<void>;
  /** Compares the copy with the (paused) source under `map`. */
  verify(source: MemoryImage, map: MigrationMap): Promise<VerifyResult>;
  /** The migration succeeded: the copy becomes authoritative (a space is published). */
  commit(): Promise<void>;
  /** The migration failed: nothing half-copied stays visible (a space is left unpublished and empty). */
  abort(reason: unknown): Promise<void>;
  /** Releases everything (after commit or abort). */
  close(): Promise<void>;
}

/** Regions that differ between two maps, by the source's ids. */
export function mapChanges(
  before: readonly StreamRegion[],
  after: readonly StreamRegion[],
): { added: StreamRegion[]; removed: StreamRegion[]; flags: StreamRegion[] } {
  const old = new Map(before.map((r) => [r.id, r]));
  const now = new Map(after.map((r) => [r.id, r]));
  return {
    added: after.filter((r) => !old.has(r.id)),
    removed: before.filter((r) => !now.has(r.id)),
    flags: after.filter((r) => old.has(r.id) && (old.get(r.id) as StreamRegion).readonly !== r.readonly),
  };
}

/**
 * A sparse raw image: file offset X holds the guest byte at GPA X. Ranges no region covers are never
 * written and stay holes; so are the pages the first round finds all zero; a region dropped during the
 * migration is zeroed where it held data. `PATH.map.json` records the map of every round.
 */
export class FileDestination implements Destination {
  private fd: number | undefined;
  private regions: StreamRegion[] = [];
  private readonly rounds: MigrationMap[] = [];
  readonly zeroFilled = true;

  constructor(readonly path: string) {}

  get description(): string {
    return `sparse image ${this.path}`;
  }

  /** Where the maps of every round are recorded. */
  get mapPath(): string {
    return `${this.path}.map.json`;
  }

  async open(): Promise<void> {
    this.fd = fs.openSync(this.path, 'w+', 0o600);
  }

  setMap(map: MigrationMap): void {
    const fd = this.fd as number;
    const { removed } = mapChanges(this.regions, map.regions);
    const zeros = Buffer.alloc(1 << 20);
    for (const r of removed) {
      for (const [from, to] of dataExtents(fd, r.gpa, rangeEnd(r.gpa, r.size))) {
        for (let at = from; at < to; at += zeros.length) this.write(at, zeros.subarray(0, Math.min(zeros.length, to - at)));
      }
    }
    const end = map.regions.reduce((n, r) => Math.max(n, rangeEnd(r.gpa, r.size)), 0);
    if (end > fs.fstatSync(fd).size) fs.ftruncateSync(fd, end);
    this.regions = map.regions;
    this.rounds.push(map);
    fs.writeFileSync(this.mapPath, `${JSON.stringify({ rounds: this.rounds }, null, 1)}\n`, { mode: 0o600 });
  }

  write(gpa: number, bytes: Uint8Array): void {
    let done = 0;
    while (done < bytes.length) done += fs.writeSync(this.fd as number, bytes, done, bytes.length - done, gpa + done);
  }

  async flush(): Promise<void> {
    // pwrite(2) has put every byte in the page cache: what a reader of the file sees.
  }

  async verify(source: MemoryImage, map: MigrationMap): Promise<VerifyResult> {
    const fd = this.fd as number;
    const image: MemoryImage = {
      extents: (r) => dataExtents(fd, r.gpa, rangeEnd(r.gpa, r.size)).map(([a, b]) => [a - r.gpa, b - r.gpa]),
      read: (r, offset, into) => preadFull(fd, into, r.gpa + offset),
    };
    const result = compareImages(source, image, map.regions);
    if (!result.identical) return result;
    // Outside the regions the image must read zero (a dropped region was zeroed).
    const size = fs.fstatSync(fd).size;
    const buf = Buffer.alloc(1 << 20);
    for (const [from, to] of dataExtents(fd, 0, size)) {
      for (let at = from; at < to; at += buf.length) {
        const n = Math.min(buf.length, to - at);
        if (map.regions.some((r) => rangesOverlap(at, n, r.gpa, r.size))) continue; // compared above
        preadFull(fd, buf.subarray(0, n), at);
        if (buf.subarray(0, n).some((b) => b !== 0))
          return { identical: false, checkedBytes: result.checkedBytes, difference: `the image holds data at ${hex(at)}, outside every region` };
      }
    }
    return result;
  }

  async commit(): Promise<void> {}

  async abort(_reason?: unknown): Promise<void> {
    // A half-written image is no image: remove it rather than leave something that looks like one.
    await this.close();
    fs.rmSync(this.path, { force: true });
    fs.rmSync(this.mapPath, { force: true });
  }

  async close(): Promise<void> {
    if (this.fd === undefined) return;
    fs.fsyncSync(this.fd);
    fs.closeSync(this.fd);
    this.fd = undefined;
  }
}

interface DestRegion {
  region: StreamRegion;
  backing: number;
  /** The owner's fd of the backing: bytes go in with pwrite(2), come out with pread(2). */
  fd: number;
}

export interface SpaceDestinationOptions {
  /** The client name the destination's owner attaches with. */
  name?: string;
  /**
   * Refuse a space that is already published (a receiver: subscribers of a published space would apply
   * the map as it is being built). Default false.
   */
  requireUnpublished?: boolean;
  /** Leave the owner attached at close (a VMM that goes on owning the space). Default false. */
  keepOwner?: boolean;
}

/**
 * Another address space: becomes its owner, creates one backing per source region (same gpa, size, name,
 * read-only flag), fills them with pwrite(2) on its own fds, follows the source's map changes (one
 * transaction per round that changed something), and publishes at commit. An abort removes everything it
 * added.
 *
 * Why pwrite and not a mapping: writing a new memfd through a shared mapping takes a page fault per 4 KiB
 * page (the kernel allocates and zeroes it, then maps it); pwrite allocates the page inside the copy and
 * maps nothing. A receiver spent most of its time in those faults (1.2 s of CPU per GiB, profiled).
 */
export class SpaceDestination implements Destination {
  private owner_: OwnerClient | undefined;
  /** By the source's region id. */
  private readonly regions = new Map<number, DestRegion>();
  /** Sorted by gpa, for write(). */
  private sorted: DestRegion[] = [];
  private publishedGeneration: number | undefined;
  readonly zeroFilled = true;

  constructor(
    private readonly target: BrokerTarget,
    readonly space: string,
    private readonly opts: SpaceDestinationOptions = {},
  ) {}

  get description(): string {
    return `address space ${JSON.stringify(this.space)}`;
  }

  /** The owner of the destination space (while open). */
  get owner(): OwnerClient | undefined {
    return this.owner_;
  }

  /** The generation PUBLISH answered (after commit). */
  get generation(): number | undefined {
    return this.publishedGeneration;
  }

  /** The map as this destination holds it. */
  map(): StreamRegion[] {
    return this.sorted.map((d) => d.region);
  }

  async open(): Promise<void> {
    const owner = await OwnerClient.attach(this.target, { space: this.space, name: this.opts.name ?? 'migration-destination' });
    try {
      const st = (await owner.status(this.space)).spaces[0];
      if (st && st.regions.length > 0) throw new InvalidArgError(`the destination ${JSON.stringify(this.space)} already has regions`);
      if (this.opts.requireUnpublished && owner.published) {
        throw new InvalidArgError(
          `the destination ${JSON.stringify(this.space)} is published: subscribers would apply the map while it is being received; ` +
            `receive into a space of a broker that starts it unpublished (mmbroker serve without --published)`,
        );
      }
    } catch (err) {
      owner.close();
      throw err;
    }
    this.owner_ = owner;
  }

  async setMap(map: MigrationMap): Promise<void> {
    const owner = this.owner_ as OwnerClient;
    const { added, removed, flags } = mapChanges(this.map(), map.regions);
    if (added.length + removed.length + flags.length === 0) return;
    const made: DestRegion[] = [];
    try {
      for (const r of added) made.push(await this.create(owner, r));
      const ops: CommitOp[] = [
        ...removed.map((r) => ({ op: 'remove' as const, region: r.name })),
        ...flags.map((r) => ({ op: 'set' as const, region: r.name, readonly: r.readonly })),
        ...made.map((d) => ({
          op: 'add' as const,
          name: d.region.name,
          gpa: d.region.gpa,
          size: d.region.size,
          backing: d.backing,
          offset: 0,
          readonly: d.region.readonly,
        })),
      ];
      await owner.commit(ops);
    } catch (err) {
      for (const d of made) await this.release(owner, d);
      throw err;
    }
    for (const r of removed) {
      const d = this.regions.get(r.id) as DestRegion;
      this.regions.delete(r.id);
      await this.release(owner, d);
    }
    for (const r of flags) (this.regions.get(r.id) as DestRegion).region = r;
    for (const d of made) this.regions.set(d.region.id, d);
    this.sorted = [...this.regions.values()].sort((a, b) => a.region.gpa - b.region.gpa);
  }

  /** A new backing for `r`, registered (not yet in the map). */
  private async create(owner: OwnerClient, r: StreamRegion): Promise<DestRegion> {
    const b = await owner.createBacking(r.size, r.name);
    return { region: r, backing: b.backing, fd: b.fd };
  }

  private async release(owner: OwnerClient, d: DestRegion): Promise<void> {
    native.close(d.fd);
    await owner.dropBacking(d.backing).catch(() => undefined);
  }

  /** The region holding [gpa, gpa + length), by binary search. */
  private find(gpa: number, length: number): DestRegion {
    let lo = 0;
    let hi = this.sorted.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if ((this.sorted[mid] as DestRegion).region.gpa <= gpa) lo = mid + 1;
      else hi = mid;
    }
    const d = this.sorted[lo - 1];
    if (!d || !rangeContains(d.region.gpa, d.region.size, gpa, length))
      throw new InvalidArgError(`[${hex(gpa)}, +${length}) is not inside one region of the destination's map`);
    return d;
  }

  /** Whether [gpa, gpa + length) lies inside one region (a receiver checks a record before taking its bytes). */
  holds(gpa: number, length: number): boolean {
    try {
      this.find(gpa, length);
      return true;
    } catch {
      return false;
    }
  }

  write(gpa: number, bytes: Uint8Array): void {
    const d = this.find(gpa, bytes.length);
    const off = gpa - d.region.gpa;
    let done = 0;
    while (done < bytes.length) done += fs.writeSync(d.fd, bytes, done, bytes.length - done, off + done);
  }

  async flush(): Promise<void> {
    // write() stores straight into the memfds: nothing is in flight.
  }

  /** This space as a verifier reads it: its memfds, with pread. */
  image(): MemoryImage {
    const byId = (r: StreamRegion) => {
      const d = this.regions.get(r.id);
      if (!d) throw new InvalidArgError(`region ${r.name} (#${r.id}) is not in the destination`);
      return d;
    };
    return {
      extents: (r) => dataExtents(byId(r).fd, 0, r.size),
      read: (r, offset, into) => preadFull(byId(r).fd, into, offset),
    };
  }

  async verify(source: MemoryImage, map: MigrationMap): Promise<VerifyResult> {
    // The broker's own view of the destination's map, against the source's.
    const st = (await (this.owner_ as OwnerClient).status(this.space)).spaces[0];
    const theirs = (st?.regions ?? []).map((r) => ({ id: r.id, name: r.name, gpa: r.gpa, size: r.size, readonly: r.readonly }));
    const difference = mapDifference(map.regions, theirs);
    if (difference) return { identical: false, checkedBytes: 0, difference };
    return compareImages(source, this.image(), map.regions);
  }

  async commit(): Promise<void> {
    this.publishedGeneration = await (this.owner_ as OwnerClient).publish();
  }

  async abort(_reason?: unknown): Promise<void> {
    const owner = this.owner_;
    if (!owner) return;
    const all = [...this.regions.values()];
    this.regions.clear();
    this.sorted = [];
    // Unpublished (a receiver's space): these commits change only the map; nobody is synced to it.
    if (all.length > 0) await owner.commit(all.map((d) => ({ op: 'remove' as const, region: d.region.name }))).catch(() => undefined);
    for (const d of all) await this.release(owner, d);
  }

  async close(): Promise<void> {
    for (const d of this.regions.values()) native.close(d.fd);
    this.regions.clear();
    this.sorted = [];
    if (!this.opts.keepOwner) this.owner_?.close();
  }
}
