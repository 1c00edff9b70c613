// Feature COMPACT_SYNC (EV_SYNC.columns): the columns round-trip exactly and every broken rule is a typed
// MMB_ERR_BAD_MESSAGE; a bin is accepted only there and only with the feature; a subscriber with the
// feature and one without (and a raw socket client of each kind) hold the same map after a snapshot and
// after a broker restart's resync. Region keys: equal exactly when gpa, size, offset, backing inode and
// access are equal. A snapshot diffed in one pass (diffSnapshot, from objects and from columns) is the
// general diff of the same map.
import fs from 'node:fs';
import fc from 'fast-check';
import { afterEach, describe, expect, it } from 'vitest';
import { Broker } from '../broker/index.js';
import { Connection } from '../clients/connection.js';
import { OwnerClient, Subscriber } from '../clients/index.js';
import { diffRegions, diffSnapshot, toView, type LocalBacking, type ViewRegion } from '../clients/view.js';
import { native } from '../native/index.js';
import {
  ALL_FEATURES,
  COLUMNS_BYTES_PER_REGION,
  COLUMNS_HEADER_BYTES,
  Feature,
  FrameDecoder,
  Msg,
  asGpa,
  asOffset,
  decodeRegionColumns,
  encodeFrame,
  encodeRegionColumns,
  isMmbError,
  parseToClient,
  type Frame,
  type Region,
} from '../protocol/index.js';
import { tempDir, waitFor } from './helpers/procs.js';
import { defer, runCleanups } from './helpers/embedded.js';
import { thrownCode as codeOf } from './helpers/throws.js';

afterEach(runCleanups);

const MiB = 1 << 20;
const limits = { maxFrameBytes: 1 << 20, maxFdsPerFrame: 64, maxPendingFds: 256 };

const region = (i: number, more: Partial<Region> = {}): Region => ({
  id: i + 1,
  name: `r${i}`,
  gpa: asGpa(0x1_0000_0000 + i * 0x2000),
  size: 0x1000,
  backing: 1,
  offset: asOffset(i * 0x1000),
  readonly: false,
  logDirty: false,
  ...more,
});

/** The frame a client receives for `message`. */
function frameOf(message: object): Frame {
  const d = new FrameDecoder(limits);
  d.push(encodeFrame(message, 0, 1 << 20));
  return d.next() as Frame;
}

const sync = (more: object) => ({
  t: Msg.EV_SYNC,
  seq: 1,
  epoch: 'e1',
  generation: 3,
  mode: 'snapshot',
  part: 0,
  last: true,
  regions: [],
  removed: [],
  ...more,
});

describe('EV_SYNC.columns (protocol/columns.ts)', () => {
  const arbRegion = fc.record({
    id: fc.integer({ min: 0, max: 0xffff_ffff }),
    // eslint-disable-next-line no-control-regex -- control characters are what it looks for
    name: fc.string({ unit: 'grapheme', minLength: 1, maxLength: 16 }).filter((s) => !/[\u0000-\u001f\u007f]/.test(s) && Buffer.byteLength(s) <= 64),
    gpa: fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER }).map(asGpa),
    size: fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER }),
    backing: fc.integer({ min: 0, max: 0xffff_ffff }),
    offset: fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER }).map(asOffset),
    readonly: fc.boolean(),
    logDirty: fc.boolean(),
  });

  it('decodes to exactly the regions encoded (any u32, any integer below 2^53, UTF-8 names)', () => {
    fc.assert(
      fc.property(fc.array(arbRegion, { maxLength: 40 }), (regions) => {
        const bin = encodeRegionColumns(regions);
        expect(bin.length).toBe(COLUMNS_HEADER_BYTES + COLUMNS_BYTES_PER_REGION * regions.length + regions.reduce((n, r) => n + Buffer.byteLength(r.name), 0));
        expect([...decodeRegionColumns(bin)]).toEqual(regions);
        // At any alignment of the bytes (a receiver's copy need not be aligned).
        const shifted = new Uint8Array(bin.length + 1).subarray(1);
        shifted.set(bin);
        expect([...decodeRegionColumns(shifted)]).toEqual(regions);
      }),
      { numRuns: 300 },
    );
    // Names of printable ASCII only (what the decoder checks in bulk), as well.
    const ascii = fc.string({ unit: fc.integer({ min: 0x20, max: 0x7e }).map((c) => String.fromCharCode(c)), minLength: 1, maxLength: 64 });
    fc.assert(
      fc.property(fc.array(arbRegion, { minLength: 1, maxLength: 40 }), fc.array(ascii, { minLength: 40, maxLength: 40 }), (rs, names) => {
        const regions = rs.map((r, i) => ({ ...r, name: names[i]! }));
        expect([...decodeRegionColumns(encodeRegionColumns(regions))]).toEqual(regions);
      }),
      { numRuns: 300 },
    );
  });

  it('every broken rule is MMB_ERR_BAD_MESSAGE naming what is wrong', () => {
    const good = encodeRegionColumns([region(0), region(1, { name: 'ab' })]);
    const n = 2;
    const flagsAt = COLUMNS_HEADER_BYTES + 32 * n;
    const lengthAt = flagsAt + n;
    const namesAt = lengthAt + n;
    const bad = (edit: (b: Buffer) => Buffer | Uint8Array): string => {
      const b = edit(Buffer.from(good));
      try {
        decodeRegionColumns(b);
      } catch (err) {
        expect(isMmbError(err) && err.code).toBe('MMB_ERR_BAD_MESSAGE');
        return (err as Error).message;
      }
      throw new Error('decoded');
    };
    expect(bad((b) => b.subarray(0, 7))).toMatch(/header/);
    expect(bad((b) => (b.writeUInt32LE(1, 4), b))).toMatch(/reserved/);
    expect(bad((b) => (b.writeUInt32LE(1000, 0), b))).toMatch(/1000 regions need/);
    expect(bad((b) => (b.writeUInt32LE(0x20_0000, COLUMNS_HEADER_BYTES + 4), b))).toMatch(/2\^53/); // gpa[0]
    expect(bad((b) => (b.writeUInt32LE(0xffff_ffff, COLUMNS_HEADER_BYTES + 16 * n + 12), b))).toMatch(/2\^53/); // offset[1]
    expect(bad((b) => ((b[flagsAt + 1] = 4), b))).toMatch(/flags\[1\]/);
    expect(bad((b) => ((b[lengthAt] = 0), b))).toMatch(/name\[0\] of 0 bytes/);
    expect(bad((b) => ((b[lengthAt] = 65), b))).toMatch(/name\[0\] of 65 bytes/);
    expect(bad((b) => ((b[namesAt] = 0x0a), b))).toMatch(/control characters/);
    expect(bad((b) => ((b[namesAt + 2] = 0x7f), b))).toMatch(/control characters/);
    expect(bad((b) => ((b[namesAt + 1] = 0xc3), b))).toMatch(/UTF-8/); // "r\xc3" is a truncated sequence
    expect(bad((b) => Buffer.concat([b, Buffer.from([0x61])]))).toMatch(/after the last name/);
    expect(bad((b) => b.subarray(0, b.length - 1))).toMatch(/the names need more/);
  });

  it('random damage to a valid bin decodes or fails typed, never otherwise', () => {
    const good = encodeRegionColumns([region(0), region(1, { name: 'ünï' }), region(2, { readonly: true, logDirty: true })]);
    fc.assert(
      fc.property(
        fc.array(fc.tuple(fc.nat(good.length - 1), fc.integer({ min: 0, max: 255 })), { minLength: 1, maxLength: 4 }),
        fc.nat(good.length),
        (edits, cut) => {
          const b = Buffer.from(good).subarray(0, Math.max(cut, 1));
          for (const [at, v] of edits) if (at < b.length) b[at] = v;
          const code = codeOf(() => decodeRegionColumns(b));
          expect(code === undefined || code === 'MMB_ERR_BAD_MESSAGE').toBe(true);
        },
      ),
      { numRuns: 3000 },
    );
  });

  it('a bin is accepted only in EV_SYNC.columns, only with the feature', () => {
    const columns = encodeRegionColumns([region(0), region(1)]);
    const ok = parseToClient(frameOf(sync({ columns })), Feature.COMPACT_SYNC) as { columns?: Iterable<Region>; regions: Region[] };
    expect([...(ok.columns ?? [])]).toEqual([region(0), region(1)]);
    expect(ok.regions).toEqual([]);
    expect(codeOf(() => parseToClient(frameOf(sync({ columns })), ALL_FEATURES & ~Feature.COMPACT_SYNC))).toBe('MMB_ERR_FEATURE');
    // A bin in another field of EV_SYNC, or in another message, is the base protocol's refusal.
    expect(codeOf(() => parseToClient(frameOf(sync({ epoch: Buffer.from('e1') })), ALL_FEATURES))).toBe('MMB_ERR_BAD_MESSAGE');
    expect(codeOf(() => parseToClient(frameOf({ t: Msg.EV_COMMITTED, generation: 3, seq: Buffer.from([1]) }), ALL_FEATURES))).toBe('MMB_ERR_BAD_MESSAGE');
    expect(codeOf(() => parseToClient(frameOf({ t: Msg.EV_BACKINGS_GONE, backings: [Buffer.alloc(2)] }), ALL_FEATURES))).toBe('MMB_ERR_BAD_MESSAGE');
    // columns that are not a bin.
    expect(codeOf(() => parseToClient(frameOf(sync({ columns: [1, 2] })), ALL_FEATURES))).toBe('MMB_ERR_BAD_MESSAGE');
  });
});

describe('a snapshot and a resync with and without COMPACT_SYNC', () => {
  it('raw clients see columns only with the feature; subscribers of both kinds hold the same map, before and after a broker restart', async () => {
    const dir = tempDir('mmb-compact-');
    const socket = `${dir}/b.sock`;
    const mk = (published: boolean) => {
      const b = new Broker({ spaces: ['vm0'], limits: { ackTimeoutMs: 5000 }, protocol: { maxFrameBytes: 256 * 1024 }, published });
      b.listen(socket);
      return b;
    };
    let broker = mk(true);
    defer(() => broker.close());
    const owner = await OwnerClient.attach(broker, { space: 'vm0' });
    const ram = await owner.createBacking(16 * MiB, 'ram');
    defer(() => native.close(ram.fd));
    // 3,000 regions: several parts at a 256 KiB frame limit, names of one and of two bytes per character.
    const N = 3000;
    const ops = Array.from({ length: N }, (_, i) => ({
      op: 'add' as const,
      name: i % 7 === 0 ? `rom-é${i}` : `r${i}`,
      gpa: 0x1_0000_0000 + i * 0x2000,
      size: 0x1000,
      backing: ram.backing,
      offset: i * 0x1000,
      readonly: i % 5 === 0,
      logDirty: i % 3 === 0,
    }));
    for (let i = 0; i < N; i += 1000) await owner.commit(ops.slice(i, i + 1000));

    // Raw clients: what arrives on the wire.
    for (const compact of [true, false]) {
      const conn = await Connection.open(socket, { features: compact ? ALL_FEATURES : ALL_FEATURES & ~Feature.COMPACT_SYNC });
      const parts: { regions: number; columns: number | undefined }[] = [];
      let last = false;
      conn.on('event', (m, fds) => {
        for (const fd of fds) native.close(fd);
        if (m.t !== Msg.EV_SYNC) return;
        parts.push({ regions: m.regions.length, columns: m.columns?.length });
        last = m.last;
      });
      await conn.request({ t: Msg.ATTACH, space: 'vm0', role: 'subscriber', kind: 'raw' });
      await waitFor('the last part', () => last);
      conn.close();
      expect(parts.length).toBeGreaterThan(1);
      if (compact) expect(parts.every((p) => p.regions === 0 && p.columns !== undefined && p.columns > 0)).toBe(true);
      else expect(parts.every((p) => p.columns === undefined && p.regions > 0)).toBe(true);
      expect(parts.reduce((n, p) => n + p.regions + (p.columns ?? 0), 0)).toBe(N);
    }

    // Subscribers: the same regions, keys and all, whichever form they got.
    const record = { apply() {} };
    const subs = await Promise.all(
      [true, false].map((compact) =>
        Subscriber.create(socket, record, {
          space: 'vm0',
          name: compact ? 'compact' : 'plain',
          reconnect: true,
          reconnectDelayMs: 10,
          ...(compact ? {} : { features: ALL_FEATURES & ~Feature.COMPACT_SYNC }),
        }),
      ),
    );
    defer(() => Promise.all(subs.map((s) => s.close())));
    const want = broker.status('vm0').spaces[0]!.regions;
    const strip = (rs: readonly Region[]) =>
      rs.map(({ id, name, gpa, size, backing, offset, readonly, logDirty }) => ({ id, name, gpa, size, backing, offset, readonly, logDirty }));
    for (const s of subs) expect(strip(s.regions())).toEqual(strip(want));
    const keys = subs[0]!.regions().map((r) => r.key);
    expect(subs[1]!.regions().map((r) => r.key)).toEqual(keys);

    // A broker restart: the subscribers wait, the owner rebuilds and publishes, both resync to the same
    // map without changing anything they established (same keys: nothing removed or added).
    const changes = subs.map(() => [] as number[]);
    subs.forEach((s, i) => s.on('change', (e) => void changes[i]!.push(e.change.removed.length + e.change.added.length)));
    const synced = subs.map((s) => new Promise<string>((resolve) => s.once('synced', (info) => resolve(info.mode))));
    owner.close();
    await broker.close();
    broker = mk(false);
    const owner2 = await OwnerClient.attach(broker, { space: 'vm0' });
    defer(() => owner2.close());
    const ram2 = await owner2.addBacking(ram.fd, 'ram');
    for (let i = 0; i < N; i += 1000) await owner2.commit(ops.slice(i, i + 1000).map((o) => ({ ...o, backing: ram2.backing })));
    await owner2.publish();
    expect(await Promise.all(synced)).toEqual(['snapshot', 'snapshot']);
    for (const s of subs) expect(s.regions().map((r) => r.key)).toEqual(keys);
    expect(changes.map((c) => c.reduce((a, b) => a + b, 0))).toEqual([0, 0]);
    fs.rmSync(dir, { recursive: true, force: true });
  });
});

describe('region keys (clients/view.ts)', () => {
  const backing = (id: number, dev: number, ino: number): LocalBacking => ({ id, name: `b${id}`, size: 1 << 30, fd: -1, dev, ino });
  const backings = new Map([
    [1, backing(1, 45, 1001)],
    [2, backing(2, 45, 1001)], // the same file under another id (a broker restart)
    [3, backing(3, 45, 1002)],
    [4, backing(4, 46, 1001)],
    [5, backing(5, 2 ** 40 + 45, 2 ** 52 + 1001)],
  ]);
  const arb = fc.record({
    gpa: fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER }),
    size: fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER }),
    offset: fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER }),
    backing: fc.integer({ min: 1, max: 5 }),
    readonly: fc.boolean(),
  });
  const identity = (r: { gpa: number; size: number; offset: number; backing: number; readonly: boolean }) => {
    const b = backings.get(r.backing)!;
    return JSON.stringify([r.gpa, r.size, r.offset, b.dev, b.ino, r.readonly]);
  };
  const view = (r: { gpa: number; size: number; offset: number; backing: number; readonly: boolean }, id = 1, logDirty = false) =>
    toView({ id, name: `n${id}`, logDirty, ...r, gpa: asGpa(r.gpa), offset: asOffset(r.offset) }, backings);

  it('are equal exactly when gpa, size, offset, backing inode and access are', () => {
    fc.assert(
      fc.property(arb, arb, fc.nat(), fc.boolean(), (a, b, id, logDirty) => {
        expect(view(a).key === view(b, id, logDirty).key).toBe(identity(a) === identity(b));
        // id, name, logDirty and the backing's id (for the same file) are not part of it.
        expect(view(a, id, logDirty).key).toBe(view({ ...a, backing: a.backing === 1 ? 2 : a.backing }, 7, !logDirty).key);
      }),
      { numRuns: 3000 },
    );
  });

  it('differ in every single field that is part of the identity', () => {
    const base = { gpa: 0x1_0000_0000, size: 0x20_0000, offset: 0x1000, backing: 1, readonly: false };
    const k = view(base).key;
    for (const change of [
      { gpa: base.gpa + 1 },
      { gpa: base.gpa + 2 ** 40 },
      { size: base.size * 2 },
      { offset: 0 },
      { backing: 3 },
      { backing: 4 },
      { backing: 5 },
      { readonly: true },
    ]) {
      expect(view({ ...base, ...change }).key, JSON.stringify(change)).not.toBe(k);
    }
    expect(view({ ...base, backing: 2 }).key).toBe(k);
  });
});

describe('a snapshot in one pass (clients/view.ts diffSnapshot)', () => {
  const backings = new Map<number, LocalBacking>([
    [1, { id: 1, name: 'b1', size: 1 << 30, fd: -1, dev: 45, ino: 1001 }],
    [2, { id: 2, name: 'b2', size: 1 << 30, fd: -1, dev: 45, ino: 1002 }],
    [3, { id: 3, name: 'b3', size: 1 << 30, fd: -1, dev: 45, ino: 1001 }], // b1's file under another id
  ]);
  // Slot i of a small address space; what is established and what the snapshot sends each pick slots and
  // vary what a region's key and its metadata hold.
  const arbAt = fc.record({
    slot: fc.integer({ min: 0, max: 30 }),
    size: fc.constantFrom(0x1000, 0x2000),
    backing: fc.constantFrom(1, 1, 2, 3),
    readonly: fc.boolean(),
    logDirty: fc.boolean(),
    id: fc.integer({ min: 0, max: 2 }),
    name: fc.constantFrom('a', 'b', 'rom-é'),
  });
  type At = { slot: number; size: number; backing: number; readonly: boolean; logDirty: boolean; id: number; name: string };
  // Ids follow the slot (distinct in a map); an established region may have another (id 0 moves it).
  const regionAt = (a: At): Region => ({
    id: a.slot * 3 + a.id,
    name: a.name,
    gpa: asGpa(0x1_0000_0000 + a.slot * 0x4000),
    size: a.size,
    backing: a.backing,
    offset: asOffset(a.slot * 0x4000),
    readonly: a.readonly,
    logDirty: a.logDirty,
  });
  const strip = ({ id, name, gpa, size, backing, offset, readonly, logDirty }: Region): Region => ({
    id,
    name,
    gpa,
    size,
    backing,
    offset,
    readonly,
    logDirty,
  });
  const keysOf = (rs: readonly ViewRegion[]) => rs.map((r) => r.key).sort();
  const sameChange = (a: ReturnType<typeof diffRegions>, b: ReturnType<typeof diffRegions>) => {
    expect(keysOf(a.removed)).toEqual(keysOf(b.removed));
    expect(a.added).toEqual(b.added);
    expect(a.updated).toEqual(b.updated);
  };

  it('is the general diff of the map it sends, whether its parts hold objects or columns', () => {
    fc.assert(
      fc.property(
        fc.uniqueArray(arbAt, { selector: (a) => a.slot, maxLength: 12 }),
        fc.uniqueArray(arbAt, { selector: (a) => a.slot, maxLength: 12 }).map((rs) => rs.map((a) => ({ ...a, id: 1 }))),
        fc.array(fc.boolean(), { minLength: 12, maxLength: 12 }),
        fc.array(fc.boolean(), { minLength: 12, maxLength: 12 }),
        (had, sent, asColumns, cut) => {
          // Established: views of `had` (one per key), some of them what `sent` sends again.
          const actual = new Map<string, ViewRegion>();
          for (const a of had) {
            const v = toView(regionAt(a), backings);
            actual.set(v.key, v);
          }
          const regions = sent.map(regionAt);
          const parts: { regions: Region[]; columns?: ReturnType<typeof decodeRegionColumns> }[] = [];
          let part: Region[] = [];
          const flush = (i: number) => {
            parts.push(asColumns[i] ? { regions: [], columns: decodeRegionColumns(encodeRegionColumns(part)) } : { regions: part });
            part = [];
          };
          regions.forEach((r, i) => {
            part.push(r);
            if (cut[i]) flush(i);
          });
          flush(11);
          const got = diffSnapshot(actual, parts, backings, 9);
          expect(got).toBeDefined();
          const target = new Map(regions.map((r) => [r.id, r]));
          sameChange(got!.change, diffRegions(actual, target.values(), backings, 9, 'sync'));
          expect(got!.change).toMatchObject({ generation: 9, cause: 'sync' });
          expect([...got!.target.keys()]).toEqual([...target.keys()]);
          expect([...got!.target.values()].map(strip)).toEqual(regions);
          // A region established and unchanged is held as its established view.
          const kept = [...got!.target.values()].filter((v) => [...actual.values()].includes(v as ViewRegion));
          expect(kept.length).toBe(actual.size - got!.change.removed.length - got!.change.updated.length);
        },
      ),
      { numRuns: 500 },
    );
  });

  it('leaves a snapshot that repeats an id to the general path; a backing it does not have is MMB_ERR_NO_BACKING, as there', () => {
    const r = regionAt({ slot: 1, size: 0x1000, backing: 1, readonly: false, logDirty: false, id: 5, name: 'a' });
    expect(
      diffSnapshot(new Map(), [{ regions: [r] }, { regions: [], columns: decodeRegionColumns(encodeRegionColumns([{ ...r, gpa: asGpa(0) }])) }], backings, 1),
    ).toBeUndefined();
    expect(codeOf(() => diffSnapshot(new Map(), [{ regions: [{ ...r, backing: 9 }] }], backings, 1))).toBe('MMB_ERR_NO_BACKING');
  });
});
