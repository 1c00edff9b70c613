// A subscriber's I/O address spaces (feature IOAS, docs/ioas.md): the IOASes its devices are attached to,
// what the broker committed in each, what the client established, and the handling of the IOAS events,
// acked or nacked like every other event. The Subscriber (subscriber.ts) owns one when its kind can follow
// IOASes, runs its event handlers in the same ordered chain as the map's events, and has it re-attach
// after a reconnect.
//
//   EV_IOAS_SYNC       the whole IOAS (an attach, a re-attach) or nothing (the last device left): the
//                      established mappings are made equal to it, keeping what is unchanged;
//   EV_IOAS_TXN        a vote: map and pin what overlaps nothing being unmapped, ack; or, `final`, a
//                      committed transaction that only unmaps: unmap, ack;
//   EV_IOAS_COMMITTED  with a seq: unmap (the host IOMMU no longer maps it when the ack goes), then map
//                      what needed that room, ack;
//   EV_IOAS_ROLLBACK   undo the vote, ack.
import {
  Msg,
  NoIoasError,
  isMmbError,
  toMmbError,
  type EvIoasCommitted,
  type EvIoasRollback,
  type EvIoasSync,
  type EvIoasTxn,
  type IoasResult,
  type IoasTxnOp,
  type IovaMapping,
  rangesOverlap,
} from '../protocol/index.js';
import type { Connection } from './connection.js';
import type { ViewRegion } from './view.js';
import { applyIoasOps, diffMappings, inverseIoas, isEmptyIoasChange, recordIoas, splitTxn, type IoasApplier, type IoasChange } from './ioas-view.js';

export type IoasEvent = EvIoasSync | EvIoasTxn | EvIoasCommitted | EvIoasRollback;

interface Followed {
  readonly name: string;
  /** Devices this client has attached to it (re-attached after a reconnect). */
  readonly devices: Set<string>;
  generation: number;
  /** The broker's committed mappings, by IOVA. */
  readonly committed: Map<number, IovaMapping>;
  /** What the applier has established, by IOVA. */
  readonly established: Map<number, IovaMapping>;
  /** A voted transaction not committed or rolled back yet: what its vote did, and what is left. */
  pending: { generation: number; ops: readonly IoasTxnOp[]; vote: IoasChange; commit: IoasChange } | undefined;
  syncParts: EvIoasSync[];
}

export class IoasFollower {
  private readonly followed = new Map<string, Followed>();

  constructor(
    readonly applier: IoasApplier,
    /** Told of every change established (for the subscriber's 'ioas' event). */
    private readonly onChange: (c: IoasChange) => void,
  ) {}

  /** The IOASes this client follows and their devices. */
  attachments(): { ioas: string; devices: string[]; generation: number; mappings: number }[] {
    return [...this.followed.values()].map((f) => ({ ioas: f.name, devices: [...f.devices], generation: f.generation, mappings: f.established.size }));
  }

  /** What this client established in `ioas`, sorted by IOVA. */
  mappings(ioas: string): IovaMapping[] {
    return [...(this.followed.get(ioas)?.established.values() ?? [])].sort((a, b) => a.iova - b.iova);
  }

  /** Attaches devices; the first one makes the broker send the IOAS, established before the reply comes. */
  async attach(conn: Connection, ioas: string, devices: readonly string[]): Promise<number> {
    // Recorded first: should the connection drop between the sync and the reply, the reconnect re-attaches them.
    const f = this.state(ioas);
    const added = devices.filter((d) => !f.devices.has(d));
    for (const d of added) f.devices.add(d);
    try {
      return ((await conn.request({ t: Msg.IOAS, op: 'attach', ioas, devices: [...devices] })) as IoasResult).generation;
    } catch (err) {
      // The connection dropped: the reconnect attaches them (or re-syncs what the broker already attached).
      if (isMmbError(err, 'MMB_ERR_DISCONNECTED')) throw err;
      for (const d of added) f.devices.delete(d);
      if (f.devices.size === 0 && f.established.size === 0) this.followed.delete(ioas);
      throw err;
    }
  }

  /** Detaches devices; with the last one everything of the IOAS is unmapped before the reply comes. */
  async detach(conn: Connection, ioas: string, devices: readonly string[]): Promise<void> {
    await conn.request({ t: Msg.IOAS, op: 'detach', ioas, devices: [...devices] });
    const f = this.followed.get(ioas);
    if (!f) return;
    for (const d of devices) f.devices.delete(d);
    if (f.devices.size === 0) this.followed.delete(ioas);
  }

  /**
   * After a reconnect: every IOAS followed is attached again with its devices, and its sync reconciles what
   * is established (the broker fences the earlier connection once all of them were re-synced). An IOAS
   * the broker no longer has (it restarted, and its owner did not make it again) is let go of entirely.
   */
  async reattach(conn: Connection): Promise<void> {
    for (const f of [...this.followed.values()]) {
      try {
        await conn.request({ t: Msg.IOAS, op: 'attach', ioas: f.name, devices: [...f.devices] });
      } catch (err) {
        if (!isMmbError(err, 'MMB_ERR_NO_IOAS')) throw err;
        await this.establish({ ioas: f.name, generation: f.generation, cause: 'sync', unmapped: [...f.established.values()], mapped: [] }, f);
        this.followed.delete(f.name);
        throw new NoIoasError(`IOAS ${JSON.stringify(f.name)} is gone from the broker: its mappings were unmapped, its devices stay attached here`, {
          cause: err,
        });
      }
    }
  }

  /**
   * Guest memory is going away under mappings (only after a re-sync of the map: the broker refuses to
   * remove RAM an IOAS maps): those mappings are unmapped first, wherever they are.
   */
  async letGo(regions: readonly ViewRegion[]): Promise<void> {
    for (const f of this.followed.values()) {
      const into = [...f.established.values()].filter((m) => regions.some((r) => rangesOverlap(m.gpa, m.size, r.gpa, r.size)));
      if (into.length === 0) continue;
      await this.establish({ ioas: f.name, generation: f.generation, cause: 'unplug', unmapped: into, mapped: [] }, f);
      for (const m of into) f.committed.delete(m.iova);
    }
  }

  /** Handles one IOAS event, in order with the map's events; acks or nacks what carries a seq. */
  async handle(conn: Connection, msg: IoasEvent): Promise<void> {
    switch (msg.t) {
      case Msg.EV_IOAS_SYNC:
        return this.onSync(conn, msg);
      case Msg.EV_IOAS_TXN:
        return this.onTxn(conn, msg);
      case Msg.EV_IOAS_COMMITTED:
        return this.onCommitted(conn, msg);
      case Msg.EV_IOAS_ROLLBACK:
        return this.onRollback(conn, msg);
    }
  }

  /** Releases nothing itself (the applier's close() does); forgets every IOAS. */
  close(): void {
    this.followed.clear();
  }

  private state(name: string): Followed {
    let f = this.followed.get(name);
    if (!f) {
      f = { name, devices: new Set(), generation: 0, committed: new Map(), established: new Map(), pending: undefined, syncParts: [] };
      this.followed.set(name, f);
    }
    return f;
  }

  private async onSync(conn: Connection, msg: EvIoasSync): Promise<void> {
    const f = this.state(msg.ioas);
    f.syncParts.push(msg);
    if (!msg.last) return;
    const parts = f.syncParts;
    f.syncParts = [];
    const target = parts.flatMap((p) => p.mappings);
    const change = diffMappings(f.established, target, f.name, msg.generation);
    if (!(await this.run(conn, msg.seq, change, f))) return;
    f.committed.clear();
    for (const m of target) f.committed.set(m.iova, m);
    f.generation = msg.generation;
    f.pending = undefined;
    ack(conn, msg.seq);
  }

  private async onTxn(conn: Connection, msg: EvIoasTxn): Promise<void> {
    const f = this.followed.get(msg.ioas);
    if (!f) return nack(conn, msg.seq, new NoIoasError(`this client does not follow IOAS ${JSON.stringify(msg.ioas)}`));
    const { vote, commit } = splitTxn(msg.ops, f.established, f.name, msg.generation);
    if (msg.final) {
      commit.cause = 'final';
      commit.mapped.push(...vote.mapped);
      if (!(await this.run(conn, msg.seq, commit, f))) return;
      applyIoasOps(f.committed, msg.ops);
      f.generation = msg.generation;
      ack(conn, msg.seq);
      return;
    }
    if (!(await this.run(conn, msg.seq, vote, f))) return;
    f.pending = { generation: msg.generation, ops: msg.ops, vote, commit };
    ack(conn, msg.seq);
  }

  private async onCommitted(conn: Connection, msg: EvIoasCommitted): Promise<void> {
    const f = this.followed.get(msg.ioas);
    const pending = f?.pending?.generation === msg.generation ? f.pending : undefined;
    if (f && pending) {
      if (msg.seq !== undefined && !(await this.run(conn, msg.seq, pending.commit, f))) return;
      applyIoasOps(f.committed, pending.ops);
      f.generation = msg.generation;
      f.pending = undefined;
    }
    if (msg.seq !== undefined) ack(conn, msg.seq);
  }

  private async onRollback(conn: Connection, msg: EvIoasRollback): Promise<void> {
    const f = this.followed.get(msg.ioas);
    const pending = f?.pending?.generation === msg.generation ? f.pending : undefined;
    if (f && pending) {
      if (!(await this.run(conn, msg.seq, inverseIoas(pending.vote), f))) return;
      f.pending = undefined;
    }
    ack(conn, msg.seq);
  }

  /** Establishes `c` and records it; on failure nacks `seq` (everything as it was) and returns false. */
  private async run(conn: Connection, seq: number, c: IoasChange, f: Followed): Promise<boolean> {
    try {
      await this.establish(c, f);
      return true;
    } catch (err) {
      nack(conn, seq, err);
      return false;
    }
  }

  private async establish(c: IoasChange, f: Followed): Promise<void> {
    if (isEmptyIoasChange(c)) return;
    await this.applier.applyIoas(c);
    recordIoas(f.established, c);
    this.onChange(c);
  }
}

function ack(conn: Connection, seq: number): void {
  if (!conn.closed) conn.send({ t: Msg.ACK, seq });
}

function nack(conn: Connection, seq: number, err: unknown): void {
  if (!conn.closed) conn.send({ t: Msg.NACK, seq, error: toMmbError(err).toWire() });
}
