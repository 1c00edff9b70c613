// The state a harness run works on: the broker process, the owner (this process, over the socket), the
// client processes, and the model of what the map should be. Operations and faults change it only
// through these helpers, which keep the model equal to what the broker confirmed.
import fs from 'node:fs';
import path from 'node:path';
import { OwnerClient, createSealedMemfd } from '../clients/index.js';
import { IoasOwner } from '../clients/ioas-owner.js';
import { native } from '../native/index.js';
import { UnsupportedError, isMmbError, toMmbError, type CommitOp, type CommitResult, type IoasOp, type IoasResult, type MmbError } from '../protocol/index.js';
import { have, makeImage, startQsd, QSD } from '../testkit/backends.js';
import { hugeMemfd, reserveHugePages, type HugeReservation } from '../testkit/hugepages.js';
import { OwnerRelay } from '../testkit/relay.js';
import { waitFor } from '../testkit/wait.js';
import type { Judged } from './invariants.js';
import { Model, PAGE, type BrokerBacking, type IovaMapping, type Memfd } from './model.js';
import { MomentJudge, type Moment } from './moment.js';
import { BROKEN_MODES, BrokerProc, spawnClient, type BrokenMode, type ClientProc } from './procs.js';
import type { RestartWindow } from './restart.js';
import { CLIENT_KINDS, type ClientKind, type HarnessOptions } from './options.js';
import type { Rng } from '../testkit/rng.js';
import type { Backend } from '../testkit/backends.js';

export const SPACE = 'vm0';

export type CommitOutcome = { ok: true; result: CommitResult } | { ok: false; err: MmbError };
export type IoasOutcome = { ok: true; result: IoasResult } | { ok: false; err: MmbError };

/** The I/O address space every run with --ioas starts with (shadow clients join it first). */
export const FIRST_IOAS = 'io0';

export class World {
  readonly model = new Model();
  clients: ClientProc[] = [];
  broker!: BrokerProc;
  owner!: OwnerClient;
  readonly socket: string;
  /** The owner connects here: the relay holds the broker's answer to each commit until the judge looked. */
  readonly ownerSocket: string;
  relay!: OwnerRelay;
  /** Set while a restarted broker's space is unpublished: commits then only rebuild the map. */
  restart: RestartWindow | undefined;
  // What the current step found besides its operation's own answer (drained into its result):
  /** Checks made during the step (at a held answer, in a restart window, while a vote is held). */
  judged: Judged[] = [];
  /** What each held answer showed. */
  moments: Moment[] = [];
  /** Lines for the step's detail. */
  notes: string[] = [];
  /** Where the system answered otherwise than documented (the outcome check). */
  surprises: string[] = [];
  private nextClient = 0;
  /** --hugetlb: the pages this run added to the kernel's pool (given back at the end). */
  private huge: HugeReservation | undefined;

  constructor(
    readonly opts: HarnessOptions,
    readonly rng: Rng,
    readonly dir: string,
  ) {
    this.socket = path.join(dir, 'broker.sock');
    this.ownerSocket = path.join(dir, 'owner.sock');
  }

  async start(): Promise<void> {
    // What the options need of the machine, before anything starts: typed errors, not a failed step.
    if ((this.opts.clients.bridge ?? 0) > 0 && !have(QSD)) {
      throw new UnsupportedError(`--bridge needs ${QSD} (each bridge client drives one); it is not on the PATH (Debian: package qemu-system-common)`);
    }
    if (this.opts.hugetlb > 0) {
      const size = this.opts.hugetlb;
      // Enough for the hugetlb part of a full map, at most 1 GiB of pages (or one 1 GiB page more than the cap).
      const pages = Math.max(2, Math.ceil(Math.min(this.opts.maxMapBytes, 2 ** 30) / size) + (size >= 2 ** 30 ? 1 : 0));
      this.huge = reserveHugePages(size, pages);
      if (this.huge.added === 0) {
        throw new UnsupportedError(
          `--hugetlb ${size / 2 ** 20}M: no page could be reserved: ${this.huge.missing ?? 'unknown'} (run as root on a machine with free contiguous memory)`,
        );
      }
    }
    this.broker = await BrokerProc.start(this.socket, SPACE, this.opts.ackTimeoutMs, undefined, this.opts.pipeline);
    this.relay = OwnerRelay.start(this.socket, this.ownerSocket, new MomentJudge(this).hooks);
    // `mmbroker serve` starts its spaces unpublished; the (empty) map is authoritative from here on.
    this.owner = await OwnerClient.attach(this.ownerSocket, { space: SPACE, name: 'harness-owner', publish: true });
    if (this.opts.ioas) {
      const r = await this.ioasCreate(FIRST_IOAS);
      if (!r.ok) throw r.err;
    }
  }

  /** --hugetlb: bytes of hugetlb pages the run may still put in new memfds (what it reserved, less what live hugetlb memfds hold). */
  hugeRoom(): number {
    if (!this.huge) return 0;
    let used = 0;
    for (const m of this.model.memfds.values()) if (m.pageSize > PAGE) used += m.size;
    return this.huge.added * this.huge.size - used;
  }

  /** The hugetlb pages this run reserved (what the report says). */
  get hugePages(): { size: number; added: number; missing?: string } | undefined {
    return this.huge ? { size: this.huge.size, added: this.huge.added, ...(this.huge.missing ? { missing: this.huge.missing } : {}) } : undefined;
  }

  /** What the step found besides its operation's answer; empties the records for the next step. */
  drain(): { judged: Judged[]; moments: Moment[]; notes: string[]; surprises: string[] } {
    const out = { judged: this.judged, moments: this.moments, notes: this.notes, surprises: this.surprises };
    this.judged = [];
    this.moments = [];
    this.notes = [];
    this.surprises = [...this.relay.errors.splice(0).map((e) => `the judge failed at a held answer: ${e.stack ?? e.message}`)];
    return out;
  }

  /** Live clients of a kind (the deliberately broken ones excluded unless asked for). */
  of(kind: ClientKind, broken = false): ClientProc[] {
    return this.clients.filter((c) => c.kind === kind && (broken || !c.broken));
  }

  /** Client processes that work as documented: the ones operations and faults may pick. */
  healthy(): ClientProc[] {
    return this.clients.filter((c) => !c.broken);
  }

  /**
   * Starts a client process of `kind` and waits until it attached and acked its initial map. One that the
   * broker evicted and killed while it established that map (pinning gigabytes past the ack deadline on a
   * loaded machine: documented) is noted and tried again, three times at most.
   */
  async join(kind: ClientKind, opts: { pinLimit?: number; ioas?: string } = {}): Promise<ClientProc> {
    const n = this.nextClient++;
    const devices = kind === 'vfio' || kind === 'shadow' ? Array.from({ length: this.rng.int(1, 2) }, (_, i) => `c${n}d${i}`) : [];
    const ioas = kind === 'shadow' ? (opts.ioas ?? this.rng.pick([...this.model.ioas.keys()].sort())) : undefined;
    for (let attempt = 1; ; attempt++) {
      const name = `${kind}-${n}${attempt > 1 ? `.${attempt}` : ''}`;
      const backend = kind === 'bridge' ? await this.startBackend(name) : undefined;
      try {
        const c = await spawnClient({
          socket: this.socket,
          space: SPACE,
          kind,
          name,
          devices,
          ...(backend ? { backend } : {}),
          ...(ioas !== undefined ? { ioas } : {}),
          ...(opts.pinLimit !== undefined ? { pinLimit: opts.pinLimit } : {}),
        });
        this.clients.push(c);
        return c;
      } catch (err) {
        await backend?.stop();
        const p = (err as { proc?: ClientProc }).proc;
        if (!p || !this.evictedAndKilled(p) || attempt >= 3) throw err;
        this.notes.push(`${p.describe()} was evicted and killed by the broker while it joined (${p.child.signalCode}), as documented; trying again`);
      }
    }
  }

  /** A qemu-storage-daemon of its own for a bridge client: a small raw image exported as vhost-user-blk. */
  private async startBackend(name: string): Promise<Backend> {
    const image = path.join(this.dir, `${name}.img`);
    makeImage(image, 2048);
    return startQsd(this.dir, image, { name });
  }

  /**
   * A bridge's back-end, once the bridge is gone: stopped (it may already be dead: the broker fences it
   * with the bridge), its image removed. Whatever it printed on stderr is a surprise (qemu-storage-daemon
   * prints nothing unless something went wrong).
   */
  async stopBackend(c: ClientProc): Promise<void> {
    const b = c.backend;
    if (!b) return;
    c.backend = undefined;
    await b.stop();
    const errors = b.errors();
    if (errors.length > 0) this.surprises.push(`${b.name} (pid ${b.pid}), the back-end of ${c.describe()}, printed: ${errors.join(' | ').slice(0, 600)}`);
    fs.rmSync(path.join(this.dir, `${c.name}.img`), { force: true });
  }

  /**
   * join(), for a replacement or an operation: when every attempt was evicted and killed as documented (the
   * machine cannot pin the map within the ack deadline just now), the world goes on without it (noted);
   * undefined then. Any other failure throws.
   */
  async tryJoin(kind: ClientKind, opts: { pinLimit?: number; ioas?: string } = {}): Promise<ClientProc | undefined> {
    try {
      return await this.join(kind, opts);
    } catch (err) {
      const p = (err as { proc?: ClientProc }).proc;
      if (!p || !this.evictedAndKilled(p)) throw err;
      this.notes.push(`${p.describe()} was evicted and killed again while it joined: the run goes on without a ${kind} client in its place`);
      return undefined;
    }
  }

  /** Starts a deliberately broken client (--self-test). */
  async joinBroken(broken: BrokenMode): Promise<ClientProc> {
    const kind = BROKEN_MODES[broken].kind;
    const ioas = kind === 'shadow' ? { ioas: FIRST_IOAS } : {};
    const c = await spawnClient({
      socket: this.socket,
      space: SPACE,
      kind,
      name: `${broken}-${this.nextClient++}`,
      devices: kind === 'vfio' || kind === 'shadow' ? ['dev0', 'dev1'] : [],
      broken,
      ...ioas,
    });
    this.clients.push(c);
    return c;
  }

  /**
   * Client processes that died without the harness asking are taken out of the world and replaced by one of
   * the same kind. A death is documented when the broker evicted the client and killed it through its
   * pidfd (fence policy kill: a client that missed its ack deadline, e.g. pinning a gigabyte under load):
   * then it is noted; any other death is a surprise. Returns whether any client died.
   */
  async replaceDead(): Promise<boolean> {
    const dead = this.clients.filter((c) => c.gone);
    if (dead.length === 0) return false;
    this.clients = this.clients.filter((c) => !c.gone);
    for (const c of dead) {
      await this.stopBackend(c);
      const how = c.child.signalCode ?? `exit ${c.child.exitCode}`;
      if (this.evictedAndKilled(c)) this.notes.push(`${c.describe()} was evicted and killed by the broker (${how}), as documented`);
      else this.surprises.push(`${c.describe()} died (${how}) without an eviction and a SIGKILL logged by the broker: ${c.stderr.join('').slice(-400)}`);
      const replacement = c.broken ? undefined : await this.tryJoin(c.kind);
      if (replacement) this.notes.push(`${replacement.describe()} joined in its place`);
    }
    return true;
  }

  /** The broker logged evicting `c` and sending SIGKILL through its pidfds, and SIGKILL is what ended it. */
  evictedAndKilled(c: ClientProc): boolean {
    return (
      c.child.signalCode === 'SIGKILL' && this.broker.warned('evicting client', c.pid) && this.broker.warned('fencing: sent SIGKILL through pidfds', c.pid)
    );
  }

  /** Detaches a client (SIGTERM: it unmaps, unpins, closes); resolves with its exit code. */
  async leave(c: ClientProc, sig: NodeJS.Signals = 'SIGTERM'): Promise<number | null> {
    this.clients = this.clients.filter((x) => x !== c);
    const code = await c.stop(sig);
    await this.stopBackend(c);
    return code;
  }

  /** A kind to add, favouring kinds below their configured count. */
  pickKind(): ClientKind {
    const weights = Object.fromEntries(
      CLIENT_KINDS.map((k) => {
        const want = this.opts.clients[k] ?? 0;
        return [k, want === 0 ? 0 : Math.max(0.2, want - this.of(k).length + 1)];
      }),
    ) as Record<ClientKind, number>;
    return this.rng.weighted(weights);
  }

  // --- the owner's side ------------------------------------------------------------------------------

  /** A new memfd of `size` bytes, registered with the broker and held by the owner. */
  async newBacking(size: number, pageSize = PAGE): Promise<BrokerBacking> {
    const name = this.model.memfdName();
    const fd = pageSize > PAGE ? hugeMemfd(name, pageSize, size) : createSealedMemfd(name, size);
    const memfd: Memfd = { name, fd, size, pageSize };
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
      const e = toMmbError(err);
      if (e.code === 'MMB_ERR_COMMITTED_UNFENCED' && e.generation !== undefined) {
        // Committed: a client evicted while finishing it (past its deadline on a loaded machine) was not
        // dead within the broker's fence wait. Documented when the broker evicted it and SIGKILL ended it,
        // which the accounting of dead clients checks (replaceDead: anything else is a surprise).
        this.applyToModel(ops, e.generation);
        this.notes.push(`committed unfenced (generation ${e.generation}): ${e.message}`);
        return { ok: true, result: { generation: e.generation } as CommitResult };
      }
      return { ok: false, err: e };
    }
  }

  applyToModel(ops: readonly CommitOp[], generation: number): void {
    this.model.regions = this.model.regionsAfter(ops);
    this.model.generation = generation;
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

  // --- I/O address spaces (--ioas), through the relay too: each answer is held until the judge looked ----

  /** Creates an IOAS; on success the model has it, empty. */
  async ioasCreate(name: string): Promise<IoasOutcome> {
    try {
      await IoasOwner.create(this.owner, name);
      this.model.ioas.set(name, []);
      return { ok: true, result: { generation: 0 } };
    } catch (err) {
      return { ok: false, err: toMmbError(err) };
    }
  }

  /** Destroys an IOAS; on success the model forgets it. */
  async ioasDestroy(name: string): Promise<IoasOutcome> {
    try {
      await new IoasOwner(this.owner, name).destroy();
      this.model.ioas.delete(name);
      return { ok: true, result: { generation: 0 } };
    } catch (err) {
      return { ok: false, err: toMmbError(err) };
    }
  }

  /** One IOAS transaction (every unmap, then every map); on success the model follows. */
  async ioasCommit(name: string, ops: IoasOp[]): Promise<IoasOutcome> {
    try {
      const result = await new IoasOwner(this.owner, name).commit(ops);
      this.model.ioas.set(name, ioasAfter(this.model.ioas.get(name) ?? [], ops));
      return { ok: true, result };
    } catch (err) {
      return { ok: false, err: toMmbError(err) };
    }
  }

  /** Attaches a new owner connection (after a disconnect or a broker restart), retrying while the old one lingers. */
  async reattachOwner(): Promise<void> {
    this.owner = await waitFor(
      'the owner to reattach',
      async () => {
        try {
          return await OwnerClient.attach(this.ownerSocket, { space: SPACE, name: 'harness-owner' });
        } catch (err) {
          // The relay drops the connection when the broker does not take it (MMB_ERR_DISCONNECTED).
          if (isMmbError(err, 'MMB_ERR_OWNER_EXISTS') || isMmbError(err, 'MMB_ERR_CONNECT') || isMmbError(err, 'MMB_ERR_DISCONNECTED')) return undefined;
          throw err;
        }
      },
      20_000,
    );
  }

  async close(): Promise<void> {
    for (const c of this.clients) {
      await c.stop('SIGTERM');
      await c.backend?.stop();
    }
    this.clients = [];
    this.huge?.release();
    this.owner?.close();
    this.relay?.close();
    await this.broker?.stop('SIGTERM');
    for (const m of this.model.memfds.values()) native.close(m.fd);
    this.model.memfds.clear();
    fs.rmSync(this.dir, { recursive: true, force: true });
  }
}

/** An IOAS's mappings once `ops` are applied (every unmap, then every map, as the broker does; unmaps remove whole mappings). */
export function ioasAfter(maps: readonly IovaMapping[], ops: readonly IoasOp[]): IovaMapping[] {
  let out = [...maps];
  for (const op of ops) if (op.op === 'unmap') out = out.filter((m) => !(m.iova < op.iova + op.size && op.iova < m.iova + m.size));
  for (const op of ops) if (op.op === 'map') out.push({ iova: op.iova, gpa: op.gpa, size: op.size, readonly: op.readonly ?? false });
  return out.sort((a, b) => a.iova - b.iova);
}
