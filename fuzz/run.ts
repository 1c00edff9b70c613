// The socket fuzzer: hostile sessions (fuzz/generate.ts) against a real broker in its own process, over
// its real socket. After each batch a legitimate owner and subscriber must still complete a hotplug, and
// the broker's /proc/PID/fd count and memfd mappings must return to the baseline. Any line the broker
// logs at level error or above is an unexpected exception; its exit would be a crash.
//
//   npm run fuzz -- --frames 100000 [--seed N] [--json]
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';
import { MappingSubscriber, OwnerClient } from '../clients/index.js';
import { constants, isNativeError, native } from '../native/index.js';
import { closeAll } from '../transport/fds.js';
import { FrameDecoder, isMmbError } from '../protocol/index.js';
import { makeFd, session } from './generate.js';
import { FLOOD_UID, startFlood, type Flood, type FloodTotals } from './flood.js';
import { Rng } from '../testkit/rng.js';
import { parseCount } from '../cli/args.js';
import { fdCount, memfdMappings } from '../testkit/procfs.js';
import { BrokerProc, levelOf } from '../testkit/broker.js';
import { waitFor } from '../testkit/wait.js';

export interface FuzzOptions {
  /** Hostile frames to send in all. */
  frames: number;
  seed?: number;
  /** Sessions between two legitimate checks. Default 100. */
  batch?: number;
  /** Hostile frames per session (after its prologue). Default 6. */
  framesPerSession?: number;
  onBatch?: (done: number, result: FuzzResult) => void;
  /** Before each legitimate check, a pre-HELLO descriptor flood from uid 65534 (fuzz/flood.ts) holds its
   *  connections while the owner hotplugs. Default true; needs root and setpriv. */
  flood?: boolean;
}

export interface FuzzResult {
  frames: number;
  sessions: number;
  batches: number;
  descriptorsSent: number;
  /** Frames the broker sent back to hostile sessions. */
  answers: number;
  /** Typed errors among them, by code: what the hostile frames were refused with. */
  errorCodes: Record<string, number>;
  seconds: number;
  framesPerSecond: number;
  brokerAlive: boolean;
  /** Lines the broker logged at level error or above (an exception it did not expect). */
  unexpectedExceptions: number;
  exceptionSamples: string[];
  /** Largest difference between the broker's fd count after a batch and the baseline. */
  fdLeak: number;
  /** memfd mappings the broker held after a batch, beyond the baseline. */
  mappingLeak: number;
  legitChecks: number;
  legitFailures: string[];
  /** The pre-HELLO flood's figures, or why it did not run. */
  flood: FloodTotals | 'skipped: needs root and setpriv' | 'off';
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
/** Every memfd mapping of a process, whatever its name. */
const memfdMappingCount = (pid: number) => memfdMappings(pid).length;

/**
 * The broker, ready once it logged "listening". It logs at level info (the launcher needs that line);
 * a line at level error or above, or anything that is not a log line (a stack trace), is an exception it
 * did not expect. FUZZ_BROKER_LOG=debug FUZZ_BROKER_LOG_FILE=path keeps every line, e.g. to count the
 * refusals by code.
 */
async function startBroker(socket: string): Promise<{ broker: BrokerProc; errors: string[] }> {
  const errors: string[] = [];
  const tee = process.env.FUZZ_BROKER_LOG_FILE ? fs.createWriteStream(process.env.FUZZ_BROKER_LOG_FILE) : undefined;
  const level = process.env.FUZZ_BROKER_LOG === 'debug' || process.env.FUZZ_BROKER_LOG === 'trace' ? process.env.FUZZ_BROKER_LOG : 'info';
  const broker = await BrokerProc.start({
    socket,
    spaces: ['vm0'],
    args: ['--ack-timeout', '1000'],
    logLevel: level,
    keepLines: 100,
    onLine: (l) => {
      tee?.write(JSON.stringify(l) + '\n');
      if (levelOf(l) >= 50 || l.event === 'text') errors.push(JSON.stringify(l));
    },
  });
  broker.child.stderr?.on('data', (d: string) => errors.push(...d.split('\n').filter(Boolean)));
  return { broker, errors };
}

function connect(socket: string): number | undefined {
  try {
    return native.socketConnect(socket);
  } catch (err) {
    if (isNativeError(err, 'EAGAIN')) return undefined;
    throw err;
  }
}

interface SessionOutcome {
  descriptors: number;
  /** Frames the broker sent back, and the error codes among them (replies, EV_ERROR, EV_GOODBYE). */
  frames: number;
  codes: string[];
}

/**
 * Sends one session's chunks (creating and closing the descriptors it attaches), half-closes, and reads
 * what the broker answers until it hangs up: a fuzzer that hung up at once would make the broker drop the
 * connection at its first reply (EPIPE) and most hostile frames would never be looked at.
 */
async function runSession(socket: string, chunks: ReturnType<typeof session>, tmpFile: string): Promise<SessionOutcome> {
  const out: SessionOutcome = { descriptors: 0, frames: 0, codes: [] };
  let fd: number | undefined;
  for (let tries = 0; fd === undefined && tries < 200; tries++) {
    fd = connect(socket);
    if (fd === undefined) await sleep(5);
  }
  if (fd === undefined) return out;
  const decoder = new FrameDecoder({ maxFrameBytes: 1 << 24, maxFdsPerFrame: 253, maxPendingFds: 1024 });
  const buf = new Uint8Array(1 << 16);
  const read = (): boolean => {
    // Returns false at EOF. Every descriptor the broker sends (backings, bitmaps) is closed at once.
    for (;;) {
      const r = native.recvmsg(fd as number, buf, 253);
      if (r === null) return true;
      if (r.bytes === 0) return false;
      decoder.push(buf.subarray(0, r.bytes), r.fds);
      for (let f = decoder.next(); f; f = decoder.next()) {
        out.frames++;
        closeAll(f.fds);
        const err = f.body.error as { code?: unknown } | undefined;
        if (err && typeof err.code === 'string') out.codes.push(err.code);
      }
    }
  };
  try {
    for (const c of chunks) {
      const made = c.fds.map((k) => makeFd(k, tmpFile));
      try {
        let r: number | null = null;
        for (let tries = 0; tries < 50; tries++) {
          r = native.sendmsg(
            fd,
            c.bytes,
            made.map((m) => m.fd),
          );
          if (r !== null) break;
          read();
          await sleep(2);
        }
        if (r === null) break;
        out.descriptors += made.length;
      } finally {
        for (const m of made) for (const x of [m.fd, ...m.extra]) native.close(x);
      }
    }
    native.shutdown(fd, constants.SHUT_WR);
    for (const end = Date.now() + 2000; read() && Date.now() < end;) await sleep(1);
  } catch (err) {
    // The broker hung up on us (EPIPE, ECONNRESET) or sent what we cannot decode after a fatal error:
    // both are allowed answers to hostile input.
    if (!isNativeError(err) && !isMmbError(err)) throw err;
  } finally {
    closeAll(decoder.dispose());
    native.close(fd);
  }
  return out;
}

/** A legitimate owner and subscriber complete a hotplug; then the space is emptied again. */
async function legitimateHotplug(socket: string, n: number): Promise<string | undefined> {
  let owner: OwnerClient | undefined;
  let sub: MappingSubscriber | undefined;
  try {
    // A hostile session may still hold ownership for a moment after it hung up.
    for (let tries = 0; !owner; tries++) {
      try {
        owner = await OwnerClient.attach(socket, { space: 'vm0', name: 'legit-owner', publish: true });
      } catch (err) {
        if (!isMmbError(err, 'MMB_ERR_OWNER_EXISTS') || tries > 200) throw err;
        await new Promise((r) => setTimeout(r, 10));
      }
    }
    // What hostile owners managed to add goes first.
    const leftovers = (await owner.status('vm0')).spaces[0]?.regions ?? [];
    if (leftovers.length > 0) await owner.commit(leftovers.map((r) => ({ op: 'remove' as const, region: r.id })));
    sub = await MappingSubscriber.attach(socket, { space: 'vm0', name: 'legit-subscriber', reconnect: false });
    const b = await owner.createBacking(1 << 20, `legit${n}`);
    native.close(b.fd);
    await owner.addRegion({ name: `legit${n}`, gpa: await owner.findFree(1 << 20), size: 1 << 20, backing: b.backing });
    if (!sub.regions().some((r) => r.name === `legit${n}`)) return `check ${n}: the subscriber did not get the hotplug`;
    await owner.removeRegion(`legit${n}`);
    await owner.dropBacking(b.backing).catch(() => undefined);
    return undefined;
  } catch (err) {
    return `check ${n}: ${(err as Error).message}`;
  } finally {
    await sub?.close();
    owner?.close();
  }
}

export async function runFuzz(opts: FuzzOptions): Promise<FuzzResult> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'mmb-fuzz-'));
  const socket = path.join(dir, 'broker.sock');
  const tmpFile = path.join(dir, 'plain-file');
  fs.writeFileSync(tmpFile, Buffer.alloc(1 << 20));
  const { broker, errors } = await startBroker(socket);
  const child = broker.child;
  const pid = broker.pid;
  // The flood's uid (on no owner list) must be able to connect at all: the allow-lists then decide.
  let flood: Flood | undefined;
  if (opts.flood !== false) {
    fs.chmodSync(dir, 0o755);
    fs.chmodSync(socket, 0o666);
    flood = startFlood(socket);
  }
  const rng = new Rng(opts.seed ?? 1);
  const per = opts.framesPerSession ?? 6;
  const batch = opts.batch ?? 100;
  const result: FuzzResult = {
    frames: 0,
    sessions: 0,
    batches: 0,
    descriptorsSent: 0,
    answers: 0,
    errorCodes: {},
    seconds: 0,
    framesPerSecond: 0,
    brokerAlive: true,
    unexpectedExceptions: 0,
    exceptionSamples: [],
    fdLeak: 0,
    mappingLeak: 0,
    legitChecks: 0,
    legitFailures: [],
    flood: opts.flood === false ? 'off' : flood ? flood.totals : 'skipped: needs root and setpriv',
  };
  const started = performance.now();
  try {
    // The baseline, after one legitimate round trip with nothing else connected.
    const first = await legitimateHotplug(socket, 0);
    if (first) result.legitFailures.push(first);
    await new Promise((r) => setTimeout(r, 100));
    const baseFds = fdCount(pid);
    const baseMaps = memfdMappingCount(pid);
    while (result.frames < opts.frames && child.exitCode === null) {
      for (let i = 0; i < batch && result.frames < opts.frames; i++) {
        const chunks = session(rng, per);
        const o = await runSession(socket, chunks, tmpFile);
        result.descriptorsSent += o.descriptors;
        result.answers += o.frames;
        for (const c of o.codes) result.errorCodes[c] = (result.errorCodes[c] ?? 0) + 1;
        result.frames += chunks.length;
        result.sessions++;
      }
      result.batches++;
      if (child.exitCode !== null) break;
      // The owner hotplugs while uid FLOOD_UID holds a round of pre-HELLO descriptor flooding open.
      if (flood) {
        await flood.round();
        flood.totals.brokerFdsMax = Math.max(flood.totals.brokerFdsMax, fdCount(pid));
      }
      const failure = await legitimateHotplug(socket, result.batches);
      await flood?.release();
      result.legitChecks++;
      if (failure) result.legitFailures.push(failure);
      // Released by now, or the leak figures below say how much was not.
      await waitFor('the broker to release the session', () => fdCount(pid) <= baseFds && memfdMappingCount(pid) <= baseMaps, 5000).catch(() => undefined);
      result.fdLeak = Math.max(result.fdLeak, fdCount(pid) - baseFds);
      result.mappingLeak = Math.max(result.mappingLeak, memfdMappingCount(pid) - baseMaps);
      result.seconds = +((performance.now() - started) / 1000).toFixed(2);
      opts.onBatch?.(result.frames, result);
    }
  } finally {
    await flood?.stop().catch(() => undefined);
    result.brokerAlive = child.exitCode === null && child.signalCode === null;
    result.unexpectedExceptions = errors.length;
    result.exceptionSamples = errors.slice(0, 5);
    result.seconds = +((performance.now() - started) / 1000).toFixed(2);
    result.framesPerSecond = Math.round(result.frames / Math.max(result.seconds, 1e-3));
    await broker.stop('SIGTERM');
    fs.rmSync(dir, { recursive: true, force: true });
  }
  return result;
}

async function main(): Promise<void> {
  const { values } = parseArgs({ options: { frames: { type: 'string' }, seed: { type: 'string' }, batch: { type: 'string' }, json: { type: 'boolean' } } });
  const frames = values.frames === undefined ? 100_000 : parseCount(values.frames, '--frames');
  const json = values.json ?? false;
  const result = await runFuzz({
    frames,
    seed: values.seed === undefined ? 1 : parseCount(values.seed, '--seed'),
    ...(values.batch ? { batch: parseCount(values.batch, '--batch') } : {}),
    onBatch: (done, r) => {
      if (!json && r.batches % 20 === 0) console.log(`  ${done} frames, ${r.legitChecks} legitimate hotplugs, fd leak ${r.fdLeak}, ${r.seconds} s`);
    },
  });
  if (json) console.log(JSON.stringify(result, null, 2));
  else {
    console.log(
      `${result.frames} hostile frames in ${result.sessions} sessions (${result.descriptorsSent} descriptors attached), ${result.seconds} s, ${result.framesPerSecond} frames/s\n` +
        `broker alive: ${result.brokerAlive}; unexpected exceptions: ${result.unexpectedExceptions}; leaked fds: ${result.fdLeak}; leaked memfd mappings: ${result.mappingLeak}; ` +
        `legitimate hotplugs: ${result.legitChecks - result.legitFailures.length} of ${result.legitChecks}`,
    );
    const codes = Object.entries(result.errorCodes).sort((a, b) => b[1] - a[1]);
    console.log(`${result.answers} frames answered; typed refusals by code: ${codes.map(([c, n]) => `${c.replace('MMB_ERR_', '')} ${n}`).join(', ')}`);
    const f = result.flood;
    if (typeof f === 'string') console.log(`pre-HELLO flood: ${f}`);
    else {
      const codes = Object.entries(f.codes)
        .sort((a, b) => b[1] - a[1])
        .map(([c, n]) => `${c.replace('MMB_ERR_', '')} ${n}`)
        .join(', ');
      console.log(
        `pre-HELLO flood as uid ${FLOOD_UID}: ${f.rounds} rounds, ${f.attempted} connections tried, ${f.connected} connected, ${f.fdsSent} descriptors sent; ` +
          `the broker closed ${f.closedByBroker} (${codes}); connect failures: ${JSON.stringify(f.connectFailed)}; broker fds at most ${f.brokerFdsMax} while flooded`,
      );
    }
    for (const f of result.legitFailures.slice(0, 5)) console.log(`  failed: ${f}`);
    for (const e of result.exceptionSamples) console.log(`  broker: ${e}`);
  }
  const clean = result.brokerAlive && result.unexpectedExceptions === 0 && result.fdLeak === 0 && result.mappingLeak === 0 && result.legitFailures.length === 0;
  process.exitCode = clean ? 0 : 1;
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) await main();
