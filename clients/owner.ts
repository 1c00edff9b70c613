// The owner of an address space (the VMM): registers backings and changes the map by transactions. Every
// commit resolves only when all subscribers applied it, and rejects with one typed error naming the
// client that refused (err.client) when anything failed: nothing is half-applied either way.
import {
  DIRTY_PAGE_SIZE,
  bitmapLayout,
  Feature,
  Msg,
  type AttachResult,
  type PublishResult,
  type DirtySyncResult,
  type BackingAddResult,
  type BackingDropResult,
  type CommitOp,
  type CommitResult,
  type FindFreeResult,
  type StatusResult,
} from '../protocol/index.js';
import { constants, native } from '../native/index.js';
import { Connection, type BrokerTarget, type ConnectionOptions } from './connection.js';
import { createSealedMemfd, type SealedMemfdOptions } from './memfd.js';

export interface OwnerOptions extends ConnectionOptions {
  space: string;
  /**
   * Publish the space right after attaching, with the map as it stands (default false). A VMM that
   * reattaches after a broker restart must not: it rebuilds its map first and then calls publish(), so
   * subscribers never apply a half-rebuilt map. See docs/protocol.md, "Guarantees".
   */
  publish?: boolean;
}

export interface RegionSpec {
  name: string;
  /** Guest-physical address, page aligned. */
  gpa: number;
  size: number;
  backing: number;
  /** Byte offset of the region inside its backing, page aligned. Default 0. */
  offset?: number;
  readonly?: boolean;
  logDirty?: boolean;
}

export interface DirtySnapshot {
  /** Per region: where it is, how many of its pages were dirty, and its bits (bit i = page i). */
  regions: (DirtySyncResult['regions'][number] & { bits: Uint8Array })[];
  dirtyPages: number;
  /** Unmaps the bits. */
  release(): void;
}

/** Bytes of bitmap for `pages` pages, whole 64-bit words, as the broker lays them out. */
export const bitmapBytes = (pages: number): number => bitmapLayout(pages).bytes;

export interface CreatedBacking extends BackingAddResult {
  /** The owner's own fd of the new memfd: map it to read and write guest memory; close it when done. */
  fd: number;
}

export class OwnerClient {
  private constructor(
    private readonly conn: Connection,
    readonly space: string,
    readonly clientId: number,
    private _generation: number,
    private _published: boolean,
  ) {}

  static async attach(target: BrokerTarget, opts: OwnerOptions): Promise<OwnerClient> {
    const conn = await Connection.open(target, { name: 'owner', ...opts });
    try {
      const r = (await conn.request({ t: Msg.ATTACH, space: opts.space, role: 'owner', kind: 'owner' })) as AttachResult;
      // A broker without the PUBLISH feature publishes a space when its owner attaches.
      const owner = new OwnerClient(conn, opts.space, r.client, r.generation, r.published ?? true);
      if (opts.publish) await owner.publish();
      return owner;
    } catch (err) {
      conn.close();
      throw err;
    }
  }

  /** Whether the space's map is authoritative (published); subscribers wait until it is. */
  get published(): boolean {
    return this._published;
  }

  /**
   * Makes the map as it stands authoritative (feature PUBLISH): subscribers that attached while the space
   * was unpublished (after a broker restart) are synced to it and reconcile by key. Idempotent.
   */
  async publish(): Promise<number> {
    if ((this.conn.features & Feature.PUBLISH) === 0) return this._generation;
    const r = (await this.conn.request({ t: Msg.PUBLISH })) as PublishResult;
    this._published = true;
    this._generation = Math.max(this._generation, r.generation);
    return r.generation;
  }

  /** The generation of the last commit this owner saw complete (or the space's at attach). */
  get generation(): number {
    return this._generation;
  }

  get connection(): Connection {
    return this.conn;
  }

  /**
   * Registers a memfd (sealed against shrinking). The broker dup()s it; the caller keeps its own fd.
   * `unsealed` (feature TRUSTED_FILE): register a file on tmpfs or hugetlbfs that cannot be sealed (QEMU's
   * memory-backend-file); whoever can write it could truncate it under every mapping, so only an owner
   * that controls the file may (docs/security.md, trusted-owner backings).
   */
  addBacking(fd: number, name?: string, opts: { unsealed?: boolean } = {}): Promise<BackingAddResult> {
    return this.conn.request({ t: Msg.BACKING_ADD, ...(name ? { name } : {}), ...(opts.unsealed ? { unsealed: true } : {}) }, [
      fd,
    ]) as Promise<BackingAddResult>;
  }

  /** Creates a sealed memfd of `size` bytes and registers it. */
  async createBacking(size: number, name = 'ram', opts: SealedMemfdOptions = {}): Promise<CreatedBacking> {
    const fd = createSealedMemfd(name, size, opts);
    try {
      return { ...(await this.addBacking(fd, name)), fd };
    } catch (err) {
      native.close(fd);
      throw err;
    }
  }

  /** Tells the broker this owner no longer needs the backing; it is closed once no region uses it. */
  dropBacking(backing: number): Promise<BackingDropResult> {
    return this.conn.request({ t: Msg.BACKING_DROP, backing }) as Promise<BackingDropResult>;
  }

  /** Applies `ops` atomically: removes, then flag changes, then adds. */
  async commit(ops: readonly CommitOp[], opts: { expect?: number } = {}): Promise<CommitResult> {
    const r = (await this.conn.request({ t: Msg.COMMIT, ops: [...ops], ...(opts.expect !== undefined ? { expect: opts.expect } : {}) })) as CommitResult;
    this._generation = Math.max(this._generation, r.generation);
    return r;
  }

  addRegion(spec: RegionSpec): Promise<CommitResult> {
    return this.commit([{ op: 'add', offset: 0, ...spec }]);
  }

  removeRegion(region: number | string): Promise<CommitResult> {
    return this.commit([{ op: 'remove', region }]);
  }

  /** The lowest free GPA range of `size` bytes (feature PLACE), avoiding regions and every reserved range. */
  async findFree(size: number, opts: { align?: number; min?: number; max?: number } = {}): Promise<number> {
    const r = (await this.conn.request({ t: Msg.FIND_FREE, size, ...opts })) as FindFreeResult;
    return r.gpa;
  }

  /**
   * Dirty sync (feature DIRTY): every writer flushes, then the bitmaps of `regions` (default: every
   * region that logs) are collected (and cleared) into a buffer this call creates. Returns each region's bits as a view
   * of that buffer (bit i = page i of the region); call release() when done with them.
   */
  async dirtySync(regions?: readonly (number | string)[]): Promise<DirtySnapshot> {
    const st = (await this.status(this.space)).spaces[0];
    const logging = (st?.regions ?? []).filter((r) => r.logDirty && (regions === undefined || regions.includes(r.id) || regions.includes(r.name)));
    const bytes = Math.max(4096, Math.ceil(logging.reduce((n, r) => n + bitmapBytes(r.size / DIRTY_PAGE_SIZE), 0) / 4096) * 4096);
    const fd = createSealedMemfd('dirty-sync', bytes);
    try {
      const r = (await this.conn.request({ t: Msg.DIRTY_SYNC, ...(regions ? { regions: [...regions] } : {}) }, [fd])) as DirtySyncResult;
      const view = native.mmap(fd, 0, bytes, constants.PROT_READ, constants.MAP_SHARED);
      const all = new Uint8Array(view.buffer);
      return {
        regions: r.regions.map((x) => ({ ...x, bits: all.subarray(x.offset, x.offset + bitmapBytes(x.pages)) })),
        dirtyPages: r.regions.reduce((n, x) => n + x.dirty, 0),
        release: () => native.munmap(view),
      };
    } finally {
      native.close(fd);
    }
  }

  /** Asks every writer to stop writing guest memory (feature DIRTY); resolves once all of them did. */
  async pause(): Promise<void> {
    await this.conn.request({ t: Msg.PAUSE, paused: true });
  }

  async resume(): Promise<void> {
    await this.conn.request({ t: Msg.PAUSE, paused: false });
  }

  status(space?: string): Promise<StatusResult> {
    return this.conn.request({ t: Msg.STATUS, ...(space !== undefined ? { space } : {}) }) as Promise<StatusResult>;
  }

  close(): void {
    this.conn.close();
  }
}

/** Asks a broker for its status over a short-lived connection. */
export async function fetchStatus(target: BrokerTarget, space?: string, opts: ConnectionOptions = {}): Promise<StatusResult> {
  const conn = await Connection.open(target, { name: 'status', ...opts });
  try {
    return (await conn.request({ t: Msg.STATUS, ...(space !== undefined ? { space } : {}) })) as StatusResult;
  } finally {
    conn.close();
  }
}
