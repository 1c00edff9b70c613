// Argument helpers shared by the commands: sizes and addresses in QEMU's syntax (4096, 128m, 1.5G, 2MiB,
// 0x100000000, 4G), one unit style for output (IEC: 4 KiB, 128 MiB, 1.5 GiB), the socket default, and a
// parseArgs wrapper that turns usage mistakes into MMB_ERR_INVALID_ARG (the CLI prints them as one line and
// a hint to --help, and exits 2).
import { GPA_LIMIT, InvalidArgError } from '../protocol/index.js';
import fs from 'node:fs';
import { parseArgs, type ParseArgsConfig } from 'node:util';

const UNITS: Record<string, number> = { '': 1, B: 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40 };

/** Where the broker listens when neither --socket nor MMBROKER_SOCKET says (contrib/systemd's socket unit). */
export const DEFAULT_SOCKET = '/run/memmap-broker/broker.sock';

/**
 * A byte count in QEMU's size syntax, plus IEC units: a whole or fractional number with an optional
 * suffix k, m, g or t (either case, powers of 1024; b for bytes), optionally followed by iB or B:
 * "4096", "128m", "128M", "1.5G", "2MiB", "64KiB", "1t". A fraction must come to a whole byte count.
 */
export function parseSize(text: string, what = 'size'): number {
  const m = /^(\d+(?:\.\d+)?)\s*(?:([kmgtb])(?:i?b)?)?$/i.exec(text.trim().replace(/_/g, ''));
  const example = '(examples: 4096, 128m, 1.5G, 2MiB)';
  if (!m) throw new InvalidArgError(`${what} ${JSON.stringify(text)} is not a size ${example}`);
  const scale = UNITS[(m[2] ?? '').toUpperCase()] as number;
  if (m[1]?.includes('.') && scale === 1) throw new InvalidArgError(`${what} ${JSON.stringify(text)}: a fraction needs a unit ${example}`);
  const n = Number(m[1]) * scale;
  if (!Number.isInteger(n)) throw new InvalidArgError(`${what} ${JSON.stringify(text)} is not a whole number of bytes (${n})`);
  if (!Number.isSafeInteger(n) || n > GPA_LIMIT) throw new InvalidArgError(`${what} ${JSON.stringify(text)} is too large (at most 4096T, 2^52 bytes)`);
  return n;
}

/** A guest-physical address: 0x hex, or decimal with an optional size suffix ("4G" is 0x100000000). */
export function parseAddress(text: string, what = 'address'): number {
  const t = text.trim().replace(/_/g, '');
  let n = NaN;
  if (/^0x[0-9a-f]+$/i.test(t)) n = Number.parseInt(t.slice(2), 16);
  else if (/^\d/.test(t)) {
    try {
      n = parseSize(t, what);
    } catch {
      n = NaN;
    }
  }
  if (!Number.isSafeInteger(n) || n >= GPA_LIMIT) throw new InvalidArgError(`${what} ${JSON.stringify(text)} is not an address below 2^52 (0x100000000, 4294967296 or 4G)`);
  return n;
}

export function parseCount(text: string, what: string): number {
  if (!/^\d+$/.test(text.trim())) throw new InvalidArgError(`${what} ${JSON.stringify(text)} is not a whole number`);
  return Number(text);
}

/** An exact size in the largest IEC unit it is a whole multiple of: "128 MiB", "2 GiB", "12 KiB", "812 B". */
export function formatSize(bytes: number): string {
  for (const [unit, scale] of [['TiB', 2 ** 40], ['GiB', 2 ** 30], ['MiB', 2 ** 20], ['KiB', 2 ** 10]] as const) {
    if (bytes >= scale && bytes % scale === 0) return `${bytes / scale} ${unit}`;
  }
  return bytes >= 2 ** 10 ? formatBytes(bytes) : `${bytes} B`;
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
