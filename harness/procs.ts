// The harness's real processes: the broker (`mmbroker serve`) and the clients (`mmbroker attach KIND
// --json --control`, or a deliberately broken client). Each client is driven by JSON commands on stdin;
// its event log is kept short (a soak runs for hours): only command replies and a few events are kept.
import { spawn, type ChildProcess } from 'node:child_process';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';
import { waitFor } from '../cli/child.js';
import type { ClientKind } from './options.js';
import { fdCensus, type FdCensus } from './kernel.js';

export const CLI = fileURLToPath(new URL('../cli/mmbroker.js', import.meta.url));
export const BROKEN_CLIENT = fileURLToPath(new URL('./broken-client.js', import.meta.url));

export interface Line {
  event: string;
  [k: string]: unknown;
}

/** Events a client prints that the harness waits for; the rest (mapped, committed, ...) are dropped. */
const KEPT = new Set(['attached', 'holding', 'reconnected', 'disconnected', 'error', 'detached']);

function lines(child: ChildProcess, onLine: (l: Line) => void, stderr: string[]): void {
  readline.createInterface({ input: child.stdout! }).on('line', (text) => {
    try {
      onLine(JSON.parse(text) as Line);
    } catch {
      onLine({ event: 'text', text });
    }
  });
  child.stderr?.setEncoding('utf8').on('data', (d: string) => {
    stderr.push(d);
    if (stderr.length > 50) stderr.splice(0, stderr.length - 50);
  });
}

function exited(child: ChildProcess): Promise<void> {
  return child.exitCode !== null || child.signalCode !== null ? Promise.resolve() : new Promise((r) => child.once('exit', () => r()));
}

export class ClientProc {
  /** Soft-vfio devices the harness attached (the model's truth for the pins invariant). */
  devices: string[];
  /** Its descriptors right after it attached: the leaks check's baseline. */
  baseline: FdCensus | undefined;
  readonly kept: Line[] = [];
  readonly stderr: string[] = [];
  private waiter: { reply: string; cmd: string; resolve: (l: Line) => void } | undefined;
  private queue: Promise<unknown> = Promise.resolve();
  private readonly exit: Promise<void>;

  constructor(
    readonly child: ChildProcess,
    readonly kind: ClientKind,
    readonly name: string,
    devices: string[],
    /** Set for the deliberately broken clients of --self-test. */
    readonly broken?: string,
  ) {
    this.devices = devices;
    this.exit = exited(child);
    lines(child, (l) => this.onLine(l), this.stderr);
  }

  get pid(): number {
    return this.child.pid as number;
  }

  get gone(): boolean {
    return this.child.exitCode !== null || this.child.signalCode !== null;
  }

  private onLine(l: Line): void {
    const w = this.waiter;
    if (w && (l.event === w.reply || (l.event === 'failed' && l.cmd === w.cmd))) {
      this.waiter = undefined;
      w.resolve(l);
      return;
    }
    if (KEPT.has(l.event)) {
      this.kept.push(l);
      if (this.kept.length > 100) this.kept.splice(0, this.kept.length - 100);
    }
  }

  /** Sends one command and resolves with its reply (or its `failed` line); one command at a time. */
  request(cmd: Record<string, unknown> & { cmd: string }, reply: string, timeoutMs = 20_000): Promise<Line> {
    const run = async () => {
      const answer = new Promise<Line>((resolve) => (this.waiter = { reply, cmd: cmd.cmd, resolve }));
      this.child.stdin?.write(JSON.stringify(cmd) + '\n');
      let timer: NodeJS.Timeout | undefined;
      try {
        return await Promise.race([
          answer,
          this.exit.then(() => { throw new Error(`${this.describe()} exited (${this.child.exitCode ?? this.child.signalCode}) before answering ${cmd.cmd}: ${this.stderr.join('').slice(-500)}`); }),
          new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`${this.describe()} did not answer ${cmd.cmd} within ${timeoutMs} ms`)), timeoutMs))),
        ]);
      } finally {
        clearTimeout(timer);
        this.waiter = undefined;
      }
    };
    const p = this.queue.then(run, run);
    this.queue = p.catch(() => undefined);
    return p;
  }

  /** Waits for a kept event (consumed once seen). */
  async event(name: string, timeoutMs = 20_000): Promise<Line> {
    return waitFor(`${name} from ${this.describe()}`, () => {
      const i = this.kept.findIndex((l) => l.event === name);
      if (i >= 0) return this.kept.splice(i, 1)[0];
      if (this.gone) throw new Error(`${this.describe()} exited: ${this.stderr.join('').slice(-1000)}`);
      return undefined;
    }, timeoutMs);
  }

  signal(sig: NodeJS.Signals): void {
    if (!this.gone) this.child.kill(sig);
  }

  /** The signal that ended the process, once it ended (within `timeoutMs`); undefined if it lives on. */
  async exitSignal(timeoutMs: number): Promise<NodeJS.Signals | null | undefined> {
    let timer: NodeJS.Timeout | undefined;
    const ended = await Promise.race([this.exit.then(() => true), new Promise<false>((r) => (timer = setTimeout(() => r(false), timeoutMs)))]);
    clearTimeout(timer);
    return ended ? this.child.signalCode : undefined;
  }

  /** Stops the process (SIGTERM: it detaches cleanly; SIGKILL after `graceMs`). Resolves with its exit code. */
  async stop(sig: NodeJS.Signals = 'SIGTERM', graceMs = 10_000): Promise<number | null> {
    if (!this.gone) {
      this.child.kill(sig);
      const timer = setTimeout(() => this.child.kill('SIGKILL'), graceMs);
      await exited(this.child);
      clearTimeout(timer);
    }
    return this.child.exitCode;
  }

  describe(): string {
    return `${this.broken ? `broken (${this.broken}) ` : ''}${this.kind} client ${this.name} (pid ${this.pid})`;
  }
}

export interface ClientSpawn {
  socket: string;
  space: string;
  kind: ClientKind;
  name: string;
  devices: string[];
  broken?: 'skip-unmap' | 'pin-twice';
}

/** Starts a client process and resolves once it attached (its initial map established and acked). */
export async function spawnClient(s: ClientSpawn): Promise<ClientProc> {
  const common = ['--socket', s.socket, '--space', s.space, '--name', s.name];
  const devs = s.devices.flatMap((d) => ['--device', d]);
  const args = s.broken
    ? [BROKEN_CLIENT, '--mode', s.broken, ...common, ...devs]
    : [CLI, 'attach', s.kind, ...common, '--json', '--control', ...(s.kind === 'vfio' ? ['--backend', 'soft', ...devs] : [])];
  const child = spawn(process.execPath, args, { stdio: ['pipe', 'pipe', 'pipe'] });
  const p = new ClientProc(child, s.kind, s.name, s.devices, s.broken);
  await p.event('attached', 60_000);
  p.baseline = fdCensus(p.pid);
  return p;
}

/** `mmbroker serve` in its own process: restartable, and its fds counted by the kernel. */
export class BrokerProc {
  /** Warnings and errors it logged (evictions, slow readers), the last few hundred. */
  readonly warnings: string[] = [];
  /** Its descriptors once listening, before any connection: the leaks check's baseline. */
  baseline!: FdCensus;
  private readonly stderr: string[] = [];

  private constructor(readonly child: ChildProcess) {}

  get pid(): number {
    return this.child.pid as number;
  }

  /**
   * `baseline`: the descriptors of an earlier broker process of the same run, measured before any client
   * existed. A restarted broker is measured against it: clients reconnect the moment it listens, so its
   * own census at that moment may already count their connections.
   */
  static async start(socket: string, space: string, ackTimeoutMs: number, baseline?: FdCensus): Promise<BrokerProc> {
    const child = spawn(process.execPath, [
      CLI, 'serve', '--socket', socket, '--space', space, '--ack-timeout', String(ackTimeoutMs),
      // Small enough that a slow reader is cut off after a short flood, large for every real message.
      '--max-outbound', '1M', '--log-level', 'info',
    ], { stdio: ['ignore', 'pipe', 'pipe'] });
    const b = new BrokerProc(child);
    let listening = false;
    lines(child, (l) => {
      if (l.msg === 'listening') listening = true;
      if (typeof l.level === 'number' && l.level >= 40) {
        b.warnings.push(JSON.stringify(l));
        if (b.warnings.length > 300) b.warnings.splice(0, b.warnings.length - 300);
      }
    }, b.stderr);
    await waitFor('the broker to listen', () => {
      if (child.exitCode !== null) throw new Error(`the broker exited: ${b.stderr.join('')}`);
      return listening;
    }, 30_000);
    b.baseline = baseline ?? fdCensus(b.pid);
    return b;
  }

  async stop(sig: NodeJS.Signals): Promise<void> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return;
    this.child.kill(sig);
    await exited(this.child);
  }
}
