// Argument helpers shared by the commands: sizes ("4096", "128M", "4G"), addresses (decimal or 0x hex),
// and a parseArgs wrapper that turns usage mistakes into MMB_ERR_INVALID_ARG with the command's help.
import { GPA_LIMIT, InvalidArgError } from '../protocol/index.js';
import fs from 'node:fs';
import { parseArgs, type ParseArgsConfig } from 'node:util';

const UNITS: Record<string, number> = { '': 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40 };

/** "4096", "128M", "4G", "2MiB", "1T" -> bytes. */
export function parseSize(text: string, what = 'size'): number {
  const m = /^(\d+)\s*([KMGT]?)(i?B)?$/i.exec(text.trim());
  if (!m) throw new InvalidArgError(`${what} ${JSON.stringify(text)} is not a size (examples: 4096, 128M, 4G)`);
  const n = Number(m[1]) * (UNITS[(m[2] ?? '').toUpperCase()] as number);
  if (!Number.isSafeInteger(n) || n > GPA_LIMIT) throw new InvalidArgError(`${what} ${text} is too large`);
  return n;
}

/** Decimal or 0x-prefixed hex -> number. */
export function parseAddress(text: string, what = 'address'): number {
  const t = text.trim().replace(/_/g, '');
  const n = /^0x[0-9a-f]+$/i.test(t) ? Number.parseInt(t.slice(2), 16) : /^\d+$/.test(t) ? Number(t) : NaN;
  if (!Number.isSafeInteger(n) || n >= GPA_LIMIT) throw new InvalidArgError(`${what} ${JSON.stringify(text)} is not an address below 2^52 (decimal or 0x hex)`);
  return n;
}

export function parseCount(text: string, what: string): number {
  if (!/^\d+$/.test(text.trim())) throw new InvalidArgError(`${what} ${JSON.stringify(text)} is not a whole number`);
  return Number(text);
}

export function formatSize(bytes: number): string {
  for (const [unit, scale] of [['T', 2 ** 40], ['G', 2 ** 30], ['M', 2 ** 20], ['K', 2 ** 10]] as const) {
    if (bytes >= scale && bytes % scale === 0) return `${bytes / scale}${unit}`;
  }
  return String(bytes);
}

/** Any byte count, rounded for people: 812 B, 213.7 KiB, 12.5 MiB. */
export function formatBytes(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = bytes;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return u === 0 ? `${Math.round(v)} B` : `${v.toFixed(v >= 100 ? 0 : 1)} ${units[u]}`;
}

export const hex = (n: number): string => `0x${n.toString(16)}`;

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
