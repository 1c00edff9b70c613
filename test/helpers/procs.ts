// Helpers for tests that use real processes and check the kernel's view of them.
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';

export const ROOT = fileURLToPath(new URL('../..', import.meta.url));
export const CLI = path.join(ROOT, 'dist/cli/mmbroker.js');
const SUBSCRIBER = path.join(ROOT, 'test/helpers/subscriber-proc.mjs');

export function tempDir(prefix = 'mmb-test-'): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
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

/** Lines of /proc/PID/maps that map the memfd called `name`. */
export function memfdMaps(pid: number, name: string): string[] {
  return fs
    .readFileSync(`/proc/${pid}/maps`, 'utf8')
    .split('\n')
    .filter((l) => / \/memfd:(.*?)(?: \(deleted\))?$/.exec(l)?.[1] === name);
}

/** Start addresses (hex, as in /proc/PID/maps) of mappings of memfd `name`. */
export function memfdStarts(pid: number, name: string): string[] {
  return memfdMaps(pid, name).map((l) => l.split('-')[0] as string);
}

export function fdCount(pid: number | 'self' = 'self'): number {
  return fs.readdirSync(`/proc/${pid}/fd`).length;
}

export function vmLckKiB(pid: number | 'self' = 'self'): number {
  const m = /^VmLck:\s+(\d+) kB$/m.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  return Number(m?.[1] ?? NaN);
}

export interface Event {
  event: string;
  [k: string]: unknown;
}

/** A child process speaking JSON lines, with a log of every event it printed. */
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

  /** The next event (after the last one returned) that matches. */
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

  async request(cmd: Record<string, unknown>, reply: string): Promise<Event> {
    this.send(cmd);
    return this.next(reply);
  }

  async stop(): Promise<void> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return;
    const exited = new Promise((r) => this.child.once('exit', r));
    this.child.kill('SIGKILL');
    await exited;
  }
}

export async function spawnSubscriber(socket: string, space: string, extra: string[] = []): Promise<JsonProc> {
  const child = spawn(process.execPath, [SUBSCRIBER, '--socket', socket, '--space', space, ...extra], { stdio: ['pipe', 'pipe', 'pipe'] });
  const p = new JsonProc(child);
  await p.next('ready');
  return p;
}

/** Runs `mmbroker serve` in its own process; resolves once its socket accepts connections. */
export async function spawnBroker(socket: string, args: string[] = []): Promise<ChildProcess & { logs: string[] }> {
  const child = spawn(process.execPath, [CLI, 'serve', '--socket', socket, '--log-level', 'info', ...args], { stdio: ['ignore', 'pipe', 'pipe'] }) as ChildProcess & { logs: string[] };
  child.logs = [];
  child.stdout?.setEncoding('utf8');
  child.stdout?.on('data', (d: string) => child.logs.push(d));
  child.stderr?.setEncoding('utf8');
  child.stderr?.on('data', (d: string) => child.logs.push(d));
  await waitFor('the broker to listen', () => child.logs.join('').includes('"listening"') || (child.exitCode !== null ? (() => { throw new Error(child.logs.join('')); })() : false));
  return child;
}

export async function stopProcess(child: ChildProcess, signal: NodeJS.Signals = 'SIGTERM'): Promise<number | null> {
  if (child.exitCode !== null || child.signalCode !== null) return child.exitCode;
  const exited = new Promise<number | null>((r) => child.once('exit', (code) => r(code)));
  child.kill(signal);
  return exited;
}

/** Runs the CLI to completion. */
export function runCli(args: string[], timeoutMs = 20_000): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [CLI, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`mmbroker ${args.join(' ')} timed out; stderr: ${stderr}`));
    }, timeoutMs);
    child.on('exit', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}
