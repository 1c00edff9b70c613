// Helper processes of the benchmarks (bench/fixtures/*.ts, run from dist/): the testkit's JSON-lines
// processes, optionally under `taskset -c CPUS`, stopped by closing their stdin (or by PID), and their
// CPU time from the kernel.
import fs from 'node:fs';
import { JsonProc, type SpawnOptions } from '../testkit/jsonproc.js';

/** Runs dist/bench/fixtures/FIXTURE.js with `args` (under taskset when `cpus` is given). */
export function spawnFixture(fixture: string, args: readonly string[], opts: SpawnOptions = {}): JsonProc {
  return JsonProc.spawn(new URL(`./fixtures/${fixture}.js`, import.meta.url).pathname, args, { name: fixture, ...opts });
}

/** `n` subscriber processes (fixtures/subscriber.ts) attached and synced (each printed `ready`); they answer `stats`. */
export async function spawnSubscribers(n: number, socket: string, space: string, mode: 'map' | 'record', cpus?: string): Promise<JsonProc[]> {
  const subs = Array.from({ length: n }, (_, i) => spawnFixture('subscriber', [socket, space, `sub${i}`, mode], { name: `subscriber ${i}`, ...(cpus !== undefined ? { cpus } : {}) }));
  try {
    await Promise.all(subs.map((s) => s.next('ready', () => true, 600_000)));
  } catch (err) {
    await stopAll(subs);
    throw err;
  }
  return subs;
}

/** Closes each one's stdin (a fixture's cue to finish) and waits; SIGKILL after 5 s. */
export async function stopAll(children: readonly JsonProc[]): Promise<void> {
  await Promise.all(children.map((c) => c.stop('end-stdin', 5000)));
}

export interface SubscriberStats {
  committed: number;
  generation: number;
  regions: number;
}

/** Each subscriber's own count of committed transactions, its generation and its regions. */
export async function statsOf(subs: readonly JsonProc[]): Promise<SubscriberStats[]> {
  return Promise.all(subs.map((s) => s.request<SubscriberStats>({ cmd: 'stats' }, 'stats', 600_000)));
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
