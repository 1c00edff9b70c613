// `mmbroker status` on a terminal: each address space as a picture of its guest-physical space (a strip
// over the whole span, then one row per region, hole and reserved range in GPA order with what each
// subscriber holds of it), its totals, its clients and the holders that may still reach memory.
import type { StatusResult, StatusSpace } from '../protocol/index.js';
import { formatBytes, formatSize, hex } from './args.js';
import { layout, strip, type Coverage, type Layout, type Segment } from './layout.js';

/** The strip's characters, also its legend. */
export const MARKS = { rw: '█', ro: '▓', reserved: '▒', hole: '·' } as const;
/** What a client holds of a region, in its column. */
export const COVERAGE: Readonly<Record<Coverage, string>> = { mapped: 'mapped', pinned: 'pinned', pending: 'pending', refused: 'REFUSED' };

const STRIP_WIDTH = 64;

export function cellOf(s: Segment | undefined): string {
  if (!s) return ' ';
  if (s.kind === 'region') return s.region.readonly ? MARKS.ro : MARKS.rw;
  return s.kind === 'reserved' ? MARKS.reserved : MARKS.hole;
}

function table(rows: string[][]): string[] {
  const widths = rows[0]?.map((_, i) => Math.max(...rows.map((r) => (r[i] ?? '').length))) ?? [];
  return rows.map(
    (r) =>
      '  ' +
      r
        .map((c, i) => c.padEnd(widths[i] ?? 0))
        .join('  ')
        .trimEnd(),
  );
}

const flagsOf = (r: { readonly: boolean; logDirty: boolean }) => [r.readonly ? 'ro' : 'rw', r.logDirty ? 'log' : ''].filter(Boolean).join(',');

function segmentRows(l: Layout, maxRows: number): string[] {
  const rows: string[][] = [['START', 'END', 'SIZE', 'WHAT', 'FLAGS', ...l.columns.map((c) => c.label)]];
  for (const s of l.segments.slice(0, maxRows)) {
    const span = [hex(s.start), hex(s.end), formatSize(s.end - s.start)];
    if (s.kind === 'region') {
      const what = `${s.region.name} (#${s.region.id}, backing ${s.region.backing}${s.region.offset ? ` +${hex(s.region.offset)}` : ''})`;
      rows.push([...span, what, flagsOf(s.region), ...l.columns.map((c) => COVERAGE[c.coverage.get(s.region.id) ?? 'pending'])]);
    } else if (s.kind === 'reserved') rows.push([...span, `reserved by ${s.clients.join(', ')}`, '', ...l.columns.map(() => '')]);
    else rows.push([...span, 'hole', '', ...l.columns.map(() => '')]);
  }
  const out = table(rows);
  if (l.segments.length > maxRows) out.push(`  ... ${l.segments.length - maxRows} more segments (mmbroker status --json lists every region)`);
  for (const b of l.beyond)
    out.push(`  beyond the last region: ${hex(b.start)}-${hex(b.end)} (${formatSize(b.end - b.start)}) reserved by ${b.clients.join(', ')}`);
  return out;
}

function clientRows(s: StatusSpace): string[] {
  if (s.clients.length === 0) return ['  (no clients)'];
  return table([
    ['CLIENT', 'ROLE', 'KIND', 'NAME', 'PID', 'ACKED', 'STATE', 'VIA', 'BACKEND', 'REGIONS', 'PINNED (PREDICTED / ACTUAL)'],
    ...s.clients.map((c) => [
      `#${c.id}`,
      c.role,
      c.kind,
      c.name,
      String(c.pid),
      c.role === 'subscriber' ? `${c.ackedGeneration}${c.ackedGeneration < s.generation ? ` (${s.generation - c.ackedGeneration} behind)` : ''}` : '',
      c.state,
      c.transport,
      c.backend ?? '',
      c.regions === undefined ? '' : `${c.regions}${c.maxRegions !== undefined ? ` of ${c.maxRegions}` : ''}${c.coalesce ? ' coalesced' : ''}`,
      c.pin
        ? `${formatSize(c.pin.predicted)} / ${c.pin.actual === undefined ? '?' : formatSize(c.pin.actual)}${c.pin.limit !== undefined ? ` (limit ${formatSize(c.pin.limit)})` : ''}`
        : '',
    ]),
  ]);
}

/** One space as a picture. */
export function drawSpace(s: StatusSpace, opts: { maxRows?: number } = {}): string {
  const l = layout(s);
  const t = l.totals;
  const out: string[] = [];
  const flags = [
    `generation ${s.generation}`,
    s.published === false ? 'UNPUBLISHED (subscribers wait until the owner publishes; mmbroker publish)' : 'published',
    s.paused ? 'PAUSED (writers stopped for migration)' : '',
    `epoch ${s.epoch}`,
  ].filter(Boolean);
  out.push(`space ${s.name}: ${flags.join(', ')}`);
  if (t.regions === 0) out.push('  (no regions)');
  else {
    const cells = strip(l, STRIP_WIDTH);
    out.push(`  ${hex(0).padEnd(STRIP_WIDTH - hex(t.end).length + 2)}${hex(t.end)}`);
    out.push(`  [${cells.map(cellOf).join('')}]`);
    out.push(
      `   ${MARKS.rw} read-write  ${MARKS.ro} read-only  ${MARKS.reserved} reserved  ${MARKS.hole} hole  (one cell: ${formatBytes(t.end / STRIP_WIDTH)})`,
    );
    out.push('');
    out.push(...segmentRows(l, opts.maxRows ?? 500));
  }
  out.push('');
  out.push(
    `  totals: ${t.regions} region${t.regions === 1 ? '' : 's'}, ${formatSize(t.bytes)} of guest memory` +
      ` (${formatSize(t.readonly)} read-only, ${formatSize(t.logging)} logging dirty pages); ` +
      `${t.holes} hole${t.holes === 1 ? '' : 's'}, ${formatSize(t.holeBytes)}; ${t.reserved} reserved range${t.reserved === 1 ? '' : 's'}`,
  );
  const pb = s.pinBudget;
  if (pb && (pb.limit !== undefined || pb.predicted > 0)) {
    out.push(
      `  pinned in all: predicted ${formatSize(pb.predicted)}, actual ${formatSize(pb.actual)}${pb.limit !== undefined ? `, budget ${formatSize(pb.limit)}` : ''}`,
    );
  }
  out.push('');
  out.push(...clientRows(s));
  const holders = s.holders ?? [];
  out.push('');
  out.push(holders.length === 0 ? '  holders: none (no ended connection may still reach memory)' : '  holders (may still reach memory, until fenced):');
  for (const h of holders) {
    out.push(
      `    ${h.client.kind} client ${JSON.stringify(h.client.name)} (#${h.client.id}, pid ${h.client.pid}): ${h.reason} ${(h.ms / 1000).toFixed(1)} s ago, ${h.state}; backings ${h.backings.join(', ')}${h.alive.length > 0 ? `; alive: ${h.alive.join(', ')}` : ''}`,
    );
  }
  return out.join('\n');
}

export function draw(result: StatusResult, opts: { maxRows?: number } = {}): string {
  return result.spaces.map((s) => drawSpace(s, opts)).join('\n\n');
}
