// Where a migration copies guest memory: a sparse raw image file, or another address space.
import fs from 'node:fs';
import { constants, native, type Mapping } from '../../native/index.js';
import { InvalidArgError, type Region } from '../../protocol/index.js';
import type { BrokerTarget } from '../connection.js';
import { CHUNK_BYTES } from '../memory.js';
import { OwnerClient } from '../owner.js';
import { dataExtents } from './extents.js';

export interface Destination {
  /** Describes the destination in progress lines and the summary. */
  readonly description: string;
  /** Prepares room for the source's regions (called once, before any write). */
  prepare(regions: readonly Region[]): Promise<void>;
  /** Writes guest bytes at `gpa` (inside one prepared region). */
  write(gpa: number, bytes: Uint8Array): void;
  /** Reads back what is at `gpa`, for verification. */
  read(gpa: number, length: number): Uint8Array;
  /** Where the destination holds data within [gpa, gpa + size) (GPA extents); elsewhere it reads zero. */
  dataExtents(gpa: number, size: number): [number, number][];
  finish(): Promise<void>;
}

/**
 * A sparse raw image: file offset X holds the guest byte at GPA X. Ranges no region covers are never
 * written and stay holes; so are the pages the first round finds all zero.
 */
export class FileDestination implements Destination {
  private fd: number | undefined;
  readonly skipsZeroPages = true;

  constructor(readonly path: string) {}

  get description(): string {
    return `sparse image ${this.path}`;
  }

  async prepare(regions: readonly Region[]): Promise<void> {
    this.fd = fs.openSync(this.path, 'w+', 0o600);
    const end = regions.reduce((n, r) => Math.max(n, r.gpa + r.size), 0);
    fs.ftruncateSync(this.fd, end);
  }

  write(gpa: number, bytes: Uint8Array): void {
    let done = 0;
    while (done < bytes.length) done += fs.writeSync(this.fd as number, bytes, done, bytes.length - done, gpa + done);
  }

  read(gpa: number, length: number): Uint8Array {
    const out = Buffer.alloc(length);
    let done = 0;
    while (done < length) {
      const n = fs.readSync(this.fd as number, out, done, length - done, gpa + done);
      if (n === 0) break;
      done += n;
    }
    return out;
  }

  dataExtents(gpa: number, size: number): [number, number][] {
    return dataExtents(this.fd as number, gpa, gpa + size);
  }

  async finish(): Promise<void> {
    if (this.fd === undefined) return;
    fs.fsyncSync(this.fd);
    fs.closeSync(this.fd);
    this.fd = undefined;
  }
}

/**
 * Another address space on the same broker: becomes its owner, creates one backing per source region
 * (same gpa, size, name, flags) and fills them through its own mappings.
 */
export class SpaceDestination implements Destination {
  private owner: OwnerClient | undefined;
  /** One per region: its backing mapped as chunks of at most CHUNK_BYTES (no ArrayBuffer may exceed 4 GiB). */
  private readonly maps: { gpa: number; size: number; chunks: Mapping[]; fd: number }[] = [];

  constructor(
    private readonly target: BrokerTarget,
    readonly space: string,
  ) {}

  get description(): string {
    return `address space ${JSON.stringify(this.space)}`;
  }

  async prepare(regions: readonly Region[]): Promise<void> {
    this.owner = await OwnerClient.attach(this.target, { space: this.space, name: 'migration-destination' });
    const st = (await this.owner.status(this.space)).spaces[0];
    if (st && st.regions.length > 0) throw new InvalidArgError(`the destination ${JSON.stringify(this.space)} already has regions`);
    for (const r of regions) {
      const b = await this.owner.createBacking(r.size, r.name);
      let chunks: Mapping[];
      try {
        chunks = native.mmapChunked(b.fd, 0, r.size, constants.PROT_READ | constants.PROT_WRITE, constants.MAP_SHARED, CHUNK_BYTES);
      } catch (err) {
        native.close(b.fd);
        throw err;
      }
      this.maps.push({ gpa: r.gpa, size: r.size, chunks, fd: b.fd });
      await this.owner.addRegion({ name: r.name, gpa: r.gpa, size: r.size, backing: b.backing, readonly: r.readonly });
    }
  }

  private find(gpa: number, length: number) {
    const m = this.maps.find((x) => gpa >= x.gpa && gpa + length <= x.gpa + x.size);
    if (!m) throw new InvalidArgError(`[0x${gpa.toString(16)}, +${length}) is not inside one destination region`);
    return m;
  }

  /** Calls fn with the views covering [gpa, gpa + length) of one region, one per chunk touched. */
  private each(gpa: number, length: number, fn: (view: Uint8Array, done: number) => void): void {
    const m = this.find(gpa, length);
    let off = gpa - m.gpa;
    for (let done = 0; done < length; ) {
      const chunk = Math.floor(off / CHUNK_BYTES);
      const at = off - chunk * CHUNK_BYTES;
      const n = Math.min(length - done, CHUNK_BYTES - at);
      fn(new Uint8Array((m.chunks[chunk] as Mapping).buffer, at, n), done);
      done += n;
      off += n;
    }
  }

  write(gpa: number, bytes: Uint8Array): void {
    this.each(gpa, bytes.length, (view, done) => view.set(bytes.subarray(done, done + view.length)));
  }

  read(gpa: number, length: number): Uint8Array {
    const views: Uint8Array[] = [];
    this.each(gpa, length, (view) => views.push(view));
    if (views.length === 1) return views[0] as Uint8Array;
    const out = new Uint8Array(length);
    let done = 0;
    for (const v of views) {
      out.set(v, done);
      done += v.length;
    }
    return out;
  }

  dataExtents(gpa: number, size: number): [number, number][] {
    const m = this.find(gpa, size);
    return dataExtents(m.fd, gpa - m.gpa, gpa - m.gpa + size).map(([a, b]) => [a + m.gpa, b + m.gpa]);
  }

  async finish(): Promise<void> {
    for (const m of this.maps.splice(0)) {
      for (const c of m.chunks) native.munmap(c);
      native.close(m.fd);
    }
    this.owner?.close();
  }
}
