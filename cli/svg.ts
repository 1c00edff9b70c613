// `mmbroker status --svg FILE`: the same picture as the terminal's (cli/picture.ts), as a standalone SVG
// document: per address space a memory-map diagram (low addresses at the top, one block per region, hole
// and reserved range, heights on a log scale so that 4 KiB and 4 GiB both show), a column per subscriber
// with what it holds of each region, then totals, clients and holders. Hover a block for its details.
import type { StatusResult, StatusSpace } from '../protocol/index.js';
import { formatSize, hex } from './args.js';
import { layout, type Coverage, type Layout, type Segment } from './layout.js';

const FONT = 'font-family="DejaVu Sans Mono, Menlo, Consolas, monospace"';
const COLORS = {
  rw: '#4a86c8',
  ro: '#9db9d8',
  log: '#e69138',
  reserved: '#cc4125',
  hole: '#f3f3f3',
  mapped: '#6aa84f',
  pinned: '#274e13',
  pending: '#f1c232',
  refused: '#cc0000',
  text: '#1a1a1a',
  muted: '#666666',
} as const;
const COVERAGE_TEXT: Readonly<Record<Coverage, string>> = { mapped: 'mapped', pinned: 'pinned', pending: 'not yet acked', refused: 'reserved: cannot map' };

const MAX_BLOCKS = 200;
const ADDR_W = 150;
const MAP_W = 380;
const COL_W = 96;
const LINE = 18;

const esc = (s: string) => s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;').replace(/'/g, '&apos;');

/** Block height: grows with log2 of the size, so every block is readable and large ones stand out. */
const heightOf = (s: Segment) => Math.round(26 + Math.min(64, 3 * Math.log2((s.end - s.start) / 4096 + 1)));

/** A line of text; `extra` attributes may override the default size and colour (never repeat them: XML forbids it). */
function text(x: number, y: number, body: string, extra = ''): string {
  const size = /font-size=/.test(extra) ? '' : ' font-size="12"';
  const fill = /fill=/.test(extra) ? '' : ` fill="${COLORS.text}"`;
  return `<text x="${x}" y="${y}" ${FONT}${size}${fill} ${extra}>${esc(body)}</text>`;
}

function block(s: Segment, x: number, y: number, h: number): string {
  const span = `${hex(s.start)}-${hex(s.end)} (${formatSize(s.end - s.start)})`;
  const mid = y + h / 2 + 4;
  if (s.kind === 'hole') {
    return `<g class="hole"><title>${esc(`hole ${span}`)}</title><rect x="${x}" y="${y}" width="${MAP_W}" height="${h}" fill="${COLORS.hole}" stroke="#bbbbbb" stroke-dasharray="4 3"/>${text(x + 10, mid, `hole, ${formatSize(s.end - s.start)}`, `fill="${COLORS.muted}"`)}</g>`;
  }
  if (s.kind === 'reserved') {
    return `<g class="reserved"><title>${esc(`reserved ${span} by ${s.clients.join(', ')}`)}</title><rect x="${x}" y="${y}" width="${MAP_W}" height="${h}" fill="url(#hatch-reserved)" stroke="${COLORS.reserved}"/>${text(x + 10, mid, `reserved by ${s.clients.join(', ')}, ${formatSize(s.end - s.start)}`)}</g>`;
  }
  const r = s.region;
  const fill = r.readonly ? 'url(#hatch-ro)' : COLORS.rw;
  const flags = [r.readonly ? 'read-only' : 'read-write', r.logDirty ? 'logging' : ''].filter(Boolean).join(', ');
  const log = r.logDirty ? `<rect x="${x}" y="${y}" width="8" height="${h}" fill="${COLORS.log}"/>` : '';
  const clash = s.reserved.length > 0 ? `<rect x="${x + MAP_W - 10}" y="${y}" width="10" height="${h}" fill="${COLORS.reserved}"/>` : '';
  return (
    `<g class="region" data-region="${r.id}"><title>${esc(`${r.name} (#${r.id}) ${span}, backing ${r.backing} at ${hex(r.offset)}, ${flags}`)}</title>` +
    `<rect x="${x}" y="${y}" width="${MAP_W}" height="${h}" fill="${fill}" stroke="#1f4e79"/>${log}${clash}` +
    text(x + 14, mid, `${r.name}  ${formatSize(r.size)}  ${flags}`, `fill="${r.readonly ? COLORS.text : '#ffffff'}"`) +
    '</g>'
  );
}

function coverageCell(c: Coverage, x: number, y: number, h: number, who: string, region: string): string {
  const w = COL_W - 16;
  return `<g class="coverage ${c}"><title>${esc(`${who}: ${region} ${COVERAGE_TEXT[c]}`)}</title><rect x="${x + 8}" y="${y + 3}" width="${w}" height="${h - 6}" rx="3" fill="${COLORS[c]}"/>${text(x + 14, y + h / 2 + 4, c, 'fill="#ffffff" font-size="11"')}</g>`;
}

/** One space's diagram at vertical offset `top`; returns its markup and height. */
function spaceDiagram(s: StatusSpace, top: number, width: number): { svg: string; height: number } {
  const l: Layout = layout(s, 11);
  const t = l.totals;
  const parts: string[] = [];
  let y = top;
  const status = s.published === false ? 'UNPUBLISHED: subscribers wait until the owner publishes' : 'published';
  parts.push(`<text x="20" y="${y + 20}" ${FONT} font-size="18" font-weight="bold" fill="${COLORS.text}">${esc(`space ${s.name}`)}</text>`);
  parts.push(
    text(
      20,
      y + 40,
      `generation ${s.generation}, ${status}${s.paused ? ', PAUSED for migration' : ''}, epoch ${s.epoch}`,
      s.published === false ? `fill="${COLORS.refused}"` : '',
    ),
  );
  y += 60;
  const mapX = 20 + ADDR_W;
  parts.push(text(mapX, y, 'guest-physical address space (low addresses first)', `fill="${COLORS.muted}"`));
  l.columns.forEach((c, i) => parts.push(text(mapX + MAP_W + 10 + i * COL_W, y, c.label, 'font-weight="bold"')));
  y += 8;
  const shown = l.segments.slice(0, MAX_BLOCKS);
  if (shown.length === 0) {
    parts.push(text(mapX, y + 20, '(no regions)', `fill="${COLORS.muted}"`));
    y += 30;
  }
  for (const seg of shown) {
    const h = heightOf(seg);
    parts.push(text(20, y + 12, hex(seg.start), `fill="${COLORS.muted}"`));
    parts.push(block(seg, mapX, y, h));
    if (seg.kind === 'region') {
      l.columns.forEach((c, i) =>
        parts.push(coverageCell(c.coverage.get(seg.region.id) ?? 'pending', mapX + MAP_W + 10 + i * COL_W, y, h, c.client.name, seg.region.name)),
      );
    }
    y += h;
  }
  if (shown.length > 0) {
    parts.push(text(20, y + 4, hex(t.end), `fill="${COLORS.muted}"`));
    y += 10;
  }
  if (l.segments.length > shown.length) {
    y += LINE;
    parts.push(text(mapX, y, `... ${l.segments.length - shown.length} more segments (mmbroker status --json lists every region)`, `fill="${COLORS.muted}"`));
  }
  for (const b of l.beyond) {
    y += LINE;
    parts.push(text(mapX, y, `beyond the last region: ${hex(b.start)}-${hex(b.end)} reserved by ${b.clients.join(', ')}`, `fill="${COLORS.reserved}"`));
  }
  y += LINE * 1.5;
  const lines = [
    `totals: ${t.regions} regions, ${formatSize(t.bytes)} of guest memory (${formatSize(t.readonly)} read-only, ${formatSize(t.logging)} logging); ${t.holes} holes, ${formatSize(t.holeBytes)}; ${t.reserved} reserved ranges`,
    ...(s.pinBudget && (s.pinBudget.limit !== undefined || s.pinBudget.predicted > 0)
      ? [
          `pinned in all: predicted ${formatSize(s.pinBudget.predicted)}, actual ${formatSize(s.pinBudget.actual)}${s.pinBudget.limit !== undefined ? `, budget ${formatSize(s.pinBudget.limit)}` : ''}`,
        ]
      : []),
    'clients:',
    ...s.clients.map(
      (c) =>
        `  #${c.id} ${c.role} ${c.kind} "${c.name}" pid ${c.pid}, ${c.state}${c.role === 'subscriber' ? `, acked generation ${c.ackedGeneration}` : ''}${c.pin ? `, pinned ${formatSize(c.pin.predicted)} predicted / ${c.pin.actual === undefined ? '?' : formatSize(c.pin.actual)} actual` : ''}`,
    ),
    (s.holders ?? []).length === 0 ? 'holders: none' : 'holders (may still reach memory, until fenced):',
    ...(s.holders ?? []).map(
      (h) => `  ${h.client.kind} "${h.client.name}" (#${h.client.id}, pid ${h.client.pid}): ${h.reason}, ${h.state}, backings ${h.backings.join(', ')}`,
    ),
  ];
  for (const line of lines) {
    parts.push(text(20, y, line));
    y += LINE;
  }
  parts.push(`<line x1="10" y1="${y}" x2="${width - 10}" y2="${y}" stroke="#dddddd"/>`);
  return { svg: parts.join('\n'), height: y - top + LINE };
}

function legend(y: number): string {
  const items: [string, string][] = [
    [COLORS.rw, 'read-write region'],
    ['url(#hatch-ro)', 'read-only region'],
    [COLORS.log, 'logging dirty pages'],
    ['url(#hatch-reserved)', 'reserved range'],
    [COLORS.hole, 'hole'],
    [COLORS.mapped, 'mapped'],
    [COLORS.pinned, 'pinned'],
    [COLORS.pending, 'not yet acked'],
    [COLORS.refused, 'cannot map (reserved)'],
  ];
  return items
    .map(
      ([fill, label], i) =>
        `<rect x="${20 + (i % 5) * 190}" y="${y + Math.floor(i / 5) * 22}" width="14" height="14" fill="${fill}" stroke="#999999"/>${text(40 + (i % 5) * 190, y + 12 + Math.floor(i / 5) * 22, label)}`,
    )
    .join('\n');
}

/** The whole status as one SVG document. */
export function statusSvg(result: StatusResult, opts: { title?: string } = {}): string {
  const columns = Math.max(0, ...result.spaces.map((s) => s.clients.filter((c) => c.role === 'subscriber').length));
  const width = Math.max(1000, 20 + ADDR_W + MAP_W + 10 + columns * COL_W + 20);
  const body: string[] = [];
  let y = 10;
  if (opts.title) {
    body.push(`<text x="20" y="${y + 16}" ${FONT} font-size="14" fill="${COLORS.muted}">${esc(opts.title)}</text>`);
    y += 30;
  }
  for (const s of result.spaces) {
    const d = spaceDiagram(s, y, width);
    body.push(d.svg);
    y += d.height;
  }
  body.push(legend(y + 10));
  const height = Math.ceil(y + 70);
  return `<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}">
<defs>
<pattern id="hatch-ro" width="8" height="8" patternUnits="userSpaceOnUse" patternTransform="rotate(45)"><rect width="8" height="8" fill="${COLORS.ro}"/><line x1="0" y1="0" x2="0" y2="8" stroke="#ffffff" stroke-width="3"/></pattern>
<pattern id="hatch-reserved" width="8" height="8" patternUnits="userSpaceOnUse" patternTransform="rotate(45)"><rect width="8" height="8" fill="#f4cccc"/><line x1="0" y1="0" x2="0" y2="8" stroke="${COLORS.reserved}" stroke-width="2"/></pattern>
</defs>
<rect x="0" y="0" width="${width}" height="${height}" fill="#ffffff"/>
${body.join('\n')}
</svg>
`;
}
