import { MappingSubscriber, type Subscriber } from '../../clients/index.js';
import { VhostSubscriber } from '../../clients/vhost/index.js';
import { InvalidArgError, type MmbError } from '../../protocol/index.js';
import { formatSize, hex, HELP, parsed, parseCount, required, type Command } from '../args.js';
import readline from 'node:readline';
import { parseArgs } from 'node:util';

const KINDS = ['plain', 'vhost'] as const;
type Kind = (typeof KINDS)[number];

const usage = `Usage: mmbroker attach [plain|vhost] --socket PATH --space NAME [options]

Runs a subscriber of the given kind until SIGTERM or SIGINT, logging each event on stdout. Every kind
acks every change, reconnects and resumes by itself.

Kinds:
  plain   (default) maps every region MAP_SHARED, never pins
  vhost   a device back-end's view: maps every region (read-only ones PROT_READ), never pins, translates
          guest addresses; declares --max-regions slots and can follow a coalesced view (--coalesce)

Options:
  --socket PATH       the broker's socket
  --space NAME        the address space to follow
  --name NAME         client name shown by status (default: <kind>-<pid>)
  --max-regions N     the most regions (slots) this client accepts; the broker refuses changes beyond it
  --coalesce          follow a coalesced view (adjacent regions of one backing merged into one)
  --json              log one JSON object per event instead of text
  --control           also read JSON commands on stdin, one per line, answered on stdout:
                      {"cmd":"read","gpa":N,"len":N} {"cmd":"write","gpa":N,"hex":"..."} {"cmd":"regions"}
  -h, --help          show this help`;

export const attach: Command = {
  name: 'attach',
  summary: 'run a subscriber of a kind (plain, vhost) that follows a space',
  usage,
  async run(argv) {
    const kind: Kind = argv[0] !== undefined && !argv[0].startsWith('-') ? (argv.shift() as Kind) : 'plain';
    if (!KINDS.includes(kind)) throw new InvalidArgError(`unknown kind ${JSON.stringify(kind)} (${KINDS.join(', ')})`);
    const { values } = parsed(() =>
      parseArgs({
        args: argv,
        strict: true,
        options: {
          ...HELP,
          socket: { type: 'string' },
          space: { type: 'string' },
          name: { type: 'string' },
          'max-regions': { type: 'string' },
          coalesce: { type: 'boolean' },
          json: { type: 'boolean' },
          control: { type: 'boolean' },
        },
      }),
    );
    if (values.help) {
      console.log(usage);
      return 0;
    }
    const json = values.json ?? false;
    const log = (event: string, text: string, data: Record<string, unknown> = {}) =>
      console.log(json ? JSON.stringify({ time: Date.now(), pid: process.pid, kind, event, ...data }) : `[${kind} ${process.pid}] ${text}`);
    const opts = {
      space: required(values, 'space'),
      name: values.name ?? `${kind}-${process.pid}`,
      ...(values['max-regions'] ? { maxRegions: parseCount(values['max-regions'], '--max-regions') } : {}),
      ...(values.coalesce ? { coalesce: true } : {}),
    };
    const socket = required(values, 'socket');
    const sub = kind === 'vhost' ? await VhostSubscriber.attach(socket, opts) : await MappingSubscriber.attach(socket, opts);
    await follow(sub, sub.memory.regions.bind(sub.memory), log, values.control ? sub.memory : undefined);
    return 0;
  },
};

type Log = (event: string, text: string, data?: Record<string, unknown>) => void;

export interface GuestAccess {
  read(gpa: number, length: number): Uint8Array;
  write(gpa: number, data: Uint8Array): void;
}

/** Answers JSON commands on stdin (read, write, regions) with JSON lines on stdout. */
function control(sub: Subscriber, memory: GuestAccess): void {
  const rl = readline.createInterface({ input: process.stdin });
  rl.on('line', (line) => {
    let reply: Record<string, unknown>;
    try {
      const c = JSON.parse(line) as { cmd?: string; gpa?: number; len?: number; hex?: string };
      if (c.cmd === 'read') reply = { event: 'read', gpa: c.gpa, hex: Buffer.from(memory.read(Number(c.gpa), Number(c.len))).toString('hex') };
      else if (c.cmd === 'write') {
        memory.write(Number(c.gpa), Buffer.from(String(c.hex), 'hex'));
        reply = { event: 'wrote', gpa: c.gpa };
      } else if (c.cmd === 'regions') reply = { event: 'regions', generation: sub.generation, regions: sub.regions().map(({ name, gpa, size, readonly }) => ({ name, gpa, size, readonly })) };
      else reply = { event: 'failed', message: `unknown command ${JSON.stringify(c.cmd)}` };
    } catch (err) {
      reply = { event: 'failed', code: (err as MmbError).code, message: (err as Error).message };
    }
    console.log(JSON.stringify(reply));
  });
}

/** Logs a subscriber's events until SIGTERM / SIGINT (or stdin's end under --control), then closes it. */
export async function follow(
  sub: Subscriber,
  mapped: () => readonly { region: { key: string }; address: number }[],
  log: Log,
  access?: GuestAccess,
): Promise<void> {
  if (access) control(sub, access);
  const addressOf = (key: string) => mapped().find((m) => m.region.key === key)?.address;
  sub.on('change', ({ change }) => {
    for (const r of change.removed) log('unmapped', `unmapped ${JSON.stringify(r.name)} gpa ${hex(r.gpa)} size ${formatSize(r.size)}`, { region: r.name, gpa: r.gpa, size: r.size });
    for (const r of change.added) {
      const address = addressOf(r.key);
      log('mapped', `mapped ${JSON.stringify(r.name)} gpa ${hex(r.gpa)} size ${formatSize(r.size)}${address !== undefined ? ` at ${hex(address)}` : ''}${r.readonly ? ' read-only' : ''}`, {
        region: r.name, gpa: r.gpa, size: r.size, address, readonly: r.readonly,
      });
    }
    for (const { after } of change.updated) log('updated', `updated ${JSON.stringify(after.name)} (logDirty ${after.logDirty})`, { region: after.name });
  });
  sub.on('committed', (g) => log('committed', `generation ${g} committed`, { generation: g }));
  sub.on('rolledBack', (g) => log('rolledBack', `generation ${g} rolled back`, { generation: g }));
  sub.on('disconnected', (reason?: MmbError) => log('disconnected', `disconnected${reason ? `: ${reason.code} ${reason.message}` : ''}`, reason ? { code: reason.code } : {}));
  sub.on('reconnected', (r) => log('reconnected', `reconnected as client ${r.client}, ${r.sync} at generation ${r.generation}`, { ...r }));
  sub.on('error', (e) => log('error', `${e.code}: ${e.message}`, { code: e.code, message: e.message }));
  log('attached', `attached to ${JSON.stringify(sub.space)} as client ${sub.id} at generation ${sub.generation}, ${sub.regions().length} region(s)`, {
    client: sub.id,
    generation: sub.generation,
    regions: sub.regions().map((r) => ({ name: r.name, gpa: r.gpa, size: r.size, address: addressOf(r.key), readonly: r.readonly })),
  });
  await new Promise<void>((resolve) => {
    process.once('SIGTERM', resolve);
    process.once('SIGINT', resolve);
  });
  await sub.close();
  log('detached', 'detached');
}

