// A fault for tests, loaded only with `node --import` by the broker launcher (testkit/broker.ts) when a
// test asks for it, never by the product: the broker's socket file exists but refuses connections for
// MMB_TESTKIT_LISTEN_DELAY_MS milliseconds before the broker listens. That is what a client sees between
// the broker's bind() and listen() (ECONNREFUSED), stretched from microseconds to something a launcher
// that waits on the file instead of on the broker's "listening" line cannot miss.
import fs from 'node:fs';
import { native } from '../../native/index.js';

const delayMs = Number(process.env.MMB_TESTKIT_LISTEN_DELAY_MS ?? 0);
const listen = native.socketListen.bind(native);

native.socketListen = (path: string, backlog: number, mode: number): number => {
  // A socket file nobody listens on: bound, then closed (connect() answers ECONNREFUSED)...
  native.close(listen(path, backlog, mode));
  // ...for as long as asked, blocking the event loop the way the real bind-to-listen step does...
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, delayMs);
  // ...then the real thing, in its place.
  fs.unlinkSync(path);
  return listen(path, backlog, mode);
};
