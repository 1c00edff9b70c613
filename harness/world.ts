// The state a harness run works on: the broker process, the owner (this process, over the socket), the
// client processes, and the model of what the map should be. Operations and faults change it only
// through these helpers, which keep the model equal to what the broker confirmed.
import fs from 'node:fs';
import path from 'node:path';
import { OwnerClient, createSealedMemfd } from '../clients/index.js';
import { native } from '../native/index.js';
import { isMmbError, toMmbError, type CommitOp, type CommitResult, type MmbError } from '../protocol/index.js';
import { waitFor } from '../testkit/wait.js';
import { Model, type BrokerBacking, type Memfd } from './model.js';
import { BrokerProc, spawnClient, type ClientProc } from './procs.js';
import { CLIENT_KINDS, type ClientKind, type HarnessOptions } from './options.js';
import type { Rng } from '../testkit/rng.js';

export const SPACE = 'vm0';

export type CommitOutcome = { ok: true; result: CommitResult } | { ok: false; err: MmbError };

export class World {
  readonly model = new Model();
  clients: ClientProc[] = [];
  broker!: BrokerProc;
  owner!: OwnerClient;
  readonly socket: string;
  private nextClient = 0;

  constructor(
    readonly opts: HarnessOptions,
    readonly rng: Rng,
    readonly dir: string,
  ) {
    this.socket = path.join(dir, 'broker.sock');
  }

  async start(): Promise<void> {
    this.broker = await BrokerProc.start(this.socket, SPACE, this.opts.ackTimeoutMs);
    // `mmbroker serve` starts its spaces unpublished; the (empty) map is authoritative from here on.
    this.owner = await OwnerClient.attach(this.socket, { space: SPACE, name: 'harness-owner', publish: true });
  }

  /** Live clients of a kind (the deliberately broken ones excluded unless asked for). */
  of(kind: ClientKind, broken = false): ClientProc[] {
    return this.clients.filter((c) => c.kind === kind && (broken || !c.broken));
  }

  /** Client processes that work as documented: the ones operations and faults may pick. */
  healthy(): ClientProc[] {
    return this.clients.filter((c) => !c.broken);
  }

  /** Starts a client process of `kind` and waits until it attached and acked its initial map. */
  async join(kind: ClientKind, broken?: 'skip-unmap' | 'pin-twice'): Promise<ClientProc> {
    const n = this.nextClient++;
    const devices = kind === 'vfio' ? (broken ? ['dev0', 'dev1'] : Array.from({ length: this.rng.int(1, 2) }, (_, i) => `c${n}d${i}`)) : [];
    const c = await spawnClient({ socket: this.socket, space: SPACE, kind, name: `${broken ?? kind}-${n}`, devices, ...(broken ? { broken } : {}) });
    this.clients.push(c);
    return c;
  }

  /** Detaches a client (SIGTERM: it unmaps, unpins, closes); resolves with its exit code. */
  async leave(c: ClientProc, sig: NodeJS.Signals = 'SIGTERM'): Promise<number | null> {
    this.clients = this.clients.filter((x) => x !== c);
    return c.stop(sig);
  }

  /** A kind to add, favouring kinds below their configured count. */
  pickKind(): ClientKind {
    const weights = Object.fromEntries(CLIENT_KINDS.map((k) => {
      const want = this.opts.clients[k] ?? 0;
      return [k, want === 0 ? 0 : Math.max(0.2, want - this.of(k).length + 1)];
    })) as Record<ClientKind, number>;
    return this.rng.weighted(weights);
  }

  // --- the owner's side ------------------------------------------------------------------------------

  /** A new memfd of `size` bytes, registered with the broker and held by the owner. */
  async newBacking(size: number): Promise<BrokerBacking> {
    const name = this.model.memfdName();
    const memfd: Memfd = { name, fd: createSealedMemfd(name, size), size };
    this.model.memfds.set(name, memfd);
    return this.register(memfd);
  }

  /** Registers `memfd` (again): a new broker backing id, held. */
  async register(memfd: Memfd): Promise<BrokerBacking> {
    const r = await this.owner.addBacking(memfd.fd, memfd.name);
    const b: BrokerBacking = { id: r.backing, memfd, held: true };
    this.model.backings.set(b.id, b);
    return b;
  }

  /** Commits `ops`; on success the model follows (generation, regions, backings the broker released). */
  async commit(ops: CommitOp[]): Promise<CommitOutcome> {
    try {
      const result = await this.owner.commit(ops);
      this.applyToModel(ops, result.generation);
      return { ok: true, result };
    } catch (err) {
      return { ok: false, err: toMmbError(err) };
    }
  }

  applyToModel(ops: readonly CommitOp[], generation: number): void {
    const m = this.model;
    for (const op of ops) if (op.op === 'remove') m.regions.delete(String(op.region));
    for (const op of ops) {
      if (op.op !== 'set') continue;
      const r = m.regions.get(String(op.region));
      if (!r) continue;
      if (op.readonly !== undefined) r.readonly = op.readonly;
      if (op.logDirty !== undefined) r.logDirty = op.logDirty;
    }
    for (const op of ops) {
      if (op.op === 'add') m.regions.set(op.name, { name: op.name, gpa: op.gpa, size: op.size, backing: op.backing, offset: op.offset, readonly: op.readonly ?? false, logDirty: op.logDirty ?? false });
    }
    m.generation = generation;
    this.releaseUnused();
  }

  /** Drops the broker backings that are neither held nor referenced from the model, and closes memfds nothing uses. */
  releaseUnused(): void {
    this.model.prune();
    for (const memfd of this.model.orphanMemfds()) {
      native.close(memfd.fd);
      this.model.memfds.delete(memfd.name);
    }
  }

  /** Attaches a new owner connection (after a disconnect or a broker restart), retrying while the old one lingers. */
  async reattachOwner(): Promise<void> {
    this.owner = await waitFor('the owner to reattach', async () => {
      try {
        return await OwnerClient.attach(this.socket, { space: SPACE, name: 'harness-owner' });
      } catch (err) {
        if (isMmbError(err, 'MMB_ERR_OWNER_EXISTS') || isMmbError(err, 'MMB_ERR_CONNECT')) return undefined;
        throw err;
      }
    }, 20_000);
  }

  async close(): Promise<void> {
    for (const c of this.clients) await c.stop('SIGTERM');
    this.clients = [];
    this.owner?.close();
    await this.broker?.stop('SIGTERM');
    for (const m of this.model.memfds.values()) native.close(m.fd);
    this.model.memfds.clear();
    fs.rmSync(this.dir, { recursive: true, force: true });
  }
}
