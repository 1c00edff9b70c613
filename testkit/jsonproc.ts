// The one class for a child process that talks JSON lines: it prints one JSON object per line on stdout
// (events, replies, a pino log) and may read one command per line on stdin (the control protocol in
// README.md). Every line is offered to whoever waits for it; which lines are kept for later, and how
// many, is the caller's choice (a soak keeps a few kinds for hours, a test keeps everything).
import { spawn, type ChildProcess, type StdioOptions } from 'node:child_process';
import readline from 'node:readline';

/** One line of output: a JSON object (a line that is not JSON becomes {event: 'text', text}). */
export interface Line {
  event?: string;
  [k: string]: unknown;
}

/** A line that names its event (what scripted processes print). */
export interface Event extends Line {
  event: string;
}

export interface JsonProcOptions {
  /** How the process is called in errors (default: `pid N`). */
  name?: string;
  /** Lines kept for next() once nobody waits for them (default: every line). */
  keep?: (line: Line) => boolean;
  /** Most lines kept; the oldest go first (default: no bound). */
  limit?: number;
  /** Characters of stderr kept for error messages (default 64 KiB). */
  stderrLimit?: number;
  /** Called with every line as it arrives, kept or not. */
  onLine?: (line: Line) => void;
}

export interface SpawnOptions extends JsonProcOptions {
  env?: NodeJS.ProcessEnv;
  cwd?: string;
  /** Node options before the script (`--import`, `--expose-gc`). */
  nodeArgs?: readonly string[];
  /** Run under `taskset -c CPUS`. */
  cpus?: string;
  /** A command that runs node (`setpriv ... --`, `prlimit ... --`), outside `taskset`. */
  prefix?: readonly string[];
  /** Descriptors passed as fd 3, 4, ... */
  extraFds?: readonly number[];
  /** stdin: a pipe (default, for commands) or ignored. */
  stdin?: 'pipe' | 'ignore';
}

/** `[prefix] [taskset -c CPUS] node [nodeArgs] script args...`, stdout and stderr piped. */
export function spawnNode(script: string, args: readonly string[], opts: SpawnOptions = {}): ChildProcess {
  const argv = [process.execPath, ...(opts.nodeArgs ?? []), script, ...args];
  const full = [...(opts.prefix ?? []), ...(opts.cpus !== undefined ? ['taskset', '-c', opts.cpus] : []), ...argv];
  const stdio: StdioOptions = [opts.stdin ?? 'pipe', 'pipe', 'pipe', ...(opts.extraFds ?? [])];
  return spawn(full[0] as string, full.slice(1), { stdio, ...(opts.env ? { env: opts.env } : {}), ...(opts.cwd ? { cwd: opts.cwd } : {}) });
}

interface Waiter {
  match: (l: Line) => boolean;
  resolve: (l: Line) => void;
  reject: (err: Error) => void;
}

export class JsonProc {
  /** Kept lines, oldest first; `lines[0]` is line number `base` of the kept sequence. */
  readonly lines: Line[] = [];
  /** What it wrote on stderr, in the chunks read, the oldest dropped beyond `stderrLimit` characters. */
  readonly stderr: string[] = [];
  private stderrChars = 0;
  private base = 0;
  private cursor = 0;
  private ended = false;
  private readonly waiters = new Set<Waiter>();
  private queue: Promise<unknown> = Promise.resolve();
  /** Resolves once the process has exited (with its code, or null after a signal). */
  readonly exited: Promise<number | null>;

  constructor(
    readonly child: ChildProcess,
    private readonly opts: JsonProcOptions = {},
  ) {
    this.exited =
      child.exitCode !== null || child.signalCode !== null ? Promise.resolve(child.exitCode) : new Promise((r) => child.once('exit', (code) => r(code)));
    if (child.stdout) {
      readline
        .createInterface({ input: child.stdout })
        .on('line', (text) => this.onLine(text))
        .on('close', () => {
          this.ended = true;
          const err = this.endedError();
          for (const w of this.waiters) w.reject(err);
          this.waiters.clear();
        });
    } else this.ended = true;
    child.stderr?.setEncoding('utf8').on('data', (d: string) => {
      const max = this.opts.stderrLimit ?? 64 * 1024;
      this.stderr.push(d);
      this.stderrChars += d.length;
      while (this.stderrChars > max && this.stderr.length > 1) this.stderrChars -= (this.stderr.shift() as string).length;
    });
  }

  /** Starts `node [nodeArgs] script args...` with stdout and stderr piped. */
  static spawn(script: string, args: readonly string[], opts: SpawnOptions = {}): JsonProc {
    return new JsonProc(spawnNode(script, args, opts), opts);
  }

  get pid(): number {
    return this.child.pid as number;
  }

  /** True once the process has exited. */
  get gone(): boolean {
    return this.child.exitCode !== null || this.child.signalCode !== null;
  }

  /** The last `chars` characters it wrote on stderr. */
  stderrTail(chars = 2000): string {
    return this.stderr.join('').slice(-chars);
  }

  describe(): string {
    return this.opts.name ?? `pid ${this.pid}`;
  }

  private endedError(): Error {
    const how = this.child.exitCode ?? this.child.signalCode ?? 'closed its stdout';
    return new Error(`${this.describe()} exited (${how}): ${this.stderrTail(1000)}`);
  }

  private onLine(text: string): void {
    let line: Line;
    try {
      const v: unknown = JSON.parse(text);
      line = v !== null && typeof v === 'object' && !Array.isArray(v) ? (v as Line) : { event: 'text', text };
    } catch {
      line = { event: 'text', text };
    }
    this.opts.onLine?.(line);
    const keep = this.opts.keep?.(line) ?? true;
    if (keep) {
      this.lines.push(line);
      const limit = this.opts.limit;
      if (limit !== undefined && this.lines.length > limit) {
        const drop = this.lines.length - limit;
        this.lines.splice(0, drop);
        this.base += drop;
        this.cursor = Math.max(this.cursor, this.base);
      }
    }
    for (const w of this.waiters) {
      if (!w.match(line)) continue;
      this.waiters.delete(w);
      // A kept line that satisfied a wait is consumed: later waits start after it.
      if (keep) this.cursor = this.base + this.lines.length;
      w.resolve(line);
      return;
    }
  }

  private wait(what: string, match: (l: Line) => boolean, timeoutMs: number): Promise<Line> {
    return new Promise<Line>((resolve, reject) => {
      if (this.ended) return reject(this.endedError());
      let timer: NodeJS.Timeout | undefined;
      const w: Waiter = {
        match,
        resolve: (l) => {
          clearTimeout(timer);
          resolve(l);
        },
        reject: (err) => {
          clearTimeout(timer);
          reject(err);
        },
      };
      timer = setTimeout(() => {
        this.waiters.delete(w);
        reject(new Error(`${this.describe()}: timed out after ${timeoutMs} ms waiting for ${what} (stderr: ${this.stderrTail(500)})`));
      }, timeoutMs);
      this.waiters.add(w);
    });
  }

  /**
   * The next kept line after the last one returned whose `event` is `event` (any line when undefined) and
   * that `match` accepts; lines skipped on the way stay in `lines` but are not returned by next() again.
   * Throws if the process ends first.
   */
  next<T = Line>(event?: string, match: (l: Line) => boolean = () => true, timeoutMs = 20_000): Promise<T> {
    const ok = (l: Line) => (event === undefined || l.event === event) && match(l);
    for (let i = this.cursor - this.base; i < this.lines.length; i++) {
      const l = this.lines[i] as Line;
      if (ok(l)) {
        this.cursor = this.base + i + 1;
        return Promise.resolve(l as T);
      }
    }
    return this.wait(event === undefined ? 'its next line' : `event ${event}`, ok, timeoutMs) as Promise<T>;
  }

  /** Writes one line on its stdin: a command object, or a raw line. */
  send(cmd: Record<string, unknown> | string): void {
    this.child.stdin?.write((typeof cmd === 'string' ? cmd : JSON.stringify(cmd)) + '\n');
  }

  /**
   * Sends a command and resolves with its reply: the next line whose event is `reply`, or the command's
   * `failed` line. One command at a time: requests queue behind each other, so replies cannot cross.
   */
  request<T = Line>(cmd: Record<string, unknown> & { cmd: string }, reply: string, timeoutMs = 20_000): Promise<T> {
    const run = () => {
      const answer = this.wait(`the reply ${reply} to ${cmd.cmd}`, (l) => l.event === reply || (l.event === 'failed' && l.cmd === cmd.cmd), timeoutMs);
      this.send(cmd);
      return answer;
    };
    const p = this.queue.then(run, run);
    this.queue = p.catch(() => undefined);
    return p as Promise<T>;
  }

  signal(sig: NodeJS.Signals): void {
    if (!this.gone) this.child.kill(sig);
  }

  /**
   * Stops the process: with `how` (default SIGKILL, a test's cleanup; SIGTERM for a clean exit), or
   * 'end-stdin' to close its stdin (a fixture's cue to finish); SIGKILL after `graceMs`. Resolves with its
   * exit code (null if a signal ended it).
   */
  async stop(how: NodeJS.Signals | 'end-stdin' = 'SIGKILL', graceMs = 10_000): Promise<number | null> {
    if (!this.gone) {
      if (how === 'end-stdin') this.child.stdin?.end();
      else this.child.kill(how);
      const timer = setTimeout(() => this.signal('SIGKILL'), graceMs);
      await this.exited;
      clearTimeout(timer);
    }
    return this.child.exitCode;
  }
}
