// Feature MAPS_FROM_ZERO: a subscriber that maps each region's backing from offset 0 (a vhost-user
// back-end) is never given a region whose backing prefix holds memory the map does not give it writable.
// The rule itself (protocol/backing-prefix.ts), then the broker refusing before anything changes. The
// same refusal against real back-ends (qemu-storage-daemon, dpdk-testpmd, whose /proc/PID/maps are read)
// is in vhost-user-qsd.test.ts and vhost-user-dpdk.test.ts.
import { afterEach, describe, expect, it } from 'vitest';
import { Connection } from '../clients/index.js';
import { native } from '../native/index.js';
import { ALL_FEATURES, Feature, Msg, exposedPrefix, isMmbError, type MmbError, type PrefixRegion } from '../protocol/index.js';
import { codeOf, defer, embeddedBroker, ownerOf, runCleanups, subscriberOf } from './helpers/embedded.js';
import { waitFor } from './helpers/procs.js';

const MiB = 1 << 20;
afterEach(runCleanups);

const r = (name: string, backing: number, offset: number, size: number, readonly = false): PrefixRegion => ({
  name,
  backing,
  offset,
  size,
  readonly,
});

describe('the rule (protocol/backing-prefix.ts)', () => {
  it('regions of a backing laid one behind the other from offset 0 expose nothing, in any order, overlapping or not', () => {
    expect(exposedPrefix([r('b', 1, 2 * MiB, MiB), r('a', 1, 0, 2 * MiB), r('c', 2, 0, MiB)])).toBeUndefined();
    expect(exposedPrefix([r('a', 1, 0, 2 * MiB), r('alias', 1, MiB, 2 * MiB), r('b', 1, 3 * MiB, MiB)])).toBeUndefined();
    // A read-only region behind the writable ones is never given to such a client: nothing to reach.
    expect(exposedPrefix([r('a', 1, 0, MiB), r('rom', 1, 4 * MiB, MiB, true)])).toBeUndefined();
    expect(exposedPrefix([])).toBeUndefined();
  });

  it('names the first region behind a gap, the gap, and a read-only region lying in it', () => {
    expect(exposedPrefix([r('a', 1, MiB, MiB)])).toEqual({ region: 'a', backing: 1, start: 0, end: MiB });
    expect(exposedPrefix([r('a', 1, 0, MiB), r('c', 1, 3 * MiB, MiB), r('b', 1, 5 * MiB, MiB)])).toEqual({
      region: 'c',
      backing: 1,
      start: MiB,
      end: 3 * MiB,
    });
    expect(exposedPrefix([r('rom', 2, 0, MiB, true), r('ram', 2, MiB, MiB)])).toEqual({ region: 'ram', backing: 2, start: 0, end: MiB, readonlyThere: 'rom' });
    // Backings in ascending id: the first exposure reported is that of backing 1.
    expect(exposedPrefix([r('y', 3, MiB, MiB), r('x', 1, 2 * MiB, MiB)])?.region).toBe('x');
  });

  it('looks only at the backings it is asked about', () => {
    const regions = [r('a', 1, MiB, MiB), r('b', 2, 0, MiB)];
    expect(exposedPrefix(regions, new Set([2]))).toBeUndefined();
    expect(exposedPrefix(regions, new Set([1]))?.region).toBe('a');
  });
});

async function setup() {
  const broker = embeddedBroker();
  const owner = await ownerOf(broker);
  const ram = await owner.createBacking(16 * MiB, 'ram');
  defer(() => native.close(ram.fd));
  return { broker, owner, ram };
}

describe('the broker (ATTACH.limits.mapsFromZero)', () => {
  it('refuses, before anything changes and naming the client, every change that would expose a prefix; the same changes pass without such a client', async () => {
    const { broker, owner, ram } = await setup();
    const zero = await subscriberOf(broker, { name: 'from-zero', kind: 'vhost-user', mapsFromZero: true, reconnect: false });
    const plain = await subscriberOf(broker, { name: 'plain', reconnect: false });
    await owner.addRegion({ name: 'a', gpa: 0, size: 2 * MiB, backing: ram.backing });
    await owner.addRegion({ name: 'b', gpa: 0x1000_0000, size: 2 * MiB, backing: ram.backing, offset: 2 * MiB });
    const st = () => broker.status('vm0').spaces[0]!;
    expect(st().clients.find((c) => c.name === 'from-zero')).toMatchObject({ mapsFromZero: true });
    expect(st().clients.find((c) => c.name === 'plain')).not.toHaveProperty('mapsFromZero');
    const generation = st().generation;
    const refusals: [string, () => Promise<unknown>][] = [
      // A region behind memory in no region.
      ['a gap', () => owner.addRegion({ name: 'c', gpa: 0x2000_0000, size: 2 * MiB, backing: ram.backing, offset: 6 * MiB })],
      // The first region removed while the one behind it stays.
      ['a removal', () => owner.removeRegion('a')],
      // The first region made read-only while the one behind it stays writable.
      ['a read-only toggle', () => owner.commit([{ op: 'set', region: 'a', readonly: true }])],
      // A writable region behind a read-only one, added together.
      [
        'a read-only region',
        () =>
          owner.commit([
            { op: 'add', name: 'rom', gpa: 0x3000_0000, size: 2 * MiB, backing: ram.backing, offset: 4 * MiB, readonly: true },
            { op: 'add', name: 'd', gpa: 0x4000_0000, size: 2 * MiB, backing: ram.backing, offset: 6 * MiB },
          ]),
      ],
    ];
    for (const [what, p] of refusals) {
      const err = (await p().catch((e: unknown) => e)) as MmbError;
      expect(isMmbError(err), `${what}: ${String(err)}`).toBe(true);
      expect([what, err.code, err.client?.name]).toEqual([what, 'MMB_ERR_BACKING_PREFIX', 'from-zero']);
      expect(err.message).toMatch(/offset 0/);
      if (what === 'a read-only region') expect(err.message).toMatch(/read-only region "rom"/);
      expect(st().generation).toBe(generation);
      for (const s of [zero, plain]) expect(s.regions().map((x) => x.name)).toEqual(['a', 'b']);
    }
    // What keeps the prefix inside the map passes: a region right behind, the last one removed, a region
    // moved within what was there, two removed together, a backing of its own.
    await owner.addRegion({ name: 'c', gpa: 0x2000_0000, size: 2 * MiB, backing: ram.backing, offset: 4 * MiB });
    await owner.removeRegion('c');
    await owner.commit([
      { op: 'remove', region: 'b' },
      { op: 'add', name: 'b', gpa: 0x5000_0000, size: 2 * MiB, backing: ram.backing, offset: 2 * MiB },
    ]);
    await owner.commit([
      { op: 'remove', region: 'a' },
      { op: 'remove', region: 'b' },
    ]);
    const own = await owner.createBacking(2 * MiB, 'own');
    defer(() => native.close(own.fd));
    await owner.addRegion({ name: 'e', gpa: 0, size: 2 * MiB, backing: own.backing });
    expect(zero.regions().map((x) => x.name)).toEqual(['e']);

    // Without a client mapping from offset 0, nothing of this is refused.
    await zero.close();
    await owner.addRegion({ name: 'f', gpa: 0x2000_0000, size: 2 * MiB, backing: ram.backing, offset: 6 * MiB });
    expect(plain.regions().map((x) => x.name)).toEqual(['e', 'f']);
    // And such a client cannot attach to that map.
    expect(await codeOf(subscriberOf(broker, { name: 'late', mapsFromZero: true, reconnect: false }))).toBe('MMB_ERR_BACKING_PREFIX');
    expect(st().clients.map((c) => c.name)).not.toContain('late');
  });

  it('holds for such a client whose connection ended while it holds memory, until it is fenced', async () => {
    const { broker, owner, ram } = await setup();
    await owner.addRegion({ name: 'a', gpa: 0, size: 2 * MiB, backing: ram.backing });
    const zero = await subscriberOf(broker, { name: 'from-zero', mapsFromZero: true, reconnect: true, reconnectDelayMs: 60_000 });
    zero.dropConnection();
    const st = () => broker.status('vm0').spaces[0]!;
    await waitFor('the dropped client to be a holder', () => (st().holders ?? []).some((h) => h.client.name === 'from-zero'), 10_000);
    const err = await owner.addRegion({ name: 'b', gpa: 0x1000_0000, size: 2 * MiB, backing: ram.backing, offset: 4 * MiB }).catch((e: unknown) => e);
    expect(isMmbError(err) && [err.code, err.client?.name]).toEqual(['MMB_ERR_BACKING_PREFIX', 'from-zero']);
    expect(isMmbError(err) && err.message).toMatch(/connection ended while it holds memory/);
    expect(st().regions.map((r) => r.name)).toEqual(['a']);
    // What it may follow still goes in (an add only: it does not wait for the holder).
    await owner.addRegion({ name: 'b', gpa: 0x1000_0000, size: 2 * MiB, backing: ram.backing, offset: 2 * MiB });
    expect(st().regions.map((r) => r.name)).toEqual(['a', 'b']);
  });

  it('holds for such a client waiting on an unpublished space; one is refused at once by a map it may not follow', async () => {
    const broker = embeddedBroker({ published: false });
    const owner = await ownerOf(broker);
    const ram = await owner.createBacking(16 * MiB, 'ram');
    defer(() => native.close(ram.fd));
    const st = () => broker.status('vm0').spaces[0]!;
    await owner.addRegion({ name: 'a', gpa: 0, size: 2 * MiB, backing: ram.backing });
    // Attached while the space is unpublished: it waits (its attach completes at the publish).
    const waiting = subscriberOf(broker, { name: 'from-zero', mapsFromZero: true, reconnect: false });
    waiting.catch(() => undefined);
    await waitFor('the client to wait', () => st().clients.some((c) => c.name === 'from-zero' && c.state === 'waiting'), 10_000);
    const err = await owner.addRegion({ name: 'b', gpa: 0x1000_0000, size: 2 * MiB, backing: ram.backing, offset: 4 * MiB }).catch((e: unknown) => e);
    expect(isMmbError(err) && [err.code, err.client?.name]).toEqual(['MMB_ERR_BACKING_PREFIX', 'from-zero']);
    expect(isMmbError(err) && err.message).toMatch(/waiting for the space to be published/);
    await owner.publish();
    const zero = await waiting;
    expect(zero.regions().map((r) => r.name)).toEqual(['a']);
    await zero.close();

    // With no such client, the unpublished map may expose a prefix; then such a client's attach is refused.
    const other = embeddedBroker({ published: false });
    const owner2 = await ownerOf(other);
    const ram2 = await owner2.createBacking(16 * MiB, 'ram');
    defer(() => native.close(ram2.fd));
    await owner2.addRegion({ name: 'b', gpa: 0, size: 2 * MiB, backing: ram2.backing, offset: 4 * MiB });
    expect(await codeOf(subscriberOf(other, { name: 'late', mapsFromZero: true, reconnect: false }))).toBe('MMB_ERR_BACKING_PREFIX');
    expect(other.status('vm0').spaces[0]!.clients.map((c) => c.name)).not.toContain('late');
  });

  it('the field needs the feature; a client that wants it refuses a broker connection without it', async () => {
    const { broker } = await setup();
    const old = await Connection.open(broker, { name: 'old', features: ALL_FEATURES & ~Feature.MAPS_FROM_ZERO });
    defer(() => old.close());
    const err = await old
      .request({ t: Msg.ATTACH, space: 'vm0', role: 'subscriber', kind: 'vhost-user', limits: { mapsFromZero: true } })
      .catch((e: unknown) => e);
    expect(isMmbError(err) && err.code).toBe('MMB_ERR_FEATURE');
    expect(
      await codeOf(subscriberOf(broker, { name: 'wants-it', mapsFromZero: true, reconnect: false, features: ALL_FEATURES & ~Feature.MAPS_FROM_ZERO })),
    ).toBe('MMB_ERR_UNSUPPORTED');
    expect(broker.status('vm0').spaces[0]!.clients).toEqual([expect.objectContaining({ role: 'owner' })]);
  });
});
