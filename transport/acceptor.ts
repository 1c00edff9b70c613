// Accepting connections on a listening Unix socket: the one accept loop behind SocketListener (a socket
// the broker binds) and PassedListener (one a service manager bound and passed). Each accepted peer comes
// with its credentials (SO_PEERCRED) and its pidfd (SO_PEERPIDFD), which the SocketTransport owns.
import { EventEmitter } from 'eventemitter3';
import { constants, native, type PollHandle } from '../native/index.js';
import { SocketTransport, type SocketTransportOptions } from './socket.js';

export interface ListenerEvents {
  connection: [transport: SocketTransport];
  /** Non-fatal trouble (accept failing with EMFILE): for logs. */
  warning: [message: string, err?: unknown];
}

export abstract class Acceptor extends EventEmitter<ListenerEvents> {
  abstract readonly path: string;
  /** Warnings found while preparing the socket, emitted once a listener is attached. */
  readonly setupWarnings: string[] = [];
  private poll: PollHandle | undefined;
  private paused: NodeJS.Timeout | undefined;
  private closed = false;
  private fd = -1;

  protected constructor(private readonly transportOptions: SocketTransportOptions) {
    super();
  }

  /** Starts accepting on `fd`, a listening socket this object owns from now on. */
  protected accept(fd: number): void {
    this.fd = fd;
    this.poll = native.pollStart(fd, constants.POLL_READABLE, (status) => this.onReadable(status));
  }

  /** Stops accepting and closes the listening socket; subclasses then clean up what they own. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    if (this.paused) clearTimeout(this.paused);
    if (this.poll) native.pollClose(this.poll);
    this.poll = undefined;
    if (this.fd >= 0) native.close(this.fd);
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
