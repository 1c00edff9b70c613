// What the tests of examples/ share: building a C example with Debian's msgpack-c, and following a client
// process that prints one line per event (the C subscribers, the Python clients).
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';

/** Why C examples cannot be built here, or undefined if gcc and msgpack-c (libmsgpack-dev) are present. */
export function missingCToolchain(): string | undefined {
  const probe = spawnSync('gcc', ['-x', 'c', '-', '-o', '/dev/null', '-lmsgpackc'], {
    input: '#include <msgpack.h>\nint main(void) { msgpack_sbuffer s; msgpack_sbuffer_init(&s); msgpack_sbuffer_destroy(&s); return 0; }\n',
    encoding: 'utf8',
  });
  if (probe.error) return `gcc is not available (${probe.error.message})`;
  if (probe.status !== 0) return `msgpack-c is not installed (${(probe.stderr.split('\n').find((l) => l.includes('error')) ?? '').trim()})`;
  return undefined;
}

/** `make -C dir`, for a beforeAll: throws with make's output, or with what is missing, when it cannot build. */
export function buildCExample(dir: string): void {
  const missing = missingCToolchain();
  if (missing) throw new Error(`${missing}: CI needs the Debian package libmsgpack-dev (apt-get install libmsgpack-dev)`);
  const r = spawnSync('make', ['-C', dir], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`make -C ${dir} failed:\n${r.stdout}${r.stderr}`);
}

export type Exit = { code: number | null; signal: NodeJS.Signals | null };

/** A running client that prints one line per event on stdout: its lines, stderr and exit. */
export class LineProc {
  readonly child: ChildProcess;
  readonly lines: string[] = [];
  stderr = '';
  exit: Exit | undefined;
  readonly closed: Promise<Exit>;
  private readonly waiters = new Set<() => void>();

  /** `stdin: true` keeps a pipe to the process open for send(); else stdin is /dev/null. */
  constructor(bin: string, args: string[], opts: { stdin?: boolean } = {}) {
    this.child = spawn(bin, args, { stdio: [opts.stdin ? 'pipe' : 'ignore', 'pipe', 'pipe'] });
    let buf = '';
    this.child.stdout?.setEncoding('utf8').on('data', (d: string) => {
      buf += d;
      for (let i = buf.indexOf('\n'); i >= 0; i = buf.indexOf('\n')) {
        this.lines.push(buf.slice(0, i));
        buf = buf.slice(i + 1);
      }
      this.wake();
    });
    this.child.stderr?.setEncoding('utf8').on('data', (d: string) => (this.stderr += d));
    this.closed = new Promise((resolve) =>
      this.child.once('close', (code, signal) => {
        this.exit = { code, signal };
        resolve(this.exit);
        this.wake();
      }),
    );
  }

  get pid(): number {
    return this.child.pid as number;
  }

  /** Writes one line to the process's stdin. */
  send(line: string): void {
    this.child.stdin?.write(`${line}\n`);
  }

  /**
   * The first output line matching `re`, from the start of the transcript: resolves when such a line
   * arrives, and fails with the whole transcript if the process exits first or after `timeoutMs`.
   */
  waitFor(re: RegExp, timeoutMs = 10_000): Promise<RegExpMatchArray> {
    return new Promise((resolve, reject) => {
      const check = (): void => {
        for (const line of this.lines) {
          const m = re.exec(line);
          if (m) return done(() => resolve(m));
        }
        if (this.exit) done(() => reject(this.failure(re, `exited ${JSON.stringify(this.exit)}`)));
      };
      const timer = setTimeout(() => done(() => reject(this.failure(re, 'timed out'))), timeoutMs);
      const done = (settle: () => void): void => {
        clearTimeout(timer);
        this.waiters.delete(check);
        settle();
      };
      this.waiters.add(check);
      check();
    });
  }

  has(re: RegExp): boolean {
    return this.lines.some((l) => re.test(l));
  }

  /** SIGTERM, then SIGKILL if it does not leave within 3 s. */
  async stop(): Promise<Exit> {
    if (!this.exit) this.child.kill('SIGTERM');
    const t = setTimeout(() => this.child.kill('SIGKILL'), 3000);
    const r = await this.closed;
    clearTimeout(t);
    return r;
  }

  private wake(): void {
    for (const w of [...this.waiters]) w();
  }

  private failure(re: RegExp, why: string): Error {
    return new Error(`no line matching ${re} (${why})\nstdout:\n${this.lines.join('\n')}\nstderr:\n${this.stderr}`);
  }
}
