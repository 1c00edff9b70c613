// VhostUserSubscriber: a subscriber that is a vhost-user front-end. It follows an address space and feeds
// the map to an unmodified vhost-user back-end (qemu-storage-daemon's vhost-user-blk, DPDK's net_vhost,
// virtiofsd) as SET_MEM_TABLE / ADD_MEM_REG / REM_MEM_REG, acking the broker only after the back-end
// confirmed each change.
//
// Before attaching to the broker it connects to the back-end and negotiates, so that it can declare the
// back-end's slot limit (GET_MAX_MEM_SLOTS, or 8 for SET_MEM_TABLE-only back-ends) as `maxRegions`: the
// broker then refuses, before anything changes, a transaction that would need more. It follows a
// coalesced view by default (`coalesce: true`): contiguous blocks of one backing added together arrive
// merged, a run it has is never grown (a block hotplugged next to it is a region of its own), and only
// when the slots run out are runs merged, with the rings stopped around it (applier.ts), so 200
// hotplugged 2 MiB blocks fit 32 slots.
//
// If the back-end goes away, the subscriber detaches from the broker (emitting 'error' with the reason)
// rather than nacking every later transaction: a dead device must not block hotplug for everyone. A
// transaction it was applying when the back-end went is nacked first (the broker rolls it back and names
// this client): the owner is never told "done" for a change the back-end did not take.
//
// Migration: it negotiates DIRTY and writes (through the back-end), so the broker asks it to flush at
// every dirty sync (the back-end's shared log, or everything it maps when the back-end cannot log) and to
// pause for the last round: the rings stop (in-flight requests complete first, then GET_VRING_BASE) and
// requests made meanwhile wait in this process; resume restarts them (SET_VRING_BASE, kick).
//
// Behind a guest IOMMU (`ioas`): the back-end must offer VIRTIO_F_ACCESS_PLATFORM, BACKEND_REQ and
// REPLY_ACK (else MMB_ERR_UNSUPPORTED before anything is attached: qemu-storage-daemon 7.2 offers no
// ACCESS_PLATFORM); the device is attached to that IOAS (feature IOAS) and the IOAS becomes the back-end's
// device IOTLB (iotlb.ts): updates in the vote, confirmed invalidations before an unmap is acked, misses
// answered on the back-end's request channel. The drivers then give the device IOVAs only.
import type { Logger } from 'pino';
import { InvalidArgError, toMmbError } from '../../protocol/index.js';
import type { BrokerTarget } from '../connection.js';
import type { GuestMemory } from '../memory.js';
import { Subscriber, type SubscriberOptions } from '../subscriber.js';
import { VhostUserApplier, type MemTableStats } from './applier.js';
import { VhostUserFrontend, type Negotiated } from './frontend.js';
import { IotlbApplier } from './iotlb.js';
import type { TableEntry } from './memtable.js';
import { Feature, bit } from './messages.js';
import type { Rings } from './rings.js';

export interface VhostUserOptions extends SubscriberOptions {
  /** The back-end's vhost-user socket (it listens; we connect). */
  backendSocket: string;
  /**
   * Virtio features to ask for (masked by what the back-end offers; VHOST_USER_F_PROTOCOL_FEATURES is
   * added when offered). Default VERSION_1. The device drivers export what they need (BLK_FEATURES,
   * NET_FEATURES).
   */
  virtioFeatures?: bigint;
  /** Give the back-end at most this many regions (default: all its slots). */
  maxSlots?: number;
  /** Map guest memory in this process too (needed by the virtqueue drivers). Default true. */
  mapMemory?: boolean;
  /** Deadline of every back-end request, in ms. Default 5000. */
  backendTimeoutMs?: number;
  /** Wait up to this long for the back-end's socket to accept. Default 5000. */
  connectTimeoutMs?: number;
  /** A pino logger for memory-table messages and failures. Default: none. */
  logger?: Logger;
  /**
   * Put the back-end's device behind a guest IOMMU: attach it to this I/O address space (feature IOAS) and
   * make the IOAS its device IOTLB. The back-end must offer VIRTIO_F_ACCESS_PLATFORM, BACKEND_REQ and
   * REPLY_ACK (dpdk-testpmd with iommu-support=1 does; qemu-storage-daemon 7.2 does not): otherwise
   * MMB_ERR_UNSUPPORTED before anything is attached.
   */
  ioas?: string;
  /** The device's name in the IOAS. Default: the subscriber's name, else 'vhost-user'. */
  device?: string;
}

export class VhostUserSubscriber extends Subscriber {
  private constructor(
    target: BrokerTarget,
    private readonly vu: VhostUserApplier,
    opts: SubscriberOptions,
    /** What was negotiated with the back-end. */
    readonly negotiated: Negotiated,
    /** The device IOTLB, when the device is behind a guest IOMMU (`ioas`). */
    readonly iotlb: IotlbApplier | undefined,
  ) {
    super(target, vu, opts);
    if (iotlb) this.followIoas(iotlb);
  }

  /**
   * Connects to the back-end and negotiates, then attaches to the broker with kind 'vhost-user',
   * `maxRegions` = the back-end's slots and a coalesced view (unless `coalesce: false`), and resolves once
   * the initial map is in the back-end's memory table, confirmed.
   */
  static async attach(target: BrokerTarget, opts: VhostUserOptions): Promise<VhostUserSubscriber> {
    const { backendSocket, virtioFeatures, maxSlots, mapMemory, backendTimeoutMs, connectTimeoutMs, logger, ioas, device, ...subOpts } = opts;
    if (ioas !== undefined && (typeof ioas !== 'string' || ioas.length === 0))
      throw new InvalidArgError(`ioas must be an IOAS name, got ${JSON.stringify(ioas)}`);
    for (const [what, v] of [
      ['maxSlots', maxSlots],
      ['maxRegions', subOpts.maxRegions],
    ] as const) {
      if (v !== undefined && (!Number.isSafeInteger(v) || v < 1)) throw new InvalidArgError(`${what} must be a positive integer, got ${v}`);
    }
    const fe = await VhostUserFrontend.connect(backendSocket, { timeoutMs: backendTimeoutMs ?? 5000, connectTimeoutMs: connectTimeoutMs ?? 5000 });
    let negotiated: Negotiated;
    try {
      negotiated = await fe.negotiate(virtioFeatures ?? bit(Feature.VERSION_1), { iommu: ioas !== undefined });
    } catch (err) {
      fe.close();
      throw err;
    }
    const limit = Math.min(negotiated.maxMemSlots, maxSlots ?? Infinity, subOpts.maxRegions ?? Infinity);
    const applier = new VhostUserApplier(fe, negotiated.memMode, limit, { mapMemory: mapMemory ?? true, ...(logger ? { logger } : {}) });
    const iotlb = ioas !== undefined ? new IotlbApplier(fe, ioas, () => applier.entries(), logger) : undefined;
    const sub = new VhostUserSubscriber(
      target,
      applier,
      { kind: 'vhost-user', coalesce: true, ...subOpts, maxRegions: limit, mapsFromZero: true },
      negotiated,
      iotlb,
    );
    // The driver's own writes to guest memory (rings, request headers) count as dirty too.
    if (applier.memory) applier.memory.dirty = sub.dirty;
    sub.on('pause', (e) => {
      if (e.paused && !applier.rings.holding('pause')) {
        // A pause that fails half way (a back-end that does not answer) lets go of what it stopped.
        e.waitUntil(
          applier.rings.hold('pause').catch(async (err: unknown) => {
            await applier.rings.release('pause').catch(() => undefined);
            throw err;
          }),
        );
      } else if (!e.paused) e.waitUntil(applier.rings.release('pause'));
    });
    fe.on('close', (reason) => {
      if (reason) sub.emit('error', toMmbError(reason));
      logger?.warn({ backend: backendSocket, reason: reason?.message }, 'vhost-user back-end gone: detaching from the broker');
      // A change in flight fails on the closed connection and is nacked; only then detach, so that the
      // broker sees the nack (the transaction rolls back) rather than a client that vanished.
      void applier
        .idle()
        .then(() => new Promise((r) => setImmediate(r)))
        .then(() => sub.close())
        .catch(() => undefined);
    });
    try {
      await sub.report({ backend: `vhost-user-${negotiated.memMode}`, pinned: 0 });
      // The back-end maps every region we hand it: should this bridge's connection end without a clean
      // close, the broker fences the back-end's process with it (DELEGATE, feature FENCE).
      const pidfd = fe.backendPidfd();
      if (pidfd >= 0) await sub.delegate([{ name: `vhost-user back-end at ${backendSocket}`.slice(0, 64), pidfd }]);
      await sub.start();
      // The device's IOTLB starts with the IOAS's mappings (updates sent, confirmed) before this resolves.
      if (ioas !== undefined) await sub.attachIoas(ioas, [device ?? subOpts.name ?? 'vhost-user']);
    } catch (err) {
      await sub.close().catch(() => undefined);
      throw err;
    }
    logger?.info(
      { backend: backendSocket, memMode: negotiated.memMode, maxSlots: limit, space: sub.space, client: sub.id, ioas },
      'vhost-user front-end attached',
    );
    return sub;
  }

  get frontend(): VhostUserFrontend {
    return this.vu.frontend;
  }

  /** 'slots' (ADD_MEM_REG / REM_MEM_REG) or 'table' (SET_MEM_TABLE only). */
  get memMode(): 'slots' | 'table' {
    return this.vu.mode;
  }

  /** The most regions the back-end is given: what this client declared as maxRegions. */
  get maxSlots(): number {
    return this.vu.maxSlots;
  }

  /** This process's mappings of guest memory (what the virtqueue drivers read and write). */
  get memory(): GuestMemory {
    if (!this.vu.memory) throw new InvalidArgError('this vhost-user subscriber was attached with mapMemory: false');
    return this.vu.memory;
  }

  /** The back-end's memory table as it confirmed it, sorted by gpa. */
  backendTable(): TableEntry[] {
    return this.vu.entries();
  }

  get stats(): MemTableStats {
    return this.vu.stats;
  }

  /** The vrings this process drives on the back-end: the virtio drivers join them (VirtioBlk, VirtioNet). */
  get rings(): Rings {
    return this.vu.rings;
  }

  /** Whether the back-end logs its writes to guest memory now (a region of its table logs dirty pages). */
  get logging(): boolean {
    return this.vu.loggingOn;
  }
}
