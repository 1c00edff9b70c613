// The pre-HELLO descriptor flood, run as another uid (65534) by fuzz/flood.ts: it imports nothing but the
// native addon (through ../native/index.js), so a copy of three files is all that uid needs to read.
//
// Commands on stdin, one per line; one JSON line on stdout for each:
//   flood    open PENDING connections that each send, before HELLO, a frame header declaring 64
//            descriptors and a 1 MiB body, then 3 more pieces of 64 descriptors (256 unclaimed: the
//            most a connection could make the broker hold), then up to SINGLES one-descriptor
//            connections; keep them all open; report what the broker did to them
//   release  close them all
// argv: SOCKET PENDING SINGLES
import { constants, native } from '../native/index.js';

const [socket = '', pendingArg = '76', singlesArg = '1000'] = process.argv.slice(2);
const PENDING = Number(pendingArg);
const SINGLES = Number(singlesArg);
const out = (o: object): void => void process.stdout.write(`${JSON.stringify(o)}\n`);

interface Conn {
  fd: number;
  closed: boolean;
  codes: string[];
  seen: string;
}

const efd = native.eventfd(0, constants.EFD_CLOEXEC);
const buf = new Uint8Array(1 << 16);
let held: Conn[] = [];

/** Reads what the broker sent; codes are found by their text (no msgpack decoder here). */
function drain(c: Conn): void {
  for (;;) {
    if (c.closed) break;
    let r;
    try {
      r = native.recvmsg(c.fd, buf, 8);
    } catch (err) {
      c.closed = true;
      c.codes.push((err as { code?: string }).code ?? 'error');
      return;
    }
    if (r === null) return;
    for (const fd of r.fds) native.close(fd);
    if (r.bytes === 0) {
      c.closed = true;
      break;
    }
    c.seen += Buffer.from(buf.subarray(0, r.bytes)).toString('latin1');
  }
  c.codes.push(...(c.seen.match(/MMB_ERR_[A-Z0-9_]+/g) ?? []));
  c.seen = '';
}

function header(bytes: number, fds: number): Buffer {
  const h = Buffer.alloc(8);
  h.writeUInt32LE(bytes, 0);
  h.writeUInt16LE(fds, 4);
  return h;
}

async function flood(): Promise<void> {
  const stats = { attempted: 0, connected: 0, connectFailed: {} as Record<string, number>, fdsSent: 0, codes: {} as Record<string, number>, closedByBroker: 0 };
  const send = (c: Conn, bytes: Buffer, fds: number[]): void => {
    if (c.closed) return;
    try {
      if (native.sendmsg(c.fd, bytes, fds) !== null) stats.fdsSent += fds.length;
    } catch (err) {
      c.closed = true;
      c.codes.push((err as { code?: string }).code ?? 'error');
    }
  };
  const open = (): Conn | undefined => {
    stats.attempted++;
    try {
      const c = { fd: native.socketConnect(socket), closed: false, codes: [], seen: '' };
      stats.connected++;
      held.push(c);
      return c;
    } catch (err) {
      const code = (err as { code?: string }).code ?? 'error';
      stats.connectFailed[code] = (stats.connectFailed[code] ?? 0) + 1;
      return undefined;
    }
  };
  const sixtyFour = Array<number>(64).fill(efd);
  for (let i = 0; i < PENDING; i++) {
    const c = open();
    if (!c) continue;
    send(c, header(1 << 20, 64), sixtyFour);
    for (let k = 0; k < 3; k++) send(c, Buffer.from([0x80 + k]), sixtyFour);
    if (i % 16 === 15) await new Promise((r) => setImmediate(r));
  }
  for (let i = 0; i < SINGLES; i++) {
    const c = open();
    if (c) send(c, header(1 << 20, 1), [efd]);
    if (i % 32 === 31) await new Promise((r) => setImmediate(r));
  }
  // What the broker answered: read until it closed every connection or a second passed (a broker that
  // keeps them is what the caller looks for; the connections stay open meanwhile).
  for (const until = Date.now() + 1000; Date.now() < until;) {
    for (const c of held) if (!c.closed) drain(c);
    if (held.every((c) => c.closed)) break;
    await new Promise((r) => setTimeout(r, 10));
  }
  for (const c of held) {
    if (c.closed) stats.closedByBroker++;
    for (const code of c.codes) stats.codes[code] = (stats.codes[code] ?? 0) + 1;
  }
  out({ round: stats });
}

function release(): void {
  for (const c of held) native.close(c.fd);
  out({ released: held.length });
  held = [];
}

let queue = Promise.resolve();
let pending = '';
process.stdin.setEncoding('utf8');
process.stdin.on('data', (d: string) => {
  pending += d;
  for (let nl = pending.indexOf('\n'); nl >= 0; nl = pending.indexOf('\n')) {
    const cmd = pending.slice(0, nl).trim();
    pending = pending.slice(nl + 1);
    queue = queue.then(() => (cmd === 'flood' ? flood() : cmd === 'release' ? release() : undefined));
  }
});
process.stdin.on('end', () => {
  void queue.then(() => {
    for (const c of held) native.close(c.fd);
    process.exit(0);
  });
});
