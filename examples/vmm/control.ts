// The VMM's control socket, shaped like QEMU's QMP: a Unix stream socket, one JSON object per line.
//   request   {"execute": "dimm-add", "arguments": {"id": "dimm1", "size": 67108864}, "id": 1}
//   success   {"return": {...}, "id": 1}
//   failure   {"error": {"class": "MMB_ERR_RESERVED_RANGE", "desc": "...", "data": {...}}, "id": 1}
// `class` is the stable code to match on (the library's MMB_ERR_*, or the VMM's VMM_ERR_*); `data` is the
// library error's wire form when there is one (it names the refusing client: data.client). Requests on one
// connection are answered in order. No greeting and no capabilities negotiation, unlike QMP.
//
// The socket lives in the VMM's private directory (0700), next to the broker's: whoever can reach it
// controls the VM.
import fs from 'node:fs';
import net from 'node:net';
import readline from 'node:readline';
import { MmbError, type ErrorBody } from '../../index.js';
import { VmmError } from './errors.js';

export type Handler = (args: Record<string, unknown>) => Promise<unknown> | unknown;

export interface ControlServer {
  readonly path: string;
  close(): Promise<void>;
}

interface Failure {
  class: string;
  desc: string;
  data?: ErrorBody;
}

/** Serves `handlers` on `path`; resolves once it listens. */
export async function serveControl(path: string, handlers: Readonly<Record<string, Handler>>): Promise<ControlServer> {
  const sockets = new Set<net.Socket>();
  const server = net.createServer((socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    socket.on('error', () => undefined);
    // One request at a time per connection: replies come in order.
    let chain = Promise.resolve();
    readline.createInterface({ input: socket }).on('line', (line) => {
      chain = chain.then(async () => {
        const reply = await answer(handlers, line);
        if (!socket.destroyed) socket.write(JSON.stringify(reply) + '\n');
      });
    });
  });
  fs.rmSync(path, { force: true });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(path, () => {
      server.off('error', reject);
      resolve();
    });
  });
  return {
    path,
    close: async () => {
      for (const s of sockets) s.destroy();
      await new Promise<void>((r) => server.close(() => r()));
    },
  };
}

async function answer(handlers: Readonly<Record<string, Handler>>, line: string): Promise<Record<string, unknown>> {
  let id: unknown;
  try {
    const req = JSON.parse(line) as { execute?: unknown; arguments?: unknown; id?: unknown };
    id = req.id;
    const cmd = req.execute;
    if (typeof cmd !== 'string' || !Object.hasOwn(handlers, cmd))
      throw new VmmError('VMM_ERR_REQUEST', `unknown command ${JSON.stringify(cmd)}; known: ${Object.keys(handlers).join(', ')}`);
    const args = req.arguments ?? {};
    if (typeof args !== 'object' || args === null || Array.isArray(args)) throw new VmmError('VMM_ERR_REQUEST', '"arguments" must be an object');
    const result = await (handlers[cmd] as Handler)(args as Record<string, unknown>);
    return { return: result ?? {}, ...(id !== undefined ? { id } : {}) };
  } catch (err) {
    return { error: failure(err), ...(id !== undefined ? { id } : {}) };
  }
}

function failure(err: unknown): Failure {
  if (err instanceof MmbError) return { class: err.code, desc: err.message, data: err.toWire() };
  if (err instanceof VmmError) return { class: err.code, desc: err.message };
  if (err instanceof SyntaxError) return { class: 'VMM_ERR_REQUEST', desc: `not JSON: ${err.message}` };
  return { class: 'GenericError', desc: err instanceof Error ? err.message : String(err) };
}

/** A client of a VMM's control socket (the demo, the test, another VMM during a migration). */
export class ControlClient {
  private nextId = 1;
  private readonly waiting = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();

  private constructor(private readonly socket: net.Socket) {
    readline.createInterface({ input: socket }).on('line', (line) => {
      let reply: { id: number; return?: unknown; error?: Failure };
      try {
        reply = JSON.parse(line) as typeof reply;
      } catch {
        socket.destroy(new Error(`the VMM sent a line that is not JSON: ${line.slice(0, 80)}`));
        return;
      }
      const w = this.waiting.get(reply.id);
      if (!w) return;
      this.waiting.delete(reply.id);
      if (reply.error) w.reject(toError(reply.error));
      else w.resolve(reply.return);
    });
    const gone = () => {
      for (const w of this.waiting.values()) w.reject(new VmmError('VMM_ERR_REQUEST', 'the control connection closed'));
      this.waiting.clear();
    };
    socket.on('close', gone);
    socket.on('error', gone);
  }

  static connect(path: string): Promise<ControlClient> {
    return new Promise((resolve, reject) => {
      const socket = net.connect(path, () => {
        socket.off('error', reject);
        resolve(new ControlClient(socket));
      });
      socket.once('error', reject);
    });
  }

  /** Runs one command; rejects with the typed error (MmbError, or VmmError by its class). */
  call<T = Record<string, unknown>>(execute: string, args: Record<string, unknown> = {}): Promise<T> {
    const id = this.nextId++;
    return new Promise<T>((resolve, reject) => {
      this.waiting.set(id, { resolve: resolve as (v: unknown) => void, reject });
      this.socket.write(JSON.stringify({ execute, arguments: args, id }) + '\n');
    });
  }

  close(): void {
    this.socket.end();
  }
}

/** The error a failure stands for: the library's class when it carries one, else a VmmError. */
function toError(f: Failure): Error {
  if (f.data) return MmbError.fromWire(f.data);
  return new VmmError(f.class as VmmError['code'], f.desc);
}
