// What the broker and the clients talk through. Two implementations with the same semantics:
// SocketTransport (a Unix stream socket, fds by SCM_RIGHTS) and InProcessTransport (an embedded broker:
// same codec and limits, fds dup()ed instead of passed, delivery asynchronous and ordered).
import type { EventEmitter } from 'eventemitter3';
import type { Credentials as KernelCredentials } from '../native/index.js';
import type { Frame, MmbError } from '../protocol/index.js';

/** Who is at the other end, in the kernel's words (SO_PEERCRED; SO_PEERPIDFD for sockets). */
export interface Credentials extends KernelCredentials {
  /**
   * The peer's pidfd, taken at accept (SO_PEERPIDFD): it names the process that connected, never a later
   * one that reused its pid. Owned by the transport and closed when the transport closes, right after
   * its 'close' listeners ran (dup() it, at the latest in such a listener, to keep it longer). Absent for in-process peers, for the client end of a socket, and where the kernel
   * has no SO_PEERPIDFD (Linux < 6.5) or the peer exited before it was accepted.
   */
  pidfd?: number;
}

export interface TransportEvents {
  /** A complete, framed message. The listener owns frame.fds from here on. */
  frame: [frame: Frame];
  /** The transport is closed; `reason` is set when it closed because of an error. Emitted once. */
  close: [reason: MmbError | undefined];
}

export interface InboundLimits {
  /** Largest frame body the peer may send. */
  maxFrameBytes?: number;
  /** Most descriptors one frame may carry (0: none at all). */
  maxFdsPerFrame?: number;
  /** Most descriptors received and not yet claimed by a complete frame. */
  maxPendingFds?: number;
  /** Why descriptors beyond the limit are refused, for the error the peer gets. */
  reason?: string;
}

export interface Transport extends EventEmitter<TransportEvents> {
  readonly kind: 'socket' | 'inproc';
  /** The peer's credentials: SO_PEERCRED (and a pidfd) for sockets, this process for in-process peers. */
  readonly peer: Credentials;
  readonly closed: boolean;
  /**
   * Encodes and sends (or queues) a message with descriptors. The caller keeps ownership of `fds`: the
   * transport duplicates whatever it has to hold on to. Throws FrameTooLargeError before anything is
   * queued; does nothing once the transport is closed.
   */
  send(message: object, fds?: readonly number[]): void;
  /**
   * Sends a frame encoded already (protocol/frame.ts: header included, its fd count that of `fds`), as
   * send() would: one message encoded once for many connections. The bytes are written or copied before
   * it returns (the caller may change them right after); does nothing once the transport is closed.
   */
  sendFrame(frame: Uint8Array, fds?: readonly number[]): void;
  /**
   * Writes now what send() corked (transport/cork.ts) instead of at the end of the event-loop turn: for a
   * sender that must have a frame out before it does something else observable. No-op in-process.
   */
  flush(): void;
  /** Sends `last` if given, then closes once everything queued is flushed (or after a grace period). */
  end(last?: object): void;
  /** Closes now, closing every descriptor the transport still holds. */
  destroy(reason?: MmbError): void;
  /** Stops or resumes keeping the process alive for this transport (sockets only). */
  setRef(ref: boolean): void;
  /** Adopts the limits the peer announced (a client does this after HELLO). */
  setLimits(limits: { maxFrameBytes?: number; maxFdsPerFrame?: number }): void;
  /**
   * Narrows (or widens again) what the peer may send from now on, inbound only: the broker admits no
   * descriptor and only small frames before ATTACH (broker/admission.ts). With `maxFdsPerFrame` 0 the
   * socket is read without room for descriptors, so the kernel discards any the peer sends (they never
   * reach our descriptor table) and the connection closes with MMB_ERR_FDS_TRUNCATED, quoting `reason`.
   * In-process transports ignore it: their peer is this process.
   */
  setInboundLimits(limits: InboundLimits): void;
}
