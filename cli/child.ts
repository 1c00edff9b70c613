// A child process that prints one JSON object per line (`mmbroker attach --json --control`, the test
// subscriber): every line is kept, and callers wait for the next event of a kind or send a command and
// wait for its answer.
import type { ChildProcess } from 'node:child_process';
import readline from 'node:readline';

export interface Event {
  event: string;
  [k: string]: unknown;
}

export async function waitFor<T>(what: string, check: () => T | undefined | false | Promise<T | undefined | false>, timeoutMs = 10_000): Promise<T> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = await check();
    if (v !== undefined && v !== false) return v;
    if (Date.now() > end) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

export class JsonProc {
  readonly events: Event[] = [];
  readonly stderr: string[] = [];
  private cursor = 0;

  constructor(readonly child: ChildProcess) {
    const rl = readline.createInterface({ input: child.stdout! });
    rl.on('line', (line) => {
      try {
        this.events.push(JSON.parse(line) as Event);
      } catch {
        this.events.push({ event: 'text', line });
      }
    });
    child.stderr?.setEncoding('utf8');
    child.stderr?.on('data', (d: string) => this.stderr.push(d));
  }

  get pid(): number {
    return this.child.pid as number;
  }

  send(cmd: Record<string, unknown>): void {
    this.child.stdin?.write(JSON.stringify(cmd) + '\n');
  }

  /** The next event (after the last one returned) of that kind that matches. */
  async next(event: string, match: (e: Event) => boolean = () => true, timeoutMs = 10_000): Promise<Event> {
    return waitFor(`event ${event} from pid ${this.pid} (stderr: ${this.stderr.join('').slice(-500)})`, () => {
      for (let i = this.cursor; i < this.events.length; i++) {
        const e = this.events[i] as Event;
        if (e.event === event && match(e)) {
          this.cursor = i + 1;
          return e;
        }
      }
      if (this.child.exitCode !== null) throw new Error(`pid ${this.pid} exited with ${this.child.exitCode}: ${this.stderr.join('').slice(-2000)}`);
      return undefined;
    }, timeoutMs);
  }

  /** Sends a command and returns its answer (the next event named `reply`, or a `failed` one). */
  async request(cmd: Record<string, unknown>, reply: string, timeoutMs = 10_000): Promise<Event> {
    this.send(cmd);
    return this.next(reply, () => true, timeoutMs);
  }

  /** Stops the process (SIGTERM, SIGKILL after a grace period). */
  async stop(signal: NodeJS.Signals = 'SIGKILL', graceMs = 2000): Promise<void> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return;
    const exited = new Promise((r) => this.child.once('exit', r));
    this.child.kill(signal);
    const timer = setTimeout(() => this.child.kill('SIGKILL'), graceMs);
    await exited;
    clearTimeout(timer);
  }
}
