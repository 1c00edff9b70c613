// A QMP client (QEMU's machine protocol: JSON lines over a Unix socket) for the QEMU peer of
// bench/qemu-hotplug.ts: the greeting, qmp_capabilities, commands answered in order, events kept.
import net from 'node:net';

export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
  timestamp?: { seconds: number; microseconds: number };
}

export class Qmp {
  private buf = '';
  private readonly waiting: { resolve: (v: unknown) => void; reject: (e: Error) => void; what: string }[] = [];
  readonly events: QmpEvent[] = [];
  private closed: Error | undefined;

  private constructor(private readonly sock: net.Socket) {
    sock.setEncoding('utf8');
    sock.on('data', (d: string) => this.onData(d));
    sock.on('close', () => this.fail(new Error('the QMP connection closed')));
    sock.on('error', (err) => this.fail(err));
  }

  /** Connects to QEMU's QMP socket, reads the greeting and enters command mode. */
  static async connect(socket: string, timeoutMs = 10_000): Promise<Qmp> {
    const sock = net.connect(socket);
    await new Promise<void>((resolve, reject) => {
      const t = setTimeout(() => reject(new Error(`no QMP connection to ${socket} within ${timeoutMs} ms`)), timeoutMs);
      sock.once('connect', () => (clearTimeout(t), resolve()));
      sock.once('error', (err) => (clearTimeout(t), reject(err)));
    });
    const q = new Qmp(sock);
    await q.next('the QMP greeting');
    await q.execute('qmp_capabilities');
    return q;
  }

  /** Runs a command; resolves with its `return`, rejects with QEMU's error. */
  async execute(command: string, args?: Record<string, unknown>): Promise<unknown> {
    const reply = this.next(command);
    this.sock.write(JSON.stringify({ execute: command, ...(args ? { arguments: args } : {}) }) + '\n');
    const r = (await reply) as { return?: unknown; error?: { class: string; desc: string } };
    if (r.error) throw new Error(`QMP ${command}: ${r.error.class}: ${r.error.desc}`);
    return r.return;
  }

  /** Resolves with the first event (kept since the connection, or coming) that `pred` accepts, and removes it. */
  async event(pred: (e: QmpEvent) => boolean, what: string, timeoutMs = 10_000): Promise<QmpEvent> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const i = this.events.findIndex(pred);
      if (i >= 0) return this.events.splice(i, 1)[0] as QmpEvent;
      if (this.closed) throw this.closed;
      if (Date.now() > deadline) throw new Error(`QMP: no ${what} within ${timeoutMs} ms`);
      await new Promise((r) => setTimeout(r, 2));
    }
  }

  close(): void {
    this.sock.destroy();
  }

  private next(what: string): Promise<unknown> {
    if (this.closed) return Promise.reject(this.closed);
    return new Promise((resolve, reject) => this.waiting.push({ resolve, reject, what }));
  }

  private onData(d: string): void {
    this.buf += d;
    let i: number;
    while ((i = this.buf.indexOf('\n')) >= 0) {
      const line = this.buf.slice(0, i).trim();
      this.buf = this.buf.slice(i + 1);
      if (!line) continue;
      const m = JSON.parse(line) as Record<string, unknown>;
      if (typeof m.event === 'string') this.events.push(m as unknown as QmpEvent);
      else this.waiting.shift()?.resolve(m);
    }
  }

  private fail(err: Error): void {
    if (this.closed) return;
    this.closed = err;
    for (const w of this.waiting.splice(0)) w.reject(new Error(`${w.what}: ${err.message}`));
  }
}
