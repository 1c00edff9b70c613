// Gathers, after a step, what every process says and what the kernel shows of it. The broker's status is
// used only to know when the change has settled (every client acked) and to compare its map with the
// owner's model; every other judgement reads /proc.
import type { StatusSpace } from '../protocol/index.js';
import { waitFor } from '../testkit/wait.js';
import type { FdCensus, FileMapping } from './kernel.js';
import { domainDevices } from './operations.js';
import type { ClientProc, Line } from './procs.js';
import { SPACE, type World } from './world.js';

export interface ViewRegion {
  name: string;
  gpa: number;
  size: number;
  readonly: boolean;
}

export interface ClientSnapshot {
  client: ClientProc;
  /** The client's own view (`regions`), or why it could not be had. */
  view: { generation: number; regions: ViewRegion[] } | string;
  /** kvm: its memslots; vfio: its domain's devices. */
  slots?: { gpa: number; size: number; hva: number; readonly: boolean; logDirty: boolean; name: string }[];
  devices?: string[];
  /** shadow: its devices as "device@ioas", sorted, as its domain lists them. */
  ioasDevices?: string[];
  /** bridge: what the kernel shows of its back-end (qemu-storage-daemon), if it is alive. */
  backend?: { who: string; maps: FileMapping[]; census: FdCensus };
  /** Why its slots (kvm) or domain (vfio) could not be read. */
  failed?: string;
  maps: FileMapping[];
  census: FdCensus;
  locked: number;
}

export interface Snapshot {
  status: StatusSpace | undefined;
  /** Empty when every client acked the space's generation in time; else why not. */
  unsettled: string;
  broker: { maps: FileMapping[]; census: FdCensus };
  clients: ClientSnapshot[];
}

/** Why the space has not settled: the owner's generation not reached, a client missing or behind. */
function unsettled(w: World, st: StatusSpace | undefined): string {
  const dead = w.clients.filter((c) => c.gone);
  if (dead.length > 0) return `${dead.map((c) => c.describe()).join(', ')} died`;
  if (!st) return 'no status for the space';
  if (st.generation !== w.model.generation) return `broker at generation ${st.generation}, the owner's last commit was ${w.model.generation}`;
  const subs = st.clients.filter((c) => c.role === 'subscriber');
  for (const c of w.clients) {
    const s = subs.find((x) => x.pid === c.pid);
    if (!s) return `${c.describe()} is not attached`;
    if (s.ackedGeneration !== st.generation || s.state !== 'ready') return `${c.describe()} acked ${s.ackedGeneration} (${s.state}), space at ${st.generation}`;
  }
  // Shadow clients: every device attached to its IOAS (after a restart they re-attach after the publish).
  for (const c of w.clients) {
    for (const [dev, io] of c.deviceIoas) {
      const att = st.ioas?.find((x) => x.name === io)?.attached.find((a) => a.client.pid === c.pid);
      if (!att?.devices.includes(dev)) return `${c.describe()}'s device ${dev} is not attached to ${io}`;
    }
  }
  const extra = subs.filter((s) => !w.clients.some((c) => c.pid === s.pid));
  if (extra.length > 0) return `subscribers the harness does not run: ${extra.map((s) => `${s.name} pid ${s.pid}`).join(', ')}`;
  return '';
}

/** Waits until every client acked the space's generation (at most `timeoutMs`), or until a client died. */
export async function settle(w: World, timeoutMs: number): Promise<{ status: StatusSpace | undefined; unsettled: string }> {
  let last: { status: StatusSpace | undefined; unsettled: string } = { status: undefined, unsettled: 'not asked' };
  try {
    await waitFor(
      'the space to settle',
      async () => {
        const status = (await w.owner.status(SPACE)).spaces[0];
        last = { status, unsettled: unsettled(w, status) };
        // A death is not waited out: the caller accounts for it (World.replaceDead) and settles again.
        return last.unsettled === '' || w.clients.some((c) => c.gone);
      },
      timeoutMs,
    );
  } catch {
    // `last` says what did not settle.
  }
  return last;
}

/** Its answers and kernel view; undefined when it died (a dead client maps nothing: its death is accounted by World.replaceDead). */
async function snapshotClient(c: ClientProc): Promise<ClientSnapshot | undefined> {
  const r = await c.request({ cmd: 'regions' }, 'regions').catch((err: Error) => ({ event: 'failed', message: err.message }) as Line);
  const view: ClientSnapshot['view'] =
    r.event === 'regions' ? { generation: Number(r.generation), regions: r.regions as ViewRegion[] } : `regions failed: ${String(r.message)}`;
  const k = c.view();
  if (!k.alive) return undefined;
  const snap: ClientSnapshot = { client: c, view, maps: k.maps, census: k.census, locked: k.lockedBytes };
  // A kvm client that cannot list its memslots, or a vfio client its domain, fails convergence (it does
  // not skip the check).
  if (c.kind === 'kvm') {
    const s = await c.request({ cmd: 'slots' }, 'slots').catch((err: Error) => ({ event: 'failed', message: err.message }) as Line);
    if (s.event === 'slots') snap.slots = s.slots as ClientSnapshot['slots'];
    else snap.failed = `slots failed: ${String(s.message)}`;
  }
  if (c.kind === 'vfio' || c.kind === 'shadow') {
    const d = await c.request({ cmd: 'domain' }, 'domain').catch((err: Error) => ({ event: 'failed', message: err.message }) as Line);
    if (d.event === 'domain' && c.kind === 'shadow') snap.ioasDevices = domainDevices(d);
    else if (d.event === 'domain') snap.devices = d.devices as string[];
    else snap.failed = `domain failed: ${String(d.message)}`;
  }
  if (c.backend) {
    const b = c.backendView();
    if (b.alive) snap.backend = { who: `${c.backend.name} (pid ${c.backend.pid}), the back-end of ${c.describe()}`, maps: b.maps, census: b.census };
    else snap.failed = `its back-end ${c.backend.name} (pid ${c.backend.pid}) is gone`;
  }
  // It died while it answered: nothing it said counts.
  return c.view().alive ? snap : undefined;
}

async function snapshotClients(clients: readonly ClientProc[]): Promise<ClientSnapshot[]> {
  const out: ClientSnapshot[] = [];
  for (const c of clients) {
    const s = await snapshotClient(c);
    if (s) out.push(s);
  }
  return out;
}

function brokerView(w: World): Snapshot['broker'] {
  const v = w.broker.view();
  return { maps: v.maps, census: v.census };
}

/**
 * What the processes show the moment a step returned, without waiting for anything to settle: the clients
 * the broker lists as ready and acked at its generation, which a completed transaction (committed or
 * rolled back) must have left exactly at the map. Clients it evicted or that are still syncing are left
 * to the settled checks.
 */
export async function observeNow(w: World): Promise<Snapshot> {
  const status = (await w.owner.status(SPACE)).spaces[0];
  const ready = new Set(
    (status?.clients ?? []).filter((c) => c.role === 'subscriber' && c.state === 'ready' && c.ackedGeneration === status?.generation).map((c) => c.pid),
  );
  const clients = await snapshotClients(w.clients.filter((c) => ready.has(c.pid)));
  return { status, unsettled: '', broker: brokerView(w), clients };
}

/**
 * Waits until the space settled, then gathers every process's answers and kernel view. A client that died
 * meanwhile is accounted for and replaced (World.replaceDead), and the space settles again with its
 * replacement; a client that dies while it is read is left out (it maps nothing) and accounted next time.
 */
export async function observe(w: World, settleMs: number): Promise<Snapshot> {
  let s = await settle(w, settleMs);
  for (let i = 0; i < 5 && (await w.replaceDead()); i++) s = await settle(w, settleMs);
  return { ...s, broker: brokerView(w), clients: await snapshotClients(w.clients) };
}
