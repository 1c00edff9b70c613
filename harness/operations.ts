// The operations a step may run (no faults: see faults.ts): hotplug, unplug, moves, flag toggles, backing
// reuse and release, refused transactions, vfio device hot-add / hot-remove, client join / leave. Each is
// chosen and shaped by the seeded generator from the model alone, so one seed replays one sequence.
import type { CommitOp } from '../protocol/index.js';
import { X86_MSI_WINDOW } from '../clients/vfio/soft.js';
import { GIB, HUGE, PAGE, type ModelRegion } from './model.js';
import type { Judged } from './invariants.js';
import type { Moment } from './moment.js';
import type { World, CommitOutcome } from './world.js';

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

const hex = (n: number) => `0x${n.toString(16)}`;
const desc = (a: AddOp) => `${a.name} ${hex(a.gpa)}+${hex(a.size)} b${a.backing}@${hex(a.offset)}${a.readonly ? ' ro' : ''}${a.logDirty ? ' log' : ''}`;

/** A size class: 1 GiB (rare), hugepage multiples, or any page count from 4 KiB to 16 MiB. */
function pickSize(w: World): { size: number; align: number } {
  const { rng } = w;
  if (rng.chance(w.opts.gigRate)) return { size: GIB, align: GIB };
  if (rng.chance(0.5)) return { size: HUGE * rng.int(1, 32), align: HUGE };
  return { size: PAGE * Math.floor(2 ** (rng.next() * 12)), align: PAGE };
}

/** A valid add: a free GPA, and either a slice of a held backing (reuse) or a new memfd. */
export async function planAdd(w: World, name = w.model.regionName(), fixed?: { gpa: number; size: number }): Promise<AddOp | undefined> {
  const { rng, model } = w;
  const { size, align } = fixed ? { size: fixed.size, align: PAGE } : pickSize(w);
  if (!fixed && model.bytes() + size > w.opts.maxMapBytes) return undefined;
  const gpa = fixed?.gpa ?? model.freeGpa(rng, size, align);
  if (gpa === undefined) return undefined;
  let backing: number | undefined;
  let offset = 0;
  if (rng.chance(0.4)) {
    const held = [...model.backings.values()].filter((b) => b.held && b.memfd.size >= size);
    if (held.length > 0) {
      const b = rng.pick(held);
      const at = model.freeOffset(rng, b.memfd, size, PAGE);
      if (at !== undefined) [backing, offset] = [b.id, at];
    }
  }
  if (backing === undefined) {
    const spare = size < GIB && rng.chance(0.3) ? size : 0;
    backing = (await w.newBacking(size + spare)).id;
    offset = spare > 0 ? rng.int(0, spare / PAGE) * PAGE : 0;
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
  const list = w.model.list();
  if (list.length === 0) return add(w);
  const r = w.rng.pick(list);
  return expectOk('remove', r.name, await w.commit([{ op: 'remove', region: r.name }]));
}

/** Remove and add under the same name in one transaction: the region moves to another GPA. */
async function move(w: World): Promise<StepResult> {
  const list = w.model.list();
  if (list.length === 0) return add(w);
  const r = w.rng.pick(list);
  const align = r.gpa % HUGE === 0 && r.size % HUGE === 0 ? HUGE : PAGE;
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
  const list = w.model.list();
  if (list.length === 0) return add(w);
  const r = w.rng.pick(list);
  const a = await planAdd(w, w.model.regionName(), { gpa: r.gpa, size: r.size });
  if (!a) return remove(w);
  return expectOk('replace', `${r.name} by ${desc(a)}`, await w.commit([{ op: 'remove', region: r.name }, a]));
}

function toggle(flag: 'readonly' | 'logDirty') {
  return async (w: World): Promise<StepResult> => {
    const list = w.model.list();
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
  const b = held.length > 0 ? rng.pick(held) : await w.newBacking(4 * PAGE);
  const name = model.regionName();
  const free = model.freeGpa(rng, 2 * PAGE, PAGE);
  const list = model.list();
  const vfio = w.of('vfio', true).length > 0;
  const kinds = ['too-small', 'unaligned', ...(list.length > 0 ? ['overlap'] : []), ...(vfio ? ['reserved'] : [])];
  const kind = rng.pick(kinds);
  let op: AddOp;
  let expect: string;
  if (kind === 'overlap') {
    const r = rng.pick(list);
    op = { op: 'add', name, gpa: r.gpa + rng.int(0, r.size / PAGE - 1) * PAGE, size: PAGE, backing: b.id, offset: 0 };
    expect = 'MMB_ERR_OVERLAP';
  } else if (kind === 'reserved') {
    op = { op: 'add', name, gpa: X86_MSI_WINDOW.start, size: Math.min(b.memfd.size, 2 ** 20), backing: b.id, offset: 0 };
    expect = 'MMB_ERR_RESERVED_RANGE';
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

export type OperationName = keyof typeof OPERATIONS;

export function runOperation(w: World): Promise<StepResult> {
  const name = w.rng.weighted(Object.fromEntries(Object.entries(OPERATIONS).map(([k, v]) => [k, v.weight])) as Record<OperationName, number>);
  return OPERATIONS[name].run(w);
}
