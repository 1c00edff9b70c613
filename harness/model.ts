// What the map should be, as the harness (the owner) knows it from its own commits: the regions, the
// broker's backings and the memfds behind them. Invariants compare every process's kernel view with it.
import { X86_MSI_WINDOW } from '../clients/vfio/soft.js';

/** The MSI doorbell window, half-open, as every range here is. */
const MSI = fromInclusive(X86_MSI_WINDOW);
import {
  exposedPrefix,
  fromInclusive,
  mergeRanges,
  rangeContains,
  rangesCover,
  rangesOverlap,
  type CommitOp,
  type PrefixExposure,
  type Range,
} from '../protocol/index.js';
import type { Rng } from '../testkit/rng.js';

export const PAGE = 4096;
export const HUGE = 2 * 2 ** 20;
export const GIB = 2 ** 30;
/** GPAs are drawn below this (64 GiB): room for hundreds of regions, all below the 52-bit limit. */
export const GPA_SPACE = 64 * GIB;

/** A memfd the harness created and holds open (its fd is the owner's). */
export interface Memfd {
  name: string;
  fd: number;
  size: number;
  /** Its page size: PAGE, or a hugetlb page size (an MFD_HUGETLB memfd: every region of it aligned to it). */
  pageSize: number;
}

/** One IOVA mapping of an I/O address space: [iova, iova + size) -> [gpa, gpa + size). */
export interface IovaMapping {
  iova: number;
  gpa: number;
  size: number;
  readonly: boolean;
}

/** A backing as the broker numbers it: one registration of a memfd. */
export interface BrokerBacking {
  id: number;
  memfd: Memfd;
  /** The owner registered it and has not dropped it (nor disconnected since). */
  held: boolean;
}

export interface ModelRegion {
  name: string;
  gpa: number;
  size: number;
  backing: number;
  offset: number;
  readonly: boolean;
  logDirty: boolean;
}

export class Model {
  generation = 0;
  readonly memfds = new Map<string, Memfd>();
  readonly backings = new Map<number, BrokerBacking>();
  regions = new Map<string, ModelRegion>();
  /** I/O address spaces (--ioas) by name, with their mappings, as the owner's answered IOAS commits left them. */
  readonly ioas = new Map<string, IovaMapping[]>();
  private nextRegion = 0;
  private nextMemfd = 0;

  regionName(): string {
    return `r${this.nextRegion++}`;
  }

  memfdName(): string {
    return `mmh-${this.nextMemfd++}`;
  }

  list(): ModelRegion[] {
    return [...this.regions.values()].sort((a, b) => a.gpa - b.gpa);
  }

  bytes(): number {
    let n = 0;
    for (const r of this.regions.values()) n += r.size;
    return n;
  }

  memfdOf(r: ModelRegion): Memfd {
    const b = this.backings.get(r.backing);
    if (!b) throw new Error(`model: region ${r.name} references backing ${r.backing}, which is not live`);
    return b.memfd;
  }

  /** The region's page size: its memfd's (a hugetlb region is aligned to it). */
  pageOf(r: ModelRegion): number {
    return this.memfdOf(r).pageSize;
  }

  /**
   * Bytes a process that pins the whole map has in VmLck: the regions on ordinary memfds. mlock(2) neither
   * marks nor counts hugetlb mappings (their pages are never swapped out), so hugetlb regions add nothing.
   */
  lockableBytes(regions: Iterable<ModelRegion> = this.regions.values()): number {
    let n = 0;
    for (const r of regions) if (this.backings.get(r.backing)?.memfd.pageSize === PAGE) n += r.size;
    return n;
  }

  /** The region an IOVA mapping of [gpa, gpa + size) points into, if any. */
  regionAt(gpa: number, size = 1): ModelRegion | undefined {
    for (const r of this.regions.values()) if (rangeContains(r.gpa, r.size, gpa, size)) return r;
    return undefined;
  }

  /** Whether an IOVA mapping of any IOAS points into the region (the broker refuses to remove it or change its access: MMB_ERR_RAM_MAPPED). */
  ramMapped(r: ModelRegion): boolean {
    for (const maps of this.ioas.values()) for (const m of maps) if (rangesOverlap(m.gpa, m.size, r.gpa, r.size)) return true;
    return false;
  }

  /**
   * What a shadow-mode vfio client (soft) whose devices are in `ioases` has in VmLck: the distinct pages
   * of ordinary memory those IOASes map (a page mapped at two IOVAs is locked once; hugetlb pages are
   * never counted, as above).
   */
  shadowLocked(ioases: Iterable<string>, maps: ReadonlyMap<string, readonly IovaMapping[]> = this.ioas): number {
    const ranges: Range[] = [];
    for (const name of new Set(ioases)) {
      for (const m of maps.get(name) ?? []) {
        const r = this.regionAt(m.gpa, m.size);
        if (r && this.pageOf(r) === PAGE) ranges.push({ start: m.gpa, size: m.size });
      }
    }
    return mergeRanges(ranges).reduce((n, r) => n + r.size, 0);
  }

  /** A free `align`ed IOVA range of `size` bytes in `ioas`, away from its mappings and the MSI window, or undefined. */
  freeIova(rng: Rng, ioas: string, size: number, align: number): number | undefined {
    const maps = this.ioas.get(ioas) ?? [];
    const slots = Math.floor((GPA_SPACE - size) / align);
    for (let i = 0; i < 24; i++) {
      const iova = rng.int(0, slots) * align;
      const msi = rangesOverlap(iova, size, MSI.start, MSI.size);
      if (!msi && !maps.some((m) => rangesOverlap(iova, size, m.iova, m.size))) return iova;
    }
    return undefined;
  }

  referenced(backing: number): boolean {
    for (const r of this.regions.values()) if (r.backing === backing) return true;
    return false;
  }

  /** Forgets backings the broker closes: neither held nor referenced. */
  prune(): void {
    for (const [id, b] of this.backings) if (!b.held && !this.referenced(id)) this.backings.delete(id);
  }

  /** Memfds no live backing uses: the harness may close them. */
  orphanMemfds(): Memfd[] {
    const used = new Set([...this.backings.values()].map((b) => b.memfd.name));
    return [...this.memfds.values()].filter((m) => !used.has(m.name));
  }

  /** The file ranges of `memfd` that current regions slice, merged; `writable` only those of writable regions. */
  fileRanges(memfd: string, writable = false): Range[] {
    return this.fileRangesIn(this.regions.values(), memfd, writable);
  }

  /** The same for another set of regions (the map a commit leads to); regions of unknown backings slice nothing. */
  fileRangesIn(regions: Iterable<ModelRegion>, memfd: string, writable = false): Range[] {
    const ranges: Range[] = [];
    for (const r of regions) {
      if (writable && r.readonly) continue;
      if (this.backings.get(r.backing)?.memfd.name === memfd) ranges.push({ start: r.offset, size: r.size });
    }
    return mergeRanges(ranges);
  }

  /**
   * What `ops` would leave a client that maps each backing from offset 0 (a bridge's back-end) beyond the
   * writable regions: the broker refuses such a transaction (MMB_ERR_BACKING_PREFIX) while one is attached.
   */
  exposes(ops: readonly CommitOp[]): PrefixExposure | undefined {
    return exposedPrefix(this.regionsAfter(ops).values());
  }

  /**
   * Where a writable region of `size` may go in `memfd` for such a client: right behind the writable regions
   * that cover it from offset 0, if that range is in the memfd and in no region; else undefined.
   */
  prefixSlot(memfd: Memfd, size: number): number | undefined {
    const first = mergeRanges(this.fileRanges(memfd.name, true))[0];
    const at = first && first.start === 0 ? first.size : 0;
    if (at + size > memfd.size) return undefined;
    return this.fileRanges(memfd.name).some((u) => rangesOverlap(at, size, u.start, u.size)) ? undefined : at;
  }

  /** The regions once `ops` are applied to the current ones (removes, then sets, then adds, as the broker does). */
  regionsAfter(ops: readonly CommitOp[]): Map<string, ModelRegion> {
    const out = new Map([...this.regions].map(([k, r]) => [k, { ...r }]));
    for (const op of ops) if (op.op === 'remove') out.delete(String(op.region));
    for (const op of ops) {
      if (op.op !== 'set') continue;
      const r = out.get(String(op.region));
      if (!r) continue;
      if (op.readonly !== undefined) r.readonly = op.readonly;
      if (op.logDirty !== undefined) r.logDirty = op.logDirty;
    }
    for (const op of ops) {
      if (op.op === 'add')
        out.set(op.name, {
          name: op.name,
          gpa: op.gpa,
          size: op.size,
          backing: op.backing,
          offset: op.offset,
          readonly: op.readonly ?? false,
          logDirty: op.logDirty ?? false,
        });
    }
    return out;
  }

  overlaps(gpa: number, size: number, except?: string): ModelRegion | undefined {
    for (const r of this.regions.values()) {
      if (r.name !== except && rangesOverlap(gpa, size, r.gpa, r.size)) return r;
    }
    return undefined;
  }

  /** A free, `align`ed GPA range of `size` bytes away from every region and the MSI window, or undefined. */
  freeGpa(rng: Rng, size: number, align: number, except?: string): number | undefined {
    const slots = Math.floor((GPA_SPACE - size) / align);
    for (let i = 0; i < 24; i++) {
      const gpa = rng.int(0, slots) * align;
      const msi = rangesOverlap(gpa, size, MSI.start, MSI.size);
      if (!msi && !this.overlaps(gpa, size, except)) return gpa;
    }
    return undefined;
  }

  /** A free `align`ed offset range of `size` bytes inside `memfd` no region slices, or undefined. */
  freeOffset(rng: Rng, memfd: Memfd, size: number, align: number): number | undefined {
    const used = this.fileRanges(memfd.name);
    const slots = Math.floor((memfd.size - size) / align);
    if (slots < 0) return undefined;
    for (let i = 0; i < 8; i++) {
      const offset = rng.int(0, slots) * align;
      if (!used.some((u) => rangesOverlap(offset, size, u.start, u.size))) return offset;
    }
    return undefined;
  }
}

/** Whether the union of `ranges` covers [s, e). */
export const covers = (ranges: readonly Range[], s: number, e: number): boolean => rangesCover(mergeRanges(ranges), s, e - s);
