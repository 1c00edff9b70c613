// One TCP connection carrying migration records (stream.ts), for both ends: sends records with
// backpressure, parses what arrives, and runs the handler of each control record to completion before the
// next record is parsed (a MAP must have created its regions before the DATA that follows lands). The
// socket is paused meanwhile, so the kernel's window, not memory here, holds what the peer sends.
import type net from 'node:net';
import { DisconnectedError, createError, isErrorCode, InternalError, toMmbError, type MmbError } from '../../protocol/index.js';
import { RecordReader, RecordType, encodeControl, type StreamErrorBody } from './stream.js';

export interface ChannelHandler {
  /** A control record; a returned promise holds the next record back until it settles (a rejection fails the channel). */
  control(type: number, body: unknown): void | Promise<void>;
  /** A DATA record begins: throw to refuse it. */
  dataStart(gpa: number, length: number): void;
  data(gpa: number, bytes: Uint8Array): void;
  dataEnd(): void;
  /** The channel failed (the connection ended, the peer sent something invalid, a handler threw). Called once. */
  failed(err: MmbError): void;
}

/** Bytes queued in the socket before a sender waits for it to drain. */
export const HIGH_WATER = 16 << 20;

export class Channel {
  readonly reader: RecordReader;
  private backlog: Buffer[] = [];
  private holding = false;
  private failure: MmbError | undefined;
  private closedByUs = false;
  /** Guest bytes and records received (DATA bodies). */
  bytesIn = 0;

  constructor(
    readonly socket: net.Socket,
    private readonly handler: ChannelHandler,
    /** Describes the peer in messages ("the receiver at 10.0.0.2:7000"). */
    private readonly peer: string,
  ) {
    let pending: Promise<void> | undefined;
    this.reader = new RecordReader({
      control: (type, body) => {
        const r = handler.control(type, body);
        if (r instanceof Promise) {
          pending = r;
          return true;
        }
        return false;
      },
      dataStart: (gpa, length) => handler.dataStart(gpa, length),
      data: (gpa, bytes) => {
        this.bytesIn += bytes.length;
        handler.data(gpa, bytes);
      },
      dataEnd: () => handler.dataEnd(),
    });
    const consume = () => {
      while (!this.holding && this.backlog.length > 0 && !this.failure) {
        const chunk = this.backlog[0] as Buffer;
        let used: number;
        try {
          used = this.reader.push(chunk);
        } catch (err) {
          this.fail(toMmbError(err));
          return;
        }
        if (used < chunk.length) this.backlog[0] = chunk.subarray(used);
        else this.backlog.shift();
        if (pending) {
          const p = pending;
          pending = undefined;
          this.holding = true;
          socket.pause();
          p.then(
            () => {
              this.holding = false;
              socket.resume();
              consume();
            },
            (err: unknown) => this.fail(toMmbError(err)),
          );
        }
      }
    };
    socket.on('data', (chunk: Buffer) => {
      if (this.failure) return;
      this.backlog.push(chunk);
      consume();
    });
    socket.on('error', (err) => this.fail(new DisconnectedError(`the connection to ${this.peer} failed: ${err.message}`, { cause: err })));
    socket.on('close', () => {
      if (this.closedByUs) {
        // An end we asked for: later sends fail, but nothing went wrong.
        this.failure ??= new DisconnectedError(`the connection to ${this.peer} was closed`);
        return;
      }
      this.fail(
        new DisconnectedError(
          `${this.peer} closed the connection${this.reader.midRecord ? ' in the middle of a record' : ''} (after ${this.reader.records} records)`,
        ),
      );
    });
  }

  /** Why the channel failed, once it did. */
  get failed(): MmbError | undefined {
    return this.failure;
  }

  /** Fails the channel: the handler hears of it once, the socket is destroyed. */
  fail(err: MmbError): void {
    if (this.failure) return;
    this.failure = err;
    this.backlog = [];
    this.socket.destroy();
    this.handler.failed(err);
  }

  /** Queues bytes; a promise when the socket holds HIGH_WATER bytes or more (wait for it to drain). */
  send(buf: Uint8Array): void | Promise<void> {
    if (this.failure) throw this.failure;
    this.socket.write(buf);
    if (this.socket.writableLength < HIGH_WATER) return undefined;
    return new Promise((resolve, reject) => {
      const done = () => {
        this.socket.off('drain', done);
        this.socket.off('close', done);
        if (this.failure) reject(this.failure);
        else resolve();
      };
      this.socket.on('drain', done);
      this.socket.on('close', done);
    });
  }

  sendControl(type: number, body: object): void | Promise<void> {
    return this.send(encodeControl(type, body));
  }

  /** Sends ERROR {code, message} and closes (after the bytes left). */
  sendError(err: unknown): void {
    const e = toMmbError(err);
    const body: StreamErrorBody = { code: e.code, message: e.message };
    if (this.failure || this.socket.destroyed) return;
    this.closedByUs = true;
    this.socket.end(encodeControl(RecordType.ERROR, body));
  }

  /** Closes after what was sent; the peer sees the end of the stream. */
  end(): void {
    this.closedByUs = true;
    if (!this.socket.destroyed) this.socket.end();
  }
}

/** An ERROR record's error, as the error it names (its code if known). */
export function remoteError(body: unknown, peer: string): MmbError {
  const b = body as Partial<StreamErrorBody>;
  const message = `${peer}: ${typeof b.message === 'string' ? b.message : 'an error'}`;
  if (typeof b.code === 'string' && isErrorCode(b.code)) return createError(b.code, message);
  return new InternalError(`${typeof b.code === 'string' ? `${b.code}: ` : ''}${message}`);
}
