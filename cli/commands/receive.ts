import { Receiver, readTokenFile, type ReceiveEvent } from '../../clients/migration/index.js';
import { isMmbError } from '../../protocol/index.js';
import { formatBytes, parseCommand, required, type Command } from '../args.js';
import { ProgressOutput } from './migrate.js';

const usage = `Usage: mmbroker receive --listen [HOST:]PORT --space NAME --socket PATH --token-file PATH [--json]

The destination end of \`mmbroker migrate --to tcp://HOST:PORT\`: listens for one migration, writes the
map and memory it receives into address space NAME of the broker at --socket (as that space's owner;
the space must be empty and unpublished, which is how \`mmbroker serve\` starts it), and once the sender
has verified the copy, publishes the space: subscribers attach to it as usual (those that attached while
it was being filled get the whole map at once). Memory and the map arrive; vCPU and device state are the
VMM's. If the connection breaks, the sender aborts, or the stream is invalid, everything received is
removed and the space stays unpublished; the command exits 1.

The sender must prove it knows the token (an HMAC of a fresh nonce: the token never crosses the
network); connections that fail are closed and listening goes on. The stream is not encrypted: run it
over a network you trust, or through a tunnel.

Output: on a terminal, progress lines; otherwise (or with --json) one JSON object per line, the first
{"event":"listening","host":...,"port":...}, the last "committed" or "aborted".

Options:
  --listen [HOST:]PORT   where to listen; a bare PORT binds loopback (127.0.0.1) only; 0 picks a port;
                         another host must be named explicitly (0.0.0.0:PORT, [::]:PORT, an address)
  --space NAME           the address space to receive into
  --socket PATH          the destination broker's socket
  --token-file PATH      the token, first line of a file only its owner can read (mode 600)
  --json                 JSON lines even on a terminal
  -h, --help             show this help`;

function describe(e: ReceiveEvent): string | undefined {
  switch (e.event) {
    case 'listening':
      return `listening on ${e.host.includes(':') ? `[${e.host}]` : e.host}:${e.port} for a migration into ${JSON.stringify(e.space)}`;
    case 'connection':
      return undefined;
    case 'refused':
      return `refused ${e.peer}: ${e.code}: ${e.message}`;
    case 'authenticated':
      return `receiving ${JSON.stringify(e.source.space)} (${formatBytes(e.memoryBytes)}) from ${e.peer}${e.dataCrc ? ', with data checksums' : ''}`;
    case 'map':
      return `  round ${String(e.round).padStart(2)} ${e.phase.padEnd(5)} map at generation ${e.generation}: ${e.regions} regions${e.added + e.removed + e.changed > 0 ? ` (+${e.added} -${e.removed} ~${e.changed})` : ''}`;
    case 'progress':
      return undefined;
    case 'synced':
      return `  every byte in place: ${formatBytes(e.bytes)} in ${e.records} records`;
    case 'verified':
      return `  digests of ${e.blocks} blocks sent for verification`;
    case 'committed':
      return `published ${JSON.stringify(e.space)} at generation ${e.generation}: ${e.regions} regions, ${formatBytes(e.bytes)} received`;
    case 'aborted':
      return `aborted (${e.code}): ${e.message}; nothing was published`;
  }
}

export const receive: Command = {
  name: 'receive',
  summary: 'the destination of `migrate --to tcp://`: receive a migration into a space and publish it',
  usage,
  async run(argv) {
    const values = parseCommand(
      argv,
      {
        listen: { type: 'string' },
        space: { type: 'string' },
        socket: { type: 'string' },
        'token-file': { type: 'string' },
        json: { type: 'boolean' },
      },
      usage,
    );
    if (!values) return 0;
    const listen = required(values, 'listen');
    const space = required(values, 'space');
    const socket = required(values, 'socket');
    const token = readTokenFile(required(values, 'token-file'));
    const out = ProgressOutput.for(values.json);
    const stop = new AbortController();
    const onSignal = (sig: NodeJS.Signals) => stop.abort(new Error(`${sig}`));
    process.once('SIGTERM', onSignal);
    process.once('SIGINT', onSignal);
    try {
      const r = await Receiver.listen({
        listen,
        space,
        broker: socket,
        token,
        signal: stop.signal,
        onEvent: (e) => {
          if (e.event === 'progress') {
            out.status(
              e,
              `  round ${String(e.round).padStart(2)}: ${formatBytes(e.bytes)} received${e.memoryBytes > 0 ? ` (${Math.round((100 * e.bytes) / e.memoryBytes)}% of the memory)` : ''}`,
            );
            return;
          }
          out.event(e, describe(e));
        },
      });
      await r.result;
      return 0;
    } catch (err) {
      // The receiver already said why ("aborted"); a failure before listening (a published space, a
      // taken port) is the CLI's to print.
      if (isMmbError(err) && stop.signal.aborted) return 1;
      throw err;
    } finally {
      process.off('SIGTERM', onSignal);
      process.off('SIGINT', onSignal);
    }
  },
};
