import { fetchStatus } from '../../clients/index.js';
import type { StatusResult } from '../../protocol/index.js';
import { formatSize, hex, parseCommand, required, type Command } from '../args.js';
import { renderIoas } from './ioas.js';

const usage = `Usage: mmbroker status --socket PATH [--space NAME] [--json]

Shows every address space (or one): its generation, its regions and its clients.

Options:
  --socket PATH   the broker's socket
  --space NAME    only this address space
  --json          print one JSON object { "spaces": [ { "name", "generation", "regions", "clients", ... } ] }
  -h, --help      show this help`;

export const status: Command = {
  name: 'status',
  summary: 'show address spaces, regions and clients',
  usage,
  async run(argv) {
    const values = parseCommand(argv, { socket: { type: 'string' }, space: { type: 'string' }, json: { type: 'boolean' } }, usage);
    if (!values) return 0;
    const result = await fetchStatus(required(values, 'socket'), values.space);
    console.log(values.json ? JSON.stringify(result, null, 2) : render(result));
    return 0;
  },
};

function table(rows: string[][]): string {
  const widths = rows[0]?.map((_, i) => Math.max(...rows.map((r) => (r[i] ?? '').length))) ?? [];
  return rows.map((r) => '  ' + r.map((c, i) => c.padEnd(widths[i] ?? 0)).join('  ').trimEnd()).join('\n');
}

export function render(result: StatusResult): string {
  const out: string[] = [];
  for (const s of result.spaces) {
    out.push(`space ${s.name}  generation ${s.generation}  epoch ${s.epoch}${s.published === false ? '  UNPUBLISHED (subscribers wait for the owner to publish; mmbroker publish)' : ''}`);
    out.push(s.regions.length === 0 ? '  (no regions)' : table([
      ['REGION', 'ID', 'GPA', 'SIZE', 'BACKING', 'OFFSET', 'FLAGS'],
      ...s.regions.map((r) => [r.name, String(r.id), hex(r.gpa), formatSize(r.size), String(r.backing), hex(r.offset), [r.readonly ? 'ro' : 'rw', r.logDirty ? 'log' : ''].filter(Boolean).join(',')]),
    ]));
    out.push(s.clients.length === 0 ? '  (no clients)' : table([
      ['CLIENT', 'ROLE', 'KIND', 'NAME', 'PID', 'ACKED', 'STATE', 'VIA', 'BACKEND', 'REGIONS', 'PINNED (PREDICTED/ACTUAL)', 'RESERVED'],
      ...s.clients.map((c) => [
        String(c.id),
        c.role,
        c.kind,
        c.name,
        String(c.pid),
        String(c.ackedGeneration),
        c.state,
        c.transport,
        c.backend ?? '',
        c.regions === undefined ? '' : `${c.regions}${c.maxRegions !== undefined ? `/${c.maxRegions}` : ''}${c.coalesce ? ' coalesced' : ''}`,
        c.pin ? `${formatSize(c.pin.predicted)}/${c.pin.actual === undefined ? '?' : formatSize(c.pin.actual)}${c.pin.limit !== undefined ? ` (limit ${formatSize(c.pin.limit)})` : ''}` : '',
        (c.reserved ?? []).map((r) => `${hex(r.start)}-${hex(r.last)}`).join(' '),
      ]),
    ]));
    for (const h of s.holders ?? []) {
      out.push(`  holding until fenced: ${h.client.kind} client ${JSON.stringify(h.client.name)} (#${h.client.id}, pid ${h.client.pid}), ${h.reason} ${(h.ms / 1000).toFixed(1)} s ago, ${h.state}; backings ${h.backings.join(', ')}${h.alive.length > 0 ? `; alive: ${h.alive.join(', ')}` : ''}`);
    }
    out.push(...renderIoas(s));
    if (s.pinBudget && (s.pinBudget.limit !== undefined || s.pinBudget.predicted > 0)) {
      out.push(`  pinned in all: predicted ${formatSize(s.pinBudget.predicted)}, actual ${formatSize(s.pinBudget.actual)}${s.pinBudget.limit !== undefined ? `, budget ${formatSize(s.pinBudget.limit)}` : ''}`);
    }
  }
  return out.join('\n');
}
