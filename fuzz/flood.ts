// The fuzzer's pre-HELLO descriptor flood (issue 14), run as uid 65534 so that it is a local user on no
// owner list: the worker (flood-worker.ts) and the native addon are copied into a directory that uid may
// read (the checkout may sit under a 0700 directory) and started through setpriv. Needs root and setpriv;
// elsewhere startFlood() returns undefined and the run says the flood was skipped.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const FLOOD_UID = 65534;

export interface FloodRound {
  attempted: number;
  connected: number;
  connectFailed: Record<string, number>;
  fdsSent: number;
  /** Codes the broker sent the flood's connections (EV_GOODBYE), and send errors after it hung up. */
  codes: Record<string, number>;
  closedByBroker: number;
}

export interface FloodTotals {
  rounds: number;
  attempted: number;
  connected: number;
  fdsSent: number;
  closedByBroker: number;
  codes: Record<string, number>;
  connectFailed: Record<string, number>;
  /** The broker's largest /proc/PID/fd count while a round's connections were held. */
  brokerFdsMax: number;
}

export interface Flood {
  /** Runs one round; resolves once its connections are open and what the broker answered is counted. */
  round(): Promise<FloodRound>;
  /** Closes the round's connections. */
  release(): Promise<void>;
  stop(): Promise<void>;
  totals: FloodTotals;
}

const here = path.dirname(fileURLToPath(import.meta.url));
// dist/fuzz/ when compiled; fuzz/ under vitest, whose compiled twin is in dist/fuzz/.
const distFuzz = path.basename(path.dirname(here)) === 'dist' ? here : path.join(here, '../dist/fuzz');

export const canFlood = (): boolean => process.getuid?.() === 0 && spawnSync('setpriv', ['--version']).status === 0;

/** Starts the worker as uid 65534 against `socket` (which that uid must be able to connect to). */
export function startFlood(socket: string, pending = 76, singles = 1000): Flood | undefined {
  if (!canFlood()) return undefined;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'mmb-flood-'));
  const put = (from: string, to: string): void => {
    fs.mkdirSync(path.dirname(path.join(dir, to)), { recursive: true, mode: 0o755 });
    fs.copyFileSync(from, path.join(dir, to));
    fs.chmodSync(path.join(dir, to), 0o644);
  };
  put(path.join(distFuzz, 'flood-worker.js'), 'dist/fuzz/flood-worker.js');
  put(path.join(distFuzz, '../native/index.js'), 'dist/native/index.js');
  put(path.join(distFuzz, '../../build/Release/mmb_native.node'), 'build/Release/mmb_native.node');
  // The addon's loader (native/index.ts) finds the addon through node-gyp-build, a runtime dependency.
  const ngb = path.join(distFuzz, '../../node_modules/node-gyp-build');
  for (const f of fs.readdirSync(ngb)) if (f.endsWith('.js') || f === 'package.json') put(path.join(ngb, f), `node_modules/node-gyp-build/${f}`);
  fs.writeFileSync(path.join(dir, 'package.json'), '{"type":"module"}\n', { mode: 0o644 });
  for (const d of [dir, `${dir}/dist`, `${dir}/dist/fuzz`, `${dir}/dist/native`, `${dir}/build`, `${dir}/build/Release`, `${dir}/node_modules`, `${dir}/node_modules/node-gyp-build`]) fs.chmodSync(d, 0o755);
  const child: ChildProcess = spawn(
    'setpriv',
    ['--reuid', String(FLOOD_UID), '--regid', String(FLOOD_UID), '--clear-groups', '--', process.execPath, path.join(dir, 'dist/fuzz/flood-worker.js'), socket, String(pending), String(singles)],
    { stdio: ['pipe', 'pipe', 'pipe'] },
  );
  const lines: object[] = [];
  const waiting: ((l: object) => void)[] = [];
  let err = '';
  let buf = '';
  child.stderr?.setEncoding('utf8').on('data', (d: string) => (err += d));
  child.stdout?.setEncoding('utf8').on('data', (d: string) => {
    buf += d;
    for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
      const l = JSON.parse(buf.slice(0, nl)) as object;
      buf = buf.slice(nl + 1);
      const w = waiting.shift();
      if (w) w(l);
      else lines.push(l);
    }
  });
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  const next = (): Promise<object> =>
    lines.length > 0
      ? Promise.resolve(lines.shift() as object)
      : new Promise((resolve, reject) => {
          waiting.push(resolve);
          void exited.then(() => reject(new Error(`the flood worker exited: ${err}`)));
        });
  const totals: FloodTotals = { rounds: 0, attempted: 0, connected: 0, fdsSent: 0, closedByBroker: 0, codes: {}, connectFailed: {}, brokerFdsMax: 0 };
  const add = (into: Record<string, number>, from: Record<string, number>): void => {
    for (const [k, v] of Object.entries(from)) into[k] = (into[k] ?? 0) + v;
  };
  return {
    totals,
    async round() {
      child.stdin?.write('flood\n');
      const { round } = (await next()) as { round: FloodRound };
      totals.rounds++;
      totals.attempted += round.attempted;
      totals.connected += round.connected;
      totals.fdsSent += round.fdsSent;
      totals.closedByBroker += round.closedByBroker;
      add(totals.codes, round.codes);
      add(totals.connectFailed, round.connectFailed);
      return round;
    },
    async release() {
      child.stdin?.write('release\n');
      await next();
    },
    async stop() {
      child.stdin?.end();
      await exited;
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}
