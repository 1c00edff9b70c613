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
import { native } from '../native/index.js';
import { InvalidArgError } from '../protocol/index.js';
import { Acceptor } from './acceptor.js';
import type { SocketTransportOptions } from './socket.js';
import { checkPassedSocket } from './trusted-dir.js';

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
 * Accepts connections on a socket this process did not bind (socket activation). Like SocketListener, but
 * it never creates, replaces or removes the socket file: the service manager owns it. The socket must be
 * a listening Unix stream socket bound to a path in a directory nobody but root and the broker controls
 * (trusted-dir.ts checkPassedSocket), else MMB_ERR_UNSAFE_PATH.
 */
export class PassedListener extends Acceptor {
  readonly path: string;

  /** Takes ownership of `fd`, a listening Unix stream socket (see listenFds). */
  constructor(fd: number, transportOptions: SocketTransportOptions = {}) {
    super(transportOptions);
    try {
      this.path = checkPassedSocket(fd);
    } catch (err) {
      native.close(fd);
      throw err;
    }
    this.accept(fd);
  }
}
