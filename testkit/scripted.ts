// The life of a scripted client process (README.md, "The scripted client"): signals handled first, then
// attach, then the `ready` line, then events and commands until SIGTERM / SIGINT, the `exit` command or
// the end of stdin; then it detaches, prints `detached` and exits 0. `ready` is printed only once the
// initial map is applied and acked, and SIGTERM is handled from before the client connects: a signal at
// any moment of its start-up ends it cleanly.
import type { GuestMemory, Subscriber } from '../clients/index.js';
import { ClientRefusedError, type MmbError } from '../protocol/index.js';
import { native } from '../native/index.js';
import { faultCommands, memoryCommands, regionsOf, type Commands } from './commands.js';
import { out, serveCommands } from './control.js';
import { JsonProc } from './jsonproc.js';
import { testkitFile } from './paths.js';
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
  /**
   * Refuse every transaction or sync that adds (or, voting, stages) a region whose name starts with this
   * (MMB_ERR_CLIENT_REFUSED).
   */
  nack?: string;
  /** Refuse only after this many milliseconds (others hold the change voted meanwhile); prints `refusing` when it starts waiting. */
  nackDelayMs?: number;
  /** Ack every change this many milliseconds late. */
  ackDelayMs?: number;
}

/**
 * Hands the memory of region `name` to a helper process (testkit/holder.ts maps the backing it inherits as
 * fd 3, like a vhost-user back-end or a child would) and names it to the broker (DELEGATE) by its pidfd.
 */
async function handOn(sub: Subscriber, name: string): Promise<Record<string, unknown>> {
  const r = sub.regions().find((x) => x.name === name);
  const b = r && sub.backing(r.backing);
  if (!b) throw new Error(`no region ${name}`);
  const holder = JsonProc.spawn(testkitFile('holder.js'), [String(b.size)], { stdin: 'ignore', extraFds: [b.fd], name: 'holder' });
  await holder.next('mapped', () => true, 30_000);
  await sub.delegate([{ name: `holder (pid ${holder.pid})`, pidfd: native.pidfdOpen(holder.pid) }]);
  return { event: 'delegated', pid: holder.pid };
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
    const { nack } = opts;
    const c0 = ev.change;
    const bad =
      nack !== undefined && (c0.cause === 'txn' || c0.cause === 'sync') ? [...c0.added, ...(c0.staged ?? [])].find((r) => r.name.startsWith(nack)) : undefined;
    const refusal = () => new ClientRefusedError(`refusing region ${bad?.name}`);
    if (bad && opts.nackDelayMs) {
      out({ event: 'refusing', region: bad.name, generation: c0.generation });
      ev.waitUntil(new Promise((_, reject) => setTimeout(() => reject(refusal()), opts.nackDelayMs)));
    } else if (bad) ev.waitUntil(Promise.reject(refusal()));
    else if (opts.ackDelayMs) ev.waitUntil(new Promise((r) => setTimeout(r, opts.ackDelayMs)));
    const c = ev.change;
    out({
      event: 'change',
      cause: c.cause,
      generation: c.generation,
      added: c.added.map((r) => r.name),
      removed: c.removed.map((r) => r.name),
      updated: c.updated.map((u) => u.after.name),
      ...state(),
    });
  });
  sub.on('committed', (generation) => out({ event: 'committed', generation, ...state() }));
  sub.on('rolledBack', (generation) => out({ event: 'rolledBack', generation, ...state() }));
  sub.on('synced', (s) =>
    out({ event: 'synced', generation: s.generation, mode: s.mode, added: s.change.added.map((r) => r.name), removed: s.change.removed.map((r) => r.name) }),
  );
  sub.on('disconnected', (reason?: MmbError) => out({ event: 'disconnected', ...(reason ? { code: reason.code, message: reason.message } : {}) }));
  sub.on('reconnected', (r) => out({ event: 'reconnected', ...r }));
  sub.on('goodbye', (e) => out({ event: 'goodbye', code: e.code }));
  sub.on('error', (e) => out({ event: 'error', code: e.code, message: e.message }));
  const faults = faultCommands(sub, out);

  let finish!: () => void;
  const finished = new Promise<void>((resolve) => (finish = resolve));
  out({
    event: 'ready',
    pid: process.pid,
    kind: opts.kind,
    client: sub.id,
    generation: sub.generation,
    regions: regionsOf(sub, memory),
    ...(a.ready?.() ?? {}),
  });
  serveCommands(
    {
      ...memoryCommands(sub, memory),
      ...a.commands,
      ...faults,
      drop: () => {
        sub.dropConnection();
        return { event: 'dropped' };
      },
      'hand-on': (c) => handOn(sub, String(c.region)),
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
