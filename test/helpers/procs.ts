// The tests' entry to the testkit (testkit/README.md): the broker launcher, the scripted client, the
// JSON-lines process class and the /proc judge, plus what only tests need (a temporary directory, a CLI
// run to completion).
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { BrokerProc } from '../../testkit/broker.js';
import { startClient } from '../../testkit/clients.js';
import type { JsonProc } from '../../testkit/jsonproc.js';
import { CLI } from '../../testkit/paths.js';

export { CLI, ROOT } from '../../testkit/paths.js';
export { waitFor } from '../../testkit/wait.js';
export { JsonProc, type Event, type Line } from '../../testkit/jsonproc.js';
export { BrokerProc } from '../../testkit/broker.js';
export { memfdMaps, memfdStarts, memfdMappedBytes, fdCount, vmLckKiB } from '../../testkit/procfs.js';

export function tempDir(prefix = 'mmb-test-'): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

/** A scripted plain client (testkit/client.ts) with `extra` options, once it is ready. */
export function spawnSubscriber(socket: string, space: string, extra: string[] = []): Promise<JsonProc> {
  return startClient({ socket, space, args: extra });
}

/**
 * `mmbroker serve --socket SOCKET ARGS...`, once it logged "listening". Its spaces start published
 * (`--published`), as tests of anything but restarts want; `published: false` gives the shipped default
 * (unpublished until an owner publishes).
 */
export function spawnBroker(socket: string, args: string[] = [], opts: { published?: boolean } = {}): Promise<BrokerProc> {
  return BrokerProc.start({ socket, args: [...(opts.published === false ? [] : ['--published']), ...args] });
}

/** Stops a process with `signal` (SIGKILL 10 s later) and resolves with its exit code. */
export async function stopProcess(p: JsonProc | ChildProcess, signal: NodeJS.Signals = 'SIGTERM'): Promise<number | null> {
  if ('request' in p) return p.stop(signal);
  if (p.exitCode !== null || p.signalCode !== null) return p.exitCode;
  const exited = new Promise<number | null>((r) => p.once('exit', (code) => r(code)));
  p.kill(signal);
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
