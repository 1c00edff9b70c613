// The broker's coalesced views merge only new memory (issue 17): a run a coalescing client follows is never
// removed to be re-added bigger, unless the client's region limit forces that reshape; and what a
// coalescing client is sent (viewOps) says so. Pure functions first, then through a broker and a real
// coalescing subscriber, watching every change it applies.
import { afterEach, describe, expect, it } from 'vitest';
import { coalesce, nextView, viewOps } from '../broker/coalesce.js';
import type { Change } from '../clients/view.js';
import { asGpa, asOffset, type Region } from '../protocol/index.js';
import { defer, embeddedBroker, ownerOf, runCleanups, subscriberOf } from './helpers/embedded.js';
import { native } from '../native/index.js';

const MiB = 1 << 20;
afterEach(runCleanups);

let nextId = 1;
const block = (i: number, extra: Partial<Region> = {}): Region => ({
  id: nextId++,
  name: `b${i}`,
  gpa: asGpa(i * 2 * MiB),
  size: 2 * MiB,
  backing: 1,
  offset: asOffset(i * 2 * MiB),
  readonly: false,
  logDirty: false,
  ...extra,
});
const other: Region = { id: 1000, name: 'other', gpa: asGpa(0x4000_0000), size: 2 * MiB, backing: 2, offset: asOffset(0), readonly: false, logDirty: false };
const shape = (v: readonly Region[]) => v.map((r) => [r.name, r.gpa / MiB, r.size / MiB]);
const sorted = (rs: Region[]) => [...rs].sort((a, b) => a.gpa - b.gpa);

describe('nextView: only new memory is merged', () => {
  it('a block hot-added right after a run the client follows stays a region of its own; new blocks merge among themselves', () => {
    const b = Array.from({ length: 6 }, (_, i) => block(i));
    const current = coalesce(sorted([b[0]!, other]));
    const one = nextView(current, sorted([b[0]!, b[1]!, other]), 32);
    expect(one.reshaped).toBe(false);
    expect(shape(one.view)).toEqual([
      ['b0', 0, 2],
      ['b1', 2, 2],
      ['other', 1024, 2],
    ]);
    // The run b0 is untouched: the client is sent only the add of b1.
    expect(viewOps(current, one.view)).toEqual([{ op: 'add', region: b[1] }]);
    // Several new blocks in one transaction are new memory together: one run.
    const two = nextView(one.view, sorted([b[0]!, b[1]!, b[2]!, b[3]!, b[4]!, other]), 32);
    expect(shape(two.view)).toEqual([
      ['b0', 0, 2],
      ['b1', 2, 2],
      ['b2..b4', 4, 6],
      ['other', 1024, 2],
    ]);
  });

  it('when the limit forces it, the view is the fully coalesced map (a reshape); beyond that the broker refuses', () => {
    const b = Array.from({ length: 4 }, (_, i) => block(i));
    const current = [b[0]!, b[1]!, b[2]!, other];
    const next = nextView(current, sorted([...b, other]), 4);
    expect(next.reshaped).toBe(true);
    expect(shape(next.view)).toEqual([
      ['b0..b3', 0, 8],
      ['other', 1024, 2],
    ]);
    const ops = viewOps(current, next.view);
    expect(
      ops
        .filter((o) => o.op === 'remove')
        .map((o) => (o as { region: number }).region)
        .sort(),
    ).toEqual([b[0]!.id, b[1]!.id, b[2]!.id].sort());
    expect(ops.filter((o) => o.op === 'add')).toHaveLength(1);
  });

  it('a run keeps its shape through a flag change of all of it; a change of part of it, or a removal inside it, splits it', () => {
    const b = Array.from({ length: 4 }, (_, i) => block(i));
    const current = coalesce(b);
    expect(shape(current)).toEqual([['b0..b3', 0, 8]]);
    const logging = b.map((r) => ({ ...r, logDirty: true }));
    const flagged = nextView(current, logging, 32);
    expect(shape(flagged.view)).toEqual([['b0..b3', 0, 8]]);
    expect(flagged.view[0]!.logDirty).toBe(true);
    // viewOps: the same id removed and added with the new flag (the client makes that a metadata update).
    expect(viewOps(current, flagged.view).map((o) => o.op)).toEqual(['remove', 'add']);
    const part = nextView(current, [b[0]!, { ...b[1]!, logDirty: true }, b[2]!, b[3]!], 32);
    expect(shape(part.view)).toEqual([
      ['b0', 0, 2],
      ['b1', 2, 2],
      ['b2..b3', 4, 4],
    ]);
    const hole = nextView(current, [b[0]!, b[1]!, b[3]!], 32);
    expect(shape(hole.view)).toEqual([
      ['b0..b1', 0, 4],
      ['b3', 6, 2],
    ]);
    // Memory replaced by a region of the same backing at the same offset is the same memory: kept.
    const same = nextView(current, [b[0]!, { ...b[1]!, id: 999, name: 'again' }, b[2]!, b[3]!], 32);
    expect(same.view.map((r) => [r.gpa, r.size])).toEqual([[0, 8 * MiB]]);
    // Other memory at the same place is not.
    const moved = nextView(current, [b[0]!, { ...b[1]!, id: 998, backing: 7 }, b[2]!, b[3]!], 32);
    expect(moved.view).toHaveLength(3);
  });
});

describe('through the broker: a coalescing subscriber never sees a run it follows removed to grow', () => {
  it('23 blocks hot-added one by one after the first: no change the subscriber applies removes anything', async () => {
    const broker = embeddedBroker();
    const owner = await ownerOf(broker);
    const ram = await owner.createBacking(64 * MiB, 'blocks');
    defer(() => native.close(ram.fd));
    const elsewhere = await owner.createBacking(2 * MiB, 'other');
    defer(() => native.close(elsewhere.fd));
    await owner.addRegion({ name: 'b0', gpa: 0, size: 2 * MiB, backing: ram.backing });
    await owner.addRegion({ name: 'other', gpa: 0x4000_0000, size: 2 * MiB, backing: elsewhere.backing });
    const sub = await subscriberOf(broker, { coalesce: true, maxRegions: 32, reconnect: false, name: 'coalescing' });
    const changes: Change[] = [];
    sub.on('change', (e) => changes.push(e.change));
    for (let i = 1; i <= 23; i++) await owner.addRegion({ name: `b${i}`, gpa: i * 2 * MiB, size: 2 * MiB, backing: ram.backing, offset: i * 2 * MiB });
    expect(changes).toHaveLength(23);
    expect(changes.flatMap((c) => c.removed)).toEqual([]);
    expect(sub.regions().find((r) => r.gpa === 0)!.size).toBe(2 * MiB);
    expect(sub.regions()).toHaveLength(25);
  });
});
