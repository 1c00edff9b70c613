import pino from 'pino';
import { parseArgs } from 'node:util';
import { Broker } from '../../broker/index.js';
import { DEFAULT_SPACE_LIMITS } from '../../protocol/index.js';
import { HELP, parsed, parseCount, parseSize, required, type Command } from '../args.js';

const usage = `Usage: mmbroker serve --socket PATH [--space NAME]... [options]

Serves address spaces on a Unix socket until SIGTERM or SIGINT, then says goodbye to every client and
exits 0. Logs are JSON lines (pino) on stdout.

Options:
  --socket PATH        socket to listen on (created 0600; its directory 0700 if it has to be created)
  --space NAME         an address space to serve (repeatable; default: "default")
  --ack-timeout MS     how long a subscriber may take to ack a change before it is evicted
                       (default ${DEFAULT_SPACE_LIMITS.ackTimeoutMs})
  --owner-uid UID      a uid allowed to own address spaces (repeatable; default: the broker's uid)
  --pin-budget SIZE    most bytes all pinning (vfio-like) subscribers of a space may pin together;
                       hotplug beyond it is refused before anything changes (default: no budget)
  --socket-mode MODE   permission bits of the socket, octal (default 600)
  --log-level LEVEL    fatal, error, warn, info, debug, trace or silent (default info)
  -h, --help           show this help`;

export const serve: Command = {
  name: 'serve',
  summary: 'serve address spaces on a Unix socket',
  usage,
  async run(argv) {
    const { values } = parsed(() => parseArgs({ args: argv, strict: true, options: { ...HELP, 
      socket: { type: 'string' },
      space: { type: 'string', multiple: true },
      'ack-timeout': { type: 'string' },
      'owner-uid': { type: 'string', multiple: true },
      'pin-budget': { type: 'string' },
      'socket-mode': { type: 'string' },
      'log-level': { type: 'string' },
    } }));
    if (values.help) {
      console.log(usage);
      return 0;
    }
    const socket = required(values, 'socket');
    const logger = pino({ level: values['log-level'] ?? 'info', base: { pid: process.pid } });
    const broker = new Broker({
      spaces: values.space?.length ? values.space : ['default'],
      logger,
      limits: {
        ...(values['ack-timeout'] ? { ackTimeoutMs: parseCount(values['ack-timeout'], '--ack-timeout') } : {}),
        ...(values['pin-budget'] ? { pinBudgetBytes: parseSize(values['pin-budget'], '--pin-budget') } : {}),
      },
      ...(values['owner-uid'] ? { ownerUids: values['owner-uid'].map((u) => parseCount(u, '--owner-uid')) } : {}),
    });
    broker.listen(socket, values['socket-mode'] ? { mode: Number.parseInt(values['socket-mode'], 8) } : {});
    await new Promise<void>((resolve) => {
      const stop = (signal: string) => {
        logger.info({ signal }, 'shutting down');
        resolve();
      };
      process.once('SIGTERM', () => stop('SIGTERM'));
      process.once('SIGINT', () => stop('SIGINT'));
    });
    await broker.close();
    logger.flush?.();
    return 0;
  },
};
