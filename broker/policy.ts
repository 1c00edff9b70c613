// What every subscriber declared (region limit, coalescing, pinning and its limit) and reported
// (reserved IOVA ranges, remaining DMA mappings, how it cuts regions into DMA mappings and their
// alignment), and the space's pin budget, checked against a planned transaction before anything is sent
// to anyone. The first violation is a typed error naming the client.
//
// A client that maps each region's backing from offset 0 (feature MAPS_FROM_ZERO: a vhost-user bridge's
// back-end) reaches the backing's prefix before each region; the writable regions of every backing a
// transaction touches must cover it from offset 0 without a gap (protocol/backing-prefix.ts).
//
// DMA mappings are predicted the way the client will make them (feature DMA_RULES: REPORT.dma, counted by
// protocol/dma-rules.ts, which the vfio-like client counts with too): per region it establishes or lets go
// of, in its own terms (its coalesced view; a read-only toggle is an unmap and a map, a remove and an add
// of the same establishment cancel out), and, for a two-phase client, at both of its steps: the vote
// establishes the adds that overlap nothing removed before anything is let go (clients/view.ts
// splitChange), the commit lets go and establishes the rest. A client that reported no rules takes one
// mapping per region.
import {
  BackingPrefixError,
  ClientLimitError,
  Feature,
  PinBudgetError,
  ReservedRangeError,
  UnalignedError,
  dmaMappingCount,
  dmaMisalignment,
  exposedPrefix,
  formatSize,
  hex,
  type ClientRef,
  type DmaRules,
  type PrefixExposure,
  type Region,
  inclusiveText,
  iovaOfGpa,
  rangeText,
  rangesOverlap,
} from '../protocol/index.js';
import { nextView, viewOps } from './coalesce.js';
import type { Plan } from './map.js';
import type { Session, SubscriberSession } from './session.js';

const fmt = (bytes: number) => (bytes >= 2 ** 20 ? `${+(bytes / 2 ** 20).toFixed(1)} MiB` : `${bytes} bytes`);

export interface MapAfter {
  /** Number of regions after the transaction. */
  count: number;
  /** Bytes of guest memory after the transaction (what a pinning client pins). */
  bytes: number;
  /** The regions after the transaction, sorted by gpa (computed only when needed). */
  regions: () => readonly Region[];
}

/** A client that maps from offset 0 (feature MAPS_FROM_ZERO), as a refusal names it. */
export interface FromZero {
  who: string;
  client: ClientRef;
}

/**
 * Checks `plan` for every subscriber and against the pin budget. Returns the coalesced view each
 * coalescing subscriber will have after it: its current runs kept, only memory new to it coalesced, and
 * a reshape (the fully coalesced map) only where its region limit forces one (coalesce.ts, nextView).
 * `absent`: clients that map from offset 0 and may reach memory while not attached (waiting for a
 * publish, or holding): the prefix rule holds for them as for attached ones.
 */

export function checkSubscribers(
  plan: Plan,
  after: MapAfter,
  subscribers: Iterable<SubscriberSession>,
  pinBudget: number,
  absent: readonly FromZero[] = [],
): Map<SubscriberSession, Region[]> {
  const views = new Map<SubscriberSession, Region[]>();
  let fromZero: FromZero | undefined = absent[0];
  let pinned = 0;
  let firstPinner: Session | undefined;
  for (const session of subscribers) {
    const s = session.subscriber;
    const reported = s.reported;
    const view = s.coalesce ? nextView(s.view, after.regions(), s.maxRegions).view : undefined;
    if (view) views.set(session, view);
    const count = view ? view.length : after.count;
    if (count > s.maxRegions) {
      throw new ClientLimitError(`${session.describe()} can follow at most ${s.maxRegions} regions; the transaction would leave it ${count}`, {
        client: session.ref(),
      });
    }
    if (s.mapsFromZero && !fromZero) fromZero = { who: session.describe(), client: session.ref() };
    for (const r of plan.adds) {
      const clash = reported.reserved.find((x) => rangesOverlap(iovaOfGpa(r.gpa), r.size, x.start, x.size));
      if (clash) {
        throw new ReservedRangeError(
          `region ${JSON.stringify(r.name)} ${rangeText(r.gpa, r.size)} covers ${inclusiveText(clash.start, clash.size)}, which ${session.describe()} reported as reserved`,
          { client: session.ref() },
        );
      }
    }
    if (reported.dma?.align !== undefined || reported.dmaAvailable !== undefined) {
      const change = establishments(session, plan, view);
      if (reported.dma?.align !== undefined) {
        for (const r of change.added) {
          const why = dmaMisalignment(r.gpa, r.size, reported.dma);
          if (why) {
            throw new UnalignedError(
              `region ${JSON.stringify(r.name)} ${rangeText(r.gpa, r.size)} cannot be DMA-mapped by ${session.describe()}, whose IOMMU needs IOVAs and sizes aligned to ${formatSize(reported.dma.align)}: ${why}`,
              { client: session.ref() },
            );
          }
        }
      }
      if (reported.dmaAvailable !== undefined) {
        const needed = dmaMappingsNeeded(session, change, count - change.added.length + change.removed.length);
        if (needed.mappings > reported.dmaAvailable) {
          throw new ClientLimitError(
            `${session.describe()} has room for ${reported.dmaAvailable} more DMA mappings; the transaction needs ${needed.mappings}${needed.why}`,
            { client: session.ref() },
          );
        }
      }
    }
    if (s.pins && plan.adds.length > 0) {
      if (after.bytes > s.pinLimit) {
        throw new PinBudgetError(`${session.describe()} would have to pin ${fmt(after.bytes)}; its limit is ${fmt(s.pinLimit)}`, { client: session.ref() });
      }
      pinned += after.bytes;
      firstPinner ??= session;
    }
  }
  // One check for every client that maps from offset 0, attached or not: the rule outlives a connection
  // (a client waiting for a publish keeps its old table, a holder keeps mapping what it had until it is
  // fenced, and either resumes against the map this leads to).
  const exposure = fromZero && exposedPrefix(after.regions(), touchedBackings(plan));
  if (fromZero && exposure) throw backingPrefixError(fromZero, exposure, 'the transaction');
  if (pinned > pinBudget && firstPinner) {
    throw new PinBudgetError(`pinning clients would pin ${fmt(pinned)} in all; the address space's pin budget is ${fmt(pinBudget)}`, {
      client: firstPinner.ref(),
    });
  }
  return views;
}

/** The backings whose regions `plan` adds, removes or changes: the only ones whose prefixes can change. */
function touchedBackings(plan: Plan): Set<number> {
  const out = new Set<number>(plan.backings);
  for (const r of plan.removes) out.add(r.backing);
  for (const { after } of plan.sets) out.add(after.backing);
  return out;
}

/**
 * The refusal for a client that maps from offset 0 (`what` leaves it `e`): which region, which bytes of its
 * backing, what lies there, and what the owner can do instead.
 */
export function backingPrefixError({ who, client }: FromZero, e: PrefixExposure, what: string): InstanceType<typeof BackingPrefixError> {
  const there =
    e.readonlyThere !== undefined ? `the read-only region ${JSON.stringify(e.readonlyThere)} (and maybe memory in no region)` : 'memory in no region';
  return new BackingPrefixError(
    `${what} would leave ${who} the region ${JSON.stringify(e.region)}, and it maps backing ${e.backing} from offset 0 (as vhost-user back-ends such as DPDK and libvhost-user before QEMU 9.0 map): ` +
      `[${hex(e.start)}, ${hex(e.end)}) of that backing is ${there}, which it would reach writable. ` +
      'Give such a region a backing of its own at offset 0, or place it right behind writable regions of its backing; keep the regions before it writable, and remove the regions behind a removed one in the same transaction',
    { client },
  );
}

/**
 * Takes a subscriber's REPORT.dma (validated before anything of the report was taken, protocol/dma-rules.ts
 * checkDmaRules) once the rest of its report was: the rules replace what it reported before. Returns `result`.
 */
export function recordDmaRules<T>(session: Session, rules: DmaRules | undefined, result: T): T {
  if (rules !== undefined && session.subscriber) session.subscriber.reported.dma = { ...rules };
  return result;
}

/** A client's regions as it establishes them: what it will establish and let go of in a transaction. */
interface Establishments {
  removed: Region[];
  added: Region[];
}

/**
 * What `s` establishes and lets go of in `plan`, in its own terms: its coalesced view's runs, or the
 * transaction's regions with a read-only toggle as a removal and an addition (the access is part of what
 * is established); a removal and an addition of the same establishment (gpa, size, backing, offset,
 * access) cancel out, as the client's reconciliation (clients/view.ts changeFromOps) has it.
 */
function establishments({ subscriber: s }: SubscriberSession, plan: Plan, view: readonly Region[] | undefined): Establishments {
  let removed: Region[];
  let added: Region[];
  if (view) {
    const before = new Map(s.view.map((r) => [r.id, r]));
    const ops = viewOps(s.view, view);
    removed = ops.flatMap((o) => (o.op === 'remove' ? [before.get(o.region) as Region] : []));
    added = ops.flatMap((o) => (o.op === 'add' ? [o.region] : []));
  } else {
    const toggled = plan.sets.filter((x) => x.before.readonly !== x.after.readonly);
    removed = [...plan.removes, ...toggled.map((x) => x.before)];
    added = [...toggled.map((x) => x.after), ...plan.adds];
  }
  const key = (r: Region) => `${r.gpa}/${r.size}/${r.backing}/${r.offset}/${r.readonly}`;
  const kept = new Map<string, number>();
  for (const r of removed) kept.set(key(r), (kept.get(key(r)) ?? 0) + 1);
  const stays = new Set<string>();
  added = added.filter((r) => {
    const n = kept.get(key(r)) ?? 0;
    if (n === 0) return true;
    kept.set(key(r), n - 1);
    stays.add(key(r));
    return false;
  });
  removed = removed.filter((r) => !stays.delete(key(r)));
  return { removed, added };
}

/**
 * The most DMA mappings `s` needs at once for `change`, `current` being how many regions it follows now.
 * Single-phase: everything it adds minus everything it lets go of. Two-phase: also what its vote adds
 * before anything is let go: the adds overlapping nothing removed, as many as its region limit leaves
 * room for (clients/view.ts splitChange).
 */
function dmaMappingsNeeded(s: SubscriberSession, change: Establishments, current: number): { mappings: number; why: string } {
  const rules: DmaRules | undefined = s.subscriber.reported.dma;
  const per = (r: Region) => dmaMappingCount(r.size, rules);
  const total = change.added.reduce((n, r) => n + per(r), 0) - change.removed.reduce((n, r) => n + per(r), 0);
  let vote = 0;
  if ((s.features & Feature.TWO_PHASE) !== 0) {
    const room = s.subscriber.maxRegions - current;
    let now = 0;
    for (const a of change.added) {
      if (now >= room || change.removed.some((r) => rangesOverlap(a.gpa, a.size, r.gpa, r.size))) continue;
      now++;
      vote += per(a);
    }
  }
  const mappings = Math.max(vote, total);
  const biggest = change.added.reduce<Region | undefined>((m, r) => (m && per(m) >= per(r) ? m : r), undefined);
  const why =
    rules && biggest && per(biggest) > 1
      ? ` (region ${JSON.stringify(biggest.name)} alone takes ${per(biggest)}: ${describeRules(rules)})`
      : vote > total
        ? ' (before its vote lets go of anything)'
        : '';
  return { mappings, why };
}

const describeRules = (r: DmaRules) =>
  [
    r.chunkBytes !== undefined ? `chunks of ${formatSize(r.chunkBytes)}` : '',
    r.pieceBytes !== undefined ? `mappings of at most ${formatSize(r.pieceBytes)}` : '',
  ]
    .filter(Boolean)
    .join(', ');
