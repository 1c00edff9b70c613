// The broker's logs (`mmbroker serve`): pino, as JSON lines for journald and log collectors, or as
// readable lines when stdout is a terminal. The readable form is a small formatter of ours rather than
// pino-pretty: it is ten lines, keeps the package's dependencies few, and runs in-process (pino's
// transports would start a worker thread in a daemon that must stay small). --log-file appends JSON lines
// to a file; SIGHUP reopens it (after logrotate moved it away).
import pino, { type Logger } from 'pino';
import { InvalidArgError } from '../protocol/index.js';

export const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];
export type LogFormat = 'auto' | 'pretty' | 'json';

export function parseLogLevel(text: string, what: string): LogLevel {
  if (!(LOG_LEVELS as readonly string[]).includes(text))
    throw new InvalidArgError(`${what} ${JSON.stringify(text)} is not a log level: ${LOG_LEVELS.join(', ')}`);
  return text as LogLevel;
}

export function parseLogFormat(text: string): LogFormat {
  if (text !== 'auto' && text !== 'pretty' && text !== 'json') throw new InvalidArgError(`--log-format ${JSON.stringify(text)} is not auto, pretty or json`);
  return text;
}

const LEVEL_NAMES: Readonly<Record<number, string>> = { 10: 'TRACE', 20: 'DEBUG', 30: 'INFO', 40: 'WARN', 50: 'ERROR', 60: 'FATAL' };
const COLOR: Readonly<Record<number, string>> = { 10: '90', 20: '90', 30: '32', 40: '33', 50: '31', 60: '35' };
const SKIP = new Set(['level', 'time', 'msg', 'pid', 'hostname']);

/** One pino JSON line as "12:00:01.234 INFO  listening socket=/run/x.sock spaces=["vm0"]". */
export function prettyLine(json: string, color: boolean): string {
  let o: Record<string, unknown>;
  try {
    o = JSON.parse(json) as Record<string, unknown>;
  } catch {
    return json;
  }
  const level = Number(o.level);
  const t = new Date(Number(o.time));
  const p = (n: number, w = 2) => String(n).padStart(w, '0');
  const time = `${p(t.getHours())}:${p(t.getMinutes())}:${p(t.getSeconds())}.${p(t.getMilliseconds(), 3)}`;
  const name = (LEVEL_NAMES[level] ?? String(level)).padEnd(5);
  const fields = Object.entries(o)
    .filter(([k]) => !SKIP.has(k))
    .map(([k, v]) => `${k}=${typeof v === 'string' && !/\s/.test(v) ? v : JSON.stringify(v)}`)
    .join(' ');
  const head = color ? `\x1b[${COLOR[level] ?? '0'}m${name}\x1b[0m` : name;
  return `${time} ${head} ${String(o.msg ?? '')}${fields ? ` ${fields}` : ''}\n`;
}

export interface ServeLog {
  logger: Logger;
  /** Where the logs go, for the first line. */
  target: string;
  /** Reopens the log file (SIGHUP); false when logging to stdout, where there is nothing to reopen. */
  reopen(): boolean;
}

export function createLog(opts: { level: LogLevel; format: LogFormat; file?: string }): ServeLog {
  const base = { base: { pid: process.pid }, level: opts.level };
  if (opts.file !== undefined) {
    const file = opts.file;
    let dest: ReturnType<typeof pino.destination>;
    try {
      dest = pino.destination({ dest: file, sync: true, append: true, mkdir: false });
    } catch (err) {
      throw new InvalidArgError(
        `--log-file ${file}: cannot open it for appending (${(err as NodeJS.ErrnoException).code ?? (err as Error).message}); its directory must exist and be writable`,
      );
    }
    return { logger: pino(base, dest), target: file, reopen: () => (dest.reopen(), true) };
  }
  const pretty = opts.format === 'pretty' || (opts.format === 'auto' && process.stdout.isTTY === true);
  // Through process.stdout (synchronous for files and pipes on Linux), so the process's stdout stays one
  // stream: tests that watch its lines (testkit/moments.ts) see these too.
  if (!pretty) return { logger: pino(base, { write: (line: string) => void process.stdout.write(line) }), target: 'stdout (JSON lines)', reopen: () => false };
  const color = process.stdout.isTTY === true;
  const stream = { write: (line: string) => void process.stdout.write(prettyLine(line, color)) };
  return { logger: pino(base, stream), target: 'stdout (readable lines)', reopen: () => false };
}
