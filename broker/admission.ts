// Who gets a connection, and what a connection may cost the broker before it has proven anything.
// Anyone who can open the socket can connect; only ATTACH (credentials, allow-lists, token) says who it
// is. Until then a connection costs its socket and its pidfd, and nothing else it can inflate:
//
//   - No descriptor before ATTACH from a uid on no owner list. The socket is read with no room for
//     SCM_RIGHTS, so the kernel discards whatever the peer sends (it never enters our descriptor table)
//     and the connection closes (MMB_ERR_FDS_TRUNCATED). Once attached, a subscriber or observer may send
//     `subscriberFds` per message (a few pidfds) and have as many pending. Only an owner ever has a reason
//     to send more (BACKING_ADD, DIRTY_SYNC), and only a uid on an owner list can attach as one: those
//     uids get `maxFdsPerFrame` / `maxPendingFds` from the accept on, as before, so an owner that sends
//     ATTACH and BACKING_ADD without waiting for the reply keeps working.
//   - Small frames before ATTACH (`maxUnattachedFrameBytes`) from the same uids: HELLO, STATUS and ATTACH
//     are small.
//   - Deadlines before ATTACH: HELLO within `helloTimeoutMs` of the accept, then no silence longer than
//     `unattachedIdleMs` (MMB_ERR_HANDSHAKE_TIMEOUT). Attached connections answer to the ack deadline.
//   - Counts, decided at accept from SO_PEERCRED (the kernel's word): uids on no owner list may hold at
//     most `maxUnattached` unattached connections in all, `maxUnattachedPerUid` each, and
//     `maxConnectionsPerUid` connections each; everyone together `maxConnections`.
//   - Descriptors: a connection of a uid on no owner list reserves the most it can make the broker hold
//     (socket, pidfd, and its pending-descriptor allowance); an owner-listed one its socket and pidfd
//     (the rest it holds shows in the count: it is trusted not to flood). A connection of a uid on no
//     owner list is admitted only while what is open (counted in /proc/self/fd) plus what is reserved
//     stays below RLIMIT_NOFILE minus `fdHeadroom` (the listener's accept, logs, /proc reads) minus the
//     owners' reserve: `ownerReserve` connections with an owner's allowance (socket, pidfd,
//     `maxPendingFds`) each, at most a quarter of the limit. An owner-listed connection may use it.
//
// Uids on an owner list are trusted (an owner can change the whole map): they are not counted per uid,
// and they alone may use the reserve of connections and descriptors, so an owner can always connect and
// register backings while others flood the socket. Nothing here defends against a uid on the owner list.
import fs from 'node:fs';
import type { Logger } from 'pino';
import { ConnectionLimitError, HandshakeTimeoutError, Msg, type ConnectionLimits, type MmbError, type ProtocolLimits } from '../protocol/index.js';
import type { Credentials, Transport } from '../transport/index.js';

export interface AdmissionHost {
  /** Is `peer` on the owner list of any address space? */
  mayOwn(peer: Credentials): boolean;
  log: Logger;
}

type Stage = 'new' | 'ready' | 'owner' | 'attached';

interface Ticket {
  transport: Transport;
  uid: number;
  owner: boolean;
  stage: Stage;
  /** Descriptors this connection may make the broker hold at most. */
  fds: number;
  /** Counted among the connections that have not attached (uids on no owner list only). */
  unattached: boolean;
  deadline: NodeJS.Timeout | undefined;
}

/** The per-connection view Admission needs of a broker session. */
export interface AdmittedSession {
  readonly transport: Transport;
  /** The session's protocol state (broker/session.ts). */
  readonly state: string;
}

/** How often the real count of open descriptors is refreshed at most (a readdir of /proc/self/fd). */
const FD_COUNT_MAX_AGE_MS = 250;

export class Admission {
  private readonly tickets = new Map<Transport, Ticket>();
  private readonly connectionsByUid = new Map<number, number>();
  private readonly unattachedByUid = new Map<number, number>();
  private unattached = 0;
  /** Sum of the reservations (Ticket.fds) of every live connection. */
  private reserved = 0;
  private counted = { at: Number.NEGATIVE_INFINITY, open: 0 };
  private readonly fdLimit: number;

  constructor(
    private readonly limits: ConnectionLimits,
    private readonly protocol: ProtocolLimits,
    private readonly host: AdmissionHost,
  ) {
    this.fdLimit = openFileLimit();
  }

  /**
   * Descriptors kept for owner-listed uids: `ownerReserve` connections with an owner's allowance each
   * (socket, pidfd, pending descriptors), at most a quarter of what there is, so that a low
   * RLIMIT_NOFILE does not leave nothing for everyone else.
   */
  private get ownerReserveFds(): number {
    const perOwner = 2 + this.limits.maxPendingFds;
    return Math.min(this.limits.ownerReserve * perOwner, Math.floor((this.fdLimit - this.limits.fdHeadroom) / 4));
  }

  /**
   * Decides on a new connection before anything of it is read. Returns the refusal (the caller says
   * goodbye with it) or registers the connection: unless its uid is owner-listed, the transport then
   * takes no descriptor and only small frames; a socket must say HELLO within helloTimeoutMs.
   */
  admit(transport: Transport): MmbError | undefined {
    const peer = transport.peer;
    const socket = transport.kind === 'socket';
    // An in-process peer is this very process: trusted like an owner, whatever the lists say.
    const owner = !socket || this.host.mayOwn(peer);
    const cost = socket ? 2 : 0;
    const refusal = this.refusal(peer.uid, owner, cost);
    if (refusal) return new ConnectionLimitError(refusal);
    const ticket: Ticket = { transport, uid: peer.uid, owner, stage: 'new', fds: cost, unattached: false, deadline: undefined };
    this.tickets.set(transport, ticket);
    this.reserved += cost;
    this.bump(this.connectionsByUid, peer.uid, 1);
    this.setUnattached(ticket, true);
    if (!owner) {
      transport.setInboundLimits({
        maxFdsPerFrame: 0,
        maxPendingFds: 0,
        maxFrameBytes: this.limits.maxUnattachedFrameBytes,
        reason: 'descriptors are accepted only after ATTACH',
      });
    }
    if (socket) this.arm(ticket, this.limits.helloTimeoutMs, 'no HELLO');
    return undefined;
  }

  /** A frame arrived: a connection that has not attached yet is not idle. */
  seen(transport: Transport): void {
    const t = this.tickets.get(transport);
    if (t && t.stage === 'ready') t.deadline?.refresh();
  }

  /**
   * Follows the session's state after a request ran (HELLO, ATTACH). Called as soon as the handler
   * returns, before its reply can reach the peer, so a client that sends descriptors once its ATTACH is
   * answered finds them admitted.
   */
  update(session: AdmittedSession): void {
    const t = this.tickets.get(session.transport);
    if (!t) return;
    const stage: Stage =
      session.state === 'new'
        ? 'new'
        : session.state === 'ready'
          ? 'ready'
          : session.state === 'owner'
            ? 'owner'
            : session.state === 'closed'
              ? t.stage
              : 'attached';
    if (stage === t.stage) return;
    t.stage = stage;
    if (stage === 'ready') {
      this.arm(t, this.limits.unattachedIdleMs, 'nothing since HELLO and not attached');
      return;
    }
    if (stage === 'new') return;
    this.disarm(t);
    this.setUnattached(t, false);
    if (t.owner) return; // it had an owner's allowances from the accept on
    const socket = t.transport.kind === 'socket';
    const fds = socket ? 2 + this.limits.subscriberFds : 0;
    this.reserved += fds - t.fds;
    t.fds = fds;
    t.transport.setInboundLimits(
      stage === 'owner'
        ? { maxFdsPerFrame: this.protocol.maxFdsPerFrame, maxPendingFds: this.limits.maxPendingFds, maxFrameBytes: this.protocol.maxFrameBytes }
        : {
            maxFdsPerFrame: Math.min(this.limits.subscriberFds, this.protocol.maxFdsPerFrame),
            maxPendingFds: this.limits.subscriberFds,
            maxFrameBytes: this.protocol.maxFrameBytes,
            reason: `a subscriber or observer may send at most ${this.limits.subscriberFds} descriptors per message`,
          },
    );
  }

  /** The connection closed: forget it. */
  release(transport: Transport): void {
    const t = this.tickets.get(transport);
    if (!t) return;
    this.tickets.delete(transport);
    this.disarm(t);
    this.setUnattached(t, false);
    this.reserved -= t.fds;
    this.bump(this.connectionsByUid, t.uid, -1);
  }

  /** Stops every deadline (broker shutdown). */
  close(): void {
    for (const t of this.tickets.values()) this.disarm(t);
  }

  /** Why a connection of `uid` costing `cost` descriptors may not be served now, or undefined. */
  private refusal(uid: number, owner: boolean, cost: number): string | undefined {
    const l = this.limits;
    const total = this.tickets.size;
    if (owner) {
      if (total >= l.maxConnections + l.ownerReserve)
        return `the broker serves ${total} connections, its limit (${l.maxConnections} + ${l.ownerReserve} kept for owners)`;
      const room = this.fdRoom();
      if (cost > room) return `no descriptors left for another connection (RLIMIT_NOFILE ${this.fdLimit}, headroom ${l.fdHeadroom})`;
      return undefined;
    }
    if (total >= l.maxConnections) return `the broker serves ${total} connections, its limit`;
    const mine = this.connectionsByUid.get(uid) ?? 0;
    if (mine >= l.maxConnectionsPerUid) return `uid ${uid} holds ${mine} connections, the limit per uid`;
    if (this.unattached >= l.maxUnattached) return `${this.unattached} connections have not attached yet, the limit`;
    const waiting = this.unattachedByUid.get(uid) ?? 0;
    if (waiting >= l.maxUnattachedPerUid) return `uid ${uid} holds ${waiting} connections that have not attached yet, the limit per uid`;
    // Worst case once attached as a subscriber: admitted only if that still leaves the owners' reserve.
    const room = this.fdRoom() - this.ownerReserveFds;
    if (cost + l.subscriberFds > room) return `no descriptors left for another connection besides those kept for owners (RLIMIT_NOFILE ${this.fdLimit})`;
    return undefined;
  }

  /**
   * Descriptors still free for connections: the limit minus the headroom, minus what is open (counted at
   * most FD_COUNT_MAX_AGE_MS ago), minus what admitted connections may make us hold. A connection's
   * reservation also covers what it holds already, so that is counted twice: on the safe side, and
   * covering what was opened since the count.
   */
  private fdRoom(): number {
    if (!Number.isFinite(this.fdLimit)) return Number.POSITIVE_INFINITY;
    const now = performance.now();
    if (now - this.counted.at > FD_COUNT_MAX_AGE_MS) this.counted = { at: now, open: countOpenFds() };
    return this.fdLimit - this.limits.fdHeadroom - this.counted.open - this.reserved;
  }

  private setUnattached(t: Ticket, on: boolean): void {
    if (t.owner || t.unattached === on) return;
    t.unattached = on;
    this.unattached += on ? 1 : -1;
    this.bump(this.unattachedByUid, t.uid, on ? 1 : -1);
  }

  private arm(t: Ticket, ms: number, why: string): void {
    this.disarm(t);
    t.deadline = setTimeout(() => {
      t.deadline = undefined;
      this.host.log.warn({ pid: t.transport.peer.pid, uid: t.uid }, `connection closed: ${why} within ${ms} ms`);
      t.transport.end({ t: Msg.EV_GOODBYE, error: new HandshakeTimeoutError(`${why} within ${ms} ms: say HELLO and ATTACH promptly`).toWire() });
    }, ms);
    t.deadline.unref();
  }

  private disarm(t: Ticket): void {
    if (t.deadline) clearTimeout(t.deadline);
    t.deadline = undefined;
  }

  private bump(map: Map<number, number>, uid: number, by: number): void {
    const n = (map.get(uid) ?? 0) + by;
    if (n > 0) map.set(uid, n);
    else map.delete(uid);
  }
}

/** RLIMIT_NOFILE's soft limit, from /proc/self/limits (Node raises it to the hard limit at start). */
export function openFileLimit(): number {
  const line = /^Max open files\s+(\S+)/m.exec(fs.readFileSync('/proc/self/limits', 'utf8'));
  const v = line?.[1];
  return v === undefined || v === 'unlimited' ? Number.POSITIVE_INFINITY : Number(v);
}

/** Descriptors this process holds now. */
export function countOpenFds(): number {
  return fs.readdirSync('/proc/self/fd').length;
}
