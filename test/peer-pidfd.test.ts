// The peer's pidfd through the transport: a SocketListener takes it at accept (SO_PEERPIDFD), the
// SocketTransport owns it and closes it when it closes; in-process peers have none.
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { native, pidOfPidfd } from '../native/index.js';
import { InProcessTransport, SocketListener, connectSocket, type SocketTransport } from '../transport/index.js';
import { defer, runCleanups } from './helpers/embedded.js';
import { tempDir } from './helpers/procs.js';

afterEach(runCleanups);

const hasPeerPidfd = (() => {
  const [a, b] = native.socketPair();
  const fd = native.peerPidfd(a);
  for (const x of [a, b, ...(fd >= 0 ? [fd] : [])]) native.close(x);
  return fd >= 0;
})();

/** What the descriptor number points at now, or undefined when it is closed. */
const target = (fd: number): string | undefined => {
  try {
    return fs.readlinkSync(`/proc/self/fd/${fd}`);
  } catch {
    return undefined;
  }
};

describe('the peer pidfd of a transport', () => {
  it.runIf(hasPeerPidfd)("an accepted socket carries the connecting process's pidfd until the transport closes", async () => {
    const dir = tempDir('mmb-pidfd-');
    defer(() => fs.rmSync(dir, { recursive: true, force: true }));
    const listener = new SocketListener(path.join(dir, 'b.sock'));
    defer(() => listener.close());
    const accepted = new Promise<SocketTransport>((resolve) => listener.once('connection', resolve));
    const client = await connectSocket(listener.path);
    defer(() => client.destroy());
    const server = await accepted;
    const pidfd = server.peer.pidfd;
    expect(pidfd).toBeTypeOf('number');
    expect(target(pidfd!)).toBe('anon_inode:[pidfd]');
    expect(pidOfPidfd(pidfd!)).toBe(process.pid);
    expect(client.peer.pidfd).toBeUndefined(); // the client end takes none unless it asks (native.peerPidfd)
    // Still open while the 'close' listeners run (one may dup it), closed right after.
    let duringClose: string | undefined;
    server.once('close', () => (duringClose = target(pidfd!)));
    server.destroy();
    expect(duringClose).toBe('anon_inode:[pidfd]');
    expect(target(pidfd!)).not.toBe('anon_inode:[pidfd]');
  });

  it('in-process peers have no pidfd', () => {
    const [a, b] = InProcessTransport.pair();
    expect(a.peer.pidfd).toBeUndefined();
    a.destroy();
    b.destroy();
  });
});
