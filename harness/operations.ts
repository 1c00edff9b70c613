// The operations a step may run (no faults: see faults.ts): hotplug, unplug, moves, flag toggles, backing
// reuse and release, refused transactions, vfio device hot-add / hot-remove, client join / leave. Each is
// chosen and shaped by the seeded generator from the model alone, so one seed replays one sequence.
import { hex, type CommitOp, type IoasOp } from '../protocol/index.js';
import { X86_MSI_WINDOW } from '../clients/vfio/soft.js';
import { GIB, HUGE, PAGE, type ModelRegion } from './model.js';
import type { ClientProc } from './procs.js';
import type { Judged } from './invariants.js';
import type { Moment } from './moment.js';
import type { World, CommitOutcome, IoasOutcome } from './world.js';

export type AddOp = Extract<CommitOp, { op: 'add' }>;

export interface StepResult {
  /** What ran: an operation's name, or the fault's. */
  op: string;
  detail: string;
  /** A transaction was refused or hit by a fault: all-or-nothing is checked. */
  risky: boolean;
  /** Where the system answered otherwise than documented (the 'outcome' check). */
  surprises: string[];
  /** Checks made during the step: at held answers, in restart windows, while a vote was held. */
  judged?: Judged[];
  /** What each held answer showed (moment.ts). */
  moments?: Moment[];
}

const desc = (a: AddOp) => `${a.name} ${hex(a.gpa)}+${hex(a.size)} b${a.backing}@${hex(a.offset)}${a.readonly ? ' ro' : ''}${a.logDirty ? ' log' : ''}`;

/** A size class: 1 GiB (rare), hugepage multiples, or any page count from 4 KiB to 16 MiB. */
function pickSize(w: World): { size: number; align: number } {
  const { rng } = w;
  if (rng.chance(w.opts.gigRate)) return { size: GIB, align: GIB };
  if (rng.chance(0.5)) return { size: HUGE * rng.int(1, 32), align: HUGE };
  return { size: PAGE * Math.floor(2 ** (rng.next() * 12)), align: PAGE };
}

/**
 * With bridge clients the map stays within a vhost-user back-end's slots (qemu-storage-daemon has 32):
 * an add past this many regions becomes a removal.
 */
export const BRIDGE_REGION_CAP = 24;

/** Regions whose memory the owner may take away or write-protect: those no IOVA mapping points into (else MMB_ERR_RAM_MAPPED). */
export function unmappedRegions(w: World): ModelRegion[] {
  return w.model.list().filter((r) => !w.model.ramMapped(r));
}

/**
 * With bridges (--bridge), whose back-ends map each backing from offset 0, the owner places and takes out
 * memory so that the writable regions of a backing cover it from offset 0 (the broker refuses anything else
 * with MMB_ERR_BACKING_PREFIX; `refused` tries that on purpose).
 */
export const fromZero = (w: World): boolean => (w.opts.clients.bridge ?? 0) > 0;

/** Whether `ops` keep every backing's prefix inside the writable regions, where that matters (fromZero). */
export const keepsPrefix = (w: World, ops: readonly CommitOp[]): boolean => !fromZero(w) || w.model.exposes(ops) === undefined;

/** A removal of `r`, or `r` made read-only. */
const prefixOp = (how: 'remove' | 'readonly', r: ModelRegion): CommitOp =>
  how === 'remove' ? { op: 'remove', region: r.name } : { op: 'set', region: r.name, readonly: true };

/** The regions the owner may remove now: unmapped (unmappedRegions), and none a bridge's back-end reaches behind it. */
export function removableRegions(w: World): ModelRegion[] {
  return unmappedRegions(w).filter((r) => keepsPrefix(w, [{ op: 'remove', region: r.name }]));
}

/**
 * A valid add: a free GPA, and either a slice of a held backing (reuse) or a new memfd. With --hugetlb, a
 * region of the hugetlb page's size class (aligned to it) lives on an MFD_HUGETLB memfd, new or held,
 * sliced at page-aligned offsets, while the reserved pages last; the other regions on ordinary memfds.
 */
export async function planAdd(w: World, name = w.model.regionName(), fixed?: { gpa: number; size: number }): Promise<AddOp | undefined> {
  const { rng, model } = w;
  const { size, align } = fixed ? { size: fixed.size, align: PAGE } : pickSize(w);
  if (!fixed && model.bytes() + size > w.opts.maxMapBytes) return undefined;
  if (!fixed && (w.opts.clients.bridge ?? 0) > 0 && model.regions.size >= BRIDGE_REGION_CAP) return undefined;
  const gpa = fixed?.gpa ?? model.freeGpa(rng, size, align);
  if (gpa === undefined) return undefined;
  const hp = w.opts.hugetlb;
  const huge = hp > 0 && size % hp === 0 && gpa % hp === 0;
  const pageSize = huge ? hp : PAGE;
  let backing: number | undefined;
  let offset = 0;
  if (rng.chance(0.4)) {
    const held = [...model.backings.values()].filter((b) => b.held && b.memfd.size >= size && b.memfd.pageSize === pageSize);
    if (held.length > 0) {
      const b = rng.pick(held);
      const at = fromZero(w) ? model.prefixSlot(b.memfd, size) : model.freeOffset(rng, b.memfd, size, pageSize);
      if (at !== undefined) [backing, offset] = [b.id, at];
    }
  }
  if (backing === undefined) {
    let spare = size < GIB && rng.chance(0.3) ? size : 0;
    if (huge && size + spare > w.hugeRoom()) spare = 0;
    // Out of reserved hugetlb pages: ordinary memory this time.
    const ps = huge && size <= w.hugeRoom() ? hp : PAGE;
    backing = (await w.newBacking(size + spare, ps)).id;
    offset = spare > 0 && !fromZero(w) ? rng.int(0, spare / ps) * ps : 0;
  }
  return { op: 'add', name, gpa, size, backing, offset, readonly: rng.chance(0.15), logDirty: rng.chance(0.15) };
}

function expectOk(name: string, detail: string, r: CommitOutcome): StepResult {
  return {
    op: name,
    detail: r.ok ? `${detail} -> generation ${r.result.generation}` : `${detail} -> ${r.err.code}: ${r.err.message}`,
    risky: !r.ok,
    surprises: r.ok ? [] : [`${name} ${detail} was refused: ${r.err.code} ${r.err.message}`],
  };
}

async function add(w: World): Promise<StepResult> {
  const a = await planAdd(w);
  if (!a) return remove(w);
  return expectOk('add', desc(a), await w.commit([a]));
}

async function remove(w: World): Promise<StepResult> {
  const list = removableRegions(w);
  // Every region mapped by an IOAS: the guest's invalidation comes first.
  if (list.length === 0 && w.model.regions.size > 0 && w.opts.ioas) return ioasUnmap(w);
  if (list.length === 0) return add(w);
  const r = w.rng.pick(list);
  return expectOk('remove', r.name, await w.commit([{ op: 'remove', region: r.name }]));
}

/** Remove and add under the same name in one transaction: the region moves to another GPA. */
async function move(w: World): Promise<StepResult> {
  const list = unmappedRegions(w);
  if (list.length === 0) return add(w);
  const r = w.rng.pick(list);
  const align = Math.max(w.model.pageOf(r), r.gpa % HUGE === 0 && r.size % HUGE === 0 ? HUGE : PAGE);
  const gpa = w.model.freeGpa(w.rng, r.size, align, r.name);
  if (gpa === undefined) return remove(w);
  const ops: CommitOp[] = [
    { op: 'remove', region: r.name },
    { op: 'add', name: r.name, gpa, size: r.size, backing: r.backing, offset: r.offset, readonly: r.readonly, logDirty: r.logDirty },
  ];
  return expectOk('move', `${r.name} ${hex(r.gpa)} -> ${hex(gpa)}`, await w.commit(ops));
}

/** Another memory at the same GPA, in one transaction (removes are applied first). */
async function replace(w: World): Promise<StepResult> {
  const list = unmappedRegions(w);
  if (list.length === 0) return add(w);
  const r = w.rng.pick(list);
  const a = await planAdd(w, w.model.regionName(), { gpa: r.gpa, size: r.size });
  if (!a) return remove(w);
  if (!keepsPrefix(w, [{ op: 'remove', region: r.name }, a])) return add(w);
  return expectOk('replace', `${r.name} by ${desc(a)}`, await w.commit([{ op: 'remove', region: r.name }, a]));
}

function toggle(flag: 'readonly' | 'logDirty') {
  return async (w: World): Promise<StepResult> => {
    const list = (flag === 'readonly' ? unmappedRegions(w) : w.model.list()).filter(
      (r) => flag !== 'readonly' || keepsPrefix(w, [{ op: 'set', region: r.name, readonly: !r.readonly }]),
    );
    if (list.length === 0) return add(w);
    const r: ModelRegion = w.rng.pick(list);
    const value = !r[flag];
    return expectOk(flag === 'readonly' ? 'readonly' : 'logging', `${r.name} ${flag}=${value}`, await w.commit([{ op: 'set', region: r.name, [flag]: value }]));
  };
}

/** Transactions the broker must refuse before anything changes, each wrong in exactly one way. */
async function refused(w: World): Promise<StepResult> {
  const { rng, model } = w;
  const held = [...model.backings.values()].filter((b) => b.held);
  // The wrong-in-one-way adds slice ordinary memory (a hugetlb backing would add a second fault: its alignment).
  const ordinary = held.filter((x) => x.memfd.pageSize === PAGE);
  const b = ordinary.length > 0 ? rng.pick(ordinary) : await w.newBacking(4 * PAGE);
  const name = model.regionName();
  const free = model.freeGpa(rng, 2 * PAGE, PAGE);
  const list = model.list();
  const vfio = w.of('vfio', true).length > 0 || w.of('shadow').length > 0;
  const hugeHeld = held.filter((x) => x.memfd.pageSize > PAGE);
  const mapped = list.filter((r) => model.ramMapped(r));
  const bridged = fromZero(w) && w.of('bridge').length > 0;
  // The regions whose removal, or write-protection, a bridge's back-end would see through (computed once).
  const exposingBy = (how: 'remove' | 'readonly') =>
    bridged ? unmappedRegions(w).filter((r) => (how === 'remove' || !r.readonly) && model.exposes([prefixOp(how, r)]) !== undefined) : [];
  const exposing = { remove: exposingBy('remove'), readonly: exposingBy('readonly') };
  const kinds = [
    'too-small',
    'unaligned',
    ...(list.length > 0 ? ['overlap'] : []),
    ...(vfio ? ['reserved'] : []),
    ...(hugeHeld.length > 0 ? ['huge-unaligned'] : []),
    ...(mapped.length > 0 ? ['ram-mapped'] : []),
    ...(bridged ? ['backing-prefix'] : []),
    ...(exposing.remove.length > 0 ? ['backing-prefix-remove'] : []),
    ...(exposing.readonly.length > 0 ? ['backing-prefix-readonly'] : []),
  ];
  const kind = rng.pick(kinds);
  if (kind === 'backing-prefix-remove' || kind === 'backing-prefix-readonly') {
    // Taking a region out from under one behind it in the same memfd, or write-protecting it: a bridge's
    // back-end, which maps the memfd from offset 0 through the later region, would keep reaching it.
    const how = kind === 'backing-prefix-remove' ? 'remove' : 'readonly';
    const r = rng.pick(exposing[how]);
    const res = await w.commit([prefixOp(how, r)]);
    const got = res.ok ? 'accepted' : res.err.code;
    return {
      op: `refused:${kind}`,
      detail: `${how} ${r.name} -> ${got}`,
      risky: true,
      surprises: got === 'MMB_ERR_BACKING_PREFIX' ? [] : [`${how} of ${r.name}, which a region behind it needs: expected MMB_ERR_BACKING_PREFIX, got ${got}`],
    };
  }
  let op: AddOp;
  let expect: string;
  if (kind === 'ram-mapped') {
    // Removing RAM an IOVA mapping points into: refused before anything is sent (docs/ioas.md).
    const r = rng.pick(mapped);
    const res = await w.commit([{ op: 'remove', region: r.name }]);
    const got = res.ok ? 'accepted' : res.err.code;
    return {
      op: 'refused:ram-mapped',
      detail: `remove ${r.name} -> ${got}`,
      risky: true,
      surprises: got === 'MMB_ERR_RAM_MAPPED' ? [] : [`removing ${r.name}, which an IOAS maps: expected MMB_ERR_RAM_MAPPED, got ${got}`],
    };
  }
  const hp = w.opts.hugetlb || HUGE;
  const f = kind === 'huge-unaligned' ? model.freeGpa(rng, 2 * hp, hp) : undefined;
  if (kind === 'huge-unaligned' && f !== undefined) {
    // A hugetlb region at a GPA that cuts its pages (4 KiB past a page boundary): refused at planning.
    const hb = rng.pick(hugeHeld);
    op = { op: 'add', name, gpa: f + PAGE, size: hb.memfd.pageSize, backing: hb.id, offset: 0 };
    expect = 'MMB_ERR_UNALIGNED';
  } else if (kind === 'overlap') {
    const r = rng.pick(list);
    op = { op: 'add', name, gpa: r.gpa + rng.int(0, r.size / PAGE - 1) * PAGE, size: PAGE, backing: b.id, offset: 0 };
    expect = 'MMB_ERR_OVERLAP';
  } else if (kind === 'reserved') {
    op = { op: 'add', name, gpa: X86_MSI_WINDOW.start, size: Math.min(b.memfd.size, 2 ** 20), backing: b.id, offset: 0 };
    expect = 'MMB_ERR_RESERVED_RANGE';
  } else if (kind === 'backing-prefix' && free !== undefined) {
    // A writable region behind memory in no region of its memfd: a bridge's back-end, which maps the memfd
    // from offset 0, would reach that memory too (feature MAPS_FROM_ZERO).
    const fresh = await w.newBacking(2 * PAGE);
    op = { op: 'add', name, gpa: free, size: PAGE, backing: fresh.id, offset: PAGE };
    expect = 'MMB_ERR_BACKING_PREFIX';
  } else if (kind === 'unaligned' && free !== undefined) {
    op = { op: 'add', name, gpa: free + 512, size: PAGE, backing: b.id, offset: 0 };
    expect = 'MMB_ERR_UNALIGNED';
  } else if (free !== undefined) {
    op = { op: 'add', name, gpa: free, size: 2 * PAGE, backing: b.id, offset: b.memfd.size - PAGE };
    expect = 'MMB_ERR_BACKING_TOO_SMALL';
  } else {
    return add(w);
  }
  const r = await w.commit([op]);
  const got = r.ok ? 'accepted' : r.err.code;
  return {
    op: `refused:${kind}`,
    detail: `${desc(op)} -> ${got}`,
    risky: true,
    surprises: got === expect ? [] : [`${kind} add ${desc(op)}: expected ${expect}, got ${got}`],
  };
}

/** The owner lets go of a backing; the broker closes it once no region uses it. */
async function drop(w: World): Promise<StepResult> {
  const held = [...w.model.backings.values()].filter((b) => b.held);
  if (held.length === 0) return add(w);
  const b = w.rng.pick(held);
  const referenced = w.model.referenced(b.id);
  const r = await w.owner.dropBacking(b.id);
  b.held = false;
  w.releaseUnused();
  // The broker releases it at once exactly when no region references it.
  const surprises = r.released === !referenced ? [] : [`drop backing ${b.id}: released=${r.released} although ${referenced ? '' : 'no '}region uses it`];
  return { op: 'drop-backing', detail: `b${b.id} (${b.memfd.name}) released=${r.released}`, risky: false, surprises };
}

/** A device hot-added to or hot-removed from a vfio-like client's domain. */
async function device(w: World): Promise<StepResult> {
  const vfios = w.of('vfio');
  if (vfios.length === 0) return add(w);
  const c = w.rng.pick(vfios);
  const attach = c.devices.length === 0 || (c.devices.length < 3 && w.rng.chance(0.5));
  const dev = attach ? `${c.name}-d${w.rng.int(0, 999)}` : w.rng.pick(c.devices);
  if (attach && c.devices.includes(dev)) return add(w);
  const reply = await c.request({ cmd: attach ? 'attach-device' : 'detach-device', device: dev }, 'domain');
  const ok = reply.event === 'domain';
  if (ok) c.devices = attach ? [...c.devices, dev] : c.devices.filter((d) => d !== dev);
  const got = JSON.stringify((reply.devices as string[] | undefined) ?? reply.message);
  return {
    op: attach ? 'device-attach' : 'device-detach',
    detail: `${dev} on ${c.name}: devices ${got}`,
    risky: false,
    surprises:
      ok && JSON.stringify(reply.devices) === JSON.stringify(c.devices) ? [] : [`${attach ? 'attach' : 'detach'} of ${dev} on ${c.describe()}: ${got}`],
  };
}

/** A shadow client's IOAS per device, as its `domain` answer lists them: "device@ioas", sorted. */
export function domainDevices(reply: Record<string, unknown>): string[] {
  const list = (reply.ioas ?? []) as { ioas: string; devices: string[] }[];
  return list.flatMap((d) => d.devices.map((dev) => `${dev}@${d.ioas}`)).sort();
}

/** The same from the harness's side: what it attached where. */
export function modelDevices(c: ClientProc): string[] {
  return [...c.deviceIoas].map(([dev, io]) => `${dev}@${io}`).sort();
}

function expectIoasOk(name: string, detail: string, r: IoasOutcome): StepResult {
  return {
    op: name,
    detail: r.ok ? `${detail} -> generation ${r.result.generation}` : `${detail} -> ${r.err.code}: ${r.err.message}`,
    risky: !r.ok,
    surprises: r.ok ? [] : [`${name} ${detail} was refused: ${r.err.code} ${r.err.message}`],
  };
}

/** Most bytes one IOAS maps at once (the harness's cap: shadow clients pin it all, in every IOAS they are in). */
export const IOAS_CAP = 64 * 2 ** 20;
/** Most IOASes at once. */
export const IOAS_MAX = 3;

const ioasNames = (w: World) => [...w.model.ioas.keys()].sort();
const ioasBytes = (w: World, name: string) => (w.model.ioas.get(name) ?? []).reduce((n, m) => n + m.size, 0);
const descMap = (m: { iova: number; gpa: number; size: number; readonly?: boolean }) =>
  `${hex(m.iova)}+${hex(m.size)}->${hex(m.gpa)}${m.readonly ? ' ro' : ''}`;

/** A valid IOAS map: page-aligned (hugetlb-page-aligned in a hugetlb region) pages of one region at a free IOVA. */
export function planIovaMap(w: World, name: string): Extract<IoasOp, { op: 'map' }> | undefined {
  const { rng, model } = w;
  const list = model.list();
  if (list.length === 0) return undefined;
  const r = rng.pick(list);
  const ps = model.pageOf(r);
  const pages = r.size / ps;
  const n = rng.int(1, Math.max(1, Math.min(pages, Math.floor((4 * 2 ** 20) / ps))));
  const size = n * ps;
  if (ioasBytes(w, name) + size > IOAS_CAP) return undefined;
  const gpa = r.gpa + rng.int(0, pages - n) * ps;
  const iova = model.freeIova(rng, name, size, ps);
  if (iova === undefined) return undefined;
  return { op: 'map', iova, gpa, size, readonly: r.readonly || rng.chance(0.2) };
}

/** The guest maps IOVAs (sometimes invalidating one of its mappings in the same transaction). */
async function ioasMap(w: World): Promise<StepResult> {
  const names = ioasNames(w);
  if (names.length === 0) return ioasCreate(w);
  const name = w.rng.pick(names);
  const m = planIovaMap(w, name);
  if (!m) return [...w.model.ioas.values()].some((x) => x.length > 0) ? ioasUnmap(w) : add(w);
  const maps = w.model.ioas.get(name) ?? [];
  const also = maps.length > 0 && w.rng.chance(0.3) ? w.rng.pick(maps) : undefined;
  const ops: IoasOp[] = [...(also ? [{ op: 'unmap' as const, iova: also.iova, size: also.size }] : []), m];
  return expectIoasOk('ioas-map', `${name}: ${also ? `unmap ${descMap(also)}, ` : ''}map ${descMap(m)}`, await w.ioasCommit(name, ops));
}

/** The guest's invalidation: whole mappings unmapped; done only once no shadow client pins or maps them. */
async function ioasUnmap(w: World): Promise<StepResult> {
  const names = ioasNames(w).filter((n) => (w.model.ioas.get(n) ?? []).length > 0);
  if (names.length === 0) return ioasMap(w);
  const name = w.rng.pick(names);
  const maps = [...(w.model.ioas.get(name) ?? [])];
  const gone = Array.from({ length: Math.min(maps.length, w.rng.int(1, 2)) }, () => maps.splice(w.rng.int(0, maps.length - 1), 1)[0]!);
  const ops: IoasOp[] = gone.map((m) => ({ op: 'unmap', iova: m.iova, size: m.size }));
  return expectIoasOk('ioas-unmap', `${name}: unmap ${gone.map(descMap).join(', ')}`, await w.ioasCommit(name, ops));
}

/** A new IOAS (up to IOAS_MAX), or else one destroyed: refused (MMB_ERR_IOAS_BUSY) while a device is attached to it. */
async function ioasCreate(w: World): Promise<StepResult> {
  const names = ioasNames(w);
  if (names.length >= IOAS_MAX || (names.length > 1 && w.rng.chance(0.4))) return ioasDestroy(w);
  let i = 0;
  while (w.model.ioas.has(`io${i}`)) i++;
  return expectIoasOk('ioas-create', `io${i}`, await w.ioasCreate(`io${i}`));
}

async function ioasDestroy(w: World): Promise<StepResult> {
  const names = ioasNames(w);
  if (names.length <= 1) return ioasMap(w);
  const name = w.rng.pick(names);
  const users = w.clients.filter((c) => [...c.deviceIoas.values()].includes(name));
  const r = await w.ioasDestroy(name);
  const got = r.ok ? 'destroyed' : r.err.code;
  if (users.length > 0) {
    return {
      op: 'refused:ioas-busy',
      detail: `destroy ${name} (devices of ${users.map((c) => c.name).join(', ')} in it) -> ${got}`,
      risky: true,
      surprises: got === 'MMB_ERR_IOAS_BUSY' ? [] : [`destroying ${name} with devices attached: expected MMB_ERR_IOAS_BUSY, got ${got}`],
    };
  }
  return {
    op: 'ioas-destroy',
    detail: `${name} -> ${got}`,
    risky: !r.ok,
    surprises: r.ok ? [] : [`destroying ${name}, which no device is in: ${got} ${r.err.message}`],
  };
}

/** A device of a shadow client hot-added to an IOAS, hot-removed, or moved to another IOAS (detach, then attach). */
async function shadowDevice(w: World): Promise<StepResult> {
  const shadows = w.of('shadow');
  const names = ioasNames(w);
  if (shadows.length === 0 || names.length === 0) return ioasMap(w);
  const c = w.rng.pick(shadows);
  const devs = [...c.deviceIoas.keys()];
  const what = devs.length === 0 || (devs.length < 3 && w.rng.chance(0.4)) ? 'attach' : w.rng.chance(0.5) ? 'detach' : 'move';
  const steps: string[] = [];
  const surprises: string[] = [];
  const run = async (cmd: 'attach-device' | 'detach-device', dev: string, ioas?: string) => {
    const reply = await c.request({ cmd, device: dev, ...(ioas !== undefined ? { ioas } : {}) }, 'domain', 60_000);
    if (reply.event !== 'domain') {
      surprises.push(`${cmd} ${dev}${ioas ? ` to ${ioas}` : ''} on ${c.describe()}: ${String(reply.message)}`);
      return;
    }
    if (cmd === 'attach-device') c.deviceIoas.set(dev, String(ioas));
    else c.deviceIoas.delete(dev);
    c.devices = [...c.deviceIoas.keys()];
    steps.push(`${cmd} ${dev}${ioas ? ` -> ${ioas}` : ''}`);
    const got = domainDevices(reply);
    if (JSON.stringify(got) !== JSON.stringify(modelDevices(c)))
      surprises.push(`after ${cmd} ${dev} ${c.describe()} lists ${JSON.stringify(got)}, the harness attached ${JSON.stringify(modelDevices(c))}`);
  };
  if (what === 'attach') await run('attach-device', `${c.name}-d${w.rng.int(0, 999)}`, w.rng.pick(names));
  else {
    const dev = w.rng.pick(devs);
    const from = c.deviceIoas.get(dev);
    await run('detach-device', dev);
    if (what === 'move') await run('attach-device', dev, w.rng.pick(names.filter((n) => n !== from).concat(names.length === 1 ? names : [])));
  }
  return { op: `shadow-${what}`, detail: `${c.name}: ${steps.join(', ')}`, risky: false, surprises };
}

async function join(w: World): Promise<StepResult> {
  if (w.clients.length >= 12) return leave(w);
  const kind = w.pickKind();
  const c = await w.tryJoin(kind);
  return { op: 'join', detail: c?.describe() ?? `a ${kind} client (evicted and killed while it joined)`, risky: false, surprises: [] };
}

async function leave(w: World): Promise<StepResult> {
  const healthy = w.healthy();
  if (healthy.length <= 2) return join(w);
  const c = w.rng.pick(healthy);
  const code = await w.leave(c);
  const how = code ?? c.child.signalCode;
  return {
    op: 'leave',
    detail: `${c.describe()} exited ${how}`,
    risky: false,
    surprises: code === 0 ? [] : [`${c.describe()} exited ${how} after SIGTERM (expected a clean detach, 0): ${c.stderr.join('').slice(-600)}`],
  };
}

export const OPERATIONS = {
  add: { weight: 30, run: add },
  remove: { weight: 16, run: remove },
  move: { weight: 7, run: move },
  replace: { weight: 4, run: replace },
  readonly: { weight: 6, run: toggle('readonly') },
  logging: { weight: 6, run: toggle('logDirty') },
  refused: { weight: 6, run: refused },
  'drop-backing': { weight: 6, run: drop },
  device: { weight: 6, run: device },
  join: { weight: 3, run: join },
  leave: { weight: 3, run: leave },
} as const;

/** With --ioas only (so that a run without it draws exactly what it drew before they existed). */
export const IOAS_OPERATIONS = {
  'ioas-map': { weight: 8, run: ioasMap },
  'ioas-unmap': { weight: 6, run: ioasUnmap },
  'ioas-create': { weight: 2, run: ioasCreate },
  'shadow-device': { weight: 4, run: shadowDevice },
} as const;

export type OperationName = keyof typeof OPERATIONS | keyof typeof IOAS_OPERATIONS;

export function runOperation(w: World): Promise<StepResult> {
  const ops: Record<string, { weight: number; run: (w: World) => Promise<StepResult> }> = { ...OPERATIONS, ...(w.opts.ioas ? IOAS_OPERATIONS : {}) };
  const name = w.rng.weighted(Object.fromEntries(Object.entries(ops).map(([k, v]) => [k, v.weight])));
  return ops[name]!.run(w);
}
