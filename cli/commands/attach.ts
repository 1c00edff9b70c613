import { parseArgs } from 'node:util';
import { MappingSubscriber } from '../../clients/index.js';
import type { MmbError } from '../../protocol/index.js';
import { formatSize, hex, HELP, parsed, parseCount, required, type Command } from '../args.js';

const usage = `Usage: mmbroker attach --socket PATH --space NAME [--name NAME] [--max-regions N] [--json]

Runs a plain subscriber until SIGTERM or SIGINT: it maps every region it is given (MAP_SHARED, never
pinned), acks every change, reconnects and resumes by itself, and logs each event on stdout.

Options:
  --socket PATH       the broker's socket
  --space NAME        the address space to follow
  --name NAME         client name shown by status (default: attach-<pid>)
  --max-regions N     the most regions this client accepts (the broker refuses changes beyond it)
  --json              log one JSON object per event instead of text
  -h, --help          show this help`;

export const attach: Command = {
  name: 'attach',
  summary: 'run a subscriber that maps every region and logs events',
  usage,
  async run(argv) {
    const { values } = parsed(() => parseArgs({ args: argv, strict: true, options: { ...HELP, 
      socket: { type: 'string' },
      space: { type: 'string' },
      name: { type: 'string' },
      'max-regions': { type: 'string' },
      json: { type: 'boolean' },
    } }));
    if (values.help) {
      console.log(usage);
      return 0;
    }
    const json = values.json ?? false;
    const log = (event: string, text: string, data: Record<string, unknown> = {}) =>
      console.log(json ? JSON.stringify({ time: Date.now(), pid: process.pid, event, ...data }) : `[attach ${process.pid}] ${text}`);
    const sub = await MappingSubscriber.attach(required(values, 'socket'), {
      space: required(values, 'space'),
      name: values.name ?? `attach-${process.pid}`,
      ...(values['max-regions'] ? { maxRegions: parseCount(values['max-regions'], '--max-regions') } : {}),
    });
    const describeMapped = () =>
      sub.memory.regions().map((m) => ({ name: m.region.name, gpa: m.region.gpa, size: m.region.size, address: m.address, readonly: m.region.readonly }));
    sub.on('change', ({ change }) => {
      for (const r of change.removed) log('unmapped', `unmapped ${JSON.stringify(r.name)} gpa ${hex(r.gpa)} size ${formatSize(r.size)}`, { region: r.name, gpa: r.gpa, size: r.size });
      for (const r of change.added) {
        const m = sub.memory.regions().find((x) => x.region.key === r.key);
        log('mapped', `mapped ${JSON.stringify(r.name)} gpa ${hex(r.gpa)} size ${formatSize(r.size)} at ${hex(m?.address ?? 0)}${r.readonly ? ' read-only' : ''}`, {
          region: r.name, gpa: r.gpa, size: r.size, address: m?.address, readonly: r.readonly,
        });
      }
      for (const { after } of change.updated) log('updated', `updated ${JSON.stringify(after.name)} (logDirty ${after.logDirty})`, { region: after.name });
    });
    sub.on('committed', (g) => log('committed', `generation ${g} committed`, { generation: g }));
    sub.on('rolledBack', (g) => log('rolledBack', `generation ${g} rolled back`, { generation: g }));
    sub.on('disconnected', (reason?: MmbError) => log('disconnected', `disconnected${reason ? `: ${reason.code} ${reason.message}` : ''}`));
    sub.on('reconnected', (r) => log('reconnected', `reconnected as client ${r.client}, ${r.sync} at generation ${r.generation}`, { ...r }));
    sub.on('error', (e) => log('error', `${e.code}: ${e.message}`, { code: e.code, message: e.message }));
    log('attached', `attached to ${JSON.stringify(sub.space)} as client ${sub.id} at generation ${sub.generation}, ${sub.regions().length} region(s)`, {
      client: sub.id, generation: sub.generation, regions: describeMapped(),
    });
    await new Promise<void>((resolve) => {
      process.once('SIGTERM', resolve);
      process.once('SIGINT', resolve);
    });
    await sub.close();
    log('detached', 'detached');
    return 0;
  },
};
