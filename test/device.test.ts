// The device client: translation, bounds checks against holes, read-only regions, never pinning.
import { afterEach, describe, expect, it } from 'vitest';
import { Broker } from '../broker/index.js';
import { OwnerClient, type GuestPointer } from '../clients/index.js';
import { DeviceSubscriber } from '../clients/device/index.js';
import { constants, native } from '../native/index.js';
import { isMmbError } from '../protocol/index.js';
import { memfdMaps, vmLckKiB } from './helpers/procs.js';
import { defer, runCleanups } from './helpers/embedded.js';

const MiB = 1 << 20;
afterEach(runCleanups);

async function setup() {
  const broker = new Broker({ spaces: ['vm0'] });
  defer(() => broker.close());
  const owner = await OwnerClient.attach(broker, { space: 'vm0' });
  defer(() => owner.close());
  const ram = await owner.createBacking(256 * MiB, 'ram');
  defer(() => native.close(ram.fd));
  const view = native.mmap(ram.fd, 0, 256 * MiB, constants.PROT_READ | constants.PROT_WRITE, constants.MAP_SHARED);
  defer(() => native.munmap(view));
  const vhost = await DeviceSubscriber.attach(broker, { space: 'vm0', name: 'blk0' });
  defer(() => vhost.close());
  return { broker, owner, ram, bytes: new Uint8Array(view.buffer), vhost };
}

const codeOf = (fn: () => unknown) => {
  try {
    fn();
  } catch (err) {
    return isMmbError(err) ? err.code : String(err);
  }
  return undefined;
};

describe('device client', () => {
  it('translates every GPA of 512 regions exactly as a brute-force reference does', async () => {
    const { owner, ram, bytes, vhost } = await setup();
    // 512 regions of 64 KiB with holes between some of them, each filled with its index.
    const regions: { gpa: number; off: number }[] = [];
    const ops = [];
    for (let i = 0; i < 512; i++) {
      const gpa = i * 0x2_0000 + (i % 3 === 0 ? 0x1_0000 : 0);
      regions.push({ gpa, off: i * 0x1_0000 });
      bytes.fill(i & 0xff, i * 0x1_0000, (i + 1) * 0x1_0000);
      ops.push({ op: 'add' as const, name: `r${i}`, gpa, size: 0x1_0000, backing: ram.backing, offset: i * 0x1_0000 });
    }
    await owner.commit(ops);
    let seed = 1;
    const out: GuestPointer = { bytes: new Uint8Array(0), offset: -1 };
    for (let n = 0; n < 20_000; n++) {
      seed = (seed * 48271) % 0x7fff_ffff;
      const gpa = seed % (512 * 0x2_0000);
      const len = 1 + (seed % 64);
      const hit = regions.findIndex((r) => gpa >= r.gpa && gpa < r.gpa + 0x1_0000);
      const inside = hit >= 0 && gpa + len <= regions[hit]!.gpa + 0x1_0000;
      if (hit < 0) expect(codeOf(() => vhost.read(gpa, 1))).toBe('MMB_ERR_NO_REGION');
      else expect(vhost.read(gpa, 1)[0]).toBe(hit & 0xff);
      // The allocation-free lookup: the same memory (this region's bytes from its backing offset) when the
      // range lies in one region, false otherwise, with `out` untouched.
      const before = { ...out };
      expect(vhost.resolve(gpa, len, out)).toBe(inside);
      if (!inside) expect(out.bytes === before.bytes && out.offset === before.offset).toBe(true);
      else {
        expect(out.offset).toBe(gpa - regions[hit]!.gpa);
        expect(out.bytes.length).toBe(0x1_0000);
        expect(out.bytes[out.offset]).toBe(hit & 0xff);
        out.bytes[out.offset] = 0xee; // a write through it lands in the backing at the region's offset
        expect(bytes[regions[hit]!.off + out.offset]).toBe(0xee);
        out.bytes[out.offset] = hit & 0xff;
      }
    }
    expect(vhost.resolve(-1, 1, out)).toBe(false);
    expect(vhost.resolve(0.5, 1, out)).toBe(false);
    expect(vhost.resolve(regions[1]!.gpa, -1, out)).toBe(false);
  });

  it('a buffer may span adjacent regions (an iovec of two views) but never a hole', async () => {
    const { owner, ram, bytes, vhost } = await setup();
    bytes.set(Buffer.from('abcdefgh'), 1 * MiB - 4); // straddles the two slices below
    await owner.commit([
      { op: 'add', name: 'lo', gpa: 0x100_0000, size: 1 * MiB, backing: ram.backing, offset: 0 },
      { op: 'add', name: 'hi', gpa: 0x110_0000, size: 1 * MiB, backing: ram.backing, offset: 1 * MiB },
      { op: 'add', name: 'far', gpa: 0x130_0000, size: 1 * MiB, backing: ram.backing, offset: 2 * MiB },
    ]);
    const iov = vhost.translate(0x110_0000 - 4, 8);
    expect(iov.map((v) => v.length)).toEqual([4, 4]);
    // resolve() serves only a range inside one region; this one needs the iovec.
    const p: GuestPointer = { bytes: new Uint8Array(0), offset: 0 };
    expect(vhost.resolve(0x110_0000 - 4, 8, p)).toBe(false);
    expect(vhost.resolve(0x110_0000 - 4, 4, p)).toBe(true);
    expect(Buffer.from(p.bytes.subarray(p.offset, p.offset + 4)).toString()).toBe('abcd');
    const held = p.bytes;
    expect(Buffer.concat(iov).toString()).toBe('abcdefgh');
    // Across the hole between "hi" and "far": refused, typed.
    expect(codeOf(() => vhost.translate(0x120_0000 - 4, 8))).toBe('MMB_ERR_NO_REGION');
    expect(codeOf(() => vhost.read(0x120_0000, 1))).toBe('MMB_ERR_NO_REGION');
    vhost.write(0x110_0000 - 2, Buffer.from('XY'));
    expect(Buffer.from(bytes.subarray(1 * MiB - 4, 1 * MiB + 4)).toString()).toBe('abXYefgh');
    // A view resolve() handed out dies with its region's mapping: no use-after-unmap from JavaScript.
    await owner.removeRegion('lo');
    expect(held.length).toBe(0);
    expect(vhost.resolve(0x110_0000 - 4, 4, p)).toBe(false);
  });

  it('a read-only region is mapped PROT_READ, and a write touching it changes nothing at all', async () => {
    const { owner, ram, bytes, vhost } = await setup();
    await owner.commit([
      { op: 'add', name: 'rw', gpa: 0, size: 1 * MiB, backing: ram.backing, offset: 0 },
      { op: 'add', name: 'rom', gpa: 1 * MiB, size: 1 * MiB, backing: ram.backing, offset: 1 * MiB, readonly: true },
    ]);
    // The kernel's view of the subscriber's own two mappings (this process also maps `ram` for the test).
    const perms = (name: string) => {
      const m = vhost.memory.regions().find((x) => x.region.name === name)!;
      return memfdMaps(process.pid, 'ram')
        .find((l) => parseInt(l.split('-')[0]!, 16) === m.address)
        ?.split(' ')[1];
    };
    expect(perms('rw')).toBe('rw-s');
    expect(perms('rom')).toBe('r--s');
    expect(codeOf(() => vhost.write(1 * MiB - 2, Buffer.from('ZZZZ')))).toBe('MMB_ERR_INVALID_ARG');
    expect(bytes[1 * MiB - 2]).toBe(0); // the writable part was not touched either
  });

  it('never pins: VmLck does not move while it maps 128 MiB', async () => {
    const { owner, ram, vhost } = await setup();
    const before = vmLckKiB();
    await owner.addRegion({ name: 'big', gpa: 0, size: 128 * MiB, backing: ram.backing });
    vhost.write(64 * MiB, Buffer.from('touch'));
    expect(vmLckKiB()).toBe(before);
    const at = vhost.memory.regions()[0]!.address;
    await owner.removeRegion('big');
    // Unmapped before the ack: once the removal completed, only the test's own view maps `ram`.
    expect(memfdMaps(process.pid, 'ram').map((l) => parseInt(l.split('-')[0]!, 16))).not.toContain(at);
    expect(memfdMaps(process.pid, 'ram')).toHaveLength(1);
  });
});
