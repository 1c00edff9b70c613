// Who may attach to an address space, and as what. Decided by the peer's credentials (SO_PEERCRED: the
// kernel's word, not the peer's) against per-space allow-lists, and for subscribers and observers
// optionally a token (feature AUTH). Default: only the broker's own uid, in every role. The socket's
// permissions (0600 in a 0700 directory) keep everyone else from connecting in the first place; these
// lists matter when an administrator opens the socket to a group.
import { timingSafeEqual } from 'node:crypto';
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

export class Access {
  private readonly owners: Allow;
  private readonly subscribers: Allow;
  private readonly token: Buffer | undefined;

  constructor(policy: AccessPolicy = {}) {
    this.owners = policy.owners ?? self();
    this.subscribers = policy.subscribers ?? self();
    this.token = policy.token === undefined ? undefined : Buffer.from(policy.token, 'utf8');
  }

  /** Throws MMB_ERR_PERMISSION unless `peer` may take `role` (with `token`, for subscribers and observers). */
  check(space: string, role: 'owner' | 'subscriber' | 'observer', peer: Credentials, token: string | undefined): void {
    const ok = listed(role === 'owner' ? this.owners : this.subscribers, peer);
    if (!ok) throw new PermissionError(`uid ${peer.uid} / gid ${peer.gid} may not attach to ${JSON.stringify(space)} as ${role}`);
    if (role === 'owner' || this.token === undefined) return;
    const given = Buffer.from(token ?? '', 'utf8');
    // Compare in constant time; lengths differ only for wrong tokens, and compare a dummy then.
    const same = given.length === this.token.length ? timingSafeEqual(given, this.token) : (timingSafeEqual(this.token, this.token), false);
    if (!same) throw new PermissionError(`a ${role} of ${JSON.stringify(space)} must present the space's token`);
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
