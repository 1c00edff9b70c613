// Helpers for tests that use real processes and check the kernel's view of them.
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import { JsonProc, waitFor } from '../../cli/child.js';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const ROOT = fileURLToPath(new URL('../..', import.meta.url));
export const CLI = path.join(ROOT, 'dist/cli/mmbroker.js');
const SUBSCRIBER = path.join(ROOT, 'test/helpers/subscriber-proc.mjs');

export function tempDir(prefix = 'mmb-test-'): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

export { waitFor, JsonProc, type Event } from '../../cli/child.js';
export { memfdMaps, memfdStarts, memfdMappedBytes, fdCount, vmLckKiB } from '../../cli/procfs.js';

export async function spawnSubscriber(socket: string, space: string, extra: string[] = []): Promise<JsonProc> {
  const child = spawn(process.execPath, [SUBSCRIBER, '--socket', socket, '--space', space, ...extra], { stdio: ['pipe', 'pipe', 'pipe'] });
  const p = new JsonProc(child);
  await p.next('ready');
  return p;
}

/**
 * Runs `mmbroker serve` in its own process; resolves once its socket accepts connections. Its spaces start
 * published (`--published`), as tests of anything but restarts want; `published: false` gives the
 * shipped default (unpublished until an owner publishes).
 */
export async function spawnBroker(socket: string, args: string[] = [], opts: { published?: boolean } = {}): Promise<ChildProcess & { logs: string[] }> {
  const publish = opts.published === false ? [] : ['--published'];
  const child = spawn(process.execPath, [CLI, 'serve', '--socket', socket, '--log-level', 'info', ...publish, ...args], { stdio: ['ignore', 'pipe', 'pipe'] }) as ChildProcess & { logs: string[] };
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
