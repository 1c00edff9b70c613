// What every subscriber declared (region limit, coalescing, pinning and its limit) and reported
// (reserved IOVA ranges, remaining DMA mappings), and the space's pin budget, checked against a planned
// transaction before anything is sent to anyone. The first violation is a typed error naming the client.
import {
  ClientLimitError,
  PinBudgetError,
  ReservedRangeError,
  type Region,
} from '../protocol/index.js';
import { nextView, viewOps } from './coalesce.js';
import type { Plan } from './map.js';
import type { Session } from './session.js';

const hex = (n: number) => `0x${n.toString(16)}`;
const fmt = (bytes: number) => (bytes >= 2 ** 20 ? `${+(bytes / 2 ** 20).toFixed(1)} MiB` : `${bytes} bytes`);

export interface MapAfter {
  /** Number of regions after the transaction. */
  count: number;
  /** Bytes of guest memory after the transaction (what a pinning client pins). */
  bytes: number;
  /** The regions after the transaction, sorted by gpa (computed only when needed). */
  regions: () => readonly Region[];
}

/**
 * Checks `plan` for every subscriber and against the pin budget. Returns the coalesced view each
 * coalescing subscriber will have after it: its current runs kept, only memory new to it coalesced, and
 * a reshape (the fully coalesced map) only where its region limit forces one (coalesce.ts, nextView).
 */
export function checkSubscribers(plan: Plan, after: MapAfter, subscribers: Iterable<Session>, pinBudget: number): Map<Session, Region[]> {
  const views = new Map<Session, Region[]>();
  let pinned = 0;
  let firstPinner: Session | undefined;
  for (const s of subscribers) {
    const view = s.coalesce ? nextView(s.view, after.regions(), s.maxRegions).view : undefined;
    if (view) views.set(s, view);
    const count = view ? view.length : after.count;
    if (count > s.maxRegions) {
      throw new ClientLimitError(`${s.describe()} can follow at most ${s.maxRegions} regions; the transaction would leave it ${count}`, { client: s.ref() });
    }
    for (const r of plan.adds) {
      const clash = s.reserved.find((x) => r.gpa <= x.last && x.start < r.gpa + r.size);
      if (clash) {
        throw new ReservedRangeError(
          `region ${JSON.stringify(r.name)} [${hex(r.gpa)}, ${hex(r.gpa + r.size)}) covers [${hex(clash.start)}, ${hex(clash.last)}], which ${s.describe()} reported as reserved`,
          { client: s.ref() },
        );
      }
    }
    if (s.dmaAvailable !== undefined) {
      const ops = view ? viewOps(s.view, view) : plan.ops;
      const needed = ops.filter((o) => o.op === 'add').length - ops.filter((o) => o.op === 'remove').length;
      if (needed > s.dmaAvailable) {
        throw new ClientLimitError(`${s.describe()} has room for ${s.dmaAvailable} more DMA mappings; the transaction needs ${needed}`, { client: s.ref() });
      }
    }
    if (s.pins && plan.adds.length > 0) {
      if (after.bytes > s.pinLimit) {
        throw new PinBudgetError(`${s.describe()} would have to pin ${fmt(after.bytes)}; its limit is ${fmt(s.pinLimit)}`, { client: s.ref() });
      }
      pinned += after.bytes;
      firstPinner ??= s;
    }
  }
  if (pinned > pinBudget && firstPinner) {
    throw new PinBudgetError(`pinning clients would pin ${fmt(pinned)} in all; the address space's pin budget is ${fmt(pinBudget)}`, { client: firstPinner.ref() });
  }
  return views;
}
