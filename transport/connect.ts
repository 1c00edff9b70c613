import { isNativeError, native } from '../native/index.js';
import { ConnectError } from '../protocol/index.js';
import { SocketTransport, type SocketTransportOptions } from './socket.js';

export interface ConnectOptions extends SocketTransportOptions {
  /** How long to keep retrying while the listener's backlog is full (EAGAIN). Default 5000 ms. */
  timeoutMs?: number;
}

/** Connects to a broker socket. Fails with MMB_ERR_CONNECT carrying connect(2)'s errno. */
export async function connectSocket(socketPath: string, opts: ConnectOptions = {}): Promise<SocketTransport> {
  const deadline = Date.now() + (opts.timeoutMs ?? 5000);
  let delay = 1;
  for (;;) {
    try {
      const fd = native.socketConnect(socketPath);
      let peer;
      try {
        peer = native.peerCred(fd);
      } catch (err) {
        native.close(fd);
        throw err;
      }
      return new SocketTransport(fd, peer, opts);
    } catch (err) {
      if (isNativeError(err, 'EAGAIN') && Date.now() < deadline) {
        await new Promise((r) => setTimeout(r, delay));
        delay = Math.min(delay * 2, 50);
        continue;
      }
      const code = isNativeError(err) ? err.code : undefined;
      throw new ConnectError(`cannot connect to ${socketPath}: ${(err as Error).message}`, {
        cause: err,
        ...(code ? { errno: code } : {}),
      });
    }
  }
}
