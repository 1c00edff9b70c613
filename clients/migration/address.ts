// Where a migration stream goes: `tcp://HOST:PORT` for the sender, `HOST:PORT` (or a bare PORT, which
// means loopback) for the receiver. IPv6 literals in brackets: tcp://[::1]:7000, [::1]:7000.
import { InvalidArgError } from '../../protocol/index.js';

export interface TcpAddress {
  host: string;
  port: number;
}

/** The receiver binds here unless told otherwise: loopback only. */
export const DEFAULT_LISTEN_HOST = '127.0.0.1';

function port(text: string, what: string, allowZero: boolean): number {
  const n = Number(text);
  if (!/^\d+$/.test(text) || n > 65535 || (n === 0 && !allowZero)) throw new InvalidArgError(`${what}: ${JSON.stringify(text)} is not a TCP port`);
  return n;
}

function hostPort(text: string, what: string, allowZero: boolean): TcpAddress {
  const m = /^\[([0-9a-fA-F:.]+)\]:(\d+)$/.exec(text) ?? /^([^:[\]]+):(\d+)$/.exec(text);
  if (!m) throw new InvalidArgError(`${what}: ${JSON.stringify(text)} is not HOST:PORT (an IPv6 address in brackets: [::1]:7000)`);
  return { host: m[1] as string, port: port(m[2] as string, what, allowZero) };
}

/** tcp://HOST:PORT */
export function parseTcpUrl(url: string): TcpAddress {
  if (!url.startsWith('tcp://')) throw new InvalidArgError(`${JSON.stringify(url)}: a migration destination URL is tcp://HOST:PORT`);
  return hostPort(url.slice('tcp://'.length).replace(/\/$/, ''), 'tcp URL', false);
}

/** HOST:PORT, or PORT alone (loopback); port 0 picks a free one. */
export function parseListen(text: string): TcpAddress {
  if (/^\d+$/.test(text)) return { host: DEFAULT_LISTEN_HOST, port: port(text, '--listen', true) };
  return hostPort(text, '--listen', true);
}

export function formatAddress(a: TcpAddress): string {
  return a.host.includes(':') ? `[${a.host}]:${a.port}` : `${a.host}:${a.port}`;
}
