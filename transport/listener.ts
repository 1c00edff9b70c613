// The broker's listening socket. By default the socket file is 0600 and, when we create its directory,
// the directory is 0700: only the broker's own user can connect. The directory and every ancestor must
// be controlled by nobody but root and the broker (trusted-dir.ts), else MMB_ERR_UNSAFE_PATH; the socket
// is bound, checked and removed relative to that directory's descriptor, never by path. A stale socket
// file left by a dead broker is replaced; a live one is an error (MMB_ERR_ADDRESS_IN_USE: two brokers must
// not share a path). Accepting is acceptor.ts's.
import fs from 'node:fs';
import path from 'node:path';
import { isNativeError, native } from '../native/index.js';
import { AddressInUseError, InvalidArgError } from '../protocol/index.js';
import { Acceptor } from './acceptor.js';
import type { SocketTransportOptions } from './socket.js';
import { openTrustedDir, under } from './trusted-dir.js';

export interface ListenOptions extends SocketTransportOptions {
  /** Permission bits of the socket file. Default 0o600. */
  mode?: number;
  /** Permission bits of the directory when we have to create it. Default 0o700. */
  dirMode?: number;
  backlog?: number;
}

export class SocketListener extends Acceptor {
  readonly path: string;
  /** The checked directory (an O_PATH descriptor) the socket lives in, and the socket's name there. */
  private readonly dirFd: number;
  private readonly name: string;
  /** The socket file we bound (dev, ino), so close() removes that one and nothing that replaced it. */
  private readonly bound: { dev: number; ino: number };

  constructor(socketPath: string, opts: ListenOptions = {}) {
    super(opts);
    this.path = path.resolve(socketPath);
    this.name = path.basename(this.path);
    this.dirFd = openTrustedDir(path.dirname(this.path), { createMode: opts.dirMode ?? 0o700 });
    let fd: number;
    try {
      this.removeStale();
      fd = native.socketListenAt(this.dirFd, this.name, opts.backlog ?? 128, opts.mode ?? 0o600);
      const st = fs.lstatSync(under(this.dirFd, this.name));
      this.bound = { dev: st.dev, ino: st.ino };
    } catch (err) {
      fs.closeSync(this.dirFd);
      throw err;
    }
    this.accept(fd);
  }

  private removed = false;

  override close(): void {
    super.close();
    if (this.removed) return;
    this.removed = true;
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
    throw new AddressInUseError(`another broker is already listening on ${this.path}`);
  }
}
