// The vfio applier in this process, without a broker: the checks it makes by itself (pin limit, reserved
// ranges, IOVA table), all-or-nothing on failure, and cancellation through ApplyContext, with the soft
// backend's real mlock checked in /proc/self/status.
import { afterEach, describe, expect, it } from 'vitest';
import { createSealedMemfd } from '../clients/memfd.js';
import { toView, type ApplyContext, type Change, type LocalBacking, type ViewRegion } from '../clients/view.js';
import { VfioApplier } from '../clients/vfio/applier.js';
import { Domain, type PinProgress } from '../clients/vfio/domain.js';
import { SoftBackend } from '../clients/vfio/soft.js';
import { native } from '../native/index.js';
import { CancelledError, asGpa, asOffset, type Region } from '../protocol/index.js';
import { vmLckKiB } from './helpers/procs.js';
import { rejection as error } from './helpers/throws.js';

const MiB = 2 ** 20;
const open: { applier: VfioApplier; fds: number[] }[] = [];

afterEach(async () => {
  for (const o of open.splice(0)) {
    await o.applier.close();
    for (const fd of o.fds) native.close(fd);
  }
  expect(vmLckKiB()).toBeLessThan(1024);
});

function setup(opts: { pinLimit?: number; devices?: string[]; chunk?: number; dmaEntryLimit?: number } = {}) {
  const progress: PinProgress[] = [];
  const hooks: { onProgress?: (p: PinProgress) => void } = {};
  const domain = new Domain(new SoftBackend(opts.dmaEntryLimit !== undefined ? { dmaEntryLimit: opts.dmaEntryLimit } : {}), {
    chunkBytes: opts.chunk ?? 16 * MiB,
    onProgress: (p) => {
      progress.push(p);
      hooks.onProgress?.(p);
    },
  });
  const applier = new VfioApplier(domain, opts.pinLimit !== undefined ? { pinLimit: opts.pinLimit } : {});
  const backings = new Map<number, LocalBacking>();
  const fds: number[] = [];
  open.push({ applier, fds });
  let nextId = 1;
  return {
    applier,
    domain,
    progress,
    hooks,
    backings,
    async devices(...names: string[]) {
      for (const n of names) await applier.attachDevice(n);
    },
    region(name: string, gpa: number, size: number): ViewRegion {
      const fd = createSealedMemfd(name, size);
      fds.push(fd);
      const st = native.fstat(fd);
      const id = nextId++;
      backings.set(id, { id, name, size, fd, dev: st.dev, ino: st.ino });
      const r: Region = { id, name, gpa: asGpa(gpa), size, backing: id, offset: asOffset(0), readonly: false, logDirty: false };
      return toView(r, backings);
    },
  };
}

const ctx = (over: Partial<ApplyContext> = {}): ApplyContext => ({ signal: new AbortController().signal, cancelled: () => false, ...over });
const change = (c: Partial<Change>): Change => ({ generation: 1, cause: 'txn', removed: [], updated: [], added: [], ...c });
const locked = () => vmLckKiB() * 1024;

describe('checks the applier makes before any work', () => {
  it('its own pin limit (the broker checks it too, but a local limit must hold by itself)', async () => {
    const t = setup({ pinLimit: 48 * MiB, devices: [] });
    await t.devices('d0');
    await t.applier.apply(change({ added: [t.region('a', 0x1000_0000, 32 * MiB)] }), t.backings, ctx());
    const big = t.region('b', 0x2000_0000, 32 * MiB);
    const e = await error(t.applier.apply(change({ added: [big] }), t.backings, ctx()));
    expect(e.code).toBe('MMB_ERR_PIN_BUDGET');
    expect(e.message).toMatch(/64 MiB.*48 MiB/);
    expect(t.domain.pinnedBytes).toBe(32 * MiB);
    expect(t.applier.memory.regions().map((m) => m.region.name)).toEqual(['a']);
    // Replacing a region frees its share first: 32 out, 32 in is within the limit.
    const [a] = t.applier.memory.regions().map((m) => m.region);
    await t.applier.apply(change({ removed: [a!], added: [big] }), t.backings, ctx());
    expect(t.domain.pinnedBytes).toBe(32 * MiB);
  });

  it('reserved ranges and the IOVA table, with the state left as it was', async () => {
    const t = setup({ dmaEntryLimit: 1 });
    await t.devices('d0');
    const msi = t.region('msi', 0xfee0_0000, 2 * MiB);
    expect((await error(t.applier.apply(change({ added: [msi] }), t.backings, ctx()))).code).toBe('MMB_ERR_RESERVED_RANGE');
    await t.applier.apply(change({ added: [t.region('one', 0x1000_0000, 4 * MiB)] }), t.backings, ctx());
    const before = locked();
    expect((await error(t.applier.apply(change({ added: [t.region('two', 0x2000_0000, 4 * MiB)] }), t.backings, ctx()))).code).toBe('MMB_ERR_CLIENT_LIMIT');
    expect(locked()).toBe(before);
    expect(t.applier.memory.regions()).toHaveLength(1);
  });
});

describe('the soft IOVA table', () => {
  it('refuses an overlapping IOVA (EEXIST, as VFIO) and undoes the whole change', async () => {
    const t = setup();
    await t.devices('d0');
    const base = locked();
    const a = t.region('a', 0x1000_0000, 8 * MiB);
    const b = t.region('b', 0x1040_0000, 8 * MiB); // starts inside a
    const e = await error(t.applier.apply(change({ added: [a, b] }), t.backings, ctx()));
    expect([e.code, e.errno]).toEqual(['MMB_ERR_IOMMU', 'EEXIST']);
    expect(locked()).toBe(base);
    expect(t.domain.mappings()).toEqual([]);
    expect(t.applier.memory.regions()).toEqual([]);
    // Entries go with their regions: the same IOVA can be mapped again afterwards.
    await t.applier.apply(change({ added: [a] }), t.backings, ctx());
    await t.applier.apply(change({ removed: [a] }), t.backings, ctx());
    await t.applier.apply(change({ added: [b] }), t.backings, ctx());
    expect(t.domain.limits().dmaAvailable).toBe(65_534);
  });
});

describe('pinning through ApplyContext', () => {
  it('an aborted change undoes every region it pinned and throws MMB_ERR_CANCELLED', async () => {
    const t = setup({ chunk: 4 * MiB });
    await t.devices('d0');
    const base = locked();
    const abort = new AbortController();
    const a = t.region('a', 0x1000_0000, 32 * MiB);
    const b = t.region('b', 0x2000_0000, 64 * MiB);
    let seen = 0;
    t.hooks.onProgress = (p) => {
      if (p.region === 'b' && ++seen === 3) abort.abort(new CancelledError('rolled back'));
    };
    const e = await error(t.applier.apply(change({ added: [a, b] }), t.backings, ctx({ signal: abort.signal })));
    expect(e.code).toBe('MMB_ERR_CANCELLED');
    expect(locked()).toBe(base);
    expect(t.domain.pinnedBytes).toBe(0);
    expect(t.applier.memory.regions()).toEqual([]);
  });

  it('a region cancelled by a queued removal is skipped and undone, the rest is established; if that removal never comes, the next change pins it', async () => {
    const t = setup({ chunk: 4 * MiB });
    await t.devices('d0');
    const base = locked();
    const a = t.region('a', 0x1000_0000, 32 * MiB);
    const b = t.region('b', 0x2000_0000, 16 * MiB);
    let gone = false;
    t.hooks.onProgress = (p) => {
      if (p.region === 'a' && p.done === 8 * MiB) gone = true;
    };
    await t.applier.apply(change({ added: [a, b] }), t.backings, ctx({ cancelled: (key) => gone && key === a.key }));
    expect(t.domain.mappings().map((m) => m.region)).toEqual(['b']);
    expect(t.applier.memory.regions().map((m) => m.region.name)).toEqual(['b']);
    expect(locked() - base).toBe(16 * MiB);

    // The removal of `a` was rolled back instead: the next change (here an unrelated add) establishes it.
    const c = t.region('c', 0x3000_0000, 4 * MiB);
    await t.applier.apply(change({ added: [c] }), t.backings, ctx());
    expect(t.domain.mappings().map((m) => m.region)).toEqual(['a', 'b', 'c']);
    expect(locked() - base).toBe(52 * MiB);
    // ...and had the removal come, it would have been a no-op.
    await t.applier.apply(change({ removed: [a] }), t.backings, ctx());
    expect(locked() - base).toBe(20 * MiB);
  });

  it('with no device nothing is pinned; the first device pins everything mapped, with progress', async () => {
    const t = setup({ chunk: 8 * MiB });
    const base = locked();
    await t.applier.apply(change({ added: [t.region('a', 0x1000_0000, 16 * MiB)] }), t.backings, ctx());
    expect(locked()).toBe(base);
    expect(t.domain.pinnedBytes).toBe(0);
    await t.devices('d0');
    expect(locked() - base).toBe(16 * MiB);
    expect(t.progress.map((p) => p.done)).toEqual([8 * MiB, 16 * MiB]);
    await t.applier.detachDevice('d0');
    expect(locked()).toBe(base);
  });
});
