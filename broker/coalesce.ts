// Coalesced views, for subscribers with few slots (vhost-user back-ends offer 8 or 32, DPDK 8): adjacent
// regions that are contiguous in the same backing, with the same flags, are merged into one. A map of
// 200 hotplugged 2 MiB blocks cut from one memfd is then one region to such a client.
//
// A merged region takes the id of its lowest member (unique: each region belongs to exactly one run) and
// a name made from its first and last member. A coalescing client's transactions are the difference
// between its view before and after, so it only ever sees whole runs appear and disappear.
import type { Region, TxnOp } from '../protocol/index.js';

const MAX_NAME = 64;

function runName(first: Region, last: Region, count: number): string {
  if (count === 1) return first.name;
  const name = `${first.name}..${last.name}`;
  return Buffer.byteLength(name) <= MAX_NAME ? name : `${first.name.slice(0, 40)}+${count - 1}`;
}

/** Merges runs of `sorted` (by gpa, non-overlapping). Returns new objects only where a run has > 1 member. */
export function coalesce(sorted: readonly Region[]): Region[] {
  const out: Region[] = [];
  let i = 0;
  while (i < sorted.length) {
    const first = sorted[i] as Region;
    let last = first;
    let j = i + 1;
    for (; j < sorted.length; j++) {
      const r = sorted[j] as Region;
      const contiguous =
        r.gpa === last.gpa + last.size &&
        r.backing === first.backing &&
        r.offset === last.offset + last.size &&
        r.readonly === first.readonly &&
        r.logDirty === first.logDirty;
      if (!contiguous) break;
      last = r;
    }
    const count = j - i;
    out.push(count === 1 ? first : { ...first, name: runName(first, last, count), size: last.gpa + last.size - first.gpa });
    i = j;
  }
  return out;
}

const same = (a: Region, b: Region) =>
  a.gpa === b.gpa && a.size === b.size && a.backing === b.backing && a.offset === b.offset && a.readonly === b.readonly && a.logDirty === b.logDirty && a.name === b.name;

/** The ops that turn view `before` into `after` (removes first, then adds; changed runs are both). */
export function viewOps(before: readonly Region[], after: readonly Region[]): TxnOp[] {
  const old = new Map(before.map((r) => [r.id, r]));
  const next = new Map(after.map((r) => [r.id, r]));
  const ops: TxnOp[] = [];
  for (const [id, r] of old) {
    const n = next.get(id);
    if (!n || !same(r, n)) ops.push({ op: 'remove', region: id });
  }
  for (const [id, r] of next) {
    const o = old.get(id);
    if (!o || !same(o, r)) ops.push({ op: 'add', region: r });
  }
  return ops;
}
