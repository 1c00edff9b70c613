// A broker restart, judged through its window (restart-keeps-memory). The broker is SIGKILLed and a new one
// starts on the same socket; its space starts unpublished. Every client reattaches and waits (STATUS says
// `waiting`) and must keep everything it had established: the same mappings at the same addresses
// (/proc/PID/maps), the same locked bytes (VmLck) for the vfio-like ones, the same memslots for the kvm
// ones. That is checked once every client waits, again and again while the owner stays away (when it
// does), at the answer to each commit that rebuilds the map (moment.ts), and once more after the owner
// published and every client reconciled: reconciling by key remaps nothing that did not change, and the
// republished map is the one from before, so nothing may have changed at all.
import { fetchStatus } from '../clients/index.js';
import type { CommitOp } from '../protocol/index.js';
import { waitFor } from '../testkit/wait.js';
import { layoutChanges } from './moment.js';
import { settle } from './observe.js';
import { BrokerProc, type ClientProc, type Line } from './procs.js';
import type { ProcessView } from './kernel.js';
import { SPACE, type World } from './world.js';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

interface Kept {
  client: ClientProc;
  /** Who this is: the client, or (a bridge's) its back-end. */
  who: string;
  look: () => ProcessView;
  view: ProcessView;
  /** kvm: its memslots (gpa, size, host address, flags), as it lists them. */
  slots?: string;
}

async function slotsOf(c: ClientProc): Promise<string | undefined> {
  if (c.kind !== 'kvm') return undefined;
  const r = await c.request({ cmd: 'slots' }, 'slots').catch((err: Error): Line => ({ event: 'failed', message: err.message }));
  if (r.event !== 'slots') return `slots failed: ${String(r.message)}`;
  const slots = r.slots as { gpa: number; size: number; hva: number; readonly: boolean; logDirty: boolean }[];
  return JSON.stringify([...slots].sort((a, b) => a.gpa - b.gpa).map((s) => [s.gpa, s.size, s.hva, s.readonly, s.logDirty]));
}

/** What every client had established before the restart, and the checks against it. */
export class RestartWindow {
  private constructor(
    private readonly w: World,
    private readonly kept: Kept[],
  ) {}

  static async record(w: World): Promise<RestartWindow> {
    const kept: Kept[] = [];
    for (const c of w.clients) {
      const slots = await slotsOf(c);
      kept.push({ client: c, who: c.describe(), look: () => c.view(), view: c.view(), ...(slots !== undefined ? { slots } : {}) });
      // A bridge's back-end keeps its memory table while the bridge waits: the bridge sends it nothing.
      const b = c.backend;
      if (b) kept.push({ client: c, who: `${b.name} (pid ${b.pid}), the back-end of ${c.describe()}`, look: () => c.backendView(), view: c.backendView() });
    }
    return new RestartWindow(w, kept);
  }

  /** One check per client: it maps and locks exactly what it did before the restart (per /proc). */
  checkKeeps(when: string): void {
    for (const k of this.kept) {
      const now = k.look();
      const problems = !now.alive
        ? [`${k.who} is gone ${when}`]
        : layoutChanges(k.view, now).map((p) => `${when}, ${k.who} ${p}; before the restart it did not`);
      this.w.judged.push({ invariant: 'restart-keeps-memory', problems });
    }
  }

  /** The same, with the kvm clients' memslots, which only they can list. */
  async checkKeepsWithSlots(when: string): Promise<void> {
    this.checkKeeps(when);
    for (const k of this.kept) {
      if (k.slots === undefined || k.client.gone) continue;
      const now = await slotsOf(k.client);
      this.w.judged.push({
        invariant: 'restart-keeps-memory',
        problems: now === k.slots ? [] : [`${when}, ${k.client.describe()}'s memslots are ${now?.slice(0, 300)}, before the restart ${k.slots.slice(0, 300)}`],
      });
    }
  }
}

/** Waits until every client reattached to the restarted broker and waits on its unpublished space; says who did not. */
async function allWaiting(w: World): Promise<string> {
  let missing = '';
  try {
    await waitFor(
      'every client to wait on the restarted broker',
      async () => {
        const st = (await fetchStatus(w.socket, SPACE).catch(() => undefined))?.spaces[0];
        const waiting = new Set((st?.clients ?? []).filter((c) => c.role === 'subscriber' && c.state === 'waiting').map((c) => c.pid));
        missing =
          st?.published !== false
            ? 'the space is published'
            : w.clients
                .filter((c) => !waiting.has(c.pid))
                .map((c) => c.describe())
                .join(', ');
        if (missing === '') return true;
        // A status connection per look: not more often than this.
        await sleep(50);
        return false;
      },
      30_000,
    );
  } catch {
    // `missing` says who.
  }
  return missing;
}

/**
 * SIGKILLs the broker and starts another on the same socket; the owner stays away `ownerAwayMs` (0: it
 * reattaches at once), then rebuilds its backings and regions, publishes, and drops again what it had
 * dropped. The restart window is checked throughout; returns the step's detail and surprises.
 */
export async function restartBroker(w: World, ownerAwayMs: number): Promise<{ detail: string; surprises: string[] }> {
  const m = w.model;
  const window = await RestartWindow.record(w);
  await w.broker.stop('SIGKILL');
  w.owner.close();
  w.restart = window;
  const surprises: string[] = [];
  let looks = 0;
  try {
    w.broker = await BrokerProc.start(w.socket, SPACE, w.opts.ackTimeoutMs, w.broker.baseline, w.opts.pipeline);
    const missing = await allWaiting(w);
    if (missing)
      w.judged.push({ invariant: 'restart-keeps-memory', problems: [`clients did not reattach and wait on the restarted, unpublished space: ${missing}`] });
    await window.checkKeepsWithSlots('with every client waiting on the unpublished space');
    looks++;
    // The owner away: the clients wait on a space nobody publishes; nothing may be taken from them meanwhile.
    const until = Date.now() + ownerAwayMs;
    while (Date.now() < until) {
      await sleep(Math.min(500, until - Date.now()));
      window.checkKeeps(`${ownerAwayMs - Math.max(0, until - Date.now())} ms into the owner's absence`);
      looks++;
    }
    await w.reattachOwner();
    const old = [...m.backings.values()];
    m.backings.clear();
    const ids = new Map<number, number>();
    for (const b of old) ids.set(b.id, (await w.register(b.memfd)).id);
    const regions = m.list();
    m.regions.clear();
    m.generation = 0;
    const ops: CommitOp[] = regions.map((r) => ({
      op: 'add',
      name: r.name,
      gpa: r.gpa,
      size: r.size,
      backing: ids.get(r.backing) as number,
      offset: r.offset,
      readonly: r.readonly,
      logDirty: r.logDirty,
    }));
    if (!w.owner.published) {
      // Unpublished until now: the map is rebuilt first and published whole, so the clients reconcile
      // against it and never see a half map.
      if (ops.length > 0) {
        const r = await w.commit(ops);
        if (!r.ok) surprises.push(`republishing ${ops.length} regions into the restarted broker failed: ${r.err.code} ${r.err.message}`);
      }
      // Neither does a restarted broker keep I/O address spaces: the owner creates them again and commits
      // their mappings before it publishes (protocol.md, Guarantees 14).
      const saved = new Map(m.ioas);
      m.ioas.clear();
      for (const [name, maps] of [...saved].sort(([a], [b]) => a.localeCompare(b))) {
        const c = await w.ioasCreate(name);
        const r =
          c.ok && maps.length > 0
            ? await w.ioasCommit(
                name,
                maps.map((x) => ({ op: 'map', iova: x.iova, gpa: x.gpa, size: x.size, readonly: x.readonly })),
              )
            : c;
        if (!r.ok) surprises.push(`recreating IOAS ${name} (${maps.length} mappings) in the restarted broker failed: ${r.err.code} ${r.err.message}`);
      }
      window.checkKeeps('with the map rebuilt, before it is published');
      w.restart = undefined;
      m.generation = await w.owner.publish();
    } else surprises.push("the restarted broker's space was already published before its owner republished it");
    w.restart = undefined;
    // Holds as before the crash: what the owner had dropped it drops again (regions still use them).
    for (const b of old) {
      if (b.held) continue;
      const id = ids.get(b.id) as number;
      await w.owner.dropBacking(id);
      const nb = m.backings.get(id);
      if (nb) nb.held = false;
    }
    w.releaseUnused();
    // Reconciled by key against the same map: nothing remapped, nothing unpinned, the same memslots.
    const s = await settle(w, 2 * w.opts.ackTimeoutMs + 15_000);
    if (s.unsettled) surprises.push(`after the publish the clients did not reconcile: ${s.unsettled}`);
    else await window.checkKeepsWithSlots('after the publish, every client reconciled');
    return {
      detail: `broker killed and restarted as pid ${w.broker.pid}${ownerAwayMs > 0 ? `, the owner away ${ownerAwayMs} ms` : ''}; ${old.length} backings, ${regions.length} regions${m.ioas.size > 0 ? ` and ${m.ioas.size} IOAS(es)` : ''} republished; the window looked at ${looks} times and after the publish`,
      surprises,
    };
  } finally {
    w.restart = undefined;
  }
}
