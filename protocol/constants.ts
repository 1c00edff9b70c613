// Wire constants of the memmap-broker protocol. docs/protocol.md is the prose form of this file.
// Message ids are never reused: a retired message keeps its number, marked retired, forever.

export const PROTOCOL_VERSION = 1;

/** Frame header: u32 body length, u16 number of fds, u16 flags (all reserved, must be 0); little-endian. */
export const HEADER_SIZE = 8;

/** Message ids. 1-15: requests (client -> broker, answered by REPLY). 16-31: client -> broker, no reply.
 *  32-63: broker -> client. */
export const Msg = {
  HELLO: 1,
  STATUS: 2,
  ATTACH: 3,
  BACKING_ADD: 4,
  BACKING_DROP: 5,
  COMMIT: 6,
  REPORT: 7,
  FIND_FREE: 8,
  DIRTY_SYNC: 9,
  PAUSE: 10,
  PUBLISH: 11,
  DETACH: 12,
  DELEGATE: 13,
  HISTORY: 14,
  IOAS: 15,

  ACK: 16,
  NACK: 17,

  REPLY: 32,
  EV_BACKINGS: 33,
  EV_BACKINGS_GONE: 34,
  EV_SYNC: 35,
  EV_TXN: 36,
  EV_ROLLBACK: 37,
  EV_COMMITTED: 38,
  EV_GOODBYE: 39,
  EV_ERROR: 40,
  EV_BITMAPS: 41,
  EV_BITMAPS_GONE: 42,
  EV_DIRTY_FLUSH: 43,
  EV_PAUSE: 44,
  EV_DIRTY: 45,
  EV_WATCH: 46,
  EV_IOAS_SYNC: 47,
  EV_IOAS_TXN: 48,
  EV_IOAS_COMMITTED: 49,
  EV_IOAS_ROLLBACK: 50,
} as const;
export type MsgId = (typeof Msg)[keyof typeof Msg];

export const MSG_NAMES: Readonly<Record<number, string>> = Object.fromEntries(Object.entries(Msg).map(([name, id]) => [id, name]));

/** Feature bits, negotiated in HELLO: the broker answers with the intersection of both sides' bits. */
export const Feature = {
  /** ATTACH may carry `resume` ({epoch, generation, backings}) and get deltas instead of a snapshot. */
  RESUME: 1 << 0,
  /** REPORT: a subscriber tells the broker its reserved IOVA ranges, DMA-mapping budget, pinned bytes,
   *  cache coherency; the broker refuses changes that collide with them before anything changes. */
  REPORT: 1 << 1,
  /** FIND_FREE: the owner asks for a free GPA range that avoids regions and every reserved range. */
  PLACE: 1 << 2,
  /** ATTACH.limits.coalesce: the subscriber follows a coalesced view (adjacent, contiguous regions of one
   *  backing merged), so a client with few slots can follow a map of many regions. */
  COALESCE: 1 << 3,
  /** ATTACH.pin: the subscriber pins every region it maps; its pinned bytes count against its own limit
   *  and the space's pin budget, checked before anything changes. */
  PIN: 1 << 4,
  /** Dirty logging: per-region bitmaps in shared memfds (EV_BITMAPS), flushes (EV_DIRTY_FLUSH), DIRTY_SYNC,
   *  PAUSE / EV_PAUSE for migration, the observer role and its EV_DIRTY events, ATTACH.writes. */
  DIRTY: 1 << 5,
  /** ATTACH.token: a per-space secret a subscriber or observer must present, besides its credentials. */
  AUTH: 1 << 6,
  /** PUBLISH: a space is authoritative only once its owner published it. A restarted broker's spaces
   *  start unpublished; subscribers attaching meanwhile keep what they hold and wait (ATTACH reply
   *  `sync: "wait"`). Owners see `published` in their ATTACH reply. */
  PUBLISH: 1 << 7,
  /** Two-phase apply: EV_TXN is a vote (the subscriber only adds what can be undone unseen); removals and
   *  reshapes happen at EV_COMMITTED, which then carries a `seq` to ack once they are done. */
  TWO_PHASE: 1 << 8,
  /** Fencing: DETACH (a clean leave, so the client is not fenced), DELEGATE (pidfds of processes the client
   *  handed memory to), ATTACH.resume.client (the connection this one resumes). */
  FENCE: 1 << 9,
  /** BACKING_ADD.unsealed: the owner registers a file it vouches for (QEMU's memory-backend-file on tmpfs or
   *  hugetlbfs), which cannot be sealed against shrinking; the reply and STATUS say page size and sealing. */
  TRUSTED_FILE: 1 << 10,
  /** For operators: HISTORY (the recent transactions and their outcomes), ATTACH.watch (an observer that
   *  receives EV_WATCH, a live stream of what happens in the space), and the HELLO reply's `brokerVersion`. */
  WATCH: 1 << 11,
  /** I/O address spaces (docs/ioas.md): IOAS (create, destroy, commit IOVA maps and unmaps, attach and
   *  detach devices) and EV_IOAS_SYNC / EV_IOAS_TXN / EV_IOAS_COMMITTED / EV_IOAS_ROLLBACK; needs TWO_PHASE
   *  for attaching. A guest IOMMU's mappings beside the guest-physical map, with the same guarantees. */
  IOAS: 1 << 12,
  /** EV_SYNC.columns: a sync part's regions as columns of fixed-width integers in one msgpack bin
   *  (protocol/columns.ts), for large maps; without the bit a client gets the plain `regions` array. */
  COMPACT_SYNC: 1 << 13,
  /** REPORT.migration ({quiesce, deviceState}: whether the client stops its devices' DMA at a pause and
   *  their state is migrated) and REPORT.dirtyTracking (how its writes reach the dirty log); both in STATUS. */
  MIGRATION: 1 << 14,
  /** REPORT.dma: how a pinning client cuts each region into DMA mappings (chunk and piece sizes) and the
   *  alignment its IOMMU needs for every mapping's IOVA and size, so that the broker counts the client's
   *  DMA mappings and checks that alignment exactly as the client will, before anything is sent. */
  DMA_RULES: 1 << 15,
  /** Pipelined transactions: EV_TXN of a later transaction may arrive before the earlier ones are committed
   *  or rolled back; the subscriber applies them in order, votes on each against the map the earlier ones
   *  leave, gets EV_ROLLBACKs of a refused run newest first, and (with TWO_PHASE) acks every EV_COMMITTED,
   *  which then always carries a `seq`. A broker offers it only when configured with a window above 1. */
  PIPELINE: 1 << 16,
  /** ATTACH.limits.mapsFromZero: the subscriber (or a process it hands memory to) maps each region's
   *  backing from offset 0 through the region's end, writable, as vhost-user back-ends do; the broker
   *  keeps every such prefix inside the map's writable regions (MMB_ERR_BACKING_PREFIX). */
  MAPS_FROM_ZERO: 1 << 17,
} as const;
export const ALL_FEATURES =
  Feature.RESUME |
  Feature.REPORT |
  Feature.PLACE |
  Feature.COALESCE |
  Feature.PIN |
  Feature.DIRTY |
  Feature.AUTH |
  Feature.PUBLISH |
  Feature.TWO_PHASE |
  Feature.FENCE |
  Feature.TRUSTED_FILE |
  Feature.WATCH |
  Feature.IOAS |
  Feature.COMPACT_SYNC |
  Feature.MIGRATION |
  Feature.DMA_RULES |
  Feature.PIPELINE |
  Feature.MAPS_FROM_ZERO;

/** Bytes of guest memory one dirty-bitmap bit stands for. */
export const DIRTY_PAGE_SIZE = 4096;

/**
 * The layout of a dirty-bitmap memfd: a 4 KiB header whose first 8 bytes (a little-endian u64, written
 * only by the broker) say which of the two halves is active, then half 0 and half 1, each `half` bytes
 * (the bitmap's whole 64-bit words, rounded up to a page). Writers set bits in the active half; a sync
 * makes the other half active and collects the retired one once every writer acked the flush.
 */
export function bitmapLayout(pages: number): { bytes: number; half: number; size: number; offset: (h: number) => number } {
  const bytes = Math.ceil(pages / 64) * 8;
  const half = Math.ceil(bytes / 4096) * 4096;
  return { bytes, half, size: 4096 + 2 * half, offset: (h) => 4096 + h * half };
}

/**
 * Calls `fn(first, count)` for every run of set bits among the first `pages` bits of `bits` (bit i =
 * page i, least significant bit of each byte first, as a dirty bitmap), in order.
 */
export function forEachBitRun(bits: Uint8Array, pages: number, fn: (first: number, count: number) => void): void {
  let start = -1;
  for (let p = 0; p <= pages; p++) {
    const set = p < pages && (bits[p >>> 3] as number) & (1 << (p & 7));
    if (set && start < 0) start = p;
    else if (!set && start >= 0) {
      fn(start, p - start);
      start = -1;
    }
  }
}

export const Role = { OWNER: 'owner', SUBSCRIBER: 'subscriber', OBSERVER: 'observer' } as const;
export type Role = (typeof Role)[keyof typeof Role];

/** Largest guest-physical address + 1 we accept: x86-64 and arm64 physical addresses are at most 52 bits,
 *  which keeps every GPA, size and offset an exact JS number. */
export const GPA_LIMIT = 2 ** 52;

/** Largest u32. */
export const U32_MAX = 0xffff_ffff;
