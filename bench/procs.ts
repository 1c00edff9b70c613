// Helper processes of the benchmarks (bench/fixtures/*.ts, run from dist/): the testkit's JSON-lines
// processes, optionally under `taskset -c CPUS`, stopped by closing their stdin (or by PID), and their
// CPU time from the kernel.
import { JsonProc, type SpawnOptions } from '../testkit/jsonproc.js';
import { cpuNs } from '../testkit/procfs.js';

/**
 * Runs dist/bench/fixtures/FIXTURE.js with `args` (under taskset when `cpus` is given). MMB_BENCH_NODE_ARGS
 * (space-separated) goes to every such node, for profiling: node refuses --cpu-prof in NODE_OPTIONS, so
 * `MMB_BENCH_NODE_ARGS='--cpu-prof --cpu-prof-dir=DIR'` is how a benchmark's helper processes get it.
 */
export function spawnFixture(fixture: string, args: readonly string[], opts: SpawnOptions = {}): JsonProc {
  const fromEnv = (process.env.MMB_BENCH_NODE_ARGS ?? '').split(' ').filter(Boolean);
  const nodeArgs = [...fromEnv, ...(opts.nodeArgs ?? [])];
  return JsonProc.spawn(new URL(`./fixtures/${fixture}.js`, import.meta.url).pathname, args, {
    name: fixture,
    ...opts,
    ...(nodeArgs.length > 0 ? { nodeArgs } : {}),
  });
}

/** `n` subscriber processes (fixtures/subscriber.ts) attached and synced (each printed `ready`); they answer `stats`. */
export async function spawnSubscribers(n: number, socket: string, space: string, mode: 'map' | 'record', cpus?: string): Promise<JsonProc[]> {
  const subs = Array.from({ length: n }, (_, i) =>
    spawnFixture('subscriber', [socket, space, `sub${i}`, mode], { name: `subscriber ${i}`, ...(cpus !== undefined ? { cpus } : {}) }),
  );
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

/** CPU time of several processes together (testkit/procfs.ts cpuNs: the kernel's schedstat). */
export const cpuNsOf = (pids: readonly (number | 'self')[]): number => pids.reduce<number>((n, p) => n + cpuNs(p), 0);
