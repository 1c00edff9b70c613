// The one broker launcher: `mmbroker serve` in its own process, ready when the broker itself says it is
// listening. Its socket file is no such signal: bind() creates it before listen() lets anyone in, and a
// client that connects in between is refused (ECONNREFUSED).
import type { ChildProcess } from 'node:child_process';
import { JsonProc, spawnNode, type JsonProcOptions, type Line } from './jsonproc.js';
import { CLI, testkitFile } from './paths.js';

/** Levels at which `mmbroker serve` still prints its "listening" line. */
const READY_LEVELS = ['info', 'debug', 'trace'] as const;

const LISTEN_DELAY_ENV = 'MMB_TESTKIT_LISTEN_DELAY_MS';
const SLOW_LISTEN = testkitFile('preload/slow-listen.js');

/**
 * Environment variables under which every broker process (whoever starts it) holds its socket bound but
 * not listening for `ms` before it listens: merge into process.env or a child's env.
 */
export function slowListenEnv(ms: number, base: NodeJS.ProcessEnv = process.env): Record<string, string> {
  return { NODE_OPTIONS: `${base.NODE_OPTIONS ?? ''} --import=${SLOW_LISTEN}`.trim(), [LISTEN_DELAY_ENV]: String(ms) };
}

export interface BrokerOptions {
  socket: string;
  /** Spaces to serve (`--space` each); default: serve's own default. */
  spaces?: readonly string[];
  /** More `mmbroker serve` options (`--ack-timeout 500`, `--token-file F`, ...). */
  args?: readonly string[];
  /** info (default), debug or trace: the launcher needs the info-level "listening" line. */
  logLevel?: (typeof READY_LEVELS)[number];
  /** Log lines kept (default 2000; the newest). */
  keepLines?: number;
  env?: NodeJS.ProcessEnv;
  /** Run under `taskset -c CPUS`. */
  cpus?: string;
  /** A command that runs it (`prlimit --nofile=1024:1024 --`). */
  prefix?: readonly string[];
  /** Hold the socket bound but not listening this long before listening (a fault, for tests). */
  listenDelayMs?: number;
  timeoutMs?: number;
  /** Called with every log line as it arrives. */
  onLine?: (line: Line) => void;
}

/** pino's numeric levels: warn 40, error 50, fatal 60. */
export const levelOf = (l: Line): number => (typeof l.level === 'number' ? l.level : 0);

export class BrokerProc extends JsonProc {
  private constructor(
    child: ChildProcess,
    readonly socket: string,
    opts: JsonProcOptions,
  ) {
    super(child, { ...opts, name: `broker (pid ${child.pid})` });
  }

  /** Starts the broker and resolves once it logged "listening" on `socket`; rejects if it exits first. */
  static async start(opts: BrokerOptions): Promise<BrokerProc> {
    const env = opts.env ?? process.env;
    const level = opts.logLevel ?? 'info';
    if (!READY_LEVELS.includes(level)) throw new Error(`log level ${level}: the launcher waits for the info-level "listening" line`);
    const args = ['serve', '--socket', opts.socket, ...(opts.spaces ?? []).flatMap((s) => ['--space', s]), '--log-level', level, ...(opts.args ?? [])];
    const child = spawnNode(CLI, args, {
      stdin: 'ignore',
      env: opts.listenDelayMs ? { ...env, ...slowListenEnv(opts.listenDelayMs, env) } : env,
      ...(opts.cpus !== undefined ? { cpus: opts.cpus } : {}),
      ...(opts.prefix !== undefined ? { prefix: opts.prefix } : {}),
    });
    const b = new BrokerProc(child, opts.socket, { limit: opts.keepLines ?? 2000, ...(opts.onLine ? { onLine: opts.onLine } : {}) });
    try {
      await b.next(undefined, (l) => l.msg === 'listening', opts.timeoutMs ?? 30_000);
    } catch (err) {
      b.signal('SIGKILL');
      throw new Error(`the broker did not start listening on ${opts.socket}: ${(err as Error).message}\n${b.text()}`);
    }
    return b;
  }

  /** Its log so far (the lines kept), one JSON object per line. */
  text(): string {
    return this.lines.map((l) => JSON.stringify(l)).join('\n');
  }

  /** Kept log lines at `level` (pino number) or above: 40 warnings, 50 errors. */
  logged(level: number): Line[] {
    return this.lines.filter((l) => levelOf(l) >= level);
  }

  /** Waits until a log line from now on matches. */
  logs(match: (l: Line) => boolean, timeoutMs = 10_000): Promise<Line> {
    return this.next(undefined, match, timeoutMs);
  }
}
