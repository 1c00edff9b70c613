// The guest-physical space of one address space laid out for a picture (cli/picture.ts draws it on a
// terminal, cli/svg.ts as an SVG): the map cut into consecutive segments (regions, holes between them,
// ranges subscribers reported reserved), what each subscriber holds of every region, and the totals.
// Pure: from a STATUS reply to data, so that what is drawn can be checked against the map.
import { fromInclusive, rangesOverlap, type StatusSpace } from '../protocol/index.js';

type Region = StatusSpace['regions'][number];
type Client = StatusSpace['clients'][number];

export interface Reserved {
  start: number;
  /** Exclusive end (the wire's ranges have an inclusive `last`). */
  end: number;
  /** Names of the clients that reported it. */
  clients: string[];
}

export type Segment =
  | { kind: 'region'; start: number; end: number; region: Region; reserved: string[] }
  | { kind: 'hole'; start: number; end: number }
  | { kind: 'reserved'; start: number; end: number; clients: string[] };

/**
 * What a subscriber holds of a region: `mapped` (it acked the current generation, which includes the
 * region), `pinned` (mapped, and the client pins), `pending` (it has not acked the current generation
 * yet: syncing, applying, waiting), `refused` (the region covers a range it reported reserved: it cannot
 * map it there).
 */
export type Coverage = 'mapped' | 'pinned' | 'pending' | 'refused';

export interface Column {
  client: Client;
  /** Short label for a narrow column. */
  label: string;
  coverage: Map<number, Coverage>;
}

export interface Totals {
  regions: number;
  bytes: number;
  readonly: number;
  logging: number;
  holes: number;
  holeBytes: number;
  reserved: number;
  /** End of the drawn span: the last region's end (0 for an empty map). */
  end: number;
}

export interface Layout {
  space: StatusSpace;
  segments: Segment[];
  /** Reserved ranges that begin beyond the last region (the top of an IOMMU's address width, say). */
  beyond: Reserved[];
  columns: Column[];
  totals: Totals;
}

/** Every subscriber's reserved ranges merged, each with the clients that reported it. */
export function reservedRanges(clients: readonly Client[]): Reserved[] {
  const out: Reserved[] = [];
  for (const c of clients) {
    for (const r of c.reserved ?? []) {
      const same = out.find((x) => x.start === r.start && x.end === r.last + 1);
      if (same) same.clients.push(c.name);
      else out.push({ start: r.start, end: r.last + 1, clients: [c.name] });
    }
  }
  return out.sort((a, b) => a.start - b.start || a.end - b.end);
}

/** Cuts [0, end of the last region) into regions, reserved ranges (in holes) and holes, in GPA order. */
function cut(regions: readonly Region[], reserved: readonly Reserved[]): { segments: Segment[]; beyond: Reserved[] } {
  const sorted = [...regions].sort((a, b) => a.gpa - b.gpa);
  const end = sorted.reduce((m, r) => Math.max(m, r.gpa + r.size), 0);
  const segments: Segment[] = [];
  const gap = (from: number, to: number) => {
    // Reserved ranges inside the gap [from, to), clipped to it, cut the hole into pieces.
    let at = from;
    for (const x of reserved) {
      const s = Math.max(x.start, at);
      const e = Math.min(x.end, to);
      if (e <= s) continue;
      if (s > at) segments.push({ kind: 'hole', start: at, end: s });
      segments.push({ kind: 'reserved', start: s, end: e, clients: x.clients });
      at = e;
    }
    if (at < to) segments.push({ kind: 'hole', start: at, end: to });
  };
  let at = 0;
  for (const r of sorted) {
    if (r.gpa > at) gap(at, r.gpa);
    const covers = reserved.filter((x) => rangesOverlap(x.start, x.end - x.start, r.gpa, r.size)).flatMap((x) => x.clients);
    segments.push({ kind: 'region', start: r.gpa, end: r.gpa + r.size, region: r, reserved: [...new Set(covers)] });
    at = r.gpa + r.size;
  }
  return { segments, beyond: reserved.filter((x) => x.end > end && x.start >= end) };
}

/** A short name for a client column: its name, cut to `width`. */
const labelOf = (c: Client, width: number) => (c.name.length <= width ? c.name : `${c.name.slice(0, width - 1)}~`);

export function layout(space: StatusSpace, labelWidth = 10): Layout {
  const subscribers = space.clients.filter((c) => c.role === 'subscriber');
  const reserved = reservedRanges(subscribers);
  const { segments, beyond } = cut(space.regions, reserved);
  const columns: Column[] = subscribers.map((c) => {
    const coverage = new Map<number, Coverage>();
    const current = c.ackedGeneration >= space.generation && c.state !== 'waiting' && c.state !== 'syncing';
    for (const r of space.regions) {
      const clash = (c.reserved ?? []).map((x) => fromInclusive(x)).some((x) => rangesOverlap(r.gpa, r.size, x.start, x.size));
      coverage.set(r.id, clash ? 'refused' : !current ? 'pending' : c.pin ? 'pinned' : 'mapped');
    }
    return { client: c, label: labelOf(c, labelWidth), coverage };
  });
  const holes = segments.filter((s) => s.kind === 'hole');
  return {
    space,
    segments,
    beyond,
    columns,
    totals: {
      regions: space.regions.length,
      bytes: space.regions.reduce((n, r) => n + r.size, 0),
      readonly: space.regions.filter((r) => r.readonly).reduce((n, r) => n + r.size, 0),
      logging: space.regions.filter((r) => r.logDirty).reduce((n, r) => n + r.size, 0),
      holes: holes.length,
      holeBytes: holes.reduce((n, s) => n + (s.end - s.start), 0),
      reserved: reserved.length,
      end: segments.reduce((m, s) => Math.max(m, s.end), 0),
    },
  };
}

/**
 * The map as a strip of `width` cells over [0, end): each cell shows the most important thing in it (a
 * region, the smallest if several share it; else a reserved range; else a hole), so that a region smaller
 * than a cell still shows (unless a smaller one shares its only cell). Returns, per cell, the segment
 * drawn there.
 */
export function strip(l: Layout, width: number): (Segment | undefined)[] {
  const end = l.totals.end;
  if (end === 0) return [];
  const cell = end / width;
  const rank = (s: Segment) => (s.kind === 'region' ? 2 : s.kind === 'reserved' ? 1 : 0);
  const out = new Array<Segment | undefined>(width).fill(undefined);
  for (const s of l.segments) {
    const first = Math.min(width - 1, Math.floor(s.start / cell));
    const last = Math.min(width - 1, Math.max(first, Math.ceil(s.end / cell) - 1));
    for (let i = first; i <= last; i++) {
      const cur = out[i];
      if (!cur || rank(s) > rank(cur) || (rank(s) === rank(cur) && s.kind === 'region' && s.end - s.start < cur.end - cur.start)) out[i] = s;
    }
  }
  return out;
}
