// The command line's conventions, through the real CLI: --version (and in serve's first log line and
// HELLO), usage mistakes in one line with a hint and exit 2, QEMU's size syntax, typed errors with the path
// or value and a hint (never a stack trace), MMBROKER_SOCKET and LOG_LEVEL, SIGHUP reopening the log file,
// SIGUSR1 opening no inspector, readable logs on a terminal, Ctrl-C on a sent `map add`, and pinning
// progress on a terminal.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parseAddress, parseSize, formatSize } from '../cli/args.js';
import { Watcher } from '../clients/index.js';
import { CLI, JsonProc, ROOT, runCli, spawnBroker, stopProcess, tempDir, waitFor } from './helpers/procs.js';
import type { BrokerProc } from '../testkit/broker.js';
import { startClient } from '../testkit/clients.js';

const VERSION = (JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { version: string }).version;
const haveScript = spawnSync('script', ['--version'], { stdio: 'ignore' }).status === 0;

let socket: string;
let broker: BrokerProc;
const children: ChildProcess[] = [];
const noStack = (s: string) => expect(s).not.toMatch(/\n\s+at .*:\d+:\d+/);

beforeAll(async () => {
  socket = path.join(tempDir('mmb-cli-'), 'run', 'b.sock');
  broker = await spawnBroker(socket, ['--space', 'c', '--ack-timeout', '3000']);
});

afterAll(async () => {
  for (const c of children) await stopProcess(c, 'SIGKILL');
  if (broker) expect(await stopProcess(broker)).toBe(0);
});

/** Runs a command under a pseudo-terminal (util-linux script), so that it sees a TTY. */
function underTty(args: string[], env: NodeJS.ProcessEnv = process.env): ChildProcess & { out: string[] } {
  const cmd = [process.execPath, CLI, ...args].map((a) => `'${a.replaceAll("'", "'\\''")}'`).join(' ');
  const child = spawn('script', ['-qfec', cmd, '/dev/null'], { stdio: ['pipe', 'pipe', 'pipe'], env, detached: true }) as ChildProcess & { out: string[] };
  children.push(child);
  child.out = [];
  child.stdout?.setEncoding('utf8').on('data', (d: string) => child.out.push(d));
  return child;
}

describe('mmbroker conventions', () => {
  it('--version, in the first log line of serve, and in HELLO for clients that negotiated WATCH', async () => {
    const v = await runCli(['--version']);
    expect(v.code).toBe(0);
    expect(v.stdout.trim()).toBe(`mmbroker (memmap-broker) ${VERSION}, protocol 1`);
    const first = JSON.parse(broker.text().split('\n')[0] as string) as { msg: string; version: string };
    expect(first).toMatchObject({ msg: `memmap-broker ${VERSION} starting`, version: VERSION });
    const w = await Watcher.attach(socket, { space: 'c' });
    expect(w.brokerVersion).toBe(VERSION);
    w.close();
  });

  it('usage mistakes: one line and a hint to --help, exit 2', async () => {
    for (const [args, what] of [
      [['map', 'add', '--socket', socket, '--space', 'c', '--gpa', '0', '--size', '12X'], /--size "12X" is not a size/],
      [['status', '--bogus'], /Unknown option '--bogus'/],
      [['serve', '--log-level', 'verbose'], /--log-level "verbose" is not a log level: fatal, error, warn, info, debug, trace, silent/],
      [
        ['map', 'add', '--socket', socket, '--space', 'c', '--gpa', '0x10000000000000', '--size', '4k'],
        /--gpa "0x10000000000000" is not an address below 2\^52/,
      ],
      [['migrate', '--socket', socket, '--space', 'c', '--to', '/nonexistent/x.img'], /--to \/nonexistent\/x\.img: the directory \/nonexistent does not exist/],
      [['migrate', '--socket', socket, '--space', 'c', '--to', '/proc/version'], /--to \/proc\/version is on procfs/],
      [['status', '--svg', '/nonexistent/pic.svg'], /--svg \/nonexistent\/pic\.svg: the directory \/nonexistent does not exist/],
    ] as [string[], RegExp][]) {
      const r = await runCli(args);
      expect(r.code, args.join(' ')).toBe(2);
      const lines = r.stderr.trim().split('\n');
      expect(lines, r.stderr).toHaveLength(2);
      expect(lines[0]).toMatch(what);
      expect(lines[0]).toContain('MMB_ERR_INVALID_ARG');
      expect(lines[1]).toMatch(/^Try 'mmbroker [a-z ]+ --help'\.$/);
      expect(r.stdout).toBe('');
    }
    const env = { ...process.env, LOG_LEVEL: 'loud' };
    const r = spawnSync(process.execPath, [CLI, 'serve', '--socket', path.join(tempDir(), 'x.sock')], { encoding: 'utf8', env });
    expect(r.status).toBe(2);
    expect(r.stderr).toMatch(/LOG_LEVEL "loud" is not a log level/);
    const unknown = await runCli(['frobnicate']);
    expect(unknown.code).toBe(2);
    expect(unknown.stderr.trim().split('\n')).toEqual(['mmbroker: unknown command "frobnicate"', "Try 'mmbroker --help'."]);
  });

  it('errors that are not usage mistakes: a code, the path, a hint, exit 1, no stack trace', async () => {
    const missing = await runCli(['status', '--socket', '/nonexistent/broker.sock']);
    expect(missing.code).toBe(1);
    expect(missing.stderr).toContain('MMB_ERR_CONNECT (ENOENT): cannot connect to /nonexistent/broker.sock');
    expect(missing.stderr).toContain('hint: is `mmbroker serve` running at /nonexistent/broker.sock?');
    const twice = await runCli(['serve', '--socket', socket, '--space', 'c']);
    expect(twice.code).toBe(1);
    expect(twice.stderr).toContain(`MMB_ERR_ADDRESS_IN_USE (EADDRINUSE): another broker is already listening on ${socket}`);
    expect(twice.stderr).toMatch(/hint: stop the other broker/);
    for (const r of [missing, twice]) noStack(r.stderr);
    // The running broker was not disturbed.
    expect((await runCli(['status', '--socket', socket, '--json'])).code).toBe(0);
  });

  it('QEMU size syntax for sizes and addresses; one unit style in output', async () => {
    expect(parseSize('128m')).toBe(128 * 2 ** 20);
    expect(parseSize('128M')).toBe(128 * 2 ** 20);
    expect(parseSize('1.5G')).toBe(1.5 * 2 ** 30);
    expect(parseSize('1.5g')).toBe(1.5 * 2 ** 30);
    expect(parseSize('2MiB')).toBe(2 * 2 ** 20);
    expect(parseSize('64KiB')).toBe(64 * 1024);
    expect(parseSize('4k')).toBe(4096);
    expect(parseSize('1t')).toBe(2 ** 40);
    expect(parseSize('0.5k')).toBe(512);
    expect(() => parseSize('1.3k')).toThrow(/not a whole number of bytes/);
    expect(() => parseSize('1.5')).toThrow(/a fraction needs a unit/);
    expect(parseAddress('4G')).toBe(2 ** 32);
    expect(parseAddress('0x1_0000_0000')).toBe(2 ** 32);
    expect(formatSize(128 * 2 ** 20)).toBe('128 MiB');
    expect(formatSize(1.5 * 2 ** 30)).toBe('1536 MiB');
    expect(formatSize(4096)).toBe('4 KiB');
    expect(formatSize(812)).toBe('812 B');
    const add = await runCli(['map', 'add', '--socket', socket, '--space', 'c', '--gpa', '4G', '--size', '1.5m', '--name', 'half']);
    expect(add.code, add.stderr).toBe(0);
    expect(add.stdout).toContain('added region "half" (id 1) at 0x100000000, 1536 KiB');
    expect((await runCli(['map', 'remove', '--socket', socket, '--space', 'c', '--name', 'half'])).code).toBe(0);
  });

  it('MMBROKER_SOCKET stands for --socket', () => {
    const r = spawnSync(process.execPath, [CLI, 'status', '--json'], { encoding: 'utf8', env: { ...process.env, MMBROKER_SOCKET: socket } });
    expect(r.status, r.stderr).toBe(0);
    expect((JSON.parse(r.stdout) as { spaces: { name: string }[] }).spaces.map((s) => s.name)).toEqual(['c']);
  });

  it('serve: SIGHUP reopens --log-file, SIGUSR1 opens no inspector, LOG_LEVEL sets the level', async () => {
    const dir = tempDir('mmb-logs-');
    const log = path.join(dir, 'broker.log');
    const sock = path.join(dir, 'run', 'b.sock');
    const child = spawn(process.execPath, [CLI, 'serve', '--socket', sock, '--space', 'l', '--log-file', log], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, LOG_LEVEL: 'debug' },
    });
    children.push(child);
    const stderr: string[] = [];
    child.stderr?.setEncoding('utf8').on('data', (d: string) => stderr.push(d));
    await waitFor('the log file to say listening', () => fs.existsSync(log) && fs.readFileSync(log, 'utf8').includes('"msg":"listening"'));
    // logrotate: move the file away, then SIGHUP; the broker writes to a new file at the same path.
    fs.renameSync(log, `${log}.1`);
    child.kill('SIGUSR1');
    child.kill('SIGHUP');
    await waitFor('a new log file after SIGHUP', () => fs.existsSync(log) && fs.readFileSync(log, 'utf8').includes('reopened'));
    expect(fs.readFileSync(`${log}.1`, 'utf8')).toContain('"msg":"listening"');
    // Signals are handled in order: SIGUSR1 came first, and opened nothing.
    expect(stderr.join('')).not.toContain('Debugger listening');
    expect(child.exitCode).toBeNull();
    const st = await runCli(['status', '--socket', sock, '--json']);
    expect(st.code).toBe(0);
    // LOG_LEVEL=debug: the connection is logged at debug level.
    await waitFor('a debug line', () => /"level":20,.*"msg":"connected"/.test(fs.readFileSync(log, 'utf8')));
    expect(await stopProcess(child)).toBe(0);
    expect(fs.existsSync(sock)).toBe(false);
  });

  it.skipIf(!haveScript)('serve logs readable lines on a terminal, JSON lines otherwise', async () => {
    const sock = path.join(tempDir('mmb-tty-'), 'run', 'b.sock');
    const tty = underTty(['serve', '--socket', sock, '--space', 't']);
    await waitFor('readable log lines', () => /\d\d:\d\d:\d\d\.\d{3} \S*INFO[^\n]*? listening socket=/.test(tty.out.join('')), 20_000);
    expect(tty.out.join('')).toMatch(new RegExp(`INFO[^\\n]*? memmap-broker ${VERSION.replaceAll('.', '\\.')} starting version=`));
    expect(tty.out.join('')).not.toContain('{"level"');
    process.kill(-(tty.pid as number), 'SIGTERM');
    expect(broker.text()).toMatch(/^\{"level":30,/); // the piped broker: JSON
  });

  it('Ctrl-C on a sent map add says it will still commit, waits for the outcome, and reports it', async () => {
    const held = await startClient({ socket, space: 'c', args: ['--name', 'slowpoke'] });
    children.push(held.child);
    await held.request({ cmd: 'hold-next' }, 'armed');
    const add = spawn(process.execPath, [CLI, 'map', 'add', '--socket', socket, '--space', 'c', '--gpa', '8G', '--size', '2m', '--name', 'ctrlc'], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    children.push(add);
    let out = '';
    let err = '';
    add.stdout.setEncoding('utf8').on('data', (d: string) => (out += d));
    add.stderr.setEncoding('utf8').on('data', (d: string) => (err += d));
    await held.next('holding'); // the transaction is at the subscribers
    add.kill('SIGINT');
    await waitFor('the interruption to be explained', () => err.includes('interrupted'));
    expect(err).toMatch(/interrupted, but the transaction \(generation \d+\) was already sent: the broker will still commit it or roll it back/);
    const code = await new Promise((res) => add.once('exit', res));
    // The held subscriber was evicted at the deadline; the transaction committed, and the command said so.
    expect(code).toBe(0);
    expect(out).toMatch(/generation \d+: added region "ctrlc"/);
    expect(err).toMatch(/note: plain client "slowpoke" .* was evicted: MMB_ERR_CLIENT_TIMEOUT/);
  });

  it.skipIf(!haveScript)('a long map add shows pinning progress on a terminal', async () => {
    const vfio = new JsonProc(
      spawn(
        process.execPath,
        [CLI, 'attach', 'vfio', '--backend', 'soft', '--socket', socket, '--space', 'c', '--name', 'pinner', '--json', '--pin-chunk', '4m'],
        { stdio: ['pipe', 'pipe', 'pipe'] },
      ),
    );
    children.push(vfio.child);
    await vfio.next('attached');
    const tty = underTty(['map', 'add', '--socket', socket, '--space', 'c', '--gpa', '16G', '--size', '256m', '--name', 'big']);
    const code = await new Promise((res) => tty.once('exit', res));
    const text = tty.out.join('');
    expect(code, text).toBe(0);
    expect(text).toMatch(/pinning: pinner has pinned \d+ MiB of \d+ MiB \(\d+%\)/);
    expect(text).toMatch(/generation \d+: added region "big"/);
    // Not on a pipe: the same command piped prints no progress.
    const piped = await runCli(['map', 'remove', '--socket', socket, '--space', 'c', '--name', 'big']);
    expect(piped.stderr).not.toContain('pinning:');
    await vfio.stop('SIGTERM');
  });
});
