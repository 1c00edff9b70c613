// The receiving end of a migration from another host: listens on TCP (loopback unless told otherwise),
// authenticates the sender (HMAC of a fresh nonce with the shared token, compared in constant time),
// and writes what it receives into an address space of its broker, whose owner it is: each round's map
// becomes transactions of the space (built while the space is unpublished, so no subscriber applies a
// half map), each DATA record's bytes go straight into the new memfds. At COMMIT it publishes the space:
// subscribers that attached meanwhile get the whole map at once, and attach as usual from then on.
// A connection that ends, an ABORT, or a stream that breaks a rule: everything received is removed and
// the space stays unpublished.
//
// One migration per Receiver: connections that fail to authenticate are closed and listening goes on;
// once a sender is authenticated, other connections are turned away, and the receiver ends with it.
import net from 'node:net';
import {
  BadMessageError,
  CancelledError,
  InvalidArgError,
  PermissionError,
  StateError,
  TimeoutError,
  VersionError,
  toMmbError,
  type MmbError,
  hex,
} from '../../protocol/index.js';
import type { BrokerTarget } from '../connection.js';
import type { OwnerClient } from '../owner.js';
import { DEFAULT_LISTEN_HOST, formatAddress, parseListen, type TcpAddress } from './address.js';
import { Channel, remoteError } from './channel.js';
import { SpaceDestination } from './destination.js';
import {
  MAGIC,
  MAX_CONTROL_BYTES,
  RecordType,
  RECORD_NAMES,
  STREAM_VERSION,
  checkAuth,
  checkMap,
  checkSeq,
  type Auth,
  type Digests,
  type MapBody,
} from './stream.js';
import { checkMac, newNonce } from './token.js';
import { imageDigests, VERIFY_BLOCK } from './verify.js';

export interface ReceiveOptions {
  /** Where to listen: {host, port}, "HOST:PORT", or "PORT" (loopback). Port 0 picks one (see `address`). */
  listen: TcpAddress | string;
  /** The space of the broker to receive into; it must be empty and unpublished. */
  space: string;
  /** The broker: its socket path, or an embedded Broker. */
  broker: BrokerTarget;
  /** The token a sender must prove it knows. */
  token: string;
  /** What happens, for a progress display or JSON lines. */
  onEvent?: (e: ReceiveEvent) => void;
  /** Stop listening (before a sender is authenticated) or abort the migration in progress. */
  signal?: AbortSignal;
  /** How long an unauthenticated connection may take to send AUTH. Default 10 s. */
  authTimeoutMs?: number;
  /** Keep the space's owner attached after the commit (a VMM that goes on owning it). Default false. */
  keepOwner?: boolean;
  /** The client name the space's owner attaches with. Default "mmbroker receive". */
  name?: string;
}

export type ReceiveEvent =
  | { event: 'listening'; host: string; port: number; space: string }
  | { event: 'connection'; peer: string }
  | { event: 'refused'; peer: string; code: string; message: string }
  | { event: 'authenticated'; peer: string; source: Auth['source']; memoryBytes: number; dataCrc: boolean }
  | { event: 'map'; round: number; phase: MapBody['phase']; generation: number; regions: number; added: number; removed: number; changed: number }
  | { event: 'progress'; bytes: number; records: number; round: number; memoryBytes: number }
  | { event: 'synced'; bytes: number; records: number }
  | { event: 'verified'; blocks: number }
  | { event: 'committed'; space: string; generation: number; bytes: number; regions: number }
  | { event: 'aborted'; code: string; message: string };

export interface ReceiveResult {
  space: string;
  /** The generation PUBLISH answered. */
  generation: number;
  /** Guest bytes and records received. */
  bytes: number;
  records: number;
  regions: MapBody['regions'];
  /** The space's owner, when keepOwner asked to keep it attached. */
  owner?: OwnerClient;
}

/** How often a 'progress' event is emitted while DATA flows. */
const PROGRESS_BYTES = 64 << 20;

export class Receiver {
  private server: net.Server | undefined;
  private session: Channel | undefined;
  private done = false;
  private resolve!: (r: ReceiveResult) => void;
  private reject!: (err: MmbError) => void;
  /** Settles when the migration committed (resolves) or failed (rejects). */
  readonly result: Promise<ReceiveResult>;
  private address_: TcpAddress | undefined;

  private constructor(
    private readonly opts: ReceiveOptions,
    private readonly dest: SpaceDestination,
  ) {
    this.result = new Promise((res, rej) => {
      this.resolve = res;
      this.reject = rej;
    });
    this.result.catch(() => undefined); // the caller may only ever look at it through receive()
  }

  /**
   * Becomes the owner of the space (refused if it has regions or is published), then listens. Resolves once
   * listening; `address` says where (the port, when 0 was asked for).
   */
  static async listen(opts: ReceiveOptions): Promise<Receiver> {
    const at = typeof opts.listen === 'string' ? parseListen(opts.listen) : opts.listen;
    if (!opts.token) throw new InvalidArgError('a receiver needs a token');
    const dest = new SpaceDestination(opts.broker, opts.space, {
      name: opts.name ?? 'mmbroker receive',
      requireUnpublished: true,
      keepOwner: opts.keepOwner ?? false,
    });
    await dest.open();
    const r = new Receiver(opts, dest);
    try {
      await r.bind(at);
    } catch (err) {
      await dest.close();
      throw err;
    }
    return r;
  }

  /** Where it listens. */
  get address(): TcpAddress {
    return this.address_ as TcpAddress;
  }

  private emit(e: ReceiveEvent): void {
    this.opts.onEvent?.(e);
  }

  private bind(at: TcpAddress): Promise<void> {
    const server = net.createServer((socket) => this.accept(socket));
    this.server = server;
    this.opts.signal?.addEventListener(
      'abort',
      () => void this.finish(new CancelledError(`the receiver was stopped: ${String(this.opts.signal?.reason ?? '')}`)),
      { once: true },
    );
    return new Promise((resolve, reject) => {
      server.once('error', (err) =>
        reject(
          new InvalidArgError(`cannot listen on ${formatAddress(at)}: ${err.message}`, { cause: err, errno: (err as NodeJS.ErrnoException).code ?? 'EIO' }),
        ),
      );
      server.listen({ host: at.host || DEFAULT_LISTEN_HOST, port: at.port, exclusive: true }, () => {
        const a = server.address() as net.AddressInfo;
        this.address_ = { host: a.address, port: a.port };
        this.emit({ event: 'listening', host: a.address, port: a.port, space: this.opts.space });
        resolve();
      });
    });
  }

  /** A new connection: greeted with a nonce; only an authenticated one becomes the session. */
  private accept(socket: net.Socket): void {
    const peer = `${socket.remoteAddress}:${socket.remotePort}`;
    socket.setNoDelay(true);
    this.emit({ event: 'connection', peer });
    if (this.session || this.done) {
      // One migration at a time: tell it why, then close.
      const busy = new Channel(
        socket,
        { control: () => undefined, dataStart: () => undefined, data: () => undefined, dataEnd: () => undefined, failed: () => undefined },
        `the sender at ${peer}`,
      );
      busy.sendError(new StateError(`this receiver is busy with another migration (space ${JSON.stringify(this.opts.space)})`));
      this.emit({ event: 'refused', peer, code: 'MMB_ERR_STATE', message: 'busy' });
      return;
    }
    const nonce = newNonce();
    let authed = false;
    let memoryBytes = 0;
    let round = 0;
    let nextProgress = PROGRESS_BYTES;
    let records = 0;
    const refuse = (err: MmbError) => {
      clearTimeout(timer);
      this.emit({ event: 'refused', peer, code: err.code, message: err.message });
      ch.sendError(err);
    };
    const timer = setTimeout(() => {
      if (!authed) refuse(new TimeoutError(`no AUTH from ${peer} in ${this.opts.authTimeoutMs ?? 10_000} ms`));
    }, this.opts.authTimeoutMs ?? 10_000);
    timer.unref();
    const ch: Channel = new Channel(
      socket,
      {
        control: (type, body) => {
          if (!authed) {
            if (type !== RecordType.AUTH) return refuse(new BadMessageError(`${RECORD_NAMES.get(type)} before AUTH`));
            const auth = checkAuth(body);
            if (auth.version !== STREAM_VERSION)
              return refuse(new VersionError(`migration stream version ${auth.version}; this receiver speaks ${STREAM_VERSION}`));
            if (!checkMac(this.opts.token, nonce, Buffer.from(auth.mac, 'hex')))
              return refuse(new PermissionError('wrong token: the AUTH answer does not match'));
            if (this.session || this.done) return refuse(new StateError('this receiver is busy with another migration'));
            clearTimeout(timer);
            authed = true;
            memoryBytes = auth.memoryBytes;
            this.session = ch;
            ch.reader.limit = MAX_CONTROL_BYTES;
            this.emit({ event: 'authenticated', peer, source: auth.source, memoryBytes, dataCrc: auth.dataCrc });
            return ch.sendControl(RecordType.READY, { space: this.opts.space, generation: 0 });
          }
          switch (type) {
            case RecordType.MAP: {
              const map = checkMap(body);
              round = map.round;
              const before = this.dest.map();
              return this.dest.setMap(map).then(() => {
                const now = new Set(map.regions.map((r) => r.id));
                const was = new Set(before.map((r) => r.id));
                this.emit({
                  event: 'map',
                  round: map.round,
                  phase: map.phase,
                  generation: map.generation,
                  regions: map.regions.length,
                  added: map.regions.filter((r) => !was.has(r.id)).length,
                  removed: before.filter((r) => !now.has(r.id)).length,
                  changed: map.regions.filter((r) => was.has(r.id) && before.find((b) => b.id === r.id)?.readonly !== r.readonly).length,
                });
              });
            }
            case RecordType.SYNC: {
              const seq = checkSeq(body, 'SYNC');
              this.emit({ event: 'synced', bytes: ch.bytesIn, records });
              return ch.sendControl(RecordType.SYNCED, { seq, bytes: ch.bytesIn, records });
            }
            case RecordType.VERIFY: {
              const block = (body as { block?: unknown }).block;
              if (block !== VERIFY_BLOCK) throw new BadMessageError(`VERIFY block ${String(block)}: this receiver digests ${VERIFY_BLOCK}-byte blocks`);
              const regions = this.dest.map();
              const digests: Digests = { regions, digests: imageDigests(this.dest.image(), regions) };
              this.emit({ event: 'verified', blocks: digests.digests.reduce((n, d) => n + d.blocks.length, 0) });
              return ch.sendControl(RecordType.DIGESTS, digests);
            }
            case RecordType.COMMIT:
              return this.dest.commit().then(async () => {
                const generation = this.dest.generation ?? 0;
                await ch.sendControl(RecordType.COMMITTED, { space: this.opts.space, generation });
                ch.end();
                const regions = this.dest.map();
                this.emit({ event: 'committed', space: this.opts.space, generation, bytes: ch.bytesIn, regions: regions.length });
                await this.finish(undefined, { space: this.opts.space, generation, bytes: ch.bytesIn, records, regions });
              });
            case RecordType.ABORT: {
              const message = String((body as { message?: unknown }).message ?? '');
              return this.finish(new CancelledError(`the sender aborted the migration: ${message}`));
            }
            case RecordType.ERROR:
              return this.finish(remoteError(body, `the sender at ${peer}`));
            default:
              throw new BadMessageError(`unexpected ${RECORD_NAMES.get(type)} from the sender`);
          }
        },
        dataStart: (gpa, length) => {
          if (!authed) throw new BadMessageError('DATA before AUTH');
          if (!this.dest.holds(gpa, length)) throw new BadMessageError(`DATA [${hex(gpa)}, +${hex(length)}) is not inside one region of the last MAP`);
        },
        data: (gpa, bytes) => this.dest.write(gpa, bytes),
        dataEnd: () => {
          records++;
          if (ch.bytesIn >= nextProgress) {
            nextProgress = ch.bytesIn + PROGRESS_BYTES;
            this.emit({ event: 'progress', bytes: ch.bytesIn, records, round, memoryBytes });
          }
        },
        failed: (err) => {
          clearTimeout(timer);
          if (this.session === ch) void this.finish(err);
        },
      },
      `the sender at ${peer}`,
    );
    void ch.sendControl(RecordType.HELLO, { magic: MAGIC, version: STREAM_VERSION, nonce: nonce.toString('hex'), space: this.opts.space });
  }

  /**
   * Ends the receiver: with `err`, everything received is removed and the space stays unpublished; the
   * sender hears why if it is still there.
   */
  private async finish(err: MmbError | undefined, ok?: ReceiveResult): Promise<void> {
    if (this.done) return;
    this.done = true;
    this.server?.close();
    if (err) {
      this.session?.sendError(err);
      await this.dest.abort(err).catch(() => undefined);
      this.emit({ event: 'aborted', code: err.code, message: err.message });
    }
    const owner = this.dest.owner;
    await this.dest.close().catch(() => undefined);
    if (err) this.reject(toMmbError(err));
    else this.resolve({ ...(ok as ReceiveResult), ...(this.opts.keepOwner && owner ? { owner } : {}) });
  }

  /** Stops listening; a migration in progress is aborted (nothing is published). */
  async close(): Promise<void> {
    await this.finish(new CancelledError('the receiver was closed'));
    await this.result.catch(() => undefined);
  }
}

/** Listens, receives one migration into `space`, publishes it; rejects (nothing published) if it fails. */
export async function receive(opts: ReceiveOptions): Promise<ReceiveResult> {
  const r = await Receiver.listen(opts);
  return r.result;
}
