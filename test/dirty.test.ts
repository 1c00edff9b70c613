// Dirty logging (feature DIRTY): Invariant 5, no lost dirty bit, with writers in several processes; the
// KVM client's dirty log; a writer that cannot track; observers; logging started and stopped while
// hotplugging; and pre-copy migration of a space while a writer keeps dirtying it.
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import {
  createSealedMemfd,
  DirtyObserver,
  FileDestination,
  KvmSubscriber,
  MappingSubscriber,
  Migration,
  type OwnerClient,
  SpaceDestination,
  VfioSubscriber,
} from '../clients/index.js';
import { constants, native } from '../native/index.js';
import { Msg } from '../protocol/index.js';
import { IN_CI } from './helpers/ci.js';
import { fdCount, runCli, waitFor } from './helpers/procs.js';
import { SharedBroker } from './helpers/shared-broker.js';
import { dataExtents, unionExtents } from '../clients/migration/extents.js';

const MiB = 1 << 20;
const PAGE = 4096;

const shared = new SharedBroker('d', 16, 'dirty-writer.mjs');
const { cleanups, owner, writer } = shared;

/** A new space with two logging regions of one backing: "rw" at 0 and "ro" (read-only) at 2 MiB. */
async function rwAndRo(): Promise<{ space: string; o: OwnerClient }> {
  const space = shared.nextSpace();
  const o = await owner(space);
  const ram = await o.createBacking(4 * MiB, 'ram');
  native.close(ram.fd);
  await o.commit([
    { op: 'add', name: 'rw', gpa: 0, size: 2 * MiB, backing: ram.backing, offset: 0, logDirty: true },
    { op: 'add', name: 'ro', gpa: 2 * MiB, size: 2 * MiB, backing: ram.backing, offset: 2 * MiB, logDirty: true, readonly: true },
  ]);
  return { space, o };
}

/** Pages (gpa / 4096) set in a dirty snapshot. */
function pagesOf(snap: Awaited<ReturnType<OwnerClient['dirtySync']>>): number[] {
  const out: number[] = [];
  for (const r of snap.regions) for (let p = 0; p < r.pages; p++) if ((r.bits[p >>> 3] as number) & (1 << (p & 7))) out.push(r.gpa / PAGE + p);
  return out;
}

describe('Invariant 5: no lost dirty bit', () => {
  it('random writers in three processes: every page they wrote is in the union of the synced dirty sets', async () => {
    const space = shared.nextSpace();
    const o = await owner(space);
    const ram = await o.createBacking(64 * MiB, 'ram');
    native.close(ram.fd);
    const hi = await o.createBacking(16 * MiB, 'hi');
    native.close(hi.fd);
    await o.commit([
      { op: 'add', name: 'ram', gpa: 0, size: 64 * MiB, backing: ram.backing, offset: 0, logDirty: true },
      { op: 'add', name: 'hi', gpa: 0x1_0000_0000, size: 16 * MiB, backing: hi.backing, offset: 0, logDirty: true },
    ]);
    const regions = [
      { gpa: 0, size: 64 * MiB },
      { gpa: 0x1_0000_0000, size: 16 * MiB },
    ];
    const writers = await Promise.all([1, 2, 3].map(() => writer(space)));
    writers.forEach((w, i) => w.send({ cmd: 'start', seed: 17 + i, regions, burst: 8 }));
    const union = new Set<number>();
    // Sync while the writers run, until at least 4 syncs collected at least 100 pages between them (the
    // deadline only bounds a broken run; the assertions are about the work, not how fast it went).
    let syncs = 0;
    const deadline = Date.now() + 30_000;
    while (syncs < 4 || union.size < 100) {
      if (Date.now() > deadline) throw new Error(`after 30 s only ${syncs} dirty syncs collected ${union.size} pages (want >= 4 syncs, >= 100 pages)`);
      const snap = await o.dirtySync();
      for (const p of pagesOf(snap)) union.add(p);
      snap.release();
      syncs++;
    }
    await o.pause(); // every writer has stopped and acked
    const last = await o.dirtySync();
    for (const p of pagesOf(last)) union.add(p);
    last.release();
    let total = 0;
    for (const w of writers) {
      const pages = (await w.request({ cmd: 'written' }, 'written')).pages as number[];
      total += pages.length;
      const missing = pages.filter((p) => !union.has(p));
      expect(missing, `pages written by pid ${w.pid} but never reported dirty`).toEqual([]);
    }
    // The writers did the work the syncs saw.
    expect(total).toBeGreaterThanOrEqual(100);
    await o.resume();
  });

  it('only the owner collects, into a sealed read-write memfd; a refused sync loses no bit and leaks nothing', async () => {
    const space = shared.nextSpace();
    const o = await owner(space);
    const ram = await o.createBacking(4 * MiB, 'ram');
    native.close(ram.fd);
    await o.addRegion({ name: 'ram', gpa: 0, size: 4 * MiB, backing: ram.backing, logDirty: true });
    const w = await writer(space);
    (await o.dirtySync()).release();
    await w.request({ cmd: 'write', pages: [3, 700] }, 'wrote');
    const fdsBefore = fdCount(shared.broker.pid!);
    // A subscriber may not take the bits (collecting clears them).
    const sub = await MappingSubscriber.attach(shared.socket, { space, reconnect: false });
    cleanups.push(() => sub.close());
    const subConn = (sub as unknown as { conn: { request(m: object, fds: number[]): Promise<unknown> } }).conn;
    const good = createSealedMemfd('stolen', 4096);
    const code = (p: Promise<unknown>) =>
      p.then(
        () => 'ok',
        (e: { code: string }) => e.code,
      );
    expect(await code(subConn.request({ t: Msg.DIRTY_SYNC }, [good]))).toBe('MMB_ERR_NOT_OWNER');
    // Buffers the broker refuses before moving a bit: a pipe, an unsealed memfd, a read-only reopen.
    const ownerConn = (o as unknown as { conn: { request(m: object, fds: number[]): Promise<unknown> } }).conn;
    const [pa, pb] = native.socketPair();
    const unsealed = native.memfdCreate('unsealed', constants.MFD_CLOEXEC);
    native.ftruncate(unsealed, 4096);
    const ro = fs.openSync(`/proc/self/fd/${good}`, 'r');
    for (const fd of [pa, unsealed, ro]) expect(await code(ownerConn.request({ t: Msg.DIRTY_SYNC }, [fd]))).toBe('MMB_ERR_BUFFER_INVALID');
    for (const fd of [good, pa, pb, unsealed, ro]) native.close(fd);
    // The bits are all still there for the owner's next sync, and the broker holds no extra descriptor.
    const snap = await o.dirtySync();
    expect(pagesOf(snap)).toEqual([3, 700]);
    snap.release();
    await sub.close();
    await waitFor(`the broker's fd count to return to ${fdsBefore}`, () => fdCount(shared.broker.pid!) === fdsBefore);
  });

  it('a writer that cannot track (no DIRTY feature) makes every writable logged page dirty at each sync', async () => {
    const { space, o } = await rwAndRo();
    await writer(space, ['--no-dirty']);
    const snap = await o.dirtySync();
    expect(snap.regions.map((r) => [r.name, r.dirty])).toEqual([
      ['rw', 512],
      ['ro', 0],
    ]);
    snap.release();
    // Such a writer cannot be paused either: a migration would refuse rather than copy a moving target.
    expect((await o.pause().catch((e) => e)).code).toBe('MMB_ERR_UNSUPPORTED');
  });

  it('a vfio-like client (no IOMMU dirty tracking) reports what its devices can write: at each sync, and when DMA stops', async () => {
    const { space, o } = await rwAndRo();
    const v = await VfioSubscriber.attach(shared.socket, { space, backend: 'soft', devices: ['dev0'], reconnect: false });
    cleanups.push(() => v.close());
    const dirty = async () => {
      const snap = await o.dirtySync();
      const out = Object.fromEntries(snap.regions.map((r) => [r.name, r.dirty]));
      snap.release();
      return out;
    };
    // While a device can reach them by DMA, every page of every writable region, at every sync.
    expect(await dirty()).toEqual({ rw: 512, ro: 0 });
    expect(await dirty()).toEqual({ rw: 512, ro: 0 });
    // The last device goes: what it may have written is in the next sync, and then nothing more.
    await v.detachDevice('dev0');
    expect(await dirty()).toEqual({ rw: 512, ro: 0 });
    expect(await dirty()).toEqual({ rw: 0, ro: 0 });
    // A device again, then the region turned read-only: its pages written before the toggle are kept.
    await v.attachDevice('dev0');
    (await o.dirtySync()).release();
    await o.commit([{ op: 'set', region: 'rw', readonly: true }]);
    expect(await dirty()).toEqual({ rw: 512, ro: 0 });
    expect(await dirty()).toEqual({ rw: 0, ro: 0 });
  });

  it.skipIf(!fs.existsSync('/dev/kvm') && !IN_CI)('what a real vCPU writes is reported, through KVM_GET_DIRTY_LOG', async () => {
    const space = shared.nextSpace();
    const o = await owner(space);
    const ram = await o.createBacking(8 * MiB, 'ram');
    native.close(ram.fd);
    await o.addRegion({ name: 'ram', gpa: 0, size: 8 * MiB, backing: ram.backing, logDirty: true });
    const kvm = await KvmSubscriber.attach(shared.socket, { space, name: 'vcpu', software: false, reconnect: false });
    cleanups.push(() => kvm.close());
    (await o.dirtySync()).release();
    await kvm.runProgram({
      codeGpa: 0x1000,
      writes: [
        { gpa: 0x30_0000, bytes: Buffer.from('vcpu') },
        { gpa: 0x50_0ffe, bytes: Buffer.from('xyz') },
      ],
    });
    const snap = await o.dirtySync();
    const pages = pagesOf(snap);
    snap.release();
    // The code page (loaded through the client's own mapping) and the three pages the vCPU wrote.
    expect(pages).toEqual([0x1, 0x300, 0x500, 0x501]);
  });
});

describe('dirty logging follows the map', () => {
  it('logging started and stopped while hotplugging: bitmaps come and go with the regions, nothing leaks', async () => {
    const space = shared.nextSpace();
    const o = await owner(space);
    const w = await writer(space);
    void w;
    const base = fdCount(shared.broker.pid!);
    const b = await o.createBacking(32 * MiB, 'blocks');
    native.close(b.fd);
    const st = async () => (await o.status(space)).spaces[0]!;
    for (let i = 0; i < 8; i++) {
      await o.commit([
        { op: 'add', name: `b${i}`, gpa: i * 2 * MiB, size: 2 * MiB, backing: b.backing, offset: i * 2 * MiB, logDirty: i % 2 === 0 },
        ...(i > 0 ? [{ op: 'set' as const, region: `b${i - 1}`, logDirty: (i - 1) % 2 !== 0 }] : []),
      ]);
    }
    // Every add set logging on for even blocks, every set flipped the previous block: b1, b3, b5 log.
    expect((await st()).regions.filter((r) => r.logDirty).map((r) => r.name)).toEqual(['b1', 'b3', 'b5']);
    expect((await st()).logging).toBe(3);
    // Remove some logging and some non-logging regions, move one with logging on.
    await o.commit([
      { op: 'remove', region: 'b2' },
      { op: 'remove', region: 'b3' },
      { op: 'remove', region: 'b7' },
      { op: 'add', name: 'moved', gpa: 0x1_0000_0000, size: 2 * MiB, backing: b.backing, offset: 7 * 2 * MiB, logDirty: true },
    ]);
    const now = await st();
    expect(now.logging).toBe(now.regions.filter((r) => r.logDirty).length);
    const snap = await o.dirtySync();
    expect(snap.regions.map((r) => r.name).sort()).toEqual(
      now.regions
        .filter((r) => r.logDirty)
        .map((r) => r.name)
        .sort(),
    );
    snap.release();
    // Logging off everywhere and every region gone: the broker's fds are back to the baseline.
    await o.commit(now.regions.map((r) => ({ op: 'remove' as const, region: r.id })));
    expect((await st()).logging).toBe(0);
    await o.dropBacking(b.backing);
    expect(fdCount(shared.broker.pid!)).toBe(base + 0); // the owner connection was counted in the baseline
  });

  it('observers receive the dirty ranges of each sync without mapping anything', async () => {
    const space = shared.nextSpace();
    const o = await owner(space);
    const ram = await o.createBacking(4 * MiB, 'ram');
    native.close(ram.fd);
    await o.addRegion({ name: 'ram', gpa: 0x10_0000, size: 4 * MiB, backing: ram.backing, logDirty: true });
    const obs = await DirtyObserver.attach(shared.socket, { space });
    cleanups.push(() => obs.close());
    const sub = await MappingSubscriber.attach(shared.socket, { space, reconnect: false });
    cleanups.push(() => sub.close());
    const got = new Promise<{ ranges: { gpa: number; size: number }[] }>((r) => obs.once('dirty', r));
    sub.memory.write(0x10_0000 + 3 * PAGE, Buffer.from('a'));
    sub.memory.write(0x10_0000 + 4 * PAGE + 100, Buffer.from('b'));
    sub.memory.write(0x10_0000 + 9 * PAGE, Buffer.from('c'));
    (await o.dirtySync()).release();
    expect((await got).ranges).toEqual([
      { gpa: 0x10_0000 + 3 * PAGE, size: 2 * PAGE },
      { gpa: 0x10_0000 + 9 * PAGE, size: PAGE },
    ]);
    expect((await o.status(space)).spaces[0]!.clients.find((c) => c.role === 'observer')).toBeDefined();
  });
});

describe('pre-copy migration', () => {
  it('1 GiB while a writer keeps dirtying: the image equals the source at the pause point', async () => {
    const space = shared.nextSpace();
    const o = await owner(space);
    const ram = await o.createBacking(768 * MiB, 'ram');
    const high = await o.createBacking(256 * MiB, 'high');
    cleanups.push(() => native.close(ram.fd));
    cleanups.push(() => native.close(high.fd));
    await o.commit([
      { op: 'add', name: 'ram', gpa: 0, size: 768 * MiB, backing: ram.backing, offset: 0 },
      { op: 'add', name: 'high', gpa: 0x1_0000_0000, size: 256 * MiB, backing: high.backing, offset: 0 },
    ]);
    // Some content before the migration starts.
    const view = native.mmap(ram.fd, 0, 64 * MiB, constants.PROT_READ | constants.PROT_WRITE, constants.MAP_SHARED);
    new Uint8Array(view.buffer).fill(0x5a, 10 * MiB, 12 * MiB);
    native.munmap(view);
    const w = await writer(space);
    // About 16,000 pages a second (64 MiB/s) all over the 1 GiB: a guest that keeps writing.
    w.send({
      cmd: 'start',
      seed: 99,
      regions: [
        { gpa: 0, size: 768 * MiB },
        { gpa: 0x1_0000_0000, size: 256 * MiB },
      ],
      burst: 32,
      intervalMs: 2,
    });
    await w.next('started');
    const reader = await MappingSubscriber.attach(shared.socket, { space, kind: 'migration', writes: false, reconnect: false });
    cleanups.push(() => reader.close());
    const image = path.join(shared.dir, `${space}.img`);
    const rounds: string[] = [];
    const result = await new Migration(o, reader, new FileDestination(image)).run({
      keepPaused: true,
      stopBytes: 8 * MiB, // what may be left for the paused round
      maxRounds: 20,
      onProgress: (p) => {
        rounds.push(`${p.round}:${p.phase}:${p.pages}`);
      },
    });
    try {
      expect(result.verified).toBe(true);
      expect(result.rounds[0]?.phase).toBe('full');
      expect(result.rounds.at(-1)?.phase).toBe('final');
      expect(result.rounds.length).toBeGreaterThan(2);
      expect(rounds.length).toBe(result.rounds.length);
      // Independently of the engine's own check: the image equals the paused source, read through the
      // owner's own mappings. Where neither the memfd nor the image holds data both read zero, so the
      // union of their data extents is compared (reading the holes would allocate them).
      const fd = fs.openSync(image, 'r');
      for (const [r, memfd] of [
        [{ gpa: 0, size: 768 * MiB }, ram.fd],
        [{ gpa: 0x1_0000_0000, size: 256 * MiB }, high.fd],
      ] as const) {
        const src = native.mmap(memfd, 0, r.size, constants.PROT_READ, constants.MAP_SHARED);
        const bytes = new Uint8Array(src.buffer);
        const extents = unionExtents(
          dataExtents(memfd, 0, r.size),
          dataExtents(fd, r.gpa, r.gpa + r.size).map(([a, b]) => [a - r.gpa, b - r.gpa]),
        );
        let compared = 0;
        for (const [from, to] of extents) {
          const img = Buffer.alloc(to - from);
          fs.readSync(fd, img, 0, to - from, r.gpa + from);
          expect(img.compare(bytes.subarray(from, to))).toBe(0);
          compared += to - from;
        }
        expect(compared).toBeGreaterThan(0);
        native.munmap(src);
      }
      fs.closeSync(fd);
      // The migration did not inflate the source: the memfds hold only what was written (the 2 MiB
      // filled before, and the pages the writer wrote), not the holes it read around.
      const written = ((await w.request({ cmd: 'written' }, 'written')).pages as number[]).length;
      const allocated = fs.fstatSync(ram.fd).blocks * 512 + fs.fstatSync(high.fd).blocks * 512;
      expect(allocated).toBeLessThanOrEqual((written + 512) * PAGE);
      expect(result.converged).toBe(true);
      // Sparse: the hole between 768 MiB and 4 GiB is not allocated, nor are pages never written.
      expect(fs.statSync(image).size).toBe(0x1_0000_0000 + 256 * MiB);
      expect(fs.statSync(image).blocks * 512).toBeLessThan(64 * MiB);
    } finally {
      await o.resume();
    }
  }, 120_000);

  it('mmbroker migrate --to FILE on a served space with a writer', async () => {
    const space = shared.nextSpace();
    const add = await runCli(['map', 'add', '--socket', shared.socket, '--space', space, '--gpa', '0x100000', '--size', '64M', '--name', 'ram']);
    expect(add.code, add.stderr).toBe(0);
    const w = await writer(space);
    w.send({ cmd: 'start', seed: 3, regions: [{ gpa: 0x10_0000, size: 64 * MiB }], burst: 8, intervalMs: 2 });
    const image = path.join(shared.dir, `${space}-cli.img`);
    const r = await runCli(['migrate', '--socket', shared.socket, '--space', space, '--to', image, '--keep-paused', '--json'], 60_000);
    expect(r.code, r.stderr).toBe(0);
    // JSON lines: start, a line per round (and 'sending' while bytes flow), then the result.
    const lines = r.stdout
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l) as { event: string });
    expect(lines[0]?.event).toBe('start');
    expect(lines.filter((l) => l.event === 'round').length).toBeGreaterThanOrEqual(2);
    const result = lines.at(-1) as unknown as { event: string; verified: boolean; rounds: unknown[]; memoryBytes: number };
    expect(result.event).toBe('result');
    expect(result.verified).toBe(true);
    expect(result.memoryBytes).toBe(64 * MiB);
    // The writer is still paused: compare what it wrote, read back from the image, with its own view.
    const pages = ((await w.request({ cmd: 'written' }, 'written')).pages as number[]).slice(0, 50);
    expect(pages.length).toBeGreaterThan(0);
    const reader = await MappingSubscriber.attach(shared.socket, { space, writes: false, reconnect: false });
    cleanups.push(() => reader.close());
    const fd = fs.openSync(image, 'r');
    for (const p of pages) {
      const buf = Buffer.alloc(PAGE);
      fs.readSync(fd, buf, 0, PAGE, p * PAGE);
      expect(buf.compare(reader.memory.read(p * PAGE, PAGE))).toBe(0);
    }
    fs.closeSync(fd);
    const o = await owner(space);
    await o.resume();
  });

  it('into another address space of the same broker', async () => {
    const src = shared.nextSpace();
    const dst = shared.nextSpace();
    const o = await owner(src);
    const ram = await o.createBacking(32 * MiB, 'ram');
    cleanups.push(() => native.close(ram.fd));
    await o.addRegion({ name: 'ram', gpa: 0x100_0000, size: 32 * MiB, backing: ram.backing });
    const w = await writer(src);
    w.send({ cmd: 'start', seed: 5, regions: [{ gpa: 0x100_0000, size: 32 * MiB }], burst: 8 });
    const reader = await MappingSubscriber.attach(shared.socket, { space: src, writes: false, reconnect: false });
    cleanups.push(() => reader.close());
    const result = await new Migration(o, reader, new SpaceDestination(shared.socket, dst)).run({ keepPaused: true });
    expect(result.verified).toBe(true);
    const copy = await MappingSubscriber.attach(shared.socket, { space: dst, writes: false, reconnect: false });
    cleanups.push(() => copy.close());
    expect(Buffer.compare(Buffer.from(copy.memory.read(0x100_0000, 32 * MiB)), Buffer.from(reader.memory.read(0x100_0000, 32 * MiB)))).toBe(0);
    await o.resume();
  });
});
