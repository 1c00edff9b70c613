// The owner's side of the map-update benchmarks, shared by an owner embedded in the broker's process
// (fanout.ts, throughput.ts) and an owner in its own process (fixtures/owner.ts), so both run the same
// loop:
//   - latency: add one region, wait for the commit (every subscriber acked), remove it, wait again;
//   - pipelined: keep up to `window` commits in flight (add, remove, add, remove... of one region:
//     the broker applies a space's transactions in order), and count how many complete per second.
import type { Broker } from '../broker/index.js';
import { OwnerClient, type BrokerTarget } from '../clients/index.js';
import { native } from '../native/index.js';
import type { RoundTrips } from './vhu-peer.js';

/** Where the benchmark region sits: 2 MiB at 4 GiB (a DIMM's worth of hotplug granularity). */
export const REGION = { name: 'bench', gpa: 0x1_0000_0000, size: 2 << 20 } as const;

export interface LatencyOptions {
  iterations: number;
  warmup: number;
}

/** Per-iteration nanoseconds of addRegion() and removeRegion(), each from the call to the commit's reply. */
export async function latencyLoop(owner: OwnerClient, backing: number, o: LatencyOptions): Promise<RoundTrips> {
  const out: RoundTrips = { add: [], rem: [] };
  for (let i = -o.warmup; i < o.iterations; i++) {
    const t0 = process.hrtime.bigint();
    await owner.addRegion({ ...REGION, backing });
    const t1 = process.hrtime.bigint();
    await owner.removeRegion(REGION.name);
    const t2 = process.hrtime.bigint();
    if (i >= 0) {
      out.add.push(Number(t1 - t0));
      out.rem.push(Number(t2 - t1));
    }
  }
  return out;
}

export interface PipelineOptions {
  /** Transactions per round (an even number: adds and removes alternate). */
  transactions: number;
  rounds: number;
  /** Commits in flight at once. */
  window: number;
  /** Rounds run first and not counted. */
  warmupRounds: number;
}

/** Transactions per second of each round. */
export async function pipelinedLoop(owner: OwnerClient, backing: number, o: PipelineOptions): Promise<number[]> {
  const rates: number[] = [];
  for (let r = -o.warmupRounds; r < o.rounds; r++) {
    const inFlight: Promise<unknown>[] = [];
    const t0 = performance.now();
    for (let i = 0; i < o.transactions; i++) {
      if (inFlight.length >= o.window) await inFlight.shift();
      inFlight.push(i % 2 === 0 ? owner.addRegion({ ...REGION, backing }) : owner.removeRegion(REGION.name));
    }
    await Promise.all(inFlight);
    const ms = performance.now() - t0;
    if (r >= 0) rates.push((o.transactions / ms) * 1000);
  }
  return rates;
}

/**
 * Attaches an owner to `space`, registers a backing for REGION, runs `fn`, drops the backing and detaches.
 * An owner embedded in a broker's process then waits for ownerGone(): a space has one owner at a time.
 */
export async function withOwner<T>(target: BrokerTarget, space: string, name: string, fn: (owner: OwnerClient, backing: number) => Promise<T>): Promise<T> {
  const owner = await OwnerClient.attach(target, { space, name, requestTimeoutMs: 120_000 });
  try {
    const b = await owner.createBacking(REGION.size, name);
    native.close(b.fd);
    const out = await fn(owner, b.backing);
    await owner.dropBacking(b.backing);
    return out;
  } finally {
    owner.close();
  }
}

/** Resolves once the broker has seen the owner of `space` go (the next one may then attach). */
export async function ownerGone(broker: Broker, space: string): Promise<void> {
  for (let i = 0; i < 500; i++) {
    if (!broker.status(space).spaces[0]?.clients.some((c) => c.role === 'owner')) return;
    await new Promise((r) => setTimeout(r, 2));
  }
  throw new Error(`the previous owner of ${space} did not detach`);
}
