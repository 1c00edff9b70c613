// Argument helpers shared by the commands: sizes and addresses in QEMU's syntax (4096, 128m, 1.5G, 2MiB,
// 0x100000000, 4G), one unit style for output (IEC: 4 KiB, 128 MiB, 1.5 GiB), the socket default, and a
// parseArgs wrapper that turns usage mistakes into MMB_ERR_INVALID_ARG (the CLI prints them as one line and
// a hint to --help, and exits 2).
import { InvalidArgError } from '../protocol/index.js';
export { formatBytes, formatSize, hex, parseAddress, parseSize } from '../protocol/index.js';
import fs from 'node:fs';
import { parseArgs, type ParseArgsConfig } from 'node:util';

/** Where the broker listens when neither --socket nor MMBROKER_SOCKET says (contrib/systemd's socket unit). */
export const DEFAULT_SOCKET = '/run/memmap-broker/broker.sock';

export function parseCount(text: string, what: string): number {
  if (!/^\d+$/.test(text.trim())) throw new InvalidArgError(`${what} ${JSON.stringify(text)} is not a whole number`);
  return Number(text);
}

export interface Command {
  name: string;
  summary: string;
  usage: string;
  run(argv: string[]): Promise<number>;
}

/** The --help option every command takes. */
export const HELP = { help: { type: 'boolean', short: 'h' } } as const;

/** Runs a parseArgs call, turning its usage errors into MMB_ERR_INVALID_ARG. */
export function parsed<T>(fn: () => T): T {
  try {
    return fn();
  } catch (err) {
    throw new InvalidArgError((err as Error).message);
  }
}

/** The options a command declares (parseArgs' own type). */
export type OptionSpec = NonNullable<ParseArgsConfig['options']>;

/**
 * Parses a command's arguments (strict: no positionals, no unknown options, usage errors as
 * MMB_ERR_INVALID_ARG) with --help added; prints `usage` and gives undefined when --help was asked for.
 */
export function parseCommand<const O extends OptionSpec>(argv: string[], options: O, usage: string): CommandValues<O> | undefined {
  const { values } = parsed(() => parseArgs({ args: argv, strict: true, options: { ...HELP, ...options } }));
  if ((values as { help?: boolean }).help) {
    console.log(usage);
    return undefined;
  }
  // --socket defaults to $MMBROKER_SOCKET, then to where the shipped systemd units put it.
  if ('socket' in options && (values as { socket?: string }).socket === undefined) {
    (values as { socket?: string }).socket = process.env.MMBROKER_SOCKET || DEFAULT_SOCKET;
  }
  return values as CommandValues<O>;
}

/** What parseArgs gives for a command's options (plus --help). */
export type CommandValues<O extends OptionSpec> = ReturnType<typeof parseArgs<{ args: string[]; strict: true; options: typeof HELP & O }>>['values'];

export function required(values: Record<string, unknown>, name: string): string {
  const v = values[name];
  if (typeof v !== 'string' || v === '') throw new InvalidArgError(`--${name} is required`);
  return v;
}

/** The first line of a token file (a space's secret: read from a file so it never shows in /proc/PID/cmdline). */
export function readToken(file: string): string {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (err) {
    throw new InvalidArgError(`--token-file ${file}: ${(err as Error).message}`);
  }
  const token = text.split('\n')[0]?.trim() ?? '';
  if (token.length < 16) throw new InvalidArgError(`--token-file ${file}: the token must be at least 16 characters`);
  return token;
}
