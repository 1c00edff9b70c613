// Socket activation (systemd's sd_listen_fds(3) protocol): a service manager binds the broker's socket and
// hands it over as descriptor 3 (and up), announced by LISTEN_PID (our pid: the variables are meant for
// this process, not one it may start), LISTEN_FDS (how many) and LISTEN_FDNAMES (their names, colon
// separated). The broker then serves on that socket instead of binding one: the socket exists before the
// broker starts (clients may connect early; the kernel queues them in the backlog) and survives its
// restarts. `systemd-socket-activate` does the same without systemd as PID 1.
//
// listenFds() takes the descriptors (close-on-exec, as every descriptor of ours) and clears the variables
// so that nothing this process starts believes they are meant for it. PassedListener accepts on one.
import fs from 'node:fs';
import { EventEmitter } from 'eventemitter3';
import { constants, native, type PollHandle } from '../native/index.js';
import { InvalidArgError } from '../protocol/index.js';
import type { ListenerEvents } from './listener.js';
import { SocketTransport, type SocketTransportOptions } from './socket.js';

/** SD_LISTEN_FDS_START: the first descriptor a service manager passes. */
export const LISTEN_FDS_START = 3;

export interface PassedSocket {
  fd: number;
  /** Its name in LISTEN_FDNAMES (the socket unit's FileDescriptorName=, default the unit's name). */
  name: string;
}

/**
 * The listening sockets passed to this process, in order (empty when none were, or LISTEN_PID names
 * another process). Takes them over: each is re-made close-on-exec (a descriptor passed across exec
 * is inherited without it) and the variables are removed from `env`. Throws MMB_ERR_INVALID_ARG when the
 * variables are malformed or a descriptor is not a socket.
 */
export function listenFds(env: NodeJS.ProcessEnv = process.env): PassedSocket[] {
  const count = env.LISTEN_FDS;
  const pid = env.LISTEN_PID;
  if (count === undefined) return [];
  const names = (env.LISTEN_FDNAMES ?? '').split(':');
  delete env.LISTEN_FDS;
  delete env.LISTEN_PID;
  delete env.LISTEN_FDNAMES;
  if (pid !== undefined && pid !== String(process.pid)) return [];
  if (!/^\d+$/.test(count) || Number(count) < 1 || Number(count) > 64) {
    throw new InvalidArgError(`LISTEN_FDS=${JSON.stringify(count)} is not a count of passed descriptors (1-64)`);
  }
  const out: PassedSocket[] = [];
  for (let i = 0; i < Number(count); i++) {
    const passed = LISTEN_FDS_START + i;
    let st: fs.Stats;
    try {
      st = fs.fstatSync(passed);
    } catch (err) {
      throw new InvalidArgError(`LISTEN_FDS=${count} but descriptor ${passed} is not open (${(err as Error).message})`);
    }
    if (!st.isSocket()) throw new InvalidArgError(`descriptor ${passed} passed by the service manager is not a socket`);
    const fd = native.dup(passed);
    native.close(passed);
    out.push({ fd, name: names[i] || `fd${passed}` });
  }
  return out;
}

/**
 * Where a passed socket listens, from /proc/net/unix (found by inode): its path, or throws unless it is a
 * listening Unix stream socket bound to a path.
 */
export function passedSocketPath(fd: number): string {
  const ino = String(fs.fstatSync(fd).ino);
  // "Num RefCount Protocol Flags Type St Inode Path": Flags 00010000 is __SO_ACCEPTCON (listening),
  // Type 0001 is SOCK_STREAM.
  const fields = fs
    .readFileSync('/proc/net/unix', 'utf8')
    .split('\n')
    .map((l) => l.trim().split(/\s+/))
    .find((f) => f[6] === ino);
  if (!fields) throw new InvalidArgError(`the passed descriptor ${fd} is not a Unix socket (the broker speaks only over Unix stream sockets: ListenStream=/path in the socket unit)`);
  const [, , , flags, type, , , where] = fields;
  if (type !== '0001' || (Number.parseInt(flags as string, 16) & 0x10000) === 0) {
    throw new InvalidArgError(`the passed descriptor ${fd} is not a listening Unix stream socket`);
  }
  if (!where || where.startsWith('@')) throw new InvalidArgError(`the passed descriptor ${fd} is ${where ? 'an abstract' : 'an unbound'} socket: it has no file permissions, so anyone may connect`);
  return where;
}

/**
 * Accepts connections on a socket this process did not bind (socket activation). Like SocketListener, but
 * it never creates, replaces or removes the socket file: the service manager owns it.
 */
export class PassedListener extends EventEmitter<ListenerEvents> {
  readonly path: string;
  readonly setupWarnings: string[] = [];
  private poll: PollHandle | undefined;
  private paused: NodeJS.Timeout | undefined;
  private closed = false;

  /** Takes ownership of `fd`, a listening Unix stream socket (see listenFds, passedSocketPath). */
  constructor(
    private readonly fd: number,
    private readonly transportOptions: SocketTransportOptions = {},
  ) {
    super();
    try {
      this.path = passedSocketPath(fd);
    } catch (err) {
      native.close(fd);
      throw err;
    }
    this.poll = native.pollStart(fd, constants.POLL_READABLE, (status) => this.onReadable(status));
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    if (this.paused) clearTimeout(this.paused);
    if (this.poll) native.pollClose(this.poll);
    this.poll = undefined;
    native.close(this.fd);
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
