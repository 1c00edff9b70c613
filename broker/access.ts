// Who may attach to an address space, and as what. Decided by the peer's credentials (SO_PEERCRED: the
// kernel's word, not the peer's) against per-space allow-lists, and for subscribers and observers
// optionally a token (feature AUTH). Default: only the broker's own uid, in every role. The socket's
// permissions (0600 in a 0700 directory) keep everyone else from connecting in the first place; these
// lists matter when an administrator opens the socket to a group.
import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import { PermissionError } from '../protocol/index.js';
import type { Credentials } from '../native/index.js';

export interface Allow {
  /** Uids allowed; a peer is allowed if its uid or its gid is listed. */
  uids?: readonly number[];
  gids?: readonly number[];
}

export interface AccessPolicy {
  /** Who may attach as the owner (change the map). Default: the broker's uid. */
  owners?: Allow;
  /** Who may attach as a subscriber or an observer (see guest memory). Default: the broker's uid. */
  subscribers?: Allow;
  /** A secret subscribers and observers must present in ATTACH.token (feature AUTH). Default: none. */
  token?: string;
}

const listed = (allow: Allow, peer: Credentials) => (allow.uids ?? []).includes(peer.uid) || (allow.gids ?? []).includes(peer.gid);

const self = (): Allow => ({ uids: [process.getuid?.() ?? 0], gids: [] });

/**
 * Tokens are compared as keyed digests (HMAC-SHA-256 under a key made at start): both sides are 32 bytes
 * whatever the lengths of the tokens, so a wrong token of another length takes the same path as one of
 * the right length, and the time of the comparison says nothing about the secret's length or bytes.
 */
const digestKey = randomBytes(32);
const digest = (token: string): Buffer => createHmac('sha256', digestKey).update(token, 'utf8').digest();

export class Access {
  private readonly owners: Allow;
  private readonly subscribers: Allow;
  private readonly token: Buffer | undefined;

  constructor(policy: AccessPolicy = {}) {
    this.owners = policy.owners ?? self();
    this.subscribers = policy.subscribers ?? self();
    this.token = policy.token === undefined ? undefined : digest(policy.token);
  }

  /** Throws MMB_ERR_PERMISSION unless `peer` may take `role` (with `token`, for subscribers and observers). */
  check(space: string, role: 'owner' | 'subscriber' | 'observer', peer: Credentials, token: string | undefined): void {
    const ok = listed(role === 'owner' ? this.owners : this.subscribers, peer);
    if (!ok) throw new PermissionError(`uid ${peer.uid} / gid ${peer.gid} may not attach to ${JSON.stringify(space)} as ${role}`);
    if (role === 'owner' || this.token === undefined) return;
    if (!timingSafeEqual(digest(token ?? ''), this.token)) throw new PermissionError(`a ${role} of ${JSON.stringify(space)} must present the space's token`);
  }

  /** Is `peer` on this space's owner list (trusted: it may use the reserve of connections, see admission.ts)? */
  mayOwn(peer: Credentials): boolean {
    return listed(this.owners, peer);
  }

  /**
   * May `peer` read the space's STATUS (its map and its clients)? Whoever may own it; whoever may
   * subscribe, when the space has no token or the peer is attached to it (and so presented the token).
   */
  maySee(peer: Credentials, attached: boolean): boolean {
    if (listed(this.owners, peer)) return true;
    return listed(this.subscribers, peer) && (this.token === undefined || attached);
  }
}
