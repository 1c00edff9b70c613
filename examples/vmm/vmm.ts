// The VMM: an embedded broker and everything that uses guest memory, put together in the order a VMM
// builds a machine, and the commands its control socket serves.
//
//   new Broker()          the map lives here, in the VMM's process (its spaces start published: the
//                         broker lives and dies with the VMM; see the README on restarts)
//   broker.listen()       devices in other processes attach over <dir>/broker.sock
//   OwnerClient           the VMM's own connection, in-process: the only one that changes the map
//   MachineMemory         RAM and DIMMs: memfds, backings, transactions (memory.ts)
//   KvmSubscriber         the VM's memslots follow the map (in-process subscriber)
//   Vcpu                  the VMM's vCPU on that VM, running the guest program (vcpu.ts)
//   Disk                  the vhost-user bridge to qemu-storage-daemon and the virtio-blk driver (disk.ts)
//   serveControl()        <dir>/control.sock, QMP-shaped (control.ts)
//
// Commands that change anything run one at a time, in the order they arrive (from any connection).
import crypto from 'node:crypto';
import path from 'node:path';
import type { Logger } from 'pino';
import { Broker, KvmSubscriber, OwnerClient } from '../../index.js';
import { ControlClient, serveControl, type ControlServer, type Handler } from './control.js';
import { Disk } from './disk.js';
import { VmmError } from './errors.js';
import { readMailbox } from './guest.js';
import { applyActions, type Machine } from './hotplug.js';
import { MIN_RAM, SPACE, hex } from './layout.js';
import { MachineMemory, type Action } from './memory.js';
import { decodeState, encodeState, sendMemory, takeOver, type Handover, type Incoming } from './migration.js';
import { Vcpu } from './vcpu.js';

export interface VmmOptions {
  /** A private directory (mode 0700) for broker.sock and control.sock. */
  dir: string;
  /** RAM bytes (default 64 MiB); ignored with `incoming`, where the migration brings the memory. */
  ram?: number;
  /** Back guest memory with huge pages: true for the default size, or the page size in bytes. */
  hugetlb?: true | number;
  /** qemu-storage-daemon's vhost-user-blk socket: the VM gets a disk. */
  diskSocket?: string;
  /** Wait for a migration instead of booting. */
  incoming?: boolean;
  logger?: Logger;
}

export type VmmState = 'running' | 'stopped' | 'incoming' | 'migrating' | 'migrated' | 'shutdown';

export class Vmm implements Machine {
  state: VmmState;
  owner: OwnerClient | undefined;
  /** Set by boot(), or by finishIncoming() on a destination; hotplug runs only after either. */
  memory!: MachineMemory;
  vcpu: Vcpu | undefined;
  disk: Disk | undefined;
  private control: ControlServer | undefined;
  /** The mutating commands, one at a time. */
  private serial: Promise<unknown> = Promise.resolve();
  /** Why the vCPU is parked, besides the kvm client's own hook: each holds one park. */
  private readonly holds = new Set<'stop' | 'pause'>();
  private migration: Record<string, unknown> | undefined;

  private constructor(
    readonly opts: VmmOptions,
    readonly broker: Broker,
    readonly kvm: KvmSubscriber,
  ) {
    this.state = opts.incoming ? 'incoming' : 'running';
  }

  get brokerSocket(): string {
    return path.join(this.opts.dir, 'broker.sock');
  }

  get controlSocket(): string {
    return path.join(this.opts.dir, 'control.sock');
  }

  /** Builds the machine (or, with `incoming`, an empty one waiting for a migration) and serves its sockets. */
  static async start(opts: VmmOptions): Promise<Vmm> {
    const broker = new Broker({
      name: `vmm-${process.pid}`,
      spaces: [SPACE],
      // A device process that stops answering is evicted and killed (never this process: the broker does
      // not signal its own), so it cannot hold an unplug hostage; the default, spelled out.
      fence: { policy: 'kill', timeoutMs: 10_000 },
      ...(opts.logger ? { logger: opts.logger } : {}),
    });
    let vmm: Vmm | undefined;
    try {
      // The memslots follow the map from the start; the vCPU comes later, so the hook looks it up.
      const kvm = await KvmSubscriber.attach(broker, {
        space: SPACE,
        name: 'kvm',
        software: false,
        parkVcpus: async () => (vmm?.vcpu ? vmm.vcpu.parkHook() : () => undefined),
        ...(opts.logger ? { logger: opts.logger } : {}),
      });
      vmm = new Vmm(opts, broker, kvm);
      // Migration's last round: PAUSE reaches every writer; this one is the vCPU.
      kvm.on('pause', (e) => e.waitUntil(vmm!.hold('pause', e.paused)));
      if (!opts.incoming) await vmm.boot();
      // The same broker serves other processes (a device, a migration's source) on its socket.
      broker.listen(vmm.brokerSocket);
      vmm.control = await serveControl(vmm.controlSocket, vmm.handlers());
      return vmm;
    } catch (err) {
      if (vmm) await vmm.shutdown().catch(() => undefined);
      else await broker.close();
      throw err;
    }
  }

  private async boot(): Promise<void> {
    const ram = this.opts.ram ?? 64 * 2 ** 20;
    if (ram < MIN_RAM) throw new VmmError('VMM_ERR_REQUEST', `RAM must be at least ${MIN_RAM} bytes`);
    this.owner = await OwnerClient.attach(this.broker, { space: SPACE, name: 'vmm' });
    this.memory = new MachineMemory(this.owner, this.opts.hugetlb);
    await this.memory.addRam(ram);
    this.vcpu = Vcpu.create(this.kvm);
    this.vcpu.boot(this.kvm);
    if (this.opts.diskSocket) {
      this.disk = await Disk.attach(this.broker, this.opts.diskSocket, this.opts.logger);
      this.disk.start();
    }
  }

  /** Parks the vCPU for `why` (or lets that reason go); parks nest, so `stop` and a migration combine. */
  private async hold(why: 'stop' | 'pause', on: boolean): Promise<void> {
    if (on === this.holds.has(why) || !this.vcpu) return;
    if (on) {
      this.holds.add(why);
      await this.vcpu.park();
    } else {
      this.holds.delete(why);
      this.vcpu.unpark();
    }
  }

  private expect(...states: VmmState[]): void {
    if (!states.includes(this.state)) throw new VmmError('VMM_ERR_STATE', `the VM is ${this.state}; this needs it ${states.join(' or ')}`);
  }

  /** Runs `fn` after every mutating command before it. */
  private exclusive<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.serial.then(fn);
    this.serial = run.catch(() => undefined);
    return run;
  }

  private handlers(): Record<string, Handler> {
    const m =
      (fn: Handler): Handler =>
      (args) =>
        this.exclusive(async () => fn(args));
    return {
      'query-status': () => this.status(),
      'query-memory': (a) => this.digests(a),
      'query-vcpu': () => this.vcpuState(),
      'dimm-add': m((a) =>
        this.hotplug([{ type: 'dimm-add', id: str(a, 'id'), size: num(a, 'size'), ...(a.gpa !== undefined ? { gpa: num(a, 'gpa') } : {}) }]),
      ),
      'dimm-del': m((a) => this.hotplug([{ type: 'dimm-del', id: str(a, 'id') }])),
      transaction: m((a) => this.hotplug(actions(a))),
      stop: m(async () => {
        this.expect('running');
        await this.hold('stop', true);
        this.state = 'stopped';
        return this.status();
      }),
      cont: m(async () => {
        this.expect('stopped');
        await this.hold('stop', false);
        this.state = 'running';
        return this.status();
      }),
      migrate: m((a) => this.migrate(str(a, 'uri'))),
      'migrate-incoming': m(async () => {
        this.expect('incoming');
        return { broker: this.brokerSocket, space: SPACE } satisfies Incoming;
      }),
      'migrate-finish': m((a) => this.finishIncoming(a as unknown as Handover)),
      quit: () => {
        // Answered first; the process entry exits once the machine is down.
        setImmediate(() => void this.shutdown().finally(() => this.onQuit?.()));
        return {};
      },
    };
  }

  /** Called once `quit` has shut the machine down (main.ts exits then). */
  onQuit: (() => void) | undefined;

  private hotplug(list: Action[]): Promise<unknown> {
    this.expect('running', 'stopped');
    return applyActions(this, list);
  }

  private async migrate(uri: string): Promise<Record<string, unknown>> {
    this.expect('running', 'stopped');
    const peer = await ControlClient.connect(uri);
    this.state = 'migrating';
    try {
      const incoming = await peer.call<Incoming>('migrate-incoming');
      // The one call that moves memory; the source is paused when it returns.
      const result = await sendMemory(this.broker, this.owner as OwnerClient, incoming);
      const vcpu = encodeState((this.vcpu as Vcpu).save());
      await peer.call('migrate-finish', { vcpu, dimms: [...this.memory.dimms.keys()] } satisfies Handover);
      this.state = 'migrated';
      this.migration = {
        rounds: result.rounds.length,
        stopReason: result.stopReason,
        totalBytes: result.totalBytes,
        memoryBytes: result.memoryBytes,
        downtimeMs: result.downtimeMs,
        verified: result.verified,
      };
      return { ...this.migration, vcpu };
    } catch (err) {
      this.state = this.holds.has('stop') ? 'stopped' : 'running';
      throw err;
    } finally {
      peer.close();
    }
  }

  /** Destination: the memory is here; take the map over, load the registers, wait for `cont`. */
  private async finishIncoming(h: Handover): Promise<Record<string, unknown>> {
    this.expect('incoming');
    this.owner = await takeOver(this.broker);
    this.memory = new MachineMemory(this.owner, undefined);
    this.memory.adopt(this.broker.status(SPACE).spaces[0]?.regions ?? [], h.dimms);
    this.vcpu = Vcpu.create(this.kvm);
    await this.hold('stop', true);
    this.vcpu.resume(decodeState(h.vcpu));
    this.state = 'stopped';
    return this.status();
  }

  status(): Record<string, unknown> {
    const space = this.broker.status(SPACE).spaces[0];
    const mapped = this.kvm.memory.regions().length > 0 && this.memory?.ram !== undefined;
    return {
      state: this.state,
      pid: process.pid,
      broker: this.brokerSocket,
      generation: space?.generation,
      memory: this.memory && {
        hugetlb: this.memory.hugetlb ?? false,
        pageSize: this.memory.pageSize,
        ram: this.memory.ram && this.memory.describe(this.memory.ram),
        dimms: [...this.memory.dimms.values()].map((d) => this.memory.describe(d)),
      },
      vcpu: this.vcpu && {
        running: this.vcpu.running,
        parked: this.vcpu.parked,
        error: this.vcpu.error,
        exits: this.vcpu.exits(),
        hookParks: this.vcpu.hookParks,
        registers: this.vcpu.registers(),
      },
      guest: mapped ? readMailbox((gpa, n) => this.kvm.memory.read(gpa, n)) : undefined,
      disk: this.disk?.status(),
      migration: this.migration,
      clients: space?.clients.map(({ id, role, kind, name, pid, transport }) => ({ id, role, kind, name, pid, transport })),
    };
  }

  /** sha256 of each block's bytes (or of [gpa, gpa + size)), read through the kvm client's mapping. */
  private digests(a: Record<string, unknown>): Record<string, unknown> {
    const hash = (gpa: number, size: number) => {
      const h = crypto.createHash('sha256');
      for (const view of this.kvm.memory.segments(gpa, size)) h.update(view);
      return h.digest('hex');
    };
    if (a.gpa !== undefined) return { gpa: hex(num(a, 'gpa')), size: num(a, 'size'), sha256: hash(num(a, 'gpa'), num(a, 'size')) };
    const blocks = [this.memory?.ram, ...(this.memory?.dimms.values() ?? [])].filter((b) => b !== undefined);
    return { blocks: blocks.map((b) => ({ id: b.id, gpa: hex(b.gpa), size: b.size, sha256: hash(b.gpa, b.size) })) };
  }

  /** The vCPU's registers, byte for byte; only while it is parked. */
  private vcpuState(): Record<string, unknown> {
    if (!this.vcpu) throw new VmmError('VMM_ERR_STATE', 'no vCPU yet');
    return { ...encodeState(this.vcpu.save()), registers: this.vcpu.registers() };
  }

  /** Takes the machine apart in the reverse order of its making. Idempotent. */
  async shutdown(): Promise<void> {
    if (this.state === 'shutdown') return;
    this.state = 'shutdown';
    await this.control?.close();
    await this.disk?.close().catch(() => undefined);
    await this.vcpu?.close();
    await this.kvm.close();
    this.owner?.close();
    this.memory?.close();
    await this.broker.close();
  }
}

function str(a: Record<string, unknown>, key: string): string {
  const v = a[key];
  if (typeof v !== 'string' || v === '') throw new VmmError('VMM_ERR_REQUEST', `argument ${JSON.stringify(key)} must be a non-empty string`);
  return v;
}

function num(a: Record<string, unknown>, key: string): number {
  const v = a[key];
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0)
    throw new VmmError('VMM_ERR_REQUEST', `argument ${JSON.stringify(key)} must be a whole number of bytes`);
  return v;
}

/** QMP's transaction shape: {actions: [{type: 'dimm-add', data: {id, size, gpa?}}, {type: 'dimm-del', data: {id}}]}. */
function actions(a: Record<string, unknown>): Action[] {
  if (!Array.isArray(a.actions)) throw new VmmError('VMM_ERR_REQUEST', 'argument "actions" must be a list of {type, data}');
  return a.actions.map((x: { type?: unknown; data?: Record<string, unknown> }) => {
    const data = x.data ?? {};
    if (x.type === 'dimm-add')
      return { type: 'dimm-add', id: str(data, 'id'), size: num(data, 'size'), ...(data.gpa !== undefined ? { gpa: num(data, 'gpa') } : {}) };
    if (x.type === 'dimm-del') return { type: 'dimm-del', id: str(data, 'id') };
    throw new VmmError('VMM_ERR_REQUEST', `unknown action type ${JSON.stringify(x.type)} (dimm-add, dimm-del)`);
  });
}
