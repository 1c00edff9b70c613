// A client's connection to a broker, over a socket or in-process: HELLO, requests matched to replies by
// id (each with a deadline), and every other message handed on as a validated event, in order.
import { EventEmitter } from 'eventemitter3';
import {
  ALL_FEATURES,
  DisconnectedError,
  MmbError,
  MESSAGES,
  Msg,
  PROTOCOL_VERSION,
  ProtocolError,
  TimeoutError,
  parseToClient,
  toMmbError,
  type HelloResult,
  type Schema,
  type ToClient,
} from '../protocol/index.js';
import { connectSocket, closeAll, type Transport } from '../transport/index.js';
import type { InProcessConnector } from '../broker/index.js';

/** Where a client connects: a socket path, or a broker in this process. */
export type BrokerTarget = string | InProcessConnector;

export interface ConnectionOptions {
  /** Client name shown in status and logs. */
  name?: string;
  /** Feature bits to ask for; default: every feature this library implements. */
  features?: number;
  /** Deadline for each request, in ms. Default 30000. */
  requestTimeoutMs?: number;
  /** Deadline to reach the socket while its backlog is full. Default 5000. */
  connectTimeoutMs?: number;
}

export interface ConnectionEvents {
  /** A broker-to-client message other than REPLY; the listener owns `fds`. */
  event: [message: Exclude<ToClient, { t: typeof Msg.REPLY }>, fds: number[]];
  /** The connection closed; `reason` is set when the broker said why (EV_GOODBYE) or the stream broke. */
  close: [reason: MmbError | undefined];
}

interface PendingRequest {
  resolve: (v: unknown) => void;
  reject: (e: MmbError) => void;
  result: Schema<unknown> | undefined;
  timer: NodeJS.Timeout;
  name: string;
}

export class Connection extends EventEmitter<ConnectionEvents> {
  private nextId = 1;
  private readonly pending = new Map<number, PendingRequest>();
  private goodbye: MmbError | undefined;
  features = 0;
  hello: HelloResult | undefined;

  private constructor(
    readonly transport: Transport,
    private readonly requestTimeoutMs: number,
  ) {
    super();
    transport.on('frame', (frame) => {
      let msg: ToClient;
      try {
        msg = parseToClient(frame, this.features);
      } catch (err) {
        closeAll(frame.fds);
        transport.destroy(new ProtocolError(`the broker sent an invalid message: ${(err as Error).message}`, { cause: err }));
        return;
      }
      if (msg.t === Msg.REPLY) this.onReply(msg);
      else {
        if (msg.t === Msg.EV_GOODBYE) this.goodbye = MmbError.fromWire(msg.error);
        this.emit('event', msg, frame.fds);
      }
    });
    transport.on('close', (reason) => {
      const why = this.goodbye ?? reason;
      for (const p of this.pending.values()) {
        clearTimeout(p.timer);
        p.reject(new DisconnectedError(`the connection closed before ${p.name} was answered`, why ? { cause: why } : {}));
      }
      this.pending.clear();
      this.emit('close', why);
    });
  }

  /** Connects and exchanges HELLO. */
  static async open(target: BrokerTarget, opts: ConnectionOptions = {}): Promise<Connection> {
    const transport =
      typeof target === 'string'
        ? await connectSocket(target, opts.connectTimeoutMs === undefined ? {} : { timeoutMs: opts.connectTimeoutMs })
        : target.connectInProcess();
    const conn = new Connection(transport, opts.requestTimeoutMs ?? 30_000);
    try {
      const hello = (await conn.request({
        t: Msg.HELLO,
        version: PROTOCOL_VERSION,
        features: opts.features ?? ALL_FEATURES,
        ...(opts.name ? { name: opts.name } : {}),
      })) as HelloResult;
      conn.hello = hello;
      conn.features = hello.features;
      transport.setLimits({ maxFrameBytes: hello.limits.maxFrameBytes, maxFdsPerFrame: hello.limits.maxFdsPerFrame });
    } catch (err) {
      transport.destroy();
      throw err;
    }
    return conn;
  }

  get closed(): boolean {
    return this.transport.closed;
  }

  /**
   * Sends a request (`t` and fields, without `id`) and resolves with its validated result, or rejects with
   * the broker's typed error, MMB_ERR_TIMEOUT or MMB_ERR_DISCONNECTED.
   */
  request(message: { t: number } & Record<string, unknown>, fds: readonly number[] = []): Promise<unknown> {
    const spec = MESSAGES.get(message.t);
    const name = spec?.name ?? `message ${message.t}`;
    if (this.transport.closed) return Promise.reject(new DisconnectedError(`cannot send ${name}: the connection is closed`));
    const id = this.nextId++;
    if (this.nextId > 0xffff_ffff) this.nextId = 1;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new TimeoutError(`${name} got no reply within ${this.requestTimeoutMs} ms`));
      }, this.requestTimeoutMs);
      this.pending.set(id, { resolve, reject, result: spec?.result, timer, name });
      try {
        this.transport.send({ ...message, id }, fds);
      } catch (err) {
        clearTimeout(timer);
        this.pending.delete(id);
        reject(toMmbError(err));
      }
    });
  }

  /** Sends a message that has no reply (ACK, NACK); it may be corked until the end of the turn (flush()). */
  send(message: object): void {
    this.transport.send(message);
  }

  /** Writes what send() corked now (transport/cork.ts). */
  flush(): void {
    this.transport.flush();
  }

  close(): void {
    this.transport.end();
  }

  private onReply(msg: Extract<ToClient, { t: typeof Msg.REPLY }>): void {
    const p = this.pending.get(msg.id);
    if (!p) return; // a reply after its deadline: the caller has already been told
    this.pending.delete(msg.id);
    clearTimeout(p.timer);
    if ((msg.error === undefined) === (msg.result === undefined)) {
      this.transport.destroy(new ProtocolError(`the broker's reply to ${p.name} must carry exactly one of result and error`));
      return;
    }
    if (msg.error) {
      p.reject(MmbError.fromWire(msg.error));
      return;
    }
    try {
      p.resolve(p.result ? p.result.parse(msg.result ?? {}, `${p.name} result`) : msg.result);
    } catch (err) {
      p.reject(new ProtocolError(`the broker's reply to ${p.name} is invalid: ${(err as Error).message}`));
    }
  }
}
