// The last N committed transactions of an address space, for resume by delta. A subscriber that
// reconnects with generation g gets, instead of a snapshot, the current record of every region touched
// by generations g+1..now, and the ids of touched regions that no longer exist; it reconciles its view
// against that and leaves everything else (its mappings, its pins) alone.
import { encodeBody, type HistoryEntry, type Region } from '../protocol/index.js';

interface Entry {
  generation: number;
  /** Ids of regions the transaction removed, changed or added. */
  touched: number[];
}

export interface Delta {
  upserts: Region[];
  removed: number[];
}

export class History {
  private readonly ring: Entry[] = [];
  private head = 0;

  constructor(private readonly capacity: number) {}

  record(generation: number, touched: number[]): void {
    const entry = { generation, touched };
    if (this.ring.length < this.capacity) this.ring.push(entry);
    else {
      this.ring[this.head] = entry;
      this.head = (this.head + 1) % this.capacity;
    }
  }

  /** Oldest generation still recorded, or undefined when empty. */
  private oldest(): number | undefined {
    return this.ring.length === 0 ? undefined : (this.ring[this.head % this.ring.length] as Entry).generation;
  }

  /**
   * What changed after `from` up to `current`, or undefined when the history no longer covers it (the
   * caller then sends a snapshot).
   */
  delta(from: number, current: number, lookup: (id: number) => Region | undefined): Delta | undefined {
    if (from > current) return undefined;
    if (from === current) return { upserts: [], removed: [] };
    const oldest = this.oldest();
    if (oldest === undefined || from + 1 < oldest) return undefined;
    const touched = new Set<number>();
    for (let i = 0; i < this.ring.length; i++) {
      const e = this.ring[(this.head + i) % this.ring.length] as Entry;
      if (e.generation > from) for (const id of e.touched) touched.add(id);
    }
    const upserts: Region[] = [];
    const removed: number[] = [];
    for (const id of touched) {
      const r = lookup(id);
      if (r) upserts.push(r);
      else removed.push(id);
    }
    upserts.sort((a, b) => a.gpa - b.gpa);
    return { upserts, removed };
  }
}

/**
 * The last N transactions of an address space as an operator sees them (HISTORY, feature WATCH): every
 * commit that ran, with its outcome (committed, rolled back, refused), owner, diff and duration. Unlike
 * History above it keeps refusals too; entries are numbered by `seq`, since a refusal has no generation
 * of its own.
 */
export class TransactionLog {
  private readonly ring: HistoryEntry[] = [];
  private head = 0;
  private nextSeq = 1;

  constructor(private readonly capacity: number) {}

  record(entry: Omit<HistoryEntry, 'seq'>): HistoryEntry {
    const e: HistoryEntry = { seq: this.nextSeq++, ...entry };
    if (this.capacity <= 0) return e;
    if (this.ring.length < this.capacity) this.ring.push(e);
    else {
      this.ring[this.head] = e;
      this.head = (this.head + 1) % this.capacity;
    }
    return e;
  }

  /** Every entry kept, oldest first. */
  all(): HistoryEntry[] {
    return [...this.ring.slice(this.head), ...this.ring.slice(0, this.head)];
  }

  /**
   * The newest entries with a seq below `before` (default: all), oldest first: at most `limit`, and only as
   * many as fit `budget` bytes once encoded (a reply must fit one frame). `more`: older entries remain.
   */
  page(before: number | undefined, limit: number, budget: number): { entries: HistoryEntry[]; more: boolean } {
    const candidates = this.all().filter((e) => before === undefined || e.seq < before);
    const entries: HistoryEntry[] = [];
    let bytes = 0;
    for (let i = candidates.length - 1; i >= 0 && entries.length < limit; i--) {
      const e = candidates[i] as HistoryEntry;
      bytes += encodeBody(e).length + 8;
      if (bytes > budget && entries.length > 0) break;
      entries.push(e);
    }
    return { entries: entries.reverse(), more: entries.length < candidates.length };
  }
}
