import fs from 'node:fs';
import { Broker, BrokerMetrics, BROKER_VERSION, DEFAULT_FENCE_OPTIONS } from '../../broker/index.js';
import { isNativeError } from '../../native/index.js';
import {
  DEFAULT_CONNECTION_LIMITS,
  DEFAULT_SPACE_LIMITS,
  InvalidArgError,
  PROTOCOL_VERSION,
  UnsafePathError,
  isMmbError,
  type ConnectionLimits,
} from '../../protocol/index.js';
import { listenFds } from '../../transport/index.js';
import { parseCommand, parseCount, parseSize, readToken, required, type Command } from '../args.js';
import { createLog, parseLogFormat, parseLogLevel } from '../logger.js';
import { parseMetricsAddress, serveMetrics } from '../metrics-http.js';
import { notifier } from '../sd-notify.js';
import { stopRequested } from '../../testkit/signals.js';

const usage = `Usage: mmbroker serve [--socket PATH] [--space NAME]... [options]

Serves address spaces on a Unix socket until SIGTERM or SIGINT, then says goodbye to every client and
exits 0. Logs go to stdout: readable lines on a terminal, JSON lines (pino) otherwise; the first one
names the release. SIGHUP reopens --log-file (after logrotate); SIGUSR1 does nothing.

Under systemd (contrib/systemd/, docs/operating.md): a socket passed by socket activation (LISTEN_FDS,
LISTEN_PID) is served instead of binding --socket; with NOTIFY_SOCKET set the broker sends READY=1 once
it serves, STOPPING=1 when it stops, and WATCHDOG=1 every WATCHDOG_USEC / 2.

Spaces start unpublished: subscribers that attach (or reconnect after a restart of this broker) keep
everything they hold and wait until the space's owner publishes its map (or \`mmbroker publish\`).
A restart of the broker therefore never tears memory out of running clients.

Options:
  --socket PATH        socket to listen on (created 0600; its directory 0700 if it has to be created;
                       default: $MMBROKER_SOCKET, else /run/memmap-broker/broker.sock)
  --space NAME         an address space to serve (repeatable; default: "default")
  --ack-timeout MS     how long a subscriber may take to ack a change before it is evicted
                       (default ${DEFAULT_SPACE_LIMITS.ackTimeoutMs})
  --owner-uid UID      a uid allowed to own address spaces (repeatable; default: the broker's uid)
  --owner-gid GID      a gid whose members may own address spaces (repeatable)
  --subscriber-uid UID a uid allowed to subscribe or observe (repeatable; default: the broker's uid)
  --subscriber-gid GID a gid whose members may subscribe or observe (repeatable)
  --token-file PATH    subscribers and observers must present the token in this file (first line);
                       read from a file so it never shows in /proc/PID/cmdline; the file must belong to
                       root or the broker's uid and be readable by nobody else (chmod 600)
  --max-connections N  connections served at once (default ${DEFAULT_CONNECTION_LIMITS.maxConnections})
  --owner-reserve N    connections beyond that, and descriptors, kept for uids on the owner list
                       (default ${DEFAULT_CONNECTION_LIMITS.ownerReserve})
  --max-connections-per-uid N
                       connections one uid that is on no owner list may hold (default ${DEFAULT_CONNECTION_LIMITS.maxConnectionsPerUid})
  --max-unattached N   connections of uids on no owner list that have not attached yet, at once
                       (default ${DEFAULT_CONNECTION_LIMITS.maxUnattached})
  --max-unattached-per-uid N
                       the same per uid (default ${DEFAULT_CONNECTION_LIMITS.maxUnattachedPerUid})
  --hello-timeout MS   a new connection must say HELLO within this (default ${DEFAULT_CONNECTION_LIMITS.helloTimeoutMs})
  --idle-timeout MS    a connection that has not attached may stay silent this long
                       (default ${DEFAULT_CONNECTION_LIMITS.unattachedIdleMs})
  --rate N             requests per second one connection may send (default ${DEFAULT_CONNECTION_LIMITS.requestsPerSecond})
  --max-outbound SIZE  bytes queued towards a peer that does not read before it is disconnected
                       (MMB_ERR_SLOW_READER; default ${DEFAULT_CONNECTION_LIMITS.maxOutboundBytes / 2 ** 20}M)
  --fence POLICY       how a client that may still reach memory after its connection ended is fenced
                       before memory it holds is taken away: kill (default: SIGKILL through its pidfd
                       once it misses a deadline, then wait for its exit) or wait (only wait for its exit)
  --fence-timeout MS   how long a change waits for such a client to be fenced before it fails with
                       MMB_ERR_NOT_FENCED (default ${DEFAULT_FENCE_OPTIONS.timeoutMs})
  --published          start spaces published (only where no client can outlive a restart of this broker)
  --pipeline N         pipelined transactions (feature PIPELINE): up to N transactions of a space in flight
                       at once, to subscribers that negotiated it (default 1: one at a time)
  --pin-budget SIZE    most bytes all pinning (vfio-like) subscribers of a space may pin together;
                       hotplug beyond it is refused before anything changes (default: no budget)
  --socket-mode MODE   permission bits of the socket, octal (default 600): the allow-lists above only
                       matter for peers that can connect at all
  See docs/security.md for who may do what.
  --log-level LEVEL    fatal, error, warn, info, debug, trace or silent (default: $LOG_LEVEL, else info)
  --log-format F       auto (default: readable on a terminal, JSON otherwise), pretty or json
  --log-file PATH      append JSON lines to PATH instead of stdout; SIGHUP reopens it
  --metrics HOST:PORT  serve Prometheus metrics at http://HOST:PORT/metrics (loopback addresses only:
                       127.0.0.1:9464, [::1]:9464, or a bare port; docs/operating.md lists the metrics)
  --metrics-public     allow --metrics on a non-loopback address (the endpoint has no authentication)
  -h, --help           show this help`;

export const serve: Command = {
  name: 'serve',
  summary: 'serve address spaces on a Unix socket',
  usage,
  async run(argv) {
    const values = parseCommand(
      argv,
      {
        socket: { type: 'string' },
        space: { type: 'string', multiple: true },
        'ack-timeout': { type: 'string' },
        'owner-uid': { type: 'string', multiple: true },
        'owner-gid': { type: 'string', multiple: true },
        'subscriber-uid': { type: 'string', multiple: true },
        'subscriber-gid': { type: 'string', multiple: true },
        'token-file': { type: 'string' },
        'max-connections': { type: 'string' },
        'owner-reserve': { type: 'string' },
        'max-connections-per-uid': { type: 'string' },
        'max-unattached': { type: 'string' },
        'max-unattached-per-uid': { type: 'string' },
        'hello-timeout': { type: 'string' },
        'idle-timeout': { type: 'string' },
        rate: { type: 'string' },
        'max-outbound': { type: 'string' },
        'pin-budget': { type: 'string' },
        fence: { type: 'string' },
        'fence-timeout': { type: 'string' },
        published: { type: 'boolean' },
        pipeline: { type: 'string' },
        'socket-mode': { type: 'string' },
        'log-level': { type: 'string' },
        'log-format': { type: 'string' },
        'log-file': { type: 'string' },
        metrics: { type: 'string' },
        'metrics-public': { type: 'boolean' },
      },
      usage,
    );
    if (!values) return 0;
    const level =
      values['log-level'] !== undefined ? parseLogLevel(values['log-level'], '--log-level') : parseLogLevel(process.env.LOG_LEVEL || 'info', 'LOG_LEVEL');
    const format = parseLogFormat(values['log-format'] ?? 'auto');
    const metricsAt = values.metrics !== undefined ? parseMetricsAddress(values.metrics, values['metrics-public'] ?? false) : undefined;
    if (values['metrics-public'] && metricsAt === undefined) throw new InvalidArgError('--metrics-public goes with --metrics HOST:PORT');
    const passed = listenFds();
    const socket = required(values, 'socket');
    const ids = (list: string[] | undefined, what: string) => list?.map((u) => parseCount(u, what));
    const allow = (uids: number[] | undefined, gids: number[] | undefined) =>
      uids || gids ? { uids: uids ?? [process.getuid?.() ?? 0], gids: gids ?? [] } : undefined;
    const owners = allow(ids(values['owner-uid'], '--owner-uid'), ids(values['owner-gid'], '--owner-gid'));
    const subscribers = allow(ids(values['subscriber-uid'], '--subscriber-uid'), ids(values['subscriber-gid'], '--subscriber-gid'));
    const token = values['token-file'] !== undefined ? readSecret(values['token-file']) : undefined;
    const mode = values['socket-mode'] !== undefined ? parseMode(values['socket-mode']) : undefined;
    const fencePolicy = values.fence ?? DEFAULT_FENCE_OPTIONS.policy;
    if (fencePolicy !== 'kill' && fencePolicy !== 'wait') throw new InvalidArgError(`--fence ${JSON.stringify(fencePolicy)} is not kill or wait`);
    const log = createLog({ level, format, ...(values['log-file'] !== undefined ? { file: values['log-file'] } : {}) });
    const logger = log.logger;
    logger.info({ version: BROKER_VERSION, protocol: PROTOCOL_VERSION, node: process.version, logs: log.target }, `memmap-broker ${BROKER_VERSION} starting`);
    const broker = new Broker({
      spaces: values.space?.length ? values.space : ['default'],
      logger,
      published: values.published ?? false,
      ...(values.pipeline !== undefined ? { pipeline: parseCount(values.pipeline, '--pipeline') } : {}),
      fence: {
        policy: fencePolicy,
        ...(values['fence-timeout'] ? { timeoutMs: parseCount(values['fence-timeout'], '--fence-timeout') } : {}),
      },
      limits: {
        ...(values['ack-timeout'] ? { ackTimeoutMs: parseCount(values['ack-timeout'], '--ack-timeout') } : {}),
        ...(values['pin-budget'] ? { pinBudgetBytes: parseSize(values['pin-budget'], '--pin-budget') } : {}),
      },
      access: { ...(owners ? { owners } : {}), ...(subscribers ? { subscribers } : {}), ...(token !== undefined ? { token } : {}) },
      connection: {
        ...counts(values, {
          'max-connections': 'maxConnections',
          'owner-reserve': 'ownerReserve',
          'max-connections-per-uid': 'maxConnectionsPerUid',
          'max-unattached': 'maxUnattached',
          'max-unattached-per-uid': 'maxUnattachedPerUid',
          'hello-timeout': 'helloTimeoutMs',
          'idle-timeout': 'unattachedIdleMs',
        }),
        ...(values.rate ? { requestsPerSecond: parseCount(values.rate, '--rate') } : {}),
        ...(values['max-outbound'] ? { maxOutboundBytes: parseSize(values['max-outbound'], '--max-outbound') } : {}),
      },
    });
    const sd = notifier((message, err) => logger.warn({ err: (err as Error).message }, message));
    // Handled before "listening" is logged: whoever starts the broker may stop it the moment it reads that line.
    const stop = stopRequested();
    let metricsServer: import('node:http').Server | undefined;
    try {
      if (passed.length > 0) {
        // Socket activation: the service manager bound the socket (and keeps it across our restarts).
        if (argv.some((a) => a === '--socket' || a.startsWith('--socket=')))
          logger.warn({ socket }, 'a socket was passed by the service manager: --socket is not bound');
        for (const p of passed) broker.listenOn(p.fd, mode !== undefined ? { mode } : {});
      } else {
        listenAt(broker, socket, mode);
      }
      if (metricsAt) {
        const m = await serveMetrics(new BrokerMetrics(broker), metricsAt);
        metricsServer = m.server;
        logger.info(
          {
            host: m.address.host,
            port: m.address.port,
            url: `http://${m.address.host.includes(':') ? `[${m.address.host}]` : m.address.host}:${m.address.port}/metrics`,
          },
          'metrics served',
        );
      }
    } catch (err) {
      await broker.close();
      throw err;
    }
    sd?.ready(`serving ${broker.status().spaces.length} address space(s)`);
    const watchdogMs = sd?.startWatchdog();
    if (watchdogMs !== undefined) logger.info({ everyMs: watchdogMs }, 'watchdog pings to the service manager');
    const reopen = () => {
      const reopened = log.reopen();
      logger.info({ signal: 'SIGHUP' }, reopened ? `log file ${log.target} reopened` : 'SIGHUP: logs go to stdout, nothing to reopen');
    };
    process.on('SIGHUP', reopen);
    logger.info({ signal: await stop }, 'shutting down');
    sd?.stopping();
    process.off('SIGHUP', reopen);
    metricsServer?.close();
    await broker.close();
    sd?.close();
    logger.flush?.();
    return 0;
  },
};

/** The connection limits given as flags (whole numbers), by their ConnectionLimits names. */
function counts(values: Record<string, unknown>, flags: Record<string, keyof ConnectionLimits>): Partial<ConnectionLimits> {
  const out: Partial<ConnectionLimits> = {};
  for (const [flag, key] of Object.entries(flags)) {
    const v = values[flag];
    if (typeof v === 'string') out[key] = parseCount(v, `--${flag}`);
  }
  return out;
}

/**
 * Reads the token from a file that nobody else can read or change: a regular file owned by root or the
 * broker's uid, with no permission bits for group or others (checked on the descriptor the token is then
 * read from, so a swap between the check and the read changes nothing). Else MMB_ERR_UNSAFE_PATH.
 */
function readSecret(file: string): string {
  let fd: number;
  try {
    fd = fs.openSync(file, 'r');
  } catch (err) {
    throw new InvalidArgError(`--token-file ${file}: ${(err as Error).message}`);
  }
  try {
    const st = fs.fstatSync(fd);
    const me = process.geteuid?.() ?? 0;
    if (!st.isFile()) throw new UnsafePathError(`--token-file ${file} is not a regular file`);
    if (st.uid !== 0 && st.uid !== me)
      throw new UnsafePathError(`--token-file ${file} belongs to uid ${st.uid}, who could change the token: give it to root or uid ${me} (chown)`);
    if ((st.mode & 0o077) !== 0) {
      throw new UnsafePathError(
        `--token-file ${file} is open to group or others (mode ${(st.mode & 0o777).toString(8).padStart(3, '0')}): chmod 600 ${file}, and choose a new token: the old one may have been read`,
      );
    }
    const proc = `/proc/self/fd/${fd}`;
    try {
      return readToken(proc);
    } catch (err) {
      throw new InvalidArgError((err as Error).message.replace(proc, file));
    }
  } finally {
    fs.closeSync(fd);
  }
}

/** broker.listen, with a system error about the path (EACCES, ENOTDIR, ...) said as one about --socket. */
function listenAt(broker: Broker, socket: string, mode: number | undefined): void {
  try {
    broker.listen(socket, mode !== undefined ? { mode } : {});
  } catch (err) {
    if (isMmbError(err)) throw err;
    const code = isNativeError(err) || (err as NodeJS.ErrnoException).code ? (err as NodeJS.ErrnoException).code : undefined;
    throw new InvalidArgError(
      `--socket ${socket}: cannot listen there (${code ?? (err as Error).message})${code === 'EACCES' ? ': its directory is not writable by this user' : ''}`,
      { cause: err },
    );
  }
}

function parseMode(text: string): number {
  if (!/^0?[0-7]{3}$/.test(text.trim())) throw new InvalidArgError(`--socket-mode ${JSON.stringify(text)} is not an octal mode such as 660`);
  return Number.parseInt(text, 8);
}
