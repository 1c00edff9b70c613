// The kvm-like client loses no dirty bit when KVM deletes a logging slot (issue 16, point 2): a real vCPU
// writes pages of a logging region, then the region's slot is deleted (removed, moved, resized, turned
// read-only and back, logging turned off) and the owner's next dirty sync must still report those pages.
// KVM frees a slot's dirty bitmap with the slot, so the client must collect it (KVM_GET_DIRTY_LOG, or the
// dirty rings) before the delete. Every case runs twice: with per-slot bitmaps (KVM_GET_DIRTY_LOG) and
// with a dirty ring (KVM_CAP_DIRTY_LOG_RING, which this host's kernel offers: up to 65,536 entries).
//
// Without /dev/kvm these tests are skipped, except under CI=true, where that is a failure.
import fs from 'node:fs';
import { afterEach, describe, expect, it } from 'vitest';
import { KvmSubscriber, KvmVm, type KvmSubscriberOptions } from '../clients/kvm/index.js';
import type { DirtySnapshot, OwnerClient } from '../clients/index.js';
import { native } from '../native/index.js';
import { IN_CI } from './helpers/ci.js';
import { defer, embeddedBroker, ownerOf, runCleanups } from './helpers/embedded.js';

const MiB = 1 << 20;
const PAGE = 4096;
const HAVE_KVM = fs.existsSync('/dev/kvm');
const describeKvm = describe.skipIf(!HAVE_KVM && !IN_CI);
if (!HAVE_KVM && !IN_CI) console.warn('real-KVM dirty-log tests skipped: no /dev/kvm (CI=true makes this a failure)');

afterEach(runCleanups);

/** GPAs of the pages set in a dirty snapshot, released. */
function pagesOf(snap: DirtySnapshot): number[] {
  const out: number[] = [];
  for (const r of snap.regions) for (let p = 0; p < r.pages; p++) if ((r.bits[p >>> 3] as number) & (1 << (p & 7))) out.push(r.gpa + p * PAGE);
  snap.release();
  return out;
}

/**
 * A space with a code region of 2 MiB at 1 MiB (not logging) and a logging region "log" of 4 MiB at 16 MiB (cut
 * from offset 8 MiB of the backing), a KVM client on a real VM, and an empty first sync.
 */
async function setupSpace(opts: Partial<KvmSubscriberOptions>): Promise<{ owner: OwnerClient; kvm: KvmSubscriber; backing: number }> {
  const broker = embeddedBroker();
  const owner = await ownerOf(broker);
  const ram = await owner.createBacking(32 * MiB, 'ram');
  defer(() => native.close(ram.fd));
  await owner.commit([
    { op: 'add', name: 'code', gpa: 0x10_0000, size: 2 * MiB, backing: ram.backing, offset: 0 },
    { op: 'add', name: 'log', gpa: 16 * MiB, size: 4 * MiB, backing: ram.backing, offset: 8 * MiB, logDirty: true },
  ]);
  const kvm = await KvmSubscriber.attach(broker, { space: 'vm0', name: 'kvm0', software: false, ...opts });
  defer(() => kvm.close());
  expect(pagesOf(await owner.dirtySync())).toEqual([]);
  return { owner, kvm, backing: ram.backing };
}

/** The vCPU writes one byte into each of `gpas` (nothing goes through a host mapping). */
async function guestWrites(kvm: KvmSubscriber, gpas: number[]): Promise<void> {
  await kvm.runProgram({ codeGpa: 0x10_0000, writes: gpas.map((gpa) => ({ gpa, bytes: new Uint8Array([0xa5]) })) });
}

const written = [16 * MiB + 3 * PAGE, 16 * MiB + 700 * PAGE];

/** The largest dirty ring this kernel offers, in entries (0: none; KVM_CAP_DIRTY_LOG_RING is Linux 5.11+). */
const RING_MAX = HAVE_KVM
  ? (() => {
      const vm = KvmVm.open();
      vm.close();
      return vm.caps.dirtyRingMaxBytes / 16;
    })()
  : 0;
// A kernel capability, not a tool CI could install: without it the ring cases are skipped, and say so.
if (HAVE_KVM && RING_MAX < 1024) console.warn(`dirty ring cases skipped: this kernel offers a ring of ${RING_MAX} entries (1024 needed)`);
const describeRing = describe.skipIf(!HAVE_KVM || RING_MAX < 1024);

const MODES: [string, Partial<KvmSubscriberOptions>][] = [
  ['bitmaps', {}],
  ...(RING_MAX >= 1024 ? [['a dirty ring', { dirtyRing: 1024 }] as [string, Partial<KvmSubscriberOptions>]] : []),
];

describeKvm.each(MODES)('KVM loses no dirty bit when a logging slot is deleted, with %s', (_mode, modeOpts) => {
  const setup = (opts: Partial<KvmSubscriberOptions> = {}) => setupSpace({ ...modeOpts, ...opts });

  it('read-only toggle and back (delete + create twice): the pages the vCPU wrote are in the next sync', async () => {
    const { owner, kvm } = await setup();
    await guestWrites(kvm, written);
    const slotBefore = kvm.slots().find((s) => s.name === 'log');
    await owner.commit([{ op: 'set', region: 'log', readonly: true }]);
    await owner.commit([{ op: 'set', region: 'log', readonly: false }]);
    // KVM really deleted and re-created the slot (same id, new incarnation): the kernel's bitmap went with it.
    expect(kvm.slots().find((s) => s.name === 'log')).toMatchObject({ slot: slotBefore!.slot, readonly: false, logDirty: true });
    expect(pagesOf(await owner.dirtySync())).toEqual(written);
    // Collected once: the next sync is empty.
    expect(pagesOf(await owner.dirtySync())).toEqual([]);
  });

  it('a coalesced run that grows, splits and shifts (slot resize, removal inside, move of its start): pages of the remaining regions survive', async () => {
    // 4 slots: "code", "log" and two for the run. A run the client has is kept while all its memory is
    // there (broker/coalesce.ts: no reshape under a running guest); the slot budget forces the merges.
    const { owner, kvm, backing } = await setup({ coalesce: true, maxSlots: 4 });
    const block = (i: number) => ({
      op: 'add' as const,
      name: `b${i}`,
      gpa: 32 * MiB + i * 2 * MiB,
      size: 2 * MiB,
      backing,
      offset: 16 * MiB + i * 2 * MiB,
      logDirty: true,
    });
    await owner.commit([block(0), block(1)]);
    const run = () =>
      kvm
        .slots()
        .filter((s) => s.gpa >= 32 * MiB)
        .map((s) => [s.gpa, s.size]);
    expect(run()).toEqual([[32 * MiB, 4 * MiB]]);
    const page = (i: number, p: number) => 32 * MiB + i * 2 * MiB + p * PAGE;
    // b2 beside the run gets a slot of its own; b3 would be a fifth slot, so the broker merges the whole
    // run: KVM deletes the 4 MiB and 2 MiB slots and creates one of 8 MiB.
    await guestWrites(kvm, [page(0, 1), page(1, 511)]);
    await owner.commit([block(2)]);
    expect(run()).toEqual([
      [32 * MiB, 4 * MiB],
      [36 * MiB, 2 * MiB],
    ]);
    await guestWrites(kvm, [page(2, 3)]);
    await owner.commit([block(3)]);
    expect(run()).toEqual([[32 * MiB, 8 * MiB]]);
    expect(pagesOf(await owner.dirtySync())).toEqual([page(0, 1), page(1, 511), page(2, 3)]);
    // A removal inside the run: the 8 MiB slot goes, b0 and b2..b3 get slots of their own.
    await guestWrites(kvm, [page(0, 2), page(2, 0), page(3, 5)]);
    await owner.commit([{ op: 'remove', region: 'b1' }]);
    expect(run()).toEqual([
      [32 * MiB, 2 * MiB],
      [36 * MiB, 4 * MiB],
    ]);
    expect(pagesOf(await owner.dirtySync())).toEqual([page(0, 2), page(2, 0), page(3, 5)]);
    // A move of a run's start: b2 gone, the slot of what remains starts 2 MiB higher.
    await guestWrites(kvm, [page(2, 9), page(3, 7)]);
    await owner.commit([{ op: 'remove', region: 'b2' }]);
    expect(run()).toEqual([
      [32 * MiB, 2 * MiB],
      [38 * MiB, 2 * MiB],
    ]);
    expect(pagesOf(await owner.dirtySync())).toEqual([page(3, 7)]);
    expect(pagesOf(await owner.dirtySync())).toEqual([]);
  });

  it('a region removed, or whose logging stops: its pages reach the subscriber log before the slot is deleted or cleared', async () => {
    const { owner, kvm, backing } = await setup();
    await owner.commit([{ op: 'add', name: 'gone', gpa: 64 * MiB, size: 2 * MiB, backing, offset: 24 * MiB, logDirty: true }]);
    // The broker drops a region's bitmap once the change commits, so look at what the client put into
    // its log while the change was applied: the marks it made, by gpa.
    const marked: number[] = [];
    const markBits = kvm.dirty.markBits.bind(kvm.dirty);
    const mark = kvm.dirty.mark.bind(kvm.dirty);
    kvm.dirty.markBits = (gpa, bits, pages) => {
      for (let p = 0; p < pages; p++) if ((bits[p >>> 3] as number) & (1 << (p & 7))) marked.push(gpa + p * PAGE);
      markBits(gpa, bits, pages);
    };
    // The ring marks page by page; the client's own writes (the program it loads) go to "code", below.
    kvm.dirty.mark = (gpa, length) => {
      if (gpa >= 16 * MiB) for (let p = gpa; p < gpa + length; p += PAGE) marked.push(p);
      mark(gpa, length);
    };
    await guestWrites(kvm, [64 * MiB + 4 * PAGE, ...written]);
    await owner.commit([{ op: 'remove', region: 'gone' }]);
    // (A ring is harvested whole: "log"'s pages may come along already.)
    expect(marked).toContain(64 * MiB + 4 * PAGE);
    await owner.commit([{ op: 'set', region: 'log', logDirty: false }]);
    expect(new Set(marked)).toEqual(new Set([64 * MiB + 4 * PAGE, ...written]));
    expect(kvm.slots().find((s) => s.name === 'log')).toMatchObject({ logDirty: false });
  });
});

describeRing('the dirty ring', () => {
  it('a full ring stops the vCPU (KVM_EXIT_DIRTY_RING_FULL), is harvested and the guest goes on; if KVM ran it past its end, everything counts as dirty: every page written is in the sync', async () => {
    const { owner, kvm } = await setupSpace({ dirtyRing: 256 });
    expect(kvm.dirtyLogMode).toBe('ring');
    // One byte into each of 600 pages: more than a 256-entry ring holds before its soft limit (256 - 64).
    const pages = Array.from({ length: 600 }, (_, i) => 16 * MiB + i * PAGE);
    const run = await kvm.runProgram({ codeGpa: 0x10_0000, writes: pages.map((gpa) => ({ gpa, bytes: new Uint8Array([3]) })) }).then(
      (r) => r,
      (e: Error & { errno: string }) => e,
    );
    // The judge: the pages guest memory shows written (all 600 unless the run stopped on an overflow).
    const written = pages.filter((gpa) => kvm.memory.read(gpa, 1)[0] === 3);
    const reported = pagesOf(await owner.dirtySync());
    if (kvm.dirtyLogMode === 'ring') {
      // KVM stopped the vCPU in time, every time: exact.
      expect(run).toMatchObject({ exits: expect.any(Number) });
      expect((run as { exits: number }).exits).toBeGreaterThanOrEqual(2);
      expect(reported).toEqual(pages);
      expect(pagesOf(await owner.dirtySync())).toEqual([]);
    } else {
      // KVM pushed past the ring's end (this host's kvm_pvm does, often): entries were overwritten, so
      // the client reports the logging region entirely dirty from then on.
      expect(kvm.dirtyLogMode).toBe('all-dirty');
      if (run instanceof Error) expect(run.errno).toBe('EOVERFLOW');
      expect(written.length).toBeGreaterThan(0);
      expect(reported).toEqual(Array.from({ length: 1024 }, (_, i) => 16 * MiB + i * PAGE));
      expect(pagesOf(await owner.dirtySync())).toHaveLength(1024);
    }
    expect(written.filter((gpa) => !reported.includes(gpa))).toEqual([]);
  });

  it('a ring larger than the kernel allows, or in software, is refused at attach', async () => {
    const broker = embeddedBroker();
    const max = KvmVm.open();
    const entries = max.caps.dirtyRingMaxBytes / 16;
    max.close();
    const big = await KvmSubscriber.attach(broker, { space: 'vm0', dirtyRing: entries * 2 }).then(
      (s) => s.close().then(() => undefined),
      (e: Error & { code: string }) => e,
    );
    expect(big?.code).toBe('MMB_ERR_UNSUPPORTED');
    const soft = await KvmSubscriber.attach(broker, { space: 'vm0', dirtyRing: 256, software: true }).then(
      (s) => s.close().then(() => undefined),
      (e: Error & { code: string }) => e,
    );
    expect(soft?.code).toBe('MMB_ERR_INVALID_ARG');
  });
});
