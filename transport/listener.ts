// The broker's listening socket. By default the socket file is 0600 and, when we create its directory,
// the directory is 0700: only the broker's own user can connect. The directory and every ancestor must
// be controlled by nobody but root and the broker (trusted-dir.ts), else MMB_ERR_UNSAFE_PATH; the socket
// is bound, checked and removed relative to that directory's descriptor, never by path. A stale socket
// file left by a dead broker is replaced; a live one is an error (two brokers must not share a path).
import fs from 'node:fs';
import path from 'node:path';
import { EventEmitter } from 'eventemitter3';
import { constants, isNativeError, native, type PollHandle } from '../native/index.js';
import { InvalidArgError } from '../protocol/index.js';
import { SocketTransport, type SocketTransportOptions } from './socket.js';
import { openTrustedDir, under } from './trusted-dir.js';

export interface ListenOptions extends SocketTransportOptions {
  /** Permission bits of the socket file. Default 0o600. */
  mode?: number;
  /** Permission bits of the directory when we have to create it. Default 0o700. */
  dirMode?: number;
  backlog?: number;
}

export interface ListenerEvents {
  connection: [transport: SocketTransport];
  /** Non-fatal trouble (accept failing with EMFILE): for logs. */
  warning: [message: string, err?: unknown];
}

export class SocketListener extends EventEmitter<ListenerEvents> {
  readonly path: string;
  private fd: number;
  private poll: PollHandle | undefined;
  private paused: NodeJS.Timeout | undefined;
  private closed = false;
  private readonly transportOptions: SocketTransportOptions;
  /** Warnings found while preparing the path, emitted once a listener is attached (none today: what
   *  used to be warned about, a loose directory, is now refused). */
  readonly setupWarnings: string[] = [];
  /** The checked directory (an O_PATH descriptor) the socket lives in, and the socket's name there. */
  private readonly dirFd: number;
  private readonly name: string;
  /** The socket file we bound (dev, ino), so close() removes that one and nothing that replaced it. */
  private readonly bound: { dev: number; ino: number };

  constructor(socketPath: string, opts: ListenOptions = {}) {
    super();
    this.path = path.resolve(socketPath);
    this.name = path.basename(this.path);
    this.transportOptions = opts;
    this.dirFd = openTrustedDir(path.dirname(this.path), { createMode: opts.dirMode ?? 0o700 });
    try {
      this.removeStale();
      this.fd = native.socketListenAt(this.dirFd, this.name, opts.backlog ?? 128, opts.mode ?? 0o600);
      const st = fs.lstatSync(under(this.dirFd, this.name));
      this.bound = { dev: st.dev, ino: st.ino };
    } catch (err) {
      fs.closeSync(this.dirFd);
      throw err;
    }
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
      const st = fs.lstatSync(under(this.dirFd, this.name));
      if (st.isSocket() && st.dev === this.bound.dev && st.ino === this.bound.ino) fs.unlinkSync(under(this.dirFd, this.name));
    } catch {
      // Already removed.
    }
    fs.closeSync(this.dirFd);
  }

  /** A socket file left by a broker that died is removed; a live one, or anything else, is an error. */
  private removeStale(): void {
    const at = under(this.dirFd, this.name);
    let st: fs.Stats;
    try {
      st = fs.lstatSync(at);
    } catch {
      return;
    }
    if (!st.isSocket()) throw new InvalidArgError(`${this.path} exists and is not a socket`);
    let fd: number | undefined;
    try {
      fd = native.socketConnect(at);
    } catch (err) {
      if (isNativeError(err, 'ECONNREFUSED')) {
        fs.unlinkSync(at);
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
