// The life of a scripted client process (README.md, "The scripted client"): signals handled first, then
// attach, then the `ready` line, then events and commands until SIGTERM / SIGINT, the `exit` command or
// the end of stdin; then it detaches, prints `detached` and exits 0. `ready` is printed only once the
// initial map is applied and acked, and SIGTERM is handled from before the client connects: a signal at
// any moment of its start-up ends it cleanly.
import type { GuestMemory, Subscriber } from '../clients/index.js';
import { ClientRefusedError, type MmbError } from '../protocol/index.js';
import { faultCommands, memoryCommands, regionsOf, type Commands } from './commands.js';
import { out, serveCommands } from './control.js';
import { stopRequested } from './signals.js';

export interface Attached {
  sub: Subscriber;
  memory: GuestMemory;
  /** The kind's own commands (kvmCommands, vfioCommands). */
  commands?: Commands;
  /** Fields of the ready line beyond the common ones (kvm: backend; vfio: domain). */
  ready?: () => Record<string, unknown>;
  /** Fields added to every change, committed and rolledBack line (vfio: pinned bytes). */
  state?: () => Record<string, unknown>;
}

export interface ScriptedOptions {
  kind: string;
  /** Refuse every transaction that adds a region whose name starts with this (MMB_ERR_CLIENT_REFUSED). */
  nack?: string;
  /** Ack every change this many milliseconds late. */
  ackDelayMs?: number;
}

/** Runs the client to its end; never returns (the process exits 0 after detaching, 2 if attach failed). */
export async function runScripted(opts: ScriptedOptions, attach: () => Promise<Attached>): Promise<never> {
  const stop = stopRequested();
  let a: Attached;
  try {
    a = await attach();
  } catch (err) {
    const e = err as MmbError;
    out({ event: 'attachFailed', code: e.code, message: e.message });
    process.exit(2);
  }
  const { sub, memory } = a;
  const state = a.state ?? (() => ({}));
  sub.on('change', (ev) => {
    const bad = opts.nack !== undefined ? ev.change.added.find((r) => r.name.startsWith(opts.nack as string)) : undefined;
    if (bad) ev.waitUntil(Promise.reject(new ClientRefusedError(`refusing region ${bad.name}`)));
    else if (opts.ackDelayMs) ev.waitUntil(new Promise((r) => setTimeout(r, opts.ackDelayMs)));
    const c = ev.change;
    out({ event: 'change', cause: c.cause, generation: c.generation, added: c.added.map((r) => r.name), removed: c.removed.map((r) => r.name), updated: c.updated.map((u) => u.after.name), ...state() });
  });
  sub.on('committed', (generation) => out({ event: 'committed', generation, ...state() }));
  sub.on('rolledBack', (generation) => out({ event: 'rolledBack', generation, ...state() }));
  sub.on('synced', (s) => out({ event: 'synced', generation: s.generation, mode: s.mode, added: s.change.added.map((r) => r.name), removed: s.change.removed.map((r) => r.name) }));
  sub.on('disconnected', (reason?: MmbError) => out({ event: 'disconnected', ...(reason ? { code: reason.code, message: reason.message } : {}) }));
  sub.on('reconnected', (r) => out({ event: 'reconnected', ...r }));
  sub.on('goodbye', (e) => out({ event: 'goodbye', code: e.code }));
  sub.on('error', (e) => out({ event: 'error', code: e.code, message: e.message }));
  const faults = faultCommands(sub, out);

  let finish!: () => void;
  const finished = new Promise<void>((resolve) => (finish = resolve));
  out({ event: 'ready', pid: process.pid, kind: opts.kind, client: sub.id, generation: sub.generation, regions: regionsOf(sub, memory), ...(a.ready?.() ?? {}) });
  serveCommands(
    {
      ...memoryCommands(sub, memory),
      ...a.commands,
      ...faults,
      drop: () => {
        sub.dropConnection();
        return { event: 'dropped' };
      },
      exit: () => {
        finish();
        return { event: 'exiting' };
      },
    },
    { onEnd: finish },
  );
  await Promise.race([stop, finished]);
  await sub.close();
  out({ event: 'detached' });
  process.exit(0);
}
