// Invariant 6: hostile input is survivable. Raw bytes over the real socket to a broker in its own
// process: each attack gets a typed error or a disconnect, the broker keeps serving a legitimate owner
// and subscriber, and its /proc/PID/fd count returns to the baseline (no leaked fd).
import { spawn } from 'node:child_process';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { OwnerClient, createSealedMemfd, fetchStatus } from '../clients/index.js';
import { native } from '../native/index.js';
import { FrameDecoder, Msg, encodeBody, encodeFrame, type Frame } from '../protocol/index.js';
import { JsonProc, ROOT, fdCount, spawnBroker, spawnSubscriber, stopProcess, tempDir, waitFor, type BrokerProc } from './helpers/procs.js';

let socket: string;
let broker: BrokerProc;
let baseline: number;

/** A client that writes whatever bytes it is given and reads frames back, without any of our checks. */
class Raw {
  constructor(readonly fd: number = native.socketConnect(socket)) {}

  /** Connects like a flood would: retrying while the listener's backlog is full. */
  static async connect(): Promise<Raw> {
    const fd = await waitFor('a connection', () => {
      try {
        return native.socketConnect(socket);
      } catch (err) {
        if ((err as { code?: string }).code === 'EAGAIN') return undefined;
        throw err;
      }
    });
    return new Raw(fd);
  }

  private readonly decoder = new FrameDecoder({ maxFrameBytes: 1 << 20, maxFdsPerFrame: 64, maxPendingFds: 256 });
  eof = false;

  send(bytes: Uint8Array, fds: number[] = []): void {
    native.sendmsg(this.fd, bytes, fds);
  }

  frame(message: Record<string, unknown>, fds: number[] = [], declared = fds.length): void {
    this.send(encodeFrame(message, declared, 1 << 21), fds);
  }

  /** Reads until a frame arrives (or EOF); returns it, or undefined at EOF. */
  async next(timeoutMs = 5000): Promise<Frame | undefined> {
    const buf = Buffer.alloc(65536);
    const take = (f: Frame | null) => {
      if (f) for (const fd of f.fds) native.close(fd);
      return f ?? undefined;
    };
    return waitFor(
      'a frame from the broker',
      () => {
        const f = take(this.decoder.next());
        if (f) return f;
        if (this.eof) return { eof: true } as never;
        const r = native.recvmsg(this.fd, buf, 64);
        if (r === null) return undefined;
        if (r.bytes === 0) this.eof = true;
        else this.decoder.push(buf.subarray(0, r.bytes), r.fds);
        return take(this.decoder.next());
      },
      timeoutMs,
    ).then((f) => ((f as { eof?: boolean }).eof ? undefined : f));
  }

  async hello(): Promise<void> {
    this.frame({ t: Msg.HELLO, id: 1, version: 1, features: 1 });
    const r = await this.next();
    expect(r?.body.result).toBeDefined();
  }

  /** Reads frames until EOF; returns the EV_GOODBYE's error code if one came. */
  async untilClosed(): Promise<string | undefined> {
    let code: string | undefined;
    for (;;) {
      const f = await this.next();
      if (!f) return code;
      if (f.type === Msg.EV_GOODBYE) code = (f.body.error as { code: string }).code;
    }
  }

  close(): void {
    native.close(this.fd);
  }
}

/** After an attack: a legitimate owner and a subscriber process still complete a hotplug, and no fd leaked. */
async function stillServes(tag: string, checkFds = true): Promise<void> {
  const owner = await OwnerClient.attach(socket, { space: 'vm0', name: 'legit-owner' });
  const sub = await spawnSubscriber(socket, 'vm0', ['--no-reconnect']);
  try {
    const b = await owner.createBacking(1 << 20, `ok-${tag}`);
    native.close(b.fd);
    const r = await owner.addRegion({ name: `ok-${tag}`, gpa: 0, size: 1 << 20, backing: b.backing });
    await sub.next('committed', (e) => e.generation === r.generation);
    await owner.removeRegion(`ok-${tag}`);
  } finally {
    await sub.stop();
    owner.close();
  }
  if (checkFds) await waitFor(`the broker's fd count to return to ${baseline} after "${tag}"`, () => fdCount(broker.pid!) === baseline);
}

beforeAll(async () => {
  socket = path.join(tempDir(), 'broker.sock');
  broker = await spawnBroker(socket, ['--space', 'vm0', '--ack-timeout', '1000']);
  baseline = fdCount(broker.pid!);
});

afterAll(async () => {
  if (broker) expect(await stopProcess(broker)).toBe(0);
});

const header = (len: number, nfds = 0, flags = 0) => {
  const h = Buffer.alloc(8);
  h.writeUInt32LE(len, 0);
  h.writeUInt16LE(nfds, 4);
  h.writeUInt16LE(flags, 6);
  return h;
};

describe('Invariant 6: hostile input is survivable', () => {
  it('random bytes: a typed goodbye, then the connection closes', async () => {
    const raw = new Raw();
    raw.send(Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n'));
    expect(await raw.untilClosed()).toMatch(/^MMB_ERR_(BAD_FRAME|FRAME_TOO_LARGE|TOO_MANY_FDS)$/);
    raw.close();
    await stillServes('random');
  });

  it('an oversized frame header', async () => {
    const raw = new Raw();
    raw.send(header(0xffff_fff0));
    expect(await raw.untilClosed()).toBe('MMB_ERR_FRAME_TOO_LARGE');
    raw.close();
    await stillServes('oversized');
  });

  it('a truncated frame and then EOF', async () => {
    const raw = new Raw();
    raw.send(Buffer.concat([header(100), Buffer.from([0x81])]));
    native.shutdown(raw.fd, 1);
    raw.close();
    await stillServes('truncated');
  });

  it('a peer that half-closes (shutdown SHUT_WR) still gets the answer to every request it sent, then EOF', async () => {
    const raw = new Raw();
    raw.frame({ t: Msg.HELLO, id: 1, version: 1, features: 0x7f });
    raw.frame({ t: Msg.ATTACH, id: 2, space: 'vm0', role: 'owner', kind: 'raw' });
    const [pipeR, pipeW] = native.socketPair();
    raw.frame({ t: Msg.BACKING_ADD, id: 3, name: 'not-memory' }, [pipeR]);
    native.close(pipeR);
    native.close(pipeW);
    native.shutdown(raw.fd, 1);
    const answers: Frame[] = [];
    for (let f = await raw.next(); f; f = await raw.next()) answers.push(f);
    expect(answers.map((f) => f.body.id)).toEqual([1, 2, 3]);
    expect(answers[1]?.body.result).toBeDefined();
    expect((answers[2]?.body.error as { code: string }).code).toBe('MMB_ERR_BACKING_INVALID');
    raw.close();
    await stillServes('half-close');
  });

  it('valid msgpack of the wrong shape, unknown ids, huge and negative numbers: typed replies, the connection stays', async () => {
    const raw = new Raw();
    const expectError = async (code: string) => {
      const f = await raw.next();
      const err = (f?.body.error ?? {}) as { code?: string };
      expect(err.code).toBe(code);
    };
    raw.frame({ t: Msg.STATUS, id: 1 });
    await expectError('MMB_ERR_STATE'); // before HELLO
    await raw.hello();
    raw.frame({ t: Msg.STATUS, id: 2, space: 7 });
    await expectError('MMB_ERR_BAD_MESSAGE');
    raw.frame({ t: 99, id: 3 });
    await expectError('MMB_ERR_UNKNOWN_MESSAGE');
    raw.frame({ t: Msg.EV_COMMITTED, generation: 1 });
    await expectError('MMB_ERR_UNKNOWN_MESSAGE');
    raw.frame({ t: Msg.HELLO, id: 4, version: 1, features: 0 });
    await expectError('MMB_ERR_STATE');
    raw.frame({ t: Msg.ATTACH, id: 5, space: 'vm0', role: 'king', kind: 'x' });
    await expectError('MMB_ERR_BAD_MESSAGE');
    raw.send(Buffer.concat([header(0), Buffer.alloc(0)]).subarray(0, 0)); // nothing
    const big = Buffer.from(encodeBody({ t: Msg.ACK, seq: 2 ** 64 }));
    raw.send(Buffer.concat([header(big.length), big]));
    await expectError('MMB_ERR_BAD_MESSAGE');
    raw.frame({ t: Msg.ACK, seq: 5 });
    await expectError('MMB_ERR_STATE'); // not a subscriber
    raw.frame({ t: Msg.ATTACH, id: 6, space: 'vm0', role: 'subscriber', kind: 'raw' });
    const reply = await raw.next();
    expect(reply?.body.result).toBeDefined();
    const sync = await raw.next();
    expect(sync?.type).toBe(Msg.EV_SYNC);
    raw.frame({ t: Msg.ACK, seq: sync!.body.seq as number });
    raw.frame({ t: Msg.ACK, seq: sync!.body.seq as number }); // duplicate
    await expectError('MMB_ERR_STALE_GENERATION');
    raw.frame({ t: Msg.ACK, seq: 12345 }); // never sent
    await expectError('MMB_ERR_STALE_GENERATION');
    raw.frame({ t: Msg.COMMIT, id: 7, ops: [{ op: 'add', name: 'x', gpa: -4096, size: 4096, backing: 1, offset: 0 }] });
    await expectError('MMB_ERR_BAD_MESSAGE');
    raw.frame({ t: Msg.COMMIT, id: 8, ops: [] });
    await expectError('MMB_ERR_NOT_OWNER');
    raw.close();
    await stillServes('shapes');
  });

  it('fds attached to a message that takes none, and a BACKING_ADD without its fd: refused, the fds closed', async () => {
    const raw = new Raw();
    await raw.hello();
    const memfds = Array.from({ length: 8 }, (_, i) => createSealedMemfd(`stray${i}`, 4096));
    raw.frame({ t: Msg.STATUS, id: 2 }, memfds);
    const f = await raw.next();
    expect((f?.body.error as { code: string }).code).toBe('MMB_ERR_FD_MISMATCH');
    raw.frame({ t: Msg.ATTACH, id: 3, space: 'vm0', role: 'owner', kind: 'raw' });
    expect((await raw.next())?.body.result).toBeDefined();
    raw.frame({ t: Msg.BACKING_ADD, id: 4 });
    expect(((await raw.next())?.body.error as { code: string }).code).toBe('MMB_ERR_FD_MISMATCH');
    // A frame that declares fds it does not carry breaks the stream.
    raw.frame({ t: Msg.BACKING_ADD, id: 5 }, [], 1);
    expect(await raw.untilClosed()).toBe('MMB_ERR_FD_MISMATCH');
    raw.close();
    for (const fd of memfds) native.close(fd);
    await stillServes('fds');
  });

  it('a connection flood and a client that never reads', { timeout: 120_000 }, async () => {
    const raws: Raw[] = [];
    for (let i = 0; i < 200; i++) raws.push(await Raw.connect());
    // A subscriber process attaches and then never reads while the map changes under it.
    const lazy = new JsonProc(
      spawn(process.execPath, [path.join(ROOT, 'test/fixtures/lazy-subscriber.mjs'), socket, 'vm0'], { stdio: ['ignore', 'pipe', 'pipe'] }),
    );
    const ended = new Promise<NodeJS.Signals | null>((r) => lazy.child.once('exit', (_c, sig) => r(sig)));
    await lazy.next('attaching');
    await waitFor('the lazy subscriber to be attached', async () => (await fetchStatus(socket, 'vm0')).spaces[0]?.clients.some((c) => c.kind === 'lazy'));
    await stillServes('flood', false);
    // It never acked: it was evicted, and fenced (killed through its pidfd: the default policy), so the
    // hotplug's removal could complete.
    expect(await ended).toBe('SIGKILL');
    for (const r of raws) r.close();
    await waitFor('the flood to be gone', () => fdCount(broker.pid!) === baseline);
  });
});
