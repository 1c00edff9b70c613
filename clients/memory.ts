// Guest memory mapped into this process: each region is its own MAP_SHARED mapping of its backing
// (PROT_READ only for read-only regions), never pinned. This is the applier of the plain subscriber and
// the base of the device-back-end kind: translate a GPA to local memory, read and write guest memory.
//
// Applying a change maps what is added *before* unmapping what is removed: mappings of different regions
// never conflict in our address space, so a failed mmap can be undone by unmapping the new mappings alone
// and the change stays all-or-nothing without ever remapping old memory.
import { constants, isNativeError, native, type Mapping } from '../native/index.js';
import { InvalidArgError, MapFailedError, NoRegionError } from '../protocol/index.js';
import type { Applier, Change, LocalBacking, ViewRegion } from './view.js';

export interface MappedRegion {
  region: ViewRegion;
  mapping: Mapping;
  bytes: Uint8Array;
}

const hex = (n: number) => `0x${n.toString(16)}`;

export class GuestMemory implements Applier {
  private readonly byKey = new Map<string, MappedRegion>();
  /** Sorted by gpa, for translation. */
  private sorted: MappedRegion[] = [];

  apply(change: Change, backings: ReadonlyMap<number, LocalBacking>): void {
    const made: MappedRegion[] = [];
    try {
      for (const r of change.added) made.push(this.map(r, backings));
    } catch (err) {
      for (const m of made) native.munmap(m.mapping);
      throw err;
    }
    for (const r of change.removed) {
      const m = this.byKey.get(r.key);
      if (!m) continue;
      this.byKey.delete(r.key);
      native.munmap(m.mapping);
    }
    for (const { after } of change.updated) {
      const m = this.byKey.get(after.key);
      if (m) m.region = after;
    }
    for (const m of made) this.byKey.set(m.region.key, m);
    this.sorted = [...this.byKey.values()].sort((a, b) => a.region.gpa - b.region.gpa);
  }

  close(): void {
    for (const m of this.byKey.values()) native.munmap(m.mapping);
    this.byKey.clear();
    this.sorted = [];
  }

  /** Mapped regions, sorted by gpa. */
  regions(): readonly MappedRegion[] {
    return this.sorted;
  }

  /**
   * The bytes of guest memory at [gpa, gpa + length), as a view into the mapping (no copy). The range must
   * lie inside one region; anything else (a hole, a range crossing into a hole) is MMB_ERR_NO_REGION.
   */
  slice(gpa: number, length: number): Uint8Array {
    if (!Number.isSafeInteger(gpa) || !Number.isSafeInteger(length) || gpa < 0 || length < 0) {
      throw new InvalidArgError(`invalid guest range ${gpa}+${length}`);
    }
    const m = this.find(gpa);
    if (!m) throw new NoRegionError(`no region maps gpa ${hex(gpa)}`);
    const off = gpa - m.region.gpa;
    if (off + length > m.region.size) {
      throw new NoRegionError(`[${hex(gpa)}, ${hex(gpa + length)}) runs past the end of region ${JSON.stringify(m.region.name)}`);
    }
    return m.bytes.subarray(off, off + length);
  }

  read(gpa: number, length: number): Uint8Array {
    return this.slice(gpa, length).slice();
  }

  write(gpa: number, data: Uint8Array): void {
    const m = this.find(gpa);
    if (m?.region.readonly) throw new InvalidArgError(`region ${JSON.stringify(m.region.name)} is read-only`);
    this.slice(gpa, data.length).set(data);
  }

  private find(gpa: number): MappedRegion | undefined {
    let lo = 0;
    let hi = this.sorted.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1;
      const m = this.sorted[mid] as MappedRegion;
      if (gpa < m.region.gpa) hi = mid - 1;
      else if (gpa >= m.region.gpa + m.region.size) lo = mid + 1;
      else return m;
    }
    return undefined;
  }

  private map(r: ViewRegion, backings: ReadonlyMap<number, LocalBacking>): MappedRegion {
    const b = backings.get(r.backing);
    if (!b) throw new NoRegionError(`region ${JSON.stringify(r.name)} has no backing here`);
    const prot = constants.PROT_READ | (r.readonly ? 0 : constants.PROT_WRITE);
    let mapping: Mapping;
    try {
      mapping = native.mmap(b.fd, r.offset, r.size, prot, constants.MAP_SHARED);
    } catch (err) {
      throw new MapFailedError(`cannot map region ${JSON.stringify(r.name)} (${hex(r.size)} bytes of ${b.name} at ${hex(r.offset)})`, {
        cause: err,
        ...(isNativeError(err) ? { errno: err.code } : {}),
      });
    }
    return { region: r, mapping, bytes: new Uint8Array(mapping.buffer) };
  }
}
