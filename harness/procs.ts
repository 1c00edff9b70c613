// The harness's real processes: the broker (`mmbroker serve`, restartable, through the testkit's
// launcher) and the clients (the testkit's scripted client, or a deliberately broken one), each driven by
// the control protocol. A client's output is kept short (a soak runs for hours): command replies go to
// whoever asked, and only the events the harness waits for or reports are kept, the last hundred.
import { BrokerProc as Broker, levelOf } from '../testkit/broker.js';
import { SCRIPTED_CLIENT, ready } from '../testkit/clients.js';
import type { Backend } from '../testkit/backends.js';
import { JsonProc, spawnNode, type Line } from '../testkit/jsonproc.js';
import { DIST } from '../testkit/paths.js';
import type { InvariantName } from './invariants.js';
import type { ClientKind } from './options.js';
import { emptyCensus, fdCensus, startTime, viewOf, type FdCensus, type ProcessView } from './kernel.js';

export const BROKEN_CLIENT = `${DIST}/harness/broken-client.js`;

/**
 * The deliberately broken clients of --self-test (harness/broken-client.ts): the kind each plays, and the
 * invariant that must catch it, by name (its violations name it `broken (MODE)`).
 */
export const BROKEN_MODES = {
  'skip-unmap': { kind: 'plain', caughtBy: 'no-stale-mapping' },
  'pin-twice': { kind: 'vfio', caughtBy: 'pins' },
  'ignore-eviction': { kind: 'plain', caughtBy: 'done-means-done' },
  'teardown-on-wait': { kind: 'plain', caughtBy: 'restart-keeps-memory' },
  /** With --ioas only: a shadow-mode client that keeps a pin of what an IOAS unmap took away. */
  'keep-pin-after-unmap': { kind: 'shadow', caughtBy: 'iova-pins' },
} as const satisfies Record<string, { kind: ClientKind; caughtBy: InvariantName }>;
export type BrokenMode = keyof typeof BROKEN_MODES;

/** The broken clients a self-test with these options plants (the shadow one needs --ioas). */
export function plantedModes(opts: { ioas: boolean }): BrokenMode[] {
  return (Object.keys(BROKEN_MODES) as BrokenMode[]).filter((m) => opts.ioas || BROKEN_MODES[m].kind !== 'shadow');
}

export type { Line };

/** What the kernel shows of a process that is gone: nothing mapped, locked or open. */
export const GONE: ProcessView = Object.freeze({
  alive: false,
  maps: [],
  lockedBytes: 0,
  census: emptyCensus(),
});

/** A process a client handed memory to (`hand-on`, named to the broker with DELEGATE): not our child. */
export interface Delegate {
  pid: number;
  /** Its start time, read when it was made: a pid alone may name another process once this one is reaped. */
  start: string | undefined;
}

/** What the kernel shows of a delegate now; nothing once it exited (or its pid is another process's). */
export function delegateView(d: Delegate): ProcessView {
  return d.start !== undefined && startTime(d.pid) === d.start ? viewOf(d.pid) : GONE;
}

/** Events a client prints that the harness waits for or reports; the rest (change, committed, ...) are dropped. */
const KEPT = new Set(['ready', 'holding', 'reconnected', 'disconnected', 'error', 'detached']);

export class ClientProc extends JsonProc {
  /** Soft-vfio devices the harness attached (the model's truth for the pins invariant). */
  devices: string[];
  /** Its descriptors right after it was ready: the leaks check's baseline. */
  baseline: FdCensus | undefined;
  /** Processes it handed memory to. */
  readonly delegates: Delegate[] = [];
  /** shadow: the IOAS each of its devices is attached to. */
  readonly deviceIoas = new Map<string, string>();
  /** bridge: its vhost-user back-end (qemu-storage-daemon), which maps what the bridge gives it. */
  backend: Backend | undefined;

  constructor(
    args: string[],
    readonly kind: ClientKind,
    readonly name: string,
    devices: string[],
    /** Set for the deliberately broken clients of --self-test. */
    readonly broken?: string,
  ) {
    super(spawnNode(broken ? BROKEN_CLIENT : SCRIPTED_CLIENT, args), { keep: (l) => KEPT.has(l.event ?? ''), limit: 100, stderrLimit: 16 * 1024 });
    this.devices = devices;
  }

  /** The events kept, oldest first. */
  get kept(): readonly Line[] {
    return this.lines;
  }

  /** Waits for the next kept event of that name. */
  event(name: string, timeoutMs = 20_000): Promise<Line> {
    return this.next(name, () => true, timeoutMs);
  }

  /** The signal that ended the process, once it ended (within `timeoutMs`); undefined if it lives on. */
  async exitSignal(timeoutMs: number): Promise<NodeJS.Signals | null | undefined> {
    let timer: NodeJS.Timeout | undefined;
    const ended = await Promise.race([this.exited.then(() => true), new Promise<false>((r) => (timer = setTimeout(() => r(false), timeoutMs)))]);
    clearTimeout(timer);
    return ended ? this.child.signalCode : undefined;
  }

  /** What the kernel shows of it now; nothing once it exited (its pid is not read then: it may be another's). */
  view(): ProcessView {
    return this.gone ? GONE : viewOf(this.pid);
  }

  /** bridge: what the kernel shows of its back-end now; nothing once it exited (a child of ours, not reaped before). */
  backendView(): ProcessView {
    const b = this.backend;
    return !b || b.proc.exitCode !== null || b.proc.signalCode !== null ? GONE : viewOf(b.pid);
  }

  override describe(): string {
    return `${this.broken ? `broken (${this.broken}) ` : ''}${this.kind} client ${this.name} (pid ${this.pid})`;
  }
}

export interface ClientSpawn {
  socket: string;
  space: string;
  kind: ClientKind;
  name: string;
  devices: string[];
  broken?: BrokenMode;
  /** bridge: the back-end it drives (started by the caller, stopped with the client). */
  backend?: Backend;
  /** shadow: the IOAS its devices join. */
  ioas?: string;
  /** shadow: its pin budget (it refuses an IOAS change past it: MMB_ERR_PIN_BUDGET). */
  pinLimit?: number;
}

/** The scripted client's argv for a client of the harness's kind. */
function clientArgs(s: ClientSpawn, common: string[], devs: string[]): string[] {
  switch (s.kind) {
    case 'vfio':
      return ['vfio', ...common, '--backend', 'soft', ...devs];
    case 'shadow':
      return [
        'vfio',
        ...common,
        '--backend',
        'soft',
        '--ioas',
        String(s.ioas),
        ...devs,
        ...(s.pinLimit !== undefined ? ['--pin-limit', String(s.pinLimit)] : []),
      ];
    case 'bridge':
      return ['vhost-user', ...common, '--backend-socket', String(s.backend?.socket)];
    default:
      return [s.kind, ...common];
  }
}

/**
 * Starts a client process and resolves once it is ready (its initial map established and acked). If it
 * ends first, the error carries the process (`proc`), so the caller can tell why (an eviction?).
 */
export async function spawnClient(s: ClientSpawn): Promise<ClientProc> {
  const common = ['--socket', s.socket, '--space', s.space, '--name', s.name];
  const devs = s.devices.flatMap((d) => ['--device', d]);
  const args = s.broken ? ['--mode', s.broken, ...common, ...devs, ...(s.ioas !== undefined ? ['--ioas', s.ioas] : [])] : clientArgs(s, common, devs);
  const p = new ClientProc(args, s.kind, s.name, s.devices, s.broken);
  p.backend = s.backend;
  if (s.kind === 'shadow') for (const d of s.devices) p.deviceIoas.set(d, String(s.ioas));
  try {
    await ready(p, 60_000);
  } catch (err) {
    await p.exited;
    throw Object.assign(err as Error, { proc: p });
  }
  // Read so that a death right after `ready` is no error (it maps and holds nothing; it is accounted later).
  p.baseline = p.view().census;
  return p;
}

/** `mmbroker serve` in its own process: restartable, its warnings kept, its fds counted by the kernel. */
export class BrokerProc {
  private constructor(
    private readonly proc: Broker,
    /** Warnings and errors it logged (evictions, slow readers), the last few hundred. */
    readonly warnings: string[],
    /** Its descriptors once listening, before any connection: the leaks check's baseline. */
    readonly baseline: FdCensus,
  ) {}

  get pid(): number {
    return this.proc.pid;
  }

  /** What the kernel shows of it now (nothing once it exited). */
  view(): ProcessView {
    return this.proc.gone ? GONE : viewOf(this.proc.pid);
  }

  /**
   * Whether it logged, at warning level or above since warning number `since`, `msg` about the client of
   * process `pid` (its `client` field), and with `code` when given.
   */
  warned(msg: string, pid: number, opts: { since?: number; code?: string } = {}): boolean {
    return this.warnings.slice(opts.since ?? 0).some((text) => {
      const l = JSON.parse(text) as { msg?: string; code?: string; client?: { pid?: number } };
      return l.msg === msg && l.client?.pid === pid && (opts.code === undefined || l.code === opts.code);
    });
  }

  /**
   * `baseline`: the descriptors of an earlier broker process of the same run, measured before any client
   * existed. A restarted broker is measured against it: clients reconnect the moment it listens, so its
   * own census at that moment may already count their connections.
   */
  static async start(socket: string, space: string, ackTimeoutMs: number, baseline?: FdCensus, pipeline?: number): Promise<BrokerProc> {
    const warnings: string[] = [];
    const proc = await Broker.start({
      socket,
      spaces: [space],
      // Small enough that a slow reader is cut off after a short flood, large for every real message.
      args: ['--ack-timeout', String(ackTimeoutMs), '--max-outbound', '1M', ...(pipeline !== undefined ? ['--pipeline', String(pipeline)] : [])],
      keepLines: 1,
      onLine: (l) => {
        if (levelOf(l) < 40) return;
        warnings.push(JSON.stringify(l));
        if (warnings.length > 300) warnings.splice(0, warnings.length - 300);
      },
    });
    return new BrokerProc(proc, warnings, baseline ?? fdCensus(proc.pid));
  }

  async stop(sig: NodeJS.Signals): Promise<void> {
    await this.proc.stop(sig);
  }
}
