// The sending end of a migration to another host: a Destination that streams the rounds to a receiver
// (`mmbroker receive`, or receive() in a VMM) over TCP, and migrateTo(url), the one call a VMM makes.
// The stream (stream.ts, docs/migration.md): the receiver greets with HELLO (a fresh nonce), the sender
// answers AUTH (HMAC of the nonce with the shared token), the receiver says READY; then MAP and DATA
// records per round; at the end SYNC (answered SYNCED once every byte before it is in place: the end of
// the downtime), VERIFY (answered with DIGESTS of the copy), and COMMIT (answered COMMITTED once the
// receiver published the space) or ABORT.
import net from 'node:net';
import { BadMessageError, DisconnectedError, TimeoutError, VersionError, type MmbError } from '../../protocol/index.js';
import type { MappingSubscriber } from '../plain.js';
import type { OwnerClient } from '../owner.js';
import { formatAddress, parseTcpUrl, type TcpAddress } from './address.js';
import { Channel, remoteError } from './channel.js';
import type { Destination, MigrationMap, SourceInfo } from './destination.js';
import { Migration, type MigrationOptions, type MigrationResult } from './engine.js';
import {
  RecordType,
  RECORD_NAMES,
  STREAM_VERSION,
  checkDigests,
  checkHello,
  checkSeq,
  encodeData,
  encodeDataWith,
  type Committed,
  type Synced,
} from './stream.js';
import { authMac } from './token.js';
import { compareDigests, mapDifference, VERIFY_BLOCK, type MemoryImage, type VerifyResult } from './verify.js';

export interface TcpDestinationOptions {
  /** The receiver's token (the content of its --token-file). */
  token: string;
  /** DATA records carry a CRC of their bytes too (costs a CRC pass on each side). Default false. */
  dataCrc?: boolean;
  /** How long to wait for the connection and the receiver's HELLO / READY. Default 10 s. */
  connectTimeoutMs?: number;
  /** How long to wait for an answer at the end (SYNCED, DIGESTS, COMMITTED). Default 10 min. */
  replyTimeoutMs?: number;
}

interface Waiter {
  types: number[];
  resolve: (r: { type: number; body: unknown }) => void;
  reject: (err: MmbError) => void;
}

export class TcpDestination implements Destination {
  readonly address: TcpAddress;
  readonly zeroFilled = true;
  private channel: Channel | undefined;
  private readonly inbox: { type: number; body: unknown }[] = [];
  private readonly waiters: Waiter[] = [];
  private failure: MmbError | undefined;
  private seq = 0;
  private committed: Committed | undefined;
  /** The receiving space, from HELLO. */
  space: string | undefined;

  constructor(
    url: string | TcpAddress,
    private readonly opts: TcpDestinationOptions,
  ) {
    this.address = typeof url === 'string' ? parseTcpUrl(url) : url;
  }

  get description(): string {
    return `the receiver at tcp://${formatAddress(this.address)}${this.space ? ` (space ${JSON.stringify(this.space)})` : ''}`;
  }

  /** What COMMITTED said: the receiving space and the generation it was published at. */
  get result(): Committed | undefined {
    return this.committed;
  }

  async open(source: SourceInfo): Promise<void> {
    const peer = `the receiver at ${formatAddress(this.address)}`;
    const socket = await new Promise<net.Socket>((resolve, reject) => {
      const s = net.connect({ host: this.address.host, port: this.address.port });
      const timer = setTimeout(() => {
        s.destroy();
        reject(new TimeoutError(`no connection to ${peer} in ${this.opts.connectTimeoutMs ?? 10_000} ms`));
      }, this.opts.connectTimeoutMs ?? 10_000);
      s.once('connect', () => {
        clearTimeout(timer);
        s.off('error', onError);
        resolve(s);
      });
      const onError = (err: Error) => {
        clearTimeout(timer);
        reject(
          new DisconnectedError(`cannot connect to ${peer}: ${err.message}`, { cause: err, errno: (err as NodeJS.ErrnoException).code ?? 'ECONNREFUSED' }),
        );
      };
      s.once('error', onError);
    });
    socket.setNoDelay(true);
    this.channel = new Channel(
      socket,
      {
        control: (type, body) => {
          if (type === RecordType.ERROR) {
            this.fail(remoteError(body, peer));
            return;
          }
          const w = this.waiters.find((x) => x.types.includes(type));
          if (w) {
            this.waiters.splice(this.waiters.indexOf(w), 1);
            w.resolve({ type, body });
          } else this.inbox.push({ type, body });
        },
        dataStart: () => {
          throw new BadMessageError(`${peer} sent DATA`);
        },
        data: () => undefined,
        dataEnd: () => undefined,
        failed: (err) => this.fail(err),
      },
      peer,
    );
    this.channel.reader.limit = 64 << 20; // DIGESTS of a large map; nothing here trusts the receiver less than that
    const connect = this.opts.connectTimeoutMs ?? 10_000;
    const hello = checkHello((await this.next([RecordType.HELLO], connect)).body);
    if (hello.version !== STREAM_VERSION) throw this.fail(new VersionError(`${peer} speaks migration stream version ${hello.version}, not ${STREAM_VERSION}`));
    this.space = hello.space;
    await this.channel.sendControl(RecordType.AUTH, {
      version: STREAM_VERSION,
      mac: authMac(this.opts.token, Buffer.from(hello.nonce, 'hex')).toString('hex'),
      source: { space: source.space, epoch: source.epoch },
      dataCrc: this.opts.dataCrc ?? false,
      memoryBytes: source.memoryBytes,
    });
    await this.next([RecordType.READY], connect);
  }

  /** Fails every wait now and later; returns the error (to throw). */
  private fail(err: MmbError): MmbError {
    if (!this.failure) {
      this.failure = err;
      for (const w of this.waiters.splice(0)) w.reject(err);
      this.channel?.fail(err);
    }
    return this.failure;
  }

  /** The next control record of one of `types`, within `ms`. */
  private next(types: number[], ms: number): Promise<{ type: number; body: unknown }> {
    if (this.failure) return Promise.reject(this.failure);
    const i = this.inbox.findIndex((r) => types.includes(r.type));
    if (i >= 0) return Promise.resolve(this.inbox.splice(i, 1)[0] as { type: number; body: unknown });
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiters.splice(this.waiters.indexOf(w), 1);
        reject(this.fail(new TimeoutError(`${this.description}: no ${types.map((t) => RECORD_NAMES.get(t)).join(' or ')} in ${ms} ms`)));
      }, ms);
      const w: Waiter = {
        types,
        resolve: (r) => {
          clearTimeout(timer);
          resolve(r);
        },
        reject: (err) => {
          clearTimeout(timer);
          reject(err);
        },
      };
      this.waiters.push(w);
    });
  }

  private get ch(): Channel {
    if (this.failure) throw this.failure;
    return this.channel as Channel;
  }

  setMap(map: MigrationMap): void | Promise<void> {
    return this.ch.sendControl(RecordType.MAP, map);
  }

  write(gpa: number, bytes: Uint8Array): void | Promise<void> {
    return this.ch.send(encodeData(gpa, bytes, this.opts.dataCrc ?? false));
  }

  writeFrom(gpa: number, length: number, fill: (into: Uint8Array) => void): void | Promise<void> {
    const ch = this.ch;
    return ch.send(encodeDataWith(gpa, length, this.opts.dataCrc ?? false, fill));
  }

  async flush(): Promise<void> {
    const seq = ++this.seq;
    await this.ch.sendControl(RecordType.SYNC, { seq });
    const r = await this.next([RecordType.SYNCED], this.opts.replyTimeoutMs ?? 600_000);
    if (checkSeq(r.body, 'SYNCED') !== seq) throw this.fail(new BadMessageError(`SYNCED ${(r.body as Synced).seq}, expected ${seq}`));
  }

  async verify(source: MemoryImage, map: MigrationMap): Promise<VerifyResult> {
    await this.ch.sendControl(RecordType.VERIFY, { block: VERIFY_BLOCK });
    const d = checkDigests((await this.next([RecordType.DIGESTS], this.opts.replyTimeoutMs ?? 600_000)).body);
    const difference = mapDifference(map.regions, d.regions);
    if (difference) return { identical: false, checkedBytes: 0, difference };
    return compareDigests(source, map.regions, d.digests);
  }

  async commit(): Promise<void> {
    await this.ch.sendControl(RecordType.COMMIT, {});
    this.committed = (await this.next([RecordType.COMMITTED], this.opts.replyTimeoutMs ?? 600_000)).body as Committed;
    this.channel?.end();
  }

  async abort(reason: unknown): Promise<void> {
    if (this.failure || !this.channel) return;
    try {
      await this.channel.sendControl(RecordType.ABORT, { message: reason instanceof Error ? reason.message : String(reason) });
    } catch {
      // The connection is gone: the receiver drops everything on its own.
    }
    this.channel.end();
  }

  async close(): Promise<void> {
    this.channel?.end();
  }
}

export interface MigrateToOptions extends MigrationOptions, TcpDestinationOptions {
  /** The source space's owner (logging, syncs and pausing are the owner's to drive). */
  owner: OwnerClient;
  /** A subscriber of the source space attached with writes: false (it maps the memory to read). */
  reader: MappingSubscriber;
}

export interface MigrateToResult extends MigrationResult {
  /** The receiving space and the generation it was published at. */
  destination: Committed | undefined;
}

/**
 * Migrates the owner's space to the receiver at `url` (tcp://HOST:PORT): memory and the map. vCPU and
 * device state are the VMM's to carry. On any failure (a broken connection included) the receiver
 * publishes nothing and the writers here resume.
 */
export async function migrateTo(url: string, opts: MigrateToOptions): Promise<MigrateToResult> {
  const { owner, reader, token, dataCrc, connectTimeoutMs, replyTimeoutMs, ...run } = opts;
  const dest = new TcpDestination(url, {
    token,
    ...(dataCrc !== undefined ? { dataCrc } : {}),
    ...(connectTimeoutMs !== undefined ? { connectTimeoutMs } : {}),
    ...(replyTimeoutMs !== undefined ? { replyTimeoutMs } : {}),
  });
  const result = await new Migration(owner, reader, dest).run(run);
  return { ...result, destination: dest.result };
}
