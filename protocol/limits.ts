// Protocol and broker limits. Each one is enforced with a typed error (see protocol/errors.ts) before
// any state changes; the broker announces the protocol ones in its HELLO reply.

export interface ProtocolLimits {
  /** Largest frame body in bytes, both directions. */
  maxFrameBytes: number;
  /** Most descriptors carried by one frame. The kernel's own cap is SCM_MAX_FD (253). */
  maxFdsPerFrame: number;
  /** Most operations in one COMMIT. */
  maxOpsPerCommit: number;
  /** Longest name (space, region, backing, client) in UTF-8 bytes. */
  maxNameBytes: number;
}

/**
 * The most any broker may announce: schemas accept lists up to these, while a broker enforces its own
 * (possibly lower) configured limits. Names are 64 bytes in version 1, not configurable.
 */
export const PROTOCOL_MAXIMA: Readonly<ProtocolLimits> = Object.freeze({
  maxFrameBytes: 64 << 20,
  maxFdsPerFrame: 253,
  maxOpsPerCommit: 65_536,
  maxNameBytes: 64,
});

export const DEFAULT_PROTOCOL_LIMITS: Readonly<ProtocolLimits> = Object.freeze({
  maxFrameBytes: 1 << 20,
  maxFdsPerFrame: 64,
  maxOpsPerCommit: 4096,
  maxNameBytes: 64,
});

export interface SpaceLimits {
  maxRegions: number;
  maxBackings: number;
  /** Committed transactions kept for resume by delta; older resumes get a snapshot. */
  historyLength: number;
  /** Commits queued behind the running one before COMMIT is refused with MMB_ERR_TOO_BUSY. */
  maxQueuedCommits: number;
  /** How long a subscriber may take to ack a transaction (or a rollback) before it is evicted. */
  ackTimeoutMs: number;
  /** Most bytes all pinning subscribers of the space may pin together (Infinity: no budget). */
  pinBudgetBytes: number;
}

export const DEFAULT_SPACE_LIMITS: Readonly<SpaceLimits> = Object.freeze({
  maxRegions: 65_536,
  maxBackings: 65_536,
  historyLength: 1024,
  maxQueuedCommits: 1024,
  ackTimeoutMs: 10_000,
  pinBudgetBytes: Number.POSITIVE_INFINITY,
});

export interface ConnectionLimits {
  /** Bytes queued towards a peer that does not read; beyond it the peer is disconnected. */
  maxOutboundBytes: number;
  /** Descriptors received but not yet claimed by a complete frame (an owner's connection). */
  maxPendingFds: number;
  /**
   * Connections served at once; more are greeted with EV_GOODBYE (MMB_ERR_CONNECTION_LIMIT) and closed.
   * Uids on an owner list may use `ownerReserve` more.
   */
  maxConnections: number;
  /** Connections beyond maxConnections, and descriptors, kept for uids on an owner list: an owner can
   *  always connect, whatever everyone else holds (see broker/admission.ts). */
  ownerReserve: number;
  /** Connections one uid that is on no owner list may hold at once. */
  maxConnectionsPerUid: number;
  /** Connections not attached yet (before HELLO and ATTACH), of uids on no owner list, at once. */
  maxUnattached: number;
  /** The same, per uid. */
  maxUnattachedPerUid: number;
  /** How long a new connection has to send HELLO before it is closed (MMB_ERR_HANDSHAKE_TIMEOUT). */
  helloTimeoutMs: number;
  /** How long a connection that has not attached may stay silent before it is closed (same error). */
  unattachedIdleMs: number;
  /** Largest frame a connection may send before it attaches (HELLO, STATUS, ATTACH are small). */
  maxUnattachedFrameBytes: number;
  /** Descriptors a subscriber or observer may send in one message, and have pending (none before ATTACH). */
  subscriberFds: number;
  /** Descriptors never promised to connections: room for the listener's accept, logs and /proc reads. */
  fdHeadroom: number;
  /** Requests per second one connection may send (a token bucket); acks do not count. */
  requestsPerSecond: number;
  /** How many requests may come at once before the rate applies (the bucket's size). */
  requestBurst: number;
}

export const DEFAULT_CONNECTION_LIMITS: Readonly<ConnectionLimits> = Object.freeze({
  maxOutboundBytes: 64 << 20,
  maxPendingFds: 256,
  maxConnections: 1024,
  ownerReserve: 8,
  maxConnectionsPerUid: 128,
  maxUnattached: 64,
  maxUnattachedPerUid: 8,
  helloTimeoutMs: 10_000,
  unattachedIdleMs: 30_000,
  maxUnattachedFrameBytes: 64 << 10,
  subscriberFds: 4,
  fdHeadroom: 64,
  requestsPerSecond: 5000,
  requestBurst: 10_000,
});
