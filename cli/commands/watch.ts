import { Watcher, fetchStatus } from '../../clients/index.js';
import { InvalidArgError, NoSpaceError, type EvWatch, type MmbError } from '../../protocol/index.js';
import { parseCommand, parseCount, readToken, required, type Command } from '../args.js';
import { clock, describeEvent } from '../describe.js';

const usage = `Usage: mmbroker watch [--socket PATH] [--space NAME]... [--json] [--count N]

Follows what happens in address spaces as it happens: transactions going to the vote and their outcome
(committed, rolled back, refused, with the error and the client), clients joining and leaving, evictions,
holders (clients whose connection ended while they may still reach memory) and their fencing, dirty
syncs, publishes, and pinning progress reported by pinning clients.

A watcher is an observer: it maps nothing and acknowledges nothing, so the broker never waits for it. A
watcher that stops reading (a stopped process, a full pipe) is disconnected by the broker once too much
is queued for it (MMB_ERR_SLOW_READER); it never slows a change.

Options:
  --socket PATH      the broker's socket (default: $MMBROKER_SOCKET, else /run/memmap-broker/broker.sock)
  --space NAME       a space to watch (repeatable; default: every space this broker lets you see)
  --json             one JSON object per event: {"space", "seq", "time", "event": {"kind", ...}}
                     (the wire's EV_WATCH, docs/protocol.md)
  --count N          stop after N events
  --token-file PATH  the space's token, when the broker requires one of observers (first line)
  -h, --help         show this help

Exits 0 on Ctrl-C (or after --count events), 1 when the broker ends the watch (and says why).`;

export const watch: Command = {
  name: 'watch',
  summary: 'follow transactions, evictions, fencing and joins live (never slows a change)',
  usage,
  async run(argv) {
    const values = parseCommand(
      argv,
      {
        socket: { type: 'string' },
        space: { type: 'string', multiple: true },
        json: { type: 'boolean' },
        count: { type: 'string' },
        'token-file': { type: 'string' },
      },
      usage,
    );
    if (!values) return 0;
    const socket = required(values, 'socket');
    const count = values.count !== undefined ? parseCount(values.count, '--count') : Number.POSITIVE_INFINITY;
    if (count === 0) throw new InvalidArgError('--count 0 would watch nothing');
    const token = values['token-file'] !== undefined ? readToken(values['token-file']) : undefined;
    let spaces = values.space ?? [];
    if (spaces.length === 0) {
      spaces = (await fetchStatus(socket)).spaces.map((s) => s.name);
      if (spaces.length === 0) throw new NoSpaceError(`the broker at ${socket} serves no address space you may see`);
    }
    const watchers: Watcher[] = [];
    try {
      for (const space of spaces) watchers.push(await Watcher.attach(socket, { space, ...(token !== undefined ? { token } : {}) }));
    } catch (err) {
      for (const w of watchers) w.close();
      throw err;
    }
    const json = values.json ?? false;
    const version = watchers[0]?.brokerVersion;
    for (const w of watchers)
      process.stderr.write(`watching ${JSON.stringify(w.space)} from generation ${w.generation}${version ? ` (broker ${version})` : ''}; Ctrl-C to stop\n`);
    let seen = 0;
    return new Promise<number>((resolve) => {
      let done = false;
      const finish = (code: number) => {
        if (done) return;
        done = true;
        for (const w of watchers) w.close();
        resolve(code);
      };
      const print = (m: EvWatch) => {
        if (done) return;
        if (json) {
          const { t: _t, ...rest } = m;
          process.stdout.write(JSON.stringify(rest) + '\n');
        } else {
          const { kind, text } = describeEvent(m);
          process.stdout.write(`${clock(m.time)} ${m.space} ${kind.padEnd(11)} ${text}\n`);
        }
        if (++seen >= count) finish(0);
      };
      const ended = (w: Watcher, reason: MmbError | undefined) => {
        if (done) return;
        const why = reason ? `${reason.code}: ${reason.message}` : 'the connection closed';
        const slow =
          reason?.code === 'MMB_ERR_SLOW_READER' ? ' (this watcher read too slowly and was cut off so that it would not hold anyone up; run it again)' : '';
        process.stderr.write(`mmbroker watch: the broker ended the watch of ${JSON.stringify(w.space)}: ${why}${slow}\n`);
        finish(1);
      };
      for (const w of watchers) {
        w.on('event', print);
        w.on('close', (reason) => ended(w, reason));
      }
      process.once('SIGINT', () => finish(0));
      process.once('SIGTERM', () => finish(0));
    });
  },
};
