import pino from 'pino';
import { Broker } from '../../broker/index.js';
import { DEFAULT_CONNECTION_LIMITS, DEFAULT_SPACE_LIMITS, InvalidArgError } from '../../protocol/index.js';
import { parseCommand, parseCount, parseSize, readToken, required, type Command } from '../args.js';
import { stopRequested } from '../../testkit/signals.js';

const usage = `Usage: mmbroker serve --socket PATH [--space NAME]... [options]

Serves address spaces on a Unix socket until SIGTERM or SIGINT, then says goodbye to every client and
exits 0. Logs are JSON lines (pino) on stdout.

Options:
  --socket PATH        socket to listen on (created 0600; its directory 0700 if it has to be created)
  --space NAME         an address space to serve (repeatable; default: "default")
  --ack-timeout MS     how long a subscriber may take to ack a change before it is evicted
                       (default ${DEFAULT_SPACE_LIMITS.ackTimeoutMs})
  --owner-uid UID      a uid allowed to own address spaces (repeatable; default: the broker's uid)
  --owner-gid GID      a gid whose members may own address spaces (repeatable)
  --subscriber-uid UID a uid allowed to subscribe or observe (repeatable; default: the broker's uid)
  --subscriber-gid GID a gid whose members may subscribe or observe (repeatable)
  --token-file PATH    subscribers and observers must present the token in this file (first line);
                       read from a file so it never shows in /proc/PID/cmdline
  --max-connections N  connections served at once (default ${DEFAULT_CONNECTION_LIMITS.maxConnections})
  --rate N             requests per second one connection may send (default ${DEFAULT_CONNECTION_LIMITS.requestsPerSecond})
  --max-outbound SIZE  bytes queued towards a peer that does not read before it is disconnected
                       (MMB_ERR_SLOW_READER; default ${DEFAULT_CONNECTION_LIMITS.maxOutboundBytes / 2 ** 20}M)
  --pin-budget SIZE    most bytes all pinning (vfio-like) subscribers of a space may pin together;
                       hotplug beyond it is refused before anything changes (default: no budget)
  --socket-mode MODE   permission bits of the socket, octal (default 600): the allow-lists above only
                       matter for peers that can connect at all
  See docs/security.md for who may do what.
  --log-level LEVEL    fatal, error, warn, info, debug, trace or silent (default info)
  -h, --help           show this help`;

export const serve: Command = {
  name: 'serve',
  summary: 'serve address spaces on a Unix socket',
  usage,
  async run(argv) {
    const values = parseCommand(argv, { socket: { type: 'string' },
      space: { type: 'string', multiple: true },
      'ack-timeout': { type: 'string' },
      'owner-uid': { type: 'string', multiple: true },
      'owner-gid': { type: 'string', multiple: true },
      'subscriber-uid': { type: 'string', multiple: true },
      'subscriber-gid': { type: 'string', multiple: true },
      'token-file': { type: 'string' },
      'max-connections': { type: 'string' },
      rate: { type: 'string' },
      'max-outbound': { type: 'string' },
      'pin-budget': { type: 'string' },
      'socket-mode': { type: 'string' },
      'log-level': { type: 'string' } }, usage);
    if (!values) return 0;
    const socket = required(values, 'socket');
    const ids = (list: string[] | undefined, what: string) => list?.map((u) => parseCount(u, what));
    const allow = (uids: number[] | undefined, gids: number[] | undefined) => (uids || gids ? { uids: uids ?? [process.getuid?.() ?? 0], gids: gids ?? [] } : undefined);
    const owners = allow(ids(values['owner-uid'], '--owner-uid'), ids(values['owner-gid'], '--owner-gid'));
    const subscribers = allow(ids(values['subscriber-uid'], '--subscriber-uid'), ids(values['subscriber-gid'], '--subscriber-gid'));
    const token = values['token-file'] !== undefined ? readToken(values['token-file']) : undefined;
    const mode = values['socket-mode'] !== undefined ? parseMode(values['socket-mode']) : undefined;
    const logger = pino({ level: values['log-level'] ?? 'info', base: { pid: process.pid } });
    const broker = new Broker({
      spaces: values.space?.length ? values.space : ['default'],
      logger,
      limits: {
        ...(values['ack-timeout'] ? { ackTimeoutMs: parseCount(values['ack-timeout'], '--ack-timeout') } : {}),
        ...(values['pin-budget'] ? { pinBudgetBytes: parseSize(values['pin-budget'], '--pin-budget') } : {}),
      },
      access: { ...(owners ? { owners } : {}), ...(subscribers ? { subscribers } : {}), ...(token !== undefined ? { token } : {}) },
      connection: {
        ...(values['max-connections'] ? { maxConnections: parseCount(values['max-connections'], '--max-connections') } : {}),
        ...(values.rate ? { requestsPerSecond: parseCount(values.rate, '--rate') } : {}),
        ...(values['max-outbound'] ? { maxOutboundBytes: parseSize(values['max-outbound'], '--max-outbound') } : {}),
      },
    });
    // Handled before "listening" is logged: whoever starts the broker may stop it the moment it reads that line.
    const stop = stopRequested();
    broker.listen(socket, mode !== undefined ? { mode } : {});
    logger.info({ signal: await stop }, 'shutting down');
    await broker.close();
    logger.flush?.();
    return 0;
  },
};

function parseMode(text: string): number {
  if (!/^0?[0-7]{3}$/.test(text.trim())) throw new InvalidArgError(`--socket-mode ${JSON.stringify(text)} is not an octal mode such as 660`);
  return Number.parseInt(text, 8);
}
