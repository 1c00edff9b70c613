// `mmbroker serve --metrics HOST:PORT`: the broker's metrics (broker/metrics.ts) over HTTP, GET /metrics.
// Loopback only unless --metrics-public: the metrics name clients, pids and sizes, and the endpoint has
// no authentication (put a proxy with TLS and auth in front of a public one).
import http from 'node:http';
import net from 'node:net';
import type { BrokerMetrics } from '../broker/metrics.js';
import { AddressInUseError, InvalidArgError } from '../protocol/index.js';

export interface MetricsAddress {
  host: string;
  port: number;
}

const isLoopback = (host: string) => host === 'localhost' || host === '::1' || (net.isIPv4(host) && host.startsWith('127.'));

/** "127.0.0.1:9464", "[::1]:9464", "localhost:9464", or a bare port (on 127.0.0.1). */
export function parseMetricsAddress(text: string, allowPublic: boolean): MetricsAddress {
  const m = /^(?:\[([0-9a-f:.]+)\]|([^:[\]]+)):(\d{1,5})$/i.exec(text.trim()) ?? /^()()(\d{1,5})$/.exec(text.trim());
  const port = Number(m?.[3]);
  if (!m || !Number.isInteger(port) || port > 65535) {
    throw new InvalidArgError(`--metrics ${JSON.stringify(text)} is not HOST:PORT (examples: 127.0.0.1:9464, [::1]:9464, 9464; port 0 picks a free one)`);
  }
  const host = m[1] || m[2] || '127.0.0.1';
  if (!isLoopback(host) && !allowPublic) {
    throw new InvalidArgError(
      `--metrics ${text}: ${host} is not a loopback address; the metrics have no authentication, so serving them beyond this machine needs --metrics-public`,
    );
  }
  return { host, port };
}

/** Starts serving; resolves once listening, with the address actually bound (port 0: any free one). */
export function serveMetrics(metrics: BrokerMetrics, at: MetricsAddress): Promise<{ server: http.Server; address: MetricsAddress }> {
  const server = http.createServer((req, res) => {
    const url = (req.url ?? '/').split('?')[0];
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      res.writeHead(405, { allow: 'GET, HEAD' }).end();
      return;
    }
    if (url !== '/metrics') {
      res.writeHead(404, { 'content-type': 'text/plain' }).end('memmap-broker: the metrics are at /metrics\n');
      return;
    }
    metrics.text().then(
      (body) => res.writeHead(200, { 'content-type': metrics.contentType }).end(req.method === 'HEAD' ? undefined : body),
      (err: unknown) => res.writeHead(500, { 'content-type': 'text/plain' }).end(`${(err as Error).message}\n`),
    );
  });
  return new Promise((resolve, reject) => {
    server.once('error', (err: NodeJS.ErrnoException) => {
      const where = `${at.host.includes(':') ? `[${at.host}]` : at.host}:${at.port}`;
      if (err.code === 'EADDRINUSE') reject(new AddressInUseError(`--metrics ${where}: something already listens there`, { cause: err }));
      else reject(new InvalidArgError(`--metrics ${where}: cannot listen there (${err.code ?? err.message})`, { cause: err }));
    });
    server.listen(at.port, at.host, () => {
      const a = server.address() as net.AddressInfo;
      resolve({ server, address: { host: a.address, port: a.port } });
    });
  });
}
