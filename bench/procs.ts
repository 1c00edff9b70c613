// Helper processes of the benchmarks (bench/fixtures/*.ts, run from dist/): spawned with node, optionally
// under `taskset -c CPUS`, talking JSON lines on stdout, stopped by closing their stdin (or by PID).
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import readline from 'node:readline';

export class Child {
  private readonly lines: string[] = [];
  private readonly waiting: ((line: string | undefined) => void)[] = [];
  private ended = false;
  readonly exited: Promise<number | null>;
  private stderr = '';

  private constructor(
    readonly name: string,
    readonly proc: ChildProcess,
  ) {
    this.exited = new Promise((resolve) => proc.once('exit', (code) => resolve(code)));
    proc.stderr?.setEncoding('utf8').on('data', (d: string) => {
      this.stderr = (this.stderr + d).slice(-4000);
    });
    readline
      .createInterface({ input: proc.stdout! })
      .on('line', (line) => {
        const w = this.waiting.shift();
        if (w) w(line);
        else this.lines.push(line);
      })
      .on('close', () => {
        this.ended = true;
        for (const w of this.waiting.splice(0)) w(undefined);
      });
  }

  /**
   * Runs dist/bench/fixtures/FIXTURE.js with `args`; under taskset when `cpus` is given. MMB_BENCH_NODE_ARGS
   * (space-separated) is passed to every such node, for profiling: node refuses --cpu-prof in NODE_OPTIONS,
   * so `MMB_BENCH_NODE_ARGS='--cpu-prof --cpu-prof-dir=DIR'` is how a benchmark's helper processes get it.
   */
  static spawn(fixture: string, args: readonly string[], opts: { cpus?: string; name?: string; nodeArgs?: readonly string[]; extraFds?: readonly number[] } = {}): Child {
    const script = new URL(`./fixtures/${fixture}.js`, import.meta.url).pathname;
    const fromEnv = (process.env.MMB_BENCH_NODE_ARGS ?? '').split(' ').filter(Boolean);
    const argv = [process.execPath, ...fromEnv, ...(opts.nodeArgs ?? []), script, ...args];
    const full = opts.cpus !== undefined ? ['taskset', '-c', opts.cpus, ...argv] : argv;
    const proc = spawn(full[0] as string, full.slice(1), { stdio: ['pipe', 'pipe', 'pipe', ...(opts.extraFds ?? [])] });
    return new Child(opts.name ?? fixture, proc);
  }

  get pid(): number {
    return this.proc.pid as number;
  }

  /** The next line it printed, parsed as JSON; throws (with its stderr) if it exited first. */
  async next<T = Record<string, unknown>>(): Promise<T> {
    const line = this.lines.shift() ?? (this.ended ? undefined : await new Promise<string | undefined>((r) => this.waiting.push(r)));
    if (line === undefined) {
      const code = await this.exited;
      throw new Error(`${this.name} (pid ${this.pid}) exited (${code}) without answering: ${this.stderr.trim()}`);
    }
    return JSON.parse(line) as T;
  }

  send(line: string): void {
    this.proc.stdin?.write(line + '\n');
  }

  /** Closes its stdin (a fixture's signal to finish) and waits; SIGKILL by PID after `graceMs`. */
  async stop(graceMs = 5000): Promise<void> {
    if (this.proc.exitCode !== null || this.proc.signalCode !== null) return;
    this.proc.stdin?.end();
    const t = setTimeout(() => {
      try {
        process.kill(this.pid, 'SIGKILL');
      } catch {
        // Gone meanwhile.
      }
    }, graceMs);
    await this.exited;
    clearTimeout(t);
  }
}

/** `n` subscriber processes (fixtures/subscriber.ts) attached and synced; they answer "stats". */
export async function spawnSubscribers(n: number, socket: string, space: string, mode: 'map' | 'record', cpus?: string): Promise<Child[]> {
  const subs = Array.from({ length: n }, (_, i) => Child.spawn('subscriber', [socket, space, `sub${i}`, mode], { name: `subscriber ${i}`, ...(cpus !== undefined ? { cpus } : {}) }));
  try {
    await Promise.all(subs.map((s) => s.next()));
  } catch (err) {
    await stopAll(subs);
    throw err;
  }
  return subs;
}

export async function stopAll(children: readonly Child[]): Promise<void> {
  await Promise.all(children.map((c) => c.stop()));
}

export interface SubscriberStats {
  committed: number;
  generation: number;
  regions: number;
}

/** Each subscriber's own count of committed transactions, its generation and its regions. */
export async function statsOf(subs: readonly Child[]): Promise<SubscriberStats[]> {
  return Promise.all(
    subs.map((s) => {
      s.send('stats');
      return s.next<SubscriberStats>();
    }),
  );
}

/**
 * Nanoseconds of CPU that process `pid` (all its threads) has used so far, from the kernel's
 * /proc/PID/task/TID/schedstat (its first field: time spent on a CPU). 0 for a process that is gone.
 */
export function cpuNs(pid: number | 'self'): number {
  let total = 0;
  let tasks: string[];
  try {
    tasks = fs.readdirSync(`/proc/${pid}/task`);
  } catch {
    return 0;
  }
  for (const t of tasks) {
    try {
      total += Number(fs.readFileSync(`/proc/${pid}/task/${t}/schedstat`, 'utf8').split(' ')[0]);
    } catch {
      // The thread ended meanwhile.
    }
  }
  return total;
}

/** CPU time of several processes together. */
export const cpuNsOf = (pids: readonly (number | 'self')[]): number => pids.reduce<number>((n, p) => n + cpuNs(p), 0);
