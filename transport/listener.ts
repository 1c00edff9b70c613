// The broker's listening socket. By default the socket file is 0600 and, when we create its directory,
// the directory is 0700: only the broker's own user can connect. A stale socket file left by a dead
// broker is replaced; a live one is an error (two brokers must not share a path).
import fs from 'node:fs';
import path from 'node:path';
import { EventEmitter } from 'eventemitter3';
import { constants, isNativeError, native, type PollHandle } from '../native/index.js';
import { InvalidArgError } from '../protocol/index.js';
import { SocketTransport, type SocketTransportOptions } from './socket.js';

export interface ListenOptions extends SocketTransportOptions {
  /** Permission bits of the socket file. Default 0o600. */
  mode?: number;
  /** Permission bits of the directory when we have to create it. Default 0o700. */
  dirMode?: number;
  backlog?: number;
}

export interface ListenerEvents {
  connection: [transport: SocketTransport];
  /** Non-fatal trouble (accept failing with EMFILE, a loose directory mode): for logs. */
  warning: [message: string, err?: unknown];
}

export class SocketListener extends EventEmitter<ListenerEvents> {
  readonly path: string;
  private fd: number;
  private poll: PollHandle | undefined;
  private paused: NodeJS.Timeout | undefined;
  private closed = false;
  private readonly transportOptions: SocketTransportOptions;
  /** Warnings found while preparing the path, emitted once a listener is attached. */
  readonly setupWarnings: string[] = [];

  constructor(socketPath: string, opts: ListenOptions = {}) {
    super();
    this.path = path.resolve(socketPath);
    this.transportOptions = opts;
    this.prepare(opts.dirMode ?? 0o700);
    this.fd = native.socketListen(this.path, opts.backlog ?? 128, opts.mode ?? 0o600);
    this.poll = native.pollStart(this.fd, constants.POLL_READABLE, (status) => this.onReadable(status));
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    if (this.paused) clearTimeout(this.paused);
    if (this.poll) native.pollClose(this.poll);
    this.poll = undefined;
    native.close(this.fd);
    try {
      if (fs.lstatSync(this.path).isSocket()) fs.unlinkSync(this.path);
    } catch {
      // Already removed.
    }
  }

  private prepare(dirMode: number): void {
    const dir = path.dirname(this.path);
    if (!fs.existsSync(dir)) {
      fs.mkdirSync(dir, { recursive: true, mode: dirMode });
      fs.chmodSync(dir, dirMode);
    } else {
      const st = fs.statSync(dir);
      if ((st.mode & 0o022) !== 0 && (st.mode & 0o1000) === 0) {
        this.setupWarnings.push(`socket directory ${dir} is writable by group or others (mode ${(st.mode & 0o7777).toString(8)})`);
      }
    }
    let st: fs.Stats;
    try {
      st = fs.lstatSync(this.path);
    } catch {
      return;
    }
    if (!st.isSocket()) throw new InvalidArgError(`${this.path} exists and is not a socket`);
    let fd: number | undefined;
    try {
      fd = native.socketConnect(this.path);
    } catch (err) {
      if (isNativeError(err, 'ECONNREFUSED')) {
        fs.unlinkSync(this.path);
        return;
      }
      throw err;
    }
    native.close(fd);
    throw new InvalidArgError(`another broker is already listening on ${this.path}`);
  }

  private onReadable(status: number): void {
    if (this.closed || status < 0) return;
    for (;;) {
      let accepted;
      try {
        accepted = native.socketAccept(this.fd);
      } catch (err) {
        // EMFILE / ENFILE / ENOMEM: stop accepting for a moment instead of spinning on a readable socket.
        this.emit('warning', `accept failed: ${(err as Error).message}`, err);
        this.pauseAccepting();
        return;
      }
      if (!accepted) return;
      const { fd, pid, uid, gid, pidfd } = accepted;
      this.emit('connection', new SocketTransport(fd, { pid, uid, gid, ...(pidfd >= 0 ? { pidfd } : {}) }, this.transportOptions));
    }
  }

  private pauseAccepting(): void {
    if (!this.poll) return;
    native.pollUpdate(this.poll, 0);
    this.paused = setTimeout(() => {
      this.paused = undefined;
      if (this.poll && !this.closed) native.pollUpdate(this.poll, constants.POLL_READABLE);
    }, 100);
    this.paused.unref();
  }
}
