// The bridge behind a guest IOMMU: an IoasApplier (clients/ioas-view.ts) that turns the IOAS the bridge's
// device is attached to into the vhost-user back-end's device IOTLB (docs/vhost-user.md, "Guest IOMMU").
//
//   - new mappings (a vote, the commit's maps, a sync): VHOST_IOTLB_UPDATE for each, confirmed before the
//     ack. Its `uaddr` is what QEMU's vhost_device_iotlb_miss computes: the GPA the IOVA maps, in the
//     coordinates of the memory table the back-end holds (userspace_addr + gpa - guest_phys_addr of the
//     region containing it; this bridge's user addresses are UADDR_BASE + gpa). An update is cut where
//     the back-end's regions end (DPDK clips an entry at its region's end). A mapping into memory the
//     back-end was not given (read-only memory, never given to a vhost-user back-end) is refused before
//     anything is sent;
//   - unmaps (the commit of a transaction that unmaps, a 'final' unmap-only transaction, a detach): the
//     mapping leaves the table the misses are answered from first, then VHOST_IOTLB_INVALIDATE, confirmed
//     (NEED_REPLY) before the ack: DPDK removes the entry from every queue's cache, and invalidates a ring
//     that used it, before it replies. An update sent for a miss before that point is ahead of the
//     invalidation on the same connection, so it cannot outlive it;
//   - misses (VHOST_USER_BACKEND_IOTLB_MSG on the request channel): answered from the mappings this
//     bridge established, the committed ones and those of a vote in flight (their updates were sent
//     already): an update for the whole mapping, confirmed, then the reply if one was asked for. A miss
//     for an IOVA the IOAS does not map, or a write through a read-only mapping, gets no update (the
//     device's access fails, as behind a real IOMMU) and a non-zero reply (QEMU answers -EFAULT);
//   - access failures (ACCESS_FAIL from the back-end): counted, logged, emitted, acknowledged.
//
// The back-end's IOTLB is a cache the front-end may refill at any time (DPDK drops it at every
// SET_MEM_TABLE and for a queue at GET_VRING_BASE, and evicts at random beyond 2,048 entries per queue):
// what this applier guarantees is about its table, from which every refill comes. A failed update is
// undone (its mappings leave the table and are invalidated); a failed invalidation leaves the back-end's
// state unknown, so the connection is dropped (the back-end then unmaps all guest memory) before the
// failure is reported.
import { EventEmitter } from 'eventemitter3';
import type { Logger } from 'pino';
import { ClientRefusedError, InvalidArgError, toMmbError, type IovaMapping, asGpa, hex, rangeEnd, rangeHas } from '../../protocol/index.js';
import type { IoasApplier, IoasChange } from '../ioas-view.js';
import type { VhostUserFrontend } from './frontend.js';
import type { TableEntry } from './memtable.js';
import { BackendReq, IotlbPerm, IotlbType, decodeIotlb, type IotlbMsg } from './messages.js';

export interface IotlbStats {
  /** IOAS changes applied. */
  changes: number;
  /** VHOST_IOTLB_UPDATE sent for new mappings, and for misses. */
  updates: number;
  /** VHOST_IOTLB_INVALIDATE sent. */
  invalidates: number;
  /** Misses received; answered with an update; answered with no entry (not mapped, or not writable). */
  misses: number;
  missesAnswered: number;
  missesRefused: number;
  /** ACCESS_FAIL reports received. */
  accessFails: number;
}

/** A miss or an access failure reported by the back-end, and what the bridge did. */
export interface IotlbReport {
  type: 'miss' | 'access-fail';
  iova: number;
  /** VHOST_ACCESS_RO (1), WO (2) or RW (3). */
  perm: number;
  /** The mapping the miss was answered with; undefined when it got no entry. */
  answered: IovaMapping | undefined;
}

export interface IotlbEvents {
  /** After the back-end's miss was answered (an update confirmed, or no entry). */
  miss: [IotlbReport];
  'access-fail': [IotlbReport];
}

export class IotlbApplier extends EventEmitter<IotlbEvents> implements IoasApplier {
  /** The mappings the back-end may have and is answered from, by IOVA. */
  private readonly mappings = new Map<number, IovaMapping>();
  readonly stats: IotlbStats = { changes: 0, updates: 0, invalidates: 0, misses: 0, missesAnswered: 0, missesRefused: 0, accessFails: 0 };

  constructor(
    private readonly frontend: VhostUserFrontend,
    /** The one IOAS this back-end's device is in: a vhost-user device has one IOTLB. */
    readonly ioas: string,
    /** The back-end's memory table as it confirmed it (VhostUserApplier.entries). */
    private readonly table: () => readonly TableEntry[],
    private readonly logger?: Logger,
  ) {
    super();
    const channel = frontend.backendChannel;
    if (!channel) throw new InvalidArgError('an IOTLB needs a back-end negotiated with iommu (its request channel)');
    channel.setHandler((request, payload) => this.onBackendRequest(request, payload));
  }

  /** The mappings the back-end may have now, sorted by IOVA. */
  established(): IovaMapping[] {
    return [...this.mappings.values()].sort((a, b) => a.iova - b.iova);
  }

  async applyIoas(change: IoasChange): Promise<void> {
    if (change.ioas !== this.ioas) {
      throw new ClientRefusedError(
        `this vhost-user back-end's device is in IOAS ${JSON.stringify(this.ioas)}: it has one IOTLB and cannot follow ${JSON.stringify(change.ioas)} too`,
      );
    }
    // Everything a refusal depends on is checked before anything is sent or changed.
    const entries = change.mapped.length > 0 ? this.table() : [];
    const updates = change.mapped.map((m) => this.updatesFor(m, entries));
    const gone = change.unmapped.filter((m) => this.mappings.has(m.iova));
    for (const m of gone) this.mappings.delete(m.iova);
    if (gone.length > 0) await this.invalidate(gone);
    for (const m of change.mapped) this.mappings.set(m.iova, m);
    try {
      this.stats.updates += updates.reduce((n, u) => n + u.length, 0);
      await this.frontend.iotlb(updates.flat());
    } catch (err) {
      // As it was: the new mappings out of the table and out of the back-end, the unmapped ones back in the
      // table (the back-end refills them on its next miss).
      for (const m of change.mapped) this.mappings.delete(m.iova);
      await this.invalidate(change.mapped);
      for (const m of gone) this.mappings.set(m.iova, m);
      throw toMmbError(err);
    }
    this.stats.changes++;
  }

  /** VHOST_IOTLB_INVALIDATE for each, confirmed; on failure the back-end goes (see the header). */
  private async invalidate(ms: readonly IovaMapping[]): Promise<void> {
    if (ms.length === 0) return;
    this.stats.invalidates += ms.length;
    try {
      await this.frontend.iotlb(ms.map((m) => ({ iova: m.iova, size: m.size, uaddr: 0n, perm: 0, type: IotlbType.INVALIDATE })));
    } catch (err) {
      this.logger?.error(
        { err: toMmbError(err).message, backend: this.frontend.path },
        'vhost-user: an IOTLB invalidation failed, dropping the back-end connection',
      );
      this.frontend.close();
      throw toMmbError(err);
    }
  }

  /**
   * The updates that give the back-end `m`: one per region of its memory table the mapping's GPAs fall
   * in, uaddr in that table's coordinates. Refuses a mapping into memory the back-end was not given.
   */
  private updatesFor(m: IovaMapping, entries: readonly TableEntry[]): IotlbMsg[] {
    const out: IotlbMsg[] = [];
    const perm = m.readonly ? IotlbPerm.RO : IotlbPerm.RW;
    const end = rangeEnd(m.gpa, m.size);
    for (let gpa = m.gpa; gpa < end;) {
      const e = entries.find((x) => rangeHas(x.gpa, x.size, gpa));
      if (!e) {
        throw new ClientRefusedError(
          `IOVA ${hex(m.iova)} would map GPA ${hex(gpa)}, which this vhost-user back-end was not given (read-only memory is never given to one): it could not translate it`,
        );
      }
      const size = Math.min(end, rangeEnd(e.gpa, e.size)) - gpa;
      out.push({ iova: m.iova + (gpa - m.gpa), size, uaddr: e.uaddr + BigInt(gpa - e.gpa), perm, type: IotlbType.UPDATE });
      gpa = asGpa(gpa + size);
    }
    return out;
  }

  private find(iova: number): IovaMapping | undefined {
    for (const m of this.mappings.values()) if (rangeHas(m.iova, m.size, iova)) return m;
    return undefined;
  }

  /** The request channel's handler: misses and access failures; anything else is refused. */
  private async onBackendRequest(request: number, payload: Buffer): Promise<bigint> {
    if (request !== BackendReq.IOTLB_MSG) {
      this.logger?.warn({ request, backend: this.frontend.path }, 'vhost-user: a back-end request this bridge does not handle');
      return 1n;
    }
    const msg = decodeIotlb(payload);
    if (msg.type === IotlbType.ACCESS_FAIL) {
      this.stats.accessFails++;
      this.logger?.warn({ iova: hex(msg.iova), perm: msg.perm, backend: this.frontend.path }, 'vhost-user: the back-end reports an IOTLB access failure');
      this.emit('access-fail', { type: 'access-fail', iova: msg.iova, perm: msg.perm, answered: undefined });
      return 0n;
    }
    if (msg.type !== IotlbType.MISS) return 1n;
    this.stats.misses++;
    const m = this.find(msg.iova);
    const allowed = m !== undefined && !(m.readonly && msg.perm & IotlbPerm.WO);
    if (!allowed) {
      this.stats.missesRefused++;
      this.logger?.debug({ iova: hex(msg.iova), perm: msg.perm }, 'vhost-user: IOTLB miss for an IOVA the IOAS does not map (no entry)');
      this.emit('miss', { type: 'miss', iova: msg.iova, perm: msg.perm, answered: undefined });
      return 1n;
    }
    const updates = this.updatesFor(m, this.table());
    this.stats.updates += updates.length;
    await this.frontend.iotlb(updates);
    this.stats.missesAnswered++;
    this.emit('miss', { type: 'miss', iova: msg.iova, perm: msg.perm, answered: m });
    return 0n;
  }

  close(): void {
    this.mappings.clear();
    this.removeAllListeners();
  }
}
