// Pre-copy migration while the map changes and while a device writes behind everyone's back: a writer
// process dirties memory throughout; regions are hotplugged, unplugged and made read-only during the
// pre-copy rounds; at the pause point the destination must equal the source byte for byte, map included.
// Then the vfio-like client: its DMA is invisible to dirty logging (only its all-dirty flush makes those
// pages count), and it blocks a migration unless the owner accepts the risk.
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { FileDestination, MappingSubscriber, Migration, SpaceDestination, type OwnerClient } from '../clients/index.js';
import { MigrationBlockedError, migrationBlockers, type MigrationProgress } from '../clients/migration/index.js';
import { constants, native } from '../native/index.js';
import type { StatusResult } from '../protocol/index.js';
import { runCli, waitFor } from './helpers/procs.js';
import { SharedBroker } from './helpers/shared-broker.js';

const MiB = 1 << 20;
const PAGE = 4096;

const shared = new SharedBroker('m', 12, 'migration-writer.mjs');
const { cleanups, owner, writer } = shared;

/** A backing of `size` bytes filled with a pattern over its first `filled` bytes; the owner keeps its fd. */
async function backing(o: OwnerClient, name: string, size: number, filled: number, seed: number): Promise<{ backing: number; fd: number }> {
  const b = await o.createBacking(size, name);
  cleanups.push(() => native.close(b.fd));
  if (filled > 0) {
    const m = native.mmap(b.fd, 0, filled, constants.PROT_READ | constants.PROT_WRITE, constants.MAP_SHARED);
    const words = new Uint32Array(m.buffer);
    for (let i = 0; i < words.length; i += 1024) words[i] = (seed * 2654435761 + i) >>> 0;
    native.munmap(m);
  }
  return { backing: b.backing, fd: b.fd };
}

/** A region's bytes as its backing holds them (pread: holes read zero, nothing is allocated). */
function bytesOf(fd: number, offset: number, size: number): Buffer {
  const out = Buffer.alloc(size);
  let done = 0;
  while (done < size) {
    const n = fs.readSync(fd, out, done, size - done, offset + done);
    if (n === 0) break;
    done += n;
  }
  return out;
}

type Space = StatusResult['spaces'][number];
const mapOf = (st: Space | undefined) =>
  (st?.regions ?? []).map((r) => ({ name: r.name, gpa: r.gpa, size: r.size, readonly: r.readonly })).sort((a, b) => a.gpa - b.gpa);

describe('migration across map changes', () => {
  it.each(['space', 'file'] as const)(
    'hotplug, unplug and a read-only toggle during pre-copy, a writer process throughout: the %s destination equals the source at the pause point',
    async (kind) => {
      const space = shared.nextSpace();
      const o = await owner(space);
      const ram = await backing(o, 'ram', 32 * MiB, 8 * MiB, 1);
      const dimm0 = await backing(o, 'dimm0', 16 * MiB, 16 * MiB, 2);
      const toggle = await backing(o, 'toggle', 8 * MiB, 4 * MiB, 3);
      await o.commit([
        { op: 'add', name: 'ram', gpa: 0, size: 32 * MiB, backing: ram.backing, offset: 0 },
        { op: 'add', name: 'dimm0', gpa: 0x1_0000_0000, size: 16 * MiB, backing: dimm0.backing, offset: 0 },
        { op: 'add', name: 'toggle', gpa: 0x2000_0000, size: 8 * MiB, backing: toggle.backing, offset: 0 },
      ]);
      const w = await writer(space, ['--burst', '24', '--interval-ms', '1']);
      const reader = await MappingSubscriber.attach(shared.socket, { space, name: 'reader', kind: 'migration', writes: false, reconnect: false });
      cleanups.push(() => reader.close());
      const image = path.join(shared.dir, `${space}.img`);
      const dstSpace = shared.nextSpace();
      const dest = kind === 'space' ? new SpaceDestination(shared.socket, dstSpace) : new FileDestination(image);

      // The map changes while rounds are copied: each change starts in one round's report and is waited
      // for in the next one's, so it runs concurrently with that round's copy, and all are done before the
      // pause (which comes at round 3 at the earliest: the writer keeps every round non-empty).
      let dimm1: { backing: number; fd: number } | undefined;
      let inFlight: Promise<unknown> = Promise.resolve();
      const generations: number[] = [];
      const result = await new Migration(o, reader, dest).run({
        keepPaused: true,
        stopBytes: 0,
        maxRounds: 8,
        onProgress: async (p: MigrationProgress) => {
          generations.push(p.generation);
          if (p.phase === 'final') return;
          await inFlight;
          if (p.round === 0) {
            await w.request({ cmd: 'mark' }, 'marked');
            inFlight = (async () => {
              dimm1 = await backing(o, 'dimm1', 16 * MiB, 2 * MiB, 4);
              await o.addRegion({ name: 'dimm1', gpa: 0x1_4000_0000, size: 16 * MiB, backing: dimm1.backing });
            })();
          } else if (p.round === 1) {
            inFlight = Promise.all([o.removeRegion('dimm0'), o.commit([{ op: 'set', region: 'toggle', readonly: true }])]);
          }
        },
      });
      try {
        await inFlight;
        expect(result.verified).toBe(true);
        const phases = result.rounds.map((r) => r.phase);
        expect(phases[0]).toBe('full');
        expect(phases.at(-1)).toBe('final');
        expect(result.rounds.length).toBeGreaterThanOrEqual(5); // full, >= 3 dirty rounds, final
        // Each change shows up in the report of a pre-copy round, not only in the paused one.
        const seen = (f: (r: MigrationProgress) => boolean) => result.rounds.findIndex((r) => r.phase === 'dirty' && f(r));
        expect(seen((r) => r.added.includes('dimm1'))).toBeGreaterThan(0);
        expect(seen((r) => r.removed.includes('dimm0'))).toBeGreaterThan(0);
        expect(seen((r) => r.changed.includes('toggle'))).toBeGreaterThan(0);
        // No transaction was refused, and the map moved on during the migration.
        expect(new Set(generations).size).toBeGreaterThanOrEqual(2);
        expect(generations.at(-1)).toBeGreaterThan(generations[0] as number);

        // The map at the pause point, as the broker has it, against what the destination holds.
        const src = (await o.status(space)).spaces[0];
        expect(src?.paused).toBe(true);
        expect(mapOf(src).map((r) => `${r.name}${r.readonly ? ':ro' : ''}`)).toEqual(['ram', 'toggle:ro', 'dimm1']);
        expect(result.finalMap.map((r) => r.name).sort()).toEqual(['dimm1', 'ram', 'toggle']);
        const fds: Record<string, number> = { ram: ram.fd, toggle: toggle.fd, dimm1: (dimm1 as { fd: number }).fd };
        // Pages the writer wrote after the first copy (it marked a new epoch at round 0's report).
        const late = (await w.request({ cmd: 'written', since: 1 }, 'written')).pages as number[];
        expect(late.length).toBeGreaterThan(50);
        expect(late.some((p) => p * PAGE >= 0x1_4000_0000)).toBe(true); // into the hotplugged region too

        if (kind === 'space') {
          const copy = await MappingSubscriber.attach(shared.socket, { space: dstSpace, writes: false, reconnect: false });
          cleanups.push(() => copy.close());
          expect(mapOf((await o.status(dstSpace)).spaces[0])).toEqual(mapOf(src));
          for (const r of src?.regions ?? []) {
            // Independently of the engine's check: the owner's own memfd against the copy's memory.
            expect(Buffer.compare(bytesOf(fds[r.name] as number, 0, r.size), Buffer.from(copy.memory.read(r.gpa, r.size))), r.name).toBe(0);
          }
          for (const p of late) {
            const r = src?.regions.find((x) => p * PAGE >= x.gpa && p * PAGE < x.gpa + x.size);
            if (r) expect(Buffer.compare(bytesOf(fds[r.name] as number, p * PAGE - r.gpa, PAGE), Buffer.from(copy.memory.read(p * PAGE, PAGE)))).toBe(0);
          }
        } else {
          const fd = fs.openSync(image, 'r');
          cleanups.push(() => fs.closeSync(fd));
          for (const r of src?.regions ?? []) expect(Buffer.compare(bytesOf(fds[r.name] as number, 0, r.size), bytesOf(fd, r.gpa, r.size)), r.name).toBe(0);
          // The unplugged region's range reads zero in the image, and every round's map is recorded.
          expect(bytesOf(fd, 0x1_0000_0000, 16 * MiB).every((b) => b === 0)).toBe(true);
          const rounds = (JSON.parse(fs.readFileSync(`${image}.map.json`, 'utf8')) as { rounds: { round: number; regions: { name: string }[] }[] }).rounds;
          expect(rounds.length).toBeGreaterThanOrEqual(result.rounds.length);
          expect(rounds[0]?.regions.map((r) => r.name).sort()).toEqual(['dimm0', 'ram', 'toggle']);
          expect(
            rounds
              .at(-1)
              ?.regions.map((r) => r.name)
              .sort(),
          ).toEqual(['dimm1', 'ram', 'toggle']);
        }
        // Logging is back to how it was: off everywhere (the migration turned it on).
        expect((await o.status(space)).spaces[0]?.regions.every((r) => !r.logDirty)).toBe(true);
      } finally {
        await o.resume();
      }
      // The writer goes on once resumed.
      await w.next('pause', (e) => e.paused === false);
      const before = (await w.request({ cmd: 'written', since: 0 }, 'written')).ticks as number;
      await waitFor('the writer to write again', async () => ((await w.request({ cmd: 'written', since: 0 }, 'written')).ticks as number) > before);
    },
    120_000,
  );
});

describe('vfio-like clients in a migration', () => {
  it('a soft vfio client with a device blocks the migration (typed error naming it); accepted, its unmarked DMA writes all reach the destination', async () => {
    const space = shared.nextSpace();
    const o = await owner(space);
    const ram = await backing(o, 'ram', 16 * MiB, 4 * MiB, 9);
    const dimm = await backing(o, 'dimm', 8 * MiB, 8 * MiB, 10);
    await o.commit([
      { op: 'add', name: 'ram', gpa: 0, size: 16 * MiB, backing: ram.backing, offset: 0 },
      { op: 'add', name: 'dimm', gpa: 0x4000_0000, size: 8 * MiB, backing: dimm.backing, offset: 0 },
    ]);
    // The "device" writes through its mapping and tells nobody (DMA); it stops while paused.
    const dev = await writer(space, ['--vfio', '--name', 'nic-vfio', '--burst', '16']);
    const reader = await MappingSubscriber.attach(shared.socket, { space, name: 'reader', kind: 'migration', writes: false, reconnect: false });
    cleanups.push(() => reader.close());

    // Refused before anything changed, naming the client.
    const dst1 = shared.nextSpace();
    const err = await new Migration(o, reader, new SpaceDestination(shared.socket, dst1)).run().catch((e: unknown) => e);
    expect(err).toBeInstanceOf(MigrationBlockedError);
    expect(err).toMatchObject({ code: 'MMB_ERR_MIGRATION_BLOCKED', client: { name: 'nic-vfio', kind: 'vfio' } });
    expect((err as MigrationBlockedError).blockers.map((b) => [b.client.name, b.devices])).toEqual([['nic-vfio', ['dev0']]]);
    expect((err as Error).message).toMatch(/cannot be quiesced.*no migratable state.*--accept-device-risk/);
    const st = (await o.status(space)).spaces[0];
    expect(st?.regions.every((r) => !r.logDirty) && st.paused === false).toBe(true);
    expect((await o.status(dst1)).spaces[0]?.regions).toEqual([]);

    // Accepted: while logging, the client says in its report which tracker it uses (none: all dirty).
    const backends: string[] = [];
    const dst2 = shared.nextSpace();
    const result = await new Migration(o, reader, new SpaceDestination(shared.socket, dst2)).run({
      acceptDeviceRisk: true,
      keepPaused: true,
      stopBytes: 0,
      maxRounds: 4,
      onProgress: async (p) => {
        if (p.round === 0) await dev.request({ cmd: 'mark' }, 'marked');
        const c = (await o.status(space)).spaces[0]?.clients.find((x) => x.name === 'nic-vfio');
        backends.push(`${c?.backend} (dirty: ${c?.dirtyTracking})`); // 'none' once logging stopped
      },
    });
    try {
      expect(result.acceptedRisks.map((b) => b.client.name)).toEqual(['nic-vfio']);
      expect(result.verified).toBe(true);
      expect(backends.slice(0, -1).every((b) => b === 'soft (dirty: all)')).toBe(true);
      // A device may have written anything it maps: every round resends every writable page.
      expect(result.rounds.filter((r) => r.phase === 'dirty').every((r) => r.pages === (16 + 8) * 256)).toBe(true);
      // Every page the device wrote after the first copy, unmarked, is at the destination as at the source.
      const late = (await dev.request({ cmd: 'written', since: 1 }, 'written')).pages as number[];
      expect(late.length).toBeGreaterThan(20);
      const copy = await MappingSubscriber.attach(shared.socket, { space: dst2, writes: false, reconnect: false });
      cleanups.push(() => copy.close());
      for (const p of late) {
        const inRam = p * PAGE < 16 * MiB;
        const src = bytesOf(inRam ? ram.fd : dimm.fd, inRam ? p * PAGE : p * PAGE - 0x4000_0000, PAGE);
        expect(Buffer.compare(src, Buffer.from(copy.memory.read(p * PAGE, PAGE))), `page 0x${p.toString(16)}`).toBe(0);
      }
      expect(Buffer.compare(bytesOf(ram.fd, 0, 16 * MiB), Buffer.from(copy.memory.read(0, 16 * MiB)))).toBe(0);
      expect(Buffer.compare(bytesOf(dimm.fd, 0, 8 * MiB), Buffer.from(copy.memory.read(0x4000_0000, 8 * MiB)))).toBe(0);
    } finally {
      await o.resume();
    }
    // Logging off again: the report names the backend alone.
    const after = (await o.status(space)).spaces[0]?.clients.find((c) => c.name === 'nic-vfio')?.backend;
    expect(after).toBe('soft');
  }, 120_000);

  it('mmbroker migrate refuses, naming the vfio client, and migrates with --accept-device-risk', async () => {
    const space = shared.nextSpace();
    const add = await runCli(['map', 'add', '--socket', shared.socket, '--space', space, '--gpa', '0x100000', '--size', '8M', '--name', 'ram']);
    expect(add.code, add.stderr).toBe(0);
    await writer(space, ['--vfio', '--name', 'gpu-vfio']);
    const image = path.join(shared.dir, `${space}-vfio.img`);
    const refused = await runCli(['migrate', '--socket', shared.socket, '--space', space, '--to', image, '--json'], 60_000);
    expect(refused.code).toBe(1);
    expect(refused.stderr).toMatch(/MMB_ERR_MIGRATION_BLOCKED .*migration blocked: vfio client "gpu-vfio"/);
    expect(refused.stderr).toMatch(/refused by: vfio client "gpu-vfio"/);
    const error = refused.stdout
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l) as { event: string; blockers?: { client: { name: string } }[] })
      .at(-1);
    expect(error).toMatchObject({ event: 'error', code: 'MMB_ERR_MIGRATION_BLOCKED', blockers: [{ client: { name: 'gpu-vfio' } }] });
    expect(fs.existsSync(image)).toBe(false);

    const ok = await runCli(['migrate', '--socket', shared.socket, '--space', space, '--to', image, '--accept-device-risk', '--json'], 60_000);
    expect(ok.code, ok.stderr).toBe(0);
    const result = ok.stdout
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l) as { event: string; verified?: boolean; acceptedRisks?: { client: { name: string } }[] })
      .at(-1);
    expect(result).toMatchObject({ event: 'result', verified: true, acceptedRisks: [{ client: { name: 'gpu-vfio' } }] });
  }, 60_000);
});

describe('the blocker rule', () => {
  const client = (over: Record<string, unknown>) =>
    ({
      id: 7,
      role: 'subscriber',
      kind: 'vfio',
      name: 'v',
      pid: 1,
      uid: 0,
      transport: 'socket',
      ackedGeneration: 0,
      state: 'ready',
      devices: ['0000:00:01.0'],
      backend: 'type1',
      ...over,
    }) as unknown as Space['clients'][number];
  it('a vfio subscriber with a device blocks unless it declares quiesce and device state; without a device, or another kind, it does not', () => {
    expect(migrationBlockers([client({})]).map((b) => b.reason)).toEqual([
      'vfio client "v" (type1, devices 0000:00:01.0) cannot be quiesced (nothing stops its DMA at the pause) and has no migratable state',
    ]);
    expect(migrationBlockers([client({ migration: { quiesce: true, deviceState: false } })]).map((b) => b.reason)).toEqual([
      'vfio client "v" (type1, devices 0000:00:01.0) has no migratable state',
    ]);
    expect(migrationBlockers([client({ migration: { quiesce: true, deviceState: true } })])).toEqual([]);
    expect(migrationBlockers([client({ devices: [] }), client({ kind: 'plain' }), client({ role: 'observer' })])).toEqual([]);
  });
});
