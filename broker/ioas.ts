// I/O address spaces (feature IOAS, docs/ioas.md): beside an address space's guest-physical map, named and
// versioned maps from IOVA ranges to guest-physical ranges, each one what a guest's IOMMU lets a group of
// devices reach. The owner (the VMM's emulated IOMMU) changes them by transactions: a guest's map, and its
// IOTLB invalidation as an unmap that completes only when every attached client let go. Subscribers attach
// devices to an IOAS one by one (a vfio-like client may hold devices in several; several devices share one).
//
// Everything runs in the address space's one work queue, so an IOAS transaction never interleaves with a
// guest-physical one, and it reuses the space's machinery (AddressSpace: fan-out with one deadline, the
// vote and its rollback, fencing through broker/fence.ts, the finish round). The same guarantees, by the
// same code:
//   1. plan: validate against the committed mappings and the committed guest-physical map (iova-map.ts)
//      and every attached client's reserved IOVA ranges and DMA-mapping budget; any problem is a typed
//      error and nothing was sent to anyone;
//   2. fence: a client whose connection ended while it was attached, and the IOAS mapped something, may
//      still DMA through its host IOMMU: it is a holder of the IOAS until fenced, and an unmap waits for it
//      exactly as a guest-physical removal waits for the holders of its memory;
//   3. vote (only when the transaction maps something): EV_IOAS_TXN to every attached client at once; a
//      client maps and pins new IOVA ranges that overlap nothing being unmapped, and acks; a refusal rolls
//      back (EV_IOAS_ROLLBACK) and changes nothing;
//   4. commit: the IOAS changes, its generation advances; with unmaps, EV_IOAS_COMMITTED carries a seq and
//      every client acks only once its host IOMMU no longer maps them (who fails is evicted and fenced).
//      A transaction that only unmaps cannot be refused: it skips the vote and is sent once, committed
//      (EV_IOAS_TXN `final`), one round trip for a guest's synchronous invalidation.
//
// Consistency with the guest-physical map: a mapping points only at RAM that exists (checked when it is
// planned), and a COMMIT that would remove RAM an IOAS maps, or change its access, is refused
// (MMB_ERR_RAM_MAPPED; checkCommit()): see docs/ioas.md for why refusing is what a guest's own unplug does.
import type { Logger } from 'pino';
import {
  ClientLimitError,
  ClientTimeoutError,
  DisconnectedError,
  Feature,
  FeatureError,
  InvalidArgError,
  IoasBusyError,
  IoasExistsError,
  Msg,
  NoDeviceError,
  NoIoasError,
  NotOwnerError,
  RamMappedError,
  ReservedRangeError,
  SpaceLimitError,
  StaleGenerationError,
  StateError,
  type ClientRef,
  type Ioas as IoasRequest,
  type IoasResult,
  type IovaMapping,
  type MmbError,
  type Region,
  type SpaceLimits,
  hex,
  inclusiveText,
  rangeText,
  rangesOverlap,
} from '../protocol/index.js';
import type { Fences, Holder } from './fence.js';
import { IovaMap, bytesOf, splitMappings, type IovaPlan } from './iova-map.js';
import type { Plan } from './map.js';
import type { AckResult, Session, SubscriberSession } from './session.js';

/** At most this many IOASes per address space. */
export const MAX_IOAS = 1024;

/** What an IOAS borrows from its address space (broker/space.ts): its queue, fan-out, vote and fences. */
export interface IoasHost {
  readonly name: string;
  readonly log: Logger;
  readonly limits: SpaceLimits;
  readonly maxFrameBytes: number;
  readonly fences: Fences;
  /** The committed guest-physical map, sorted by gpa. */
  regions(): readonly Region[];
  isSubscriber(s: Session): s is SubscriberSession;
  isOwner(s: Session): boolean;
  /** Throws MMB_ERR_TOO_BUSY when the queue is full of transactions. */
  admitCommit(): void;
  /** Runs `work` in the space's queue, after everything queued before it. */
  enqueue<T>(work: () => Promise<T>, counted: boolean): Promise<T>;
  /** Runs a resuming subscriber's `run` between transactions, or at once in a fence window (AddressSpace.resumeHolder). */
  resumeHolder<T>(session: SubscriberSession, run: () => Promise<T>): Promise<T>;
  fenceHolders(holders: () => Holder[], generation: number): Promise<void>;
  runVote(
    targets: readonly SubscriberSession[],
    send: (s: SubscriberSession, seq: number) => void,
    rollback: (s: SubscriberSession, seq: number) => void,
    generation: number,
    holders: () => Holder[],
    mayRetry: boolean,
  ): Promise<{ results: Map<SubscriberSession, AckResult>; retry?: true }>;
  finish(
    targets: readonly SubscriberSession[],
    send: (s: SubscriberSession, seq: number) => void,
    generation: number,
    holders: () => Holder[],
  ): Promise<Holder[]>;
  committedUnfenced(unfenced: readonly Holder[], generation: number, held: string): MmbError;
  evict(s: Session, err: MmbError): Holder | undefined;
  refusal(client: ClientRef, cause: MmbError, generation: number): MmbError;
}

/** One I/O address space. */
class Ioas {
  generation = 0;
  readonly map = new IovaMap();
  /** Attached clients and their devices. */
  readonly attached = new Map<Session, Set<string>>();
  /** Clients being sent the IOAS (their first device's sync, not acked yet): they may map part of it already. */
  readonly syncing = new Set<Session>();
  /**
   * Set while a committed transaction's unmaps are being finished: they are gone from `map` already, but
   * a client may still map them until it acked.
   */
  unmapping = false;
  constructor(readonly name: string) {}
}

export interface IoasStatus {
  name: string;
  generation: number;
  mappings: number;
  bytes: number;
  /** `pinned`: what the client last reported pinned (REPORT), across its IOASes. */
  attached: { client: ClientRef; devices: string[]; pinned?: number }[];
  holders: number[];
}

export class IoSpaces {
  private readonly all = new Map<string, Ioas>();
  /** Holders of connections that were attached to IOASes with mappings: those IOASes, by name. */
  private readonly held = new Map<Holder, Set<string>>();
  /** Of those, what their resuming connection has re-synced so far (see reconciled()). */
  private readonly resynced = new Map<Holder, { map: boolean; ioas: Set<string> }>();

  constructor(private readonly host: IoasHost) {}

  get size(): number {
    return this.all.size;
  }

  /** One IOAS request; owners create, destroy and commit, subscribers attach and detach devices. */
  request(session: Session, msg: IoasRequest): Promise<IoasResult> {
    switch (msg.op) {
      case 'create':
        this.requireOwner(session);
        return this.host.enqueue(async () => this.create(msg.ioas), false);
      case 'destroy':
        this.requireOwner(session);
        return this.host.enqueue(async () => this.destroy(msg.ioas), false);
      case 'commit':
        this.requireOwner(session);
        this.host.admitCommit();
        return this.host.enqueue(() => this.commit(session, msg.ioas, msg.ops, msg.expect), true);
      case 'attach':
      case 'detach': {
        if (!this.host.isSubscriber(session)) throw new StateError('only an attached subscriber attaches devices to an IOAS');
        if ((session.features & Feature.TWO_PHASE) === 0) throw new FeatureError('following an IOAS needs the TWO_PHASE feature');
        if (msg.devices.length === 0) throw new InvalidArgError(`${msg.op} names no device`);
        if (new Set(msg.devices).size !== msg.devices.length) throw new InvalidArgError(`${msg.op} names a device twice: ${JSON.stringify(msg.devices)}`);
        const run = () => (msg.op === 'attach' ? this.attach(session, msg.ioas, msg.devices) : this.detach(session, msg.ioas, msg.devices));
        // A client resuming a connection that a transaction waits to fence re-syncs in that transaction's
        // fence window: its reconcile is what the transaction waits for (AddressSpace.resumeHolder).
        return this.host.resumeHolder(session, run);
      }
    }
  }

  /**
   * A COMMIT of the guest-physical map is refused (before anything is sent) when it removes a region, or
   * changes whether it is read-only, while an IOVA mapping points into it: a device may still DMA there.
   */
  checkCommit(plan: Plan): void {
    if (this.all.size === 0) return;
    const touched = [...plan.removes, ...plan.sets.filter((x) => x.before.readonly !== x.after.readonly).map((x) => x.before)];
    for (const r of touched) {
      for (const io of this.all.values()) {
        const into = io.map.into(r.gpa, r.size);
        const m = into[0];
        if (!m) continue;
        const what = plan.removes.includes(r) ? 'remove' : 'change the access of';
        const more = into.length > 1 ? ` and ${into.length - 1} more mapping(s) into it` : '';
        throw new RamMappedError(
          `cannot ${what} region ${JSON.stringify(r.name)} ${rangeText(r.gpa, r.size)}: IOAS ${JSON.stringify(io.name)} maps IOVA ${rangeText(m.iova, m.size)} to gpa ${hex(m.gpa)}${more}; unmap first`,
        );
      }
    }
  }

  /**
   * A subscriber's connection ended (or it sent DETACH): it leaves every IOAS. If `holder` is set it may
   * still reach what it was given, and so through its host IOMMU every IOAS it was attached to that mapped
   * something: unmaps there wait until it is fenced.
   */
  released(session: Session, holder: Holder | undefined): void {
    const names = new Set<string>();
    for (const io of this.all.values()) {
      const syncing = io.syncing.delete(session);
      if (!io.attached.delete(session) && !syncing) continue;
      if (io.map.size > 0 || io.unmapping) names.add(io.name);
      this.host.log.info({ client: session.ref(), ioas: io.name }, 'client left the IOAS');
    }
    if (holder && names.size > 0) this.held.set(holder, names);
    this.prune();
  }

  /**
   * A connection that resumes an earlier one (ATTACH.resume.client) acked a sync: of the guest-physical
   * map (`ioas` undefined) or of an IOAS. The holder of the earlier connection is fenced (it reconciled)
   * once it re-synced the map and every IOAS it was attached to: until then it may still map IOVAs that
   * were unmapped meanwhile.
   */
  reconciled(session: Session, ioas: string | undefined): void {
    const client = session.subscriber?.resumes;
    if (client === undefined) return;
    for (const h of this.host.fences.all()) {
      if (h.ref.id !== client || h.ref.pid !== session.pid || h.reason === 'leaving' || h.state === 'fenced') continue;
      const need = this.held.get(h);
      if (!need) {
        if (ioas === undefined) h.fence('reconciled');
        continue;
      }
      const done = this.resynced.get(h) ?? { map: false, ioas: new Set(need) };
      if (ioas === undefined) done.map = true;
      else done.ioas.delete(ioas);
      this.resynced.set(h, done);
      if (done.map && done.ioas.size === 0) h.fence('reconciled');
    }
    this.prune();
  }

  status(): IoasStatus[] {
    this.prune();
    return [...this.all.values()].map((io) => ({
      name: io.name,
      generation: io.generation,
      mappings: io.map.size,
      bytes: io.map.bytes,
      attached: [...io.attached].map(([s, devices]) => ({
        client: s.ref(),
        devices: [...devices],
        ...(s.subscriber?.reported.pinned !== undefined ? { pinned: s.subscriber.reported.pinned } : {}),
      })),
      holders: this.holdersOf(io.name).map((h) => h.ref.id),
    }));
  }

  // --- owner requests -------------------------------------------------------------------------------

  private create(name: string): IoasResult {
    if (this.all.has(name)) throw new IoasExistsError(`address space ${JSON.stringify(this.host.name)} already has an IOAS named ${JSON.stringify(name)}`);
    if (this.all.size >= MAX_IOAS) throw new SpaceLimitError(`an address space has at most ${MAX_IOAS} IOASes`);
    this.all.set(name, new Ioas(name));
    this.host.log.info({ ioas: name }, 'IOAS created');
    return { generation: 0 };
  }

  private destroy(name: string): IoasResult {
    const io = this.require(name);
    const holders = this.holdersOf(name);
    if (io.attached.size > 0 || io.syncing.size > 0 || holders.length > 0) {
      const who = [
        ...[...io.attached.keys(), ...io.syncing].map((s) => s.describe()),
        ...holders.map((h) => `${h.ref.kind} client ${JSON.stringify(h.ref.name)} (#${h.ref.id}, connection ended, not fenced yet)`),
      ];
      throw new IoasBusyError(`IOAS ${JSON.stringify(name)} cannot be destroyed while ${who.join(', ')} may reach it`);
    }
    this.all.delete(name);
    this.host.log.info({ ioas: name, mappings: io.map.size }, 'IOAS destroyed');
    return { generation: io.generation };
  }

  private async commit(owner: Session, name: string, ops: Parameters<IovaMap['plan']>[0], expect: number | undefined): Promise<IoasResult> {
    if (owner.closed || !this.host.isOwner(owner)) throw new DisconnectedError('the owner disconnected before its IOAS commit ran');
    const io = this.require(name);
    if (expect !== undefined && expect !== io.generation) {
      throw new StaleGenerationError(`expected generation ${expect} of IOAS ${JSON.stringify(io.name)}, it is at ${io.generation}`, {
        generation: io.generation,
      });
    }
    const plan = io.map.plan(ops, this.host.regions());
    if (plan.ops.length === 0) return { generation: io.generation, mapped: 0, unmapped: 0 };
    const generation = io.generation + 1;
    const started = performance.now();
    this.checkTargets(io, plan, this.targets(io));
    const holders = () => (plan.unmaps.length > 0 ? this.holdersOf(io.name) : []);
    const result = { generation, mapped: bytesOf(plan.maps), unmapped: bytesOf(plan.unmaps) };
    const held = `its host IOMMU may still map IOVAs of IOAS ${JSON.stringify(io.name)} that were unmapped`;

    if (plan.maps.length === 0) {
      // Only unmaps: nothing anyone could refuse, so no vote. Committed first, then sent once; each client
      // acks when its host IOMMU no longer maps them.
      await this.host.fenceHolders(holders, generation);
      this.apply(io, plan, generation);
      const unfenced = await this.finishing(io, () =>
        this.host.finish(
          this.targets(io),
          (s, seq) => s.send({ t: Msg.EV_IOAS_TXN, seq, ioas: io.name, generation, ops: plan.ops, final: true }),
          generation,
          holders,
        ),
      );
      this.logCommit(io, plan, started);
      if (unfenced.length > 0) throw this.host.committedUnfenced(unfenced, generation, held);
      return result;
    }

    for (let attempt = 1; ; attempt++) {
      await this.host.fenceHolders(holders, generation);
      const targets = this.targets(io);
      this.checkTargets(io, plan, targets);
      const vote = await this.host.runVote(
        targets,
        (s, seq) => s.send({ t: Msg.EV_IOAS_TXN, seq, ioas: io.name, generation, ops: plan.ops }),
        (s, seq) => s.send({ t: Msg.EV_IOAS_ROLLBACK, seq, ioas: io.name, generation }),
        generation,
        holders,
        attempt === 1,
      );
      if (vote.retry === undefined) break;
    }
    this.apply(io, plan, generation);
    if (plan.unmaps.length === 0) {
      // Nothing to take away: the vote established everything; the verdict needs no answer.
      for (const s of this.targets(io)) s.send({ t: Msg.EV_IOAS_COMMITTED, ioas: io.name, generation });
      this.logCommit(io, plan, started);
      return result;
    }
    const unfenced = await this.finishing(io, () =>
      this.host.finish(this.targets(io), (s, seq) => s.send({ t: Msg.EV_IOAS_COMMITTED, ioas: io.name, generation, seq }), generation, holders),
    );
    this.logCommit(io, plan, started);
    if (unfenced.length > 0) throw this.host.committedUnfenced(unfenced, generation, held);
    return result;
  }

  /** Runs the finish round of a transaction that unmaps: meanwhile a client whose connection ends holds the IOAS. */
  private async finishing(io: Ioas, finish: () => Promise<Holder[]>): Promise<Holder[]> {
    io.unmapping = true;
    try {
      return await finish();
    } finally {
      io.unmapping = false;
    }
  }

  private apply(io: Ioas, plan: IovaPlan, generation: number): void {
    io.map.commit(plan);
    io.generation = generation;
  }

  private logCommit(io: Ioas, plan: IovaPlan, started: number): void {
    this.host.log.debug(
      { ioas: io.name, generation: io.generation, maps: plan.maps.length, unmaps: plan.unmaps.length, ms: +(performance.now() - started).toFixed(3) },
      'IOAS transaction committed',
    );
  }

  /** Who follows `io` now: attached clients that are still subscribers of the space. */
  private targets(io: Ioas): SubscriberSession[] {
    return [...io.attached.keys()].filter((s): s is SubscriberSession => !s.closed && this.host.isSubscriber(s));
  }

  /** What each attached client reported (REPORT): its reserved IOVA ranges and remaining DMA mappings. */
  private checkTargets(io: Ioas, plan: IovaPlan, targets: readonly SubscriberSession[]): void {
    for (const s of targets) {
      const { reserved, dmaAvailable } = s.subscriber.reported;
      if (reserved.length > 0) {
        for (const m of plan.maps) {
          const x = reserved.find((r) => rangesOverlap(m.iova, m.size, r.start, r.size));
          if (x) {
            throw new ReservedRangeError(
              `IOAS ${JSON.stringify(io.name)}: IOVA ${rangeText(m.iova, m.size)} covers ${inclusiveText(x.start, x.size)}, which ${s.describe()} reported as reserved`,
              { client: s.ref() },
            );
          }
        }
      }
      const needed = plan.maps.length - plan.unmaps.length;
      if (dmaAvailable !== undefined && needed > dmaAvailable) {
        throw new ClientLimitError(`${s.describe()} has room for ${dmaAvailable} more DMA mappings; this IOAS transaction needs ${needed}`, {
          client: s.ref(),
        });
      }
    }
  }

  // --- subscriber requests --------------------------------------------------------------------------

  /** Devices join `name`; the client's first device there brings it the IOAS (EV_IOAS_SYNC), acked before the reply. */
  private async attach(session: Session, name: string, devices: readonly string[]): Promise<IoasResult> {
    this.requireFollower(session);
    const io = this.require(name);
    for (const other of this.all.values()) {
      const taken = other !== io ? devices.find((d) => other.attached.get(session)?.has(d)) : undefined;
      if (taken !== undefined)
        throw new IoasBusyError(
          `device ${JSON.stringify(taken)} of ${session.describe()} is attached to IOAS ${JSON.stringify(other.name)}; detach it there first`,
        );
    }
    const have = io.attached.get(session);
    if (have) {
      for (const d of devices) have.add(d);
      return { generation: io.generation };
    }
    io.syncing.add(session);
    const r = await this.sync(session, io, io.map.mappings());
    // A timeout evicts it (syncFailed) while it still counts as syncing: its holder then holds this IOAS.
    const err = r.kind === 'ack' ? undefined : this.syncFailed(session, io, r, 'follow');
    io.syncing.delete(session);
    if (r.kind === 'ack') {
      io.attached.set(session, new Set(devices));
      this.host.log.info({ client: session.ref(), ioas: name, devices, mappings: io.map.size }, 'client attached to the IOAS');
      // Attached before anything it resumes is fenced: a transaction waiting for that fence sends it the vote.
      this.reconciled(session, name);
      return { generation: io.generation };
    }
    throw err;
  }

  /** Devices leave `name`; with the last one the client unmaps everything (an empty EV_IOAS_SYNC) and is out. */
  private async detach(session: Session, name: string, devices: readonly string[]): Promise<IoasResult> {
    this.requireFollower(session);
    const io = this.require(name);
    const have = io.attached.get(session);
    const missing = devices.find((d) => !have?.has(d));
    if (!have || missing !== undefined)
      throw new NoDeviceError(`device ${JSON.stringify(missing ?? devices[0])} of ${session.describe()} is not attached to IOAS ${JSON.stringify(name)}`);
    if (devices.length < have.size) {
      for (const d of devices) have.delete(d);
      return { generation: io.generation };
    }
    const r = await this.sync(session, io, []);
    if (r.kind === 'ack') {
      io.attached.delete(session);
      this.host.log.info({ client: session.ref(), ioas: name }, 'client detached from the IOAS');
      return { generation: io.generation };
    }
    // It did not let go: it may still reach the IOAS's mappings. Evicted, it is a holder until fenced.
    const err = this.syncFailed(session, io, r, 'let go of');
    if (r.kind === 'nack' && !session.closed) this.host.evict(session, err);
    throw err;
  }

  /** Sends `session` the IOAS as `mappings` (its whole content, or nothing) and waits for the ack. */
  private async sync(session: Session, io: Ioas, mappings: readonly IovaMapping[]): Promise<AckResult> {
    const { seq, done } = session.expectAck();
    for (const part of splitMappings(mappings, this.host.maxFrameBytes)) {
      session.send({ t: Msg.EV_IOAS_SYNC, seq, ioas: io.name, generation: io.generation, ...part });
    }
    const timer = setTimeout(() => session.settle(seq, { kind: 'timeout' }), this.host.limits.ackTimeoutMs);
    const r = await done;
    clearTimeout(timer);
    return r;
  }

  private syncFailed(session: Session, io: Ioas, r: AckResult, what: string): MmbError {
    if (r.kind === 'nack') return this.host.refusal(session.ref(), r.error, io.generation);
    if (r.kind === 'timeout') {
      const err = new ClientTimeoutError(`${session.describe()} did not ack IOAS ${JSON.stringify(io.name)} within ${this.host.limits.ackTimeoutMs} ms`, {
        client: session.ref(),
      });
      this.host.evict(session, err);
      return err;
    }
    return new DisconnectedError(`${session.describe()} disconnected before it could ${what} IOAS ${JSON.stringify(io.name)}`);
  }

  // --- internals ------------------------------------------------------------------------------------

  /** Unfenced holders that may still reach IOAS `name`'s mappings. */
  private holdersOf(name: string): Holder[] {
    return [...this.held].filter(([h, names]) => h.state !== 'fenced' && names.has(name)).map(([h]) => h);
  }

  /** Forgets fenced holders. */
  private prune(): void {
    for (const h of this.held.keys()) {
      if (h.state !== 'fenced') continue;
      this.held.delete(h);
      this.resynced.delete(h);
    }
  }

  private require(name: string): Ioas {
    const io = this.all.get(name);
    if (!io) throw new NoIoasError(`address space ${JSON.stringify(this.host.name)} has no IOAS named ${JSON.stringify(name)}`);
    return io;
  }

  private requireOwner(session: Session): void {
    if (!this.host.isOwner(session)) {
      throw session.state === 'subscriber'
        ? new NotOwnerError('only the owner changes an IOAS; subscribers attach and detach devices')
        : new StateError('attach as owner before changing an IOAS');
    }
  }

  private requireFollower(session: Session): void {
    if (session.closed || !this.host.isSubscriber(session))
      throw new DisconnectedError(`${session.describe()} left the address space before its IOAS request ran`);
  }
}
