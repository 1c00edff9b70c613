// The fuzzer's pre-HELLO descriptor flood (issue 14), run as uid 65534 so that it is a local user on no
// owner list: the worker (flood-worker.ts) runs from the testkit's copy that uid may read (testkit/uid.ts:
// the checkout may sit under a 0700 directory), started through setpriv. Needs root and setpriv; elsewhere
// startFlood() returns undefined and the run says the flood was skipped.
import { canSwitchUid, spawnAsUid } from '../testkit/uid.js';

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

export const canFlood = (): boolean => canSwitchUid();

/** Starts the worker as uid 65534 against `socket` (which that uid must be able to connect to). */
export function startFlood(socket: string, pending = 76, singles = 1000): Flood | undefined {
  if (!canFlood()) return undefined;
  // From the testkit's copy that uid can read (the checkout may sit under a 0700 directory).
  const worker = spawnAsUid(FLOOD_UID, 'dist/fuzz/flood-worker.js', [socket, String(pending), String(singles)], { name: 'the flood worker' });
  const next = <T>(): Promise<T> => worker.next<T>(undefined, () => true, 600_000);
  const totals: FloodTotals = { rounds: 0, attempted: 0, connected: 0, fdsSent: 0, closedByBroker: 0, codes: {}, connectFailed: {}, brokerFdsMax: 0 };
  const add = (into: Record<string, number>, from: Record<string, number>): void => {
    for (const [k, v] of Object.entries(from)) into[k] = (into[k] ?? 0) + v;
  };
  return {
    totals,
    async round() {
      worker.send('flood');
      const { round } = await next<{ round: FloodRound }>();
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
      worker.send('release');
      await next();
    },
    async stop() {
      await worker.stop('end-stdin', 60_000);
    },
  };
}
