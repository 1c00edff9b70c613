// examples/vmm, the VMM prototype that embeds the broker, run as a user runs it: VMM processes driven
// through their control sockets, an unmodified qemu-storage-daemon serving the disk (throttled, so requests
// stay in flight), a soft VFIO device in a process of its own on the VMM's broker socket. Every claim is
// judged in the kernel's view at the moment the VMM answers: the daemon's and the device's
// /proc/PID/maps and VmLck, the VMM's own descriptors, guest memory read through /proc/PID/fd.
//
// Needs /dev/kvm and qemu-storage-daemon: skipped without them, except under CI=true.
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { spawn } from 'node:child_process';
import { afterEach, describe, expect, it } from 'vitest';
import { have, QSD } from '../bench/vhost-user-backends.js';
import { memfdMappings } from '../testkit/procfs.js';
import { ControlClient } from '../examples/vmm/control.js';
import { startDevice, startStorageDaemon, startVmm, type Daemon, type VmmProcess } from '../examples/vmm/processes.js';
import { IN_CI } from './helpers/ci.js';
import { reserveHugePages, smapsAt } from './helpers/hugepages.js';
import { memfdMaps, ROOT, tempDir, vmLckKiB, waitFor } from './helpers/procs.js';

const MiB = 2 ** 20;
const HAVE = fs.existsSync('/dev/kvm') && have(QSD);
const WHY = `the VMM example needs /dev/kvm and ${QSD} (CI=true makes their absence a failure)`;
if (!HAVE && !IN_CI) console.warn(`VMM example tests skipped: ${WHY}`);
const describeVmm = describe.skipIf(!HAVE && !IN_CI);

const cleanups: (() => Promise<unknown> | unknown)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

if (IN_CI) it('CI machines have /dev/kvm and qemu-storage-daemon', () => expect(HAVE, WHY).toBe(true));

interface Status {
  state: string;
  generation: number;
  guest: { counter: number; offer: number; ack: number };
  vcpu: { running: boolean; parked: boolean; exits: { mmio: number; io: number }; hookParks: number };
  disk: { completed: number; inflight: number; errors: number; mismatches: number; lastError?: string };
  memory: { dimms: { id: string; gpa: string }[] };
}
interface Hotplug {
  generation: number;
  added: { id: string; gpa: string; size: number }[];
  removed: string[];
  hookParks: number;
  disk?: { inflightAtStart: number; inflightThroughout: number; completedDuring: number };
}
interface Blocks {
  blocks: { id: string; gpa: string; size: number; sha256: string }[];
}
type VcpuBytes = { regs: string; sregs: string };

const status = (c: ControlClient) => c.call<Status>('query-status');
const kib = (bytes: number) => bytes / 1024;

/** Names of the memfds a process holds open (its /proc/PID/fd links), with duplicates. */
function memfdFds(pid: number): string[] {
  return fs
    .readdirSync(`/proc/${pid}/fd`)
    .map((fd) => {
      try {
        return /^\/memfd:(.*?)(?: \(deleted\))?$/.exec(fs.readlinkSync(`/proc/${pid}/fd/${fd}`))?.[1];
      } catch {
        return undefined; // closed meanwhile
      }
    })
    .filter((n): n is string => n !== undefined);
}

/**
 * sha256 of the first `size` bytes of the memfd called `name` in process `pid`, read through the kernel
 * (/proc/PID/fd/N opened anew), not through the VMM. Every descriptor of that name must be one inode.
 */
function memfdSha(pid: number, name: string, size: number): string {
  const paths = fs
    .readdirSync(`/proc/${pid}/fd`)
    .map((fd) => `/proc/${pid}/fd/${fd}`)
    .filter((p) => {
      try {
        return /^\/memfd:(.*?)(?: \(deleted\))?$/.exec(fs.readlinkSync(p))?.[1] === name;
      } catch {
        return false;
      }
    });
  const inodes = new Set(paths.map((p) => fs.statSync(p).ino));
  expect(inodes.size, `one memfd called ${name} in pid ${pid}`).toBe(1);
  const fd = fs.openSync(paths[0] as string, 'r');
  try {
    const h = crypto.createHash('sha256');
    const buf = Buffer.alloc(4 * MiB);
    for (let at = 0; at < size;) {
      const n = fs.readSync(fd, buf, 0, Math.min(buf.length, size - at), at);
      if (n === 0) throw new Error(`memfd ${name} of pid ${pid} ends at ${at}, before ${size}`);
      h.update(buf.subarray(0, n));
      at += n;
    }
    return h.digest('hex');
  } finally {
    fs.closeSync(fd);
  }
}

const rbxOf = (v: VcpuBytes) => Buffer.from(v.regs, 'base64').readUInt32LE(8);

async function vmm(dir: string, args: string[]): Promise<VmmProcess> {
  const v = await startVmm(dir, args);
  cleanups.push(() => v.stop());
  return v;
}

describeVmm('examples/vmm: a VMM that embeds the broker', () => {
  it(
    'boots its guest, hot-adds and unplugs DIMMs in transactions with disk I/O in flight, is refused by the device without a change, and migrates memory and vCPU registers to a second instance',
    { timeout: 180_000 },
    async () => {
      const dir = tempDir('vmm-example-');
      cleanups.push(() => fs.rmSync(dir, { recursive: true, force: true }));
      const image = path.join(dir, 'disk.img');
      fs.writeFileSync(image, Buffer.alloc(4 * MiB));
      const qsd: Daemon = startStorageDaemon(dir, image, { bytesPerSecond: MiB });
      cleanups.push(() => qsd.stop());

      // Boot: the guest runs (its counter moves), the disk does I/O, the daemon maps guest RAM.
      const src = await vmm(path.join(dir, 'src'), ['--disk-socket', qsd.socket, '--ram', '64M']);
      const c = src.control;
      const booted = await status(c);
      expect(booted).toMatchObject({ state: 'running', generation: 1, vcpu: { running: true } });
      await waitFor('the guest to run and the disk to complete requests', async () => {
        const s = await status(c);
        return s.guest.counter > booted.guest.counter && s.disk.completed > booted.disk.completed;
      });
      expect(memfdMaps(qsd.pid, 'ram').length).toBeGreaterThan(0);
      // Registers are read only out of KVM_RUN (the ioctl would wait for the guest's next exit).
      expect(
        await c.call('query-vcpu').then(
          () => undefined,
          (e: { code: string; errno: string }) => [e.code, e.errno],
        ),
      ).toEqual(['MMB_ERR_KVM', 'EBUSY']);

      // A device in another process, attached over the VMM's broker socket: it pins all of RAM.
      const device = await startDevice(src.brokerSocket);
      cleanups.push(() => device.stop('SIGTERM'));
      expect(vmLckKiB(device.pid)).toBe(kib(64 * MiB));

      // Hot-add: at the VMM's answer the daemon maps the DIMM, the device pinned it, the guest uses it, and
      // disk requests were in flight when the transaction started.
      const add = await c.call<Hotplug>('dimm-add', { id: 'dimm1', size: 64 * MiB });
      expect(memfdMaps(qsd.pid, 'dimm1').length).toBeGreaterThan(0);
      expect(vmLckKiB(device.pid)).toBe(kib(128 * MiB));
      expect(add).toMatchObject({ generation: 2, added: [{ id: 'dimm1', gpa: '0x40000000' }], removed: [] });
      expect(add.disk?.inflightAtStart).toBeGreaterThan(0);
      const dimm1 = Number(add.added[0]?.gpa);
      expect((await status(c)).guest).toMatchObject({ offer: dimm1, ack: dimm1 });

      // Two DIMMs, one transaction: one generation.
      const two = await c.call<Hotplug>('transaction', { actions: ['dimm2', 'dimm3'].map((id) => ({ type: 'dimm-add', data: { id, size: 32 * MiB } })) });
      expect(two.generation).toBe(3);
      expect(two.added.map((a) => a.id)).toEqual(['dimm2', 'dimm3']);
      expect(two.disk?.inflightAtStart).toBeGreaterThan(0);
      for (const id of ['dimm2', 'dimm3']) expect(memfdMaps(qsd.pid, id).length, id).toBeGreaterThan(0);
      expect(vmLckKiB(device.pid)).toBe(kib(192 * MiB));

      // A refusal: RAM over the MSI window the device reported. The error names the device; nothing changed,
      // and the VMM let go of the memfd it made for it before answering.
      const refused = await c.call('dimm-add', { id: 'bad', size: 4 * MiB, gpa: 0xfee0_0000 }).then(
        () => undefined,
        (e: Error & { code: string; client?: { kind: string; name: string; pid: number } }) => e,
      );
      expect(refused).toMatchObject({ code: 'MMB_ERR_RESERVED_RANGE', client: { kind: 'vfio', name: 'nic0', pid: device.pid } });
      expect((await status(c)).generation).toBe(3);
      expect(memfdFds(src.pid)).not.toContain('bad');
      expect(vmLckKiB(device.pid)).toBe(kib(192 * MiB));

      // Stopped, one transaction replaces dimm1 at its own gpa (its bytes copied) and unplugs dimm2: the kvm
      // client deletes and re-creates the slot there, so it parks the vCPU through the VMM's hook.
      await c.call('stop');
      const before = await c.call<{ sha256: string }>('query-memory', { gpa: dimm1, size: 64 * MiB });
      const swap = await c.call<Hotplug>('transaction', {
        actions: [
          { type: 'dimm-del', data: { id: 'dimm1' } },
          { type: 'dimm-add', data: { id: 'dimm4', size: 64 * MiB, gpa: dimm1 } },
          { type: 'dimm-del', data: { id: 'dimm2' } },
        ],
      });
      expect(swap).toMatchObject({ generation: 4, hookParks: 1, removed: ['dimm1', 'dimm2'], added: [{ id: 'dimm4', gpa: '0x40000000' }] });
      for (const id of ['dimm1', 'dimm2']) expect(memfdMaps(qsd.pid, id), id).toEqual([]);
      expect(memfdMaps(qsd.pid, 'dimm4').length).toBeGreaterThan(0);
      expect(vmLckKiB(device.pid)).toBe(kib(160 * MiB));
      expect((await c.call<{ sha256: string }>('query-memory', { gpa: dimm1, size: 64 * MiB })).sha256).toBe(before.sha256);
      expect(before.sha256).not.toBe(
        crypto
          .createHash('sha256')
          .update(Buffer.alloc(64 * MiB))
          .digest('hex'),
      );
      await c.call('cont');

      // Unplug: the guest lets go, then at the VMM's answer nobody maps the DIMM (the daemon, the VMM's own
      // subscribers) and the device unpinned it; the descriptors follow (EV_BACKINGS_GONE is asynchronous).
      const del = await c.call<Hotplug>('dimm-del', { id: 'dimm3' });
      expect(del).toMatchObject({ generation: 5, removed: ['dimm3'] });
      expect(del.disk?.inflightAtStart).toBeGreaterThan(0);
      expect(memfdMaps(qsd.pid, 'dimm3')).toEqual([]);
      expect(memfdMappings(src.pid).filter((m) => m.memfd === 'dimm3')).toEqual([]);
      expect(vmLckKiB(device.pid)).toBe(kib(128 * MiB));
      await waitFor(
        'the VMM and the device to close their dimm3 descriptors',
        () => !memfdFds(src.pid).includes('dimm3') && !memfdFds(device.pid).includes('dimm3'),
      );

      const beforeMigration = await status(c);
      expect(beforeMigration.vcpu.exits).toEqual({ mmio: 0, io: 0 });
      expect(beforeMigration.disk).toMatchObject({ errors: 0, mismatches: 0 });
      expect(beforeMigration.disk.completed).toBeGreaterThan(booted.disk.completed);

      // Migration to a second instance. When `migrate` answers, the source is paused for good and the
      // destination has not run: their memory must be equal, byte for byte, read by the kernel.
      const dst = await vmm(path.join(dir, 'dst'), ['--incoming']);
      expect((await status(dst.control)).state).toBe('incoming');
      const m = await c.call<{ verified: boolean; rounds: number; vcpu: VcpuBytes }>('migrate', { uri: dst.controlSocket });
      expect(m.verified).toBe(true);
      const [srcStatus, dstStatus] = await Promise.all([status(c), status(dst.control)]);
      expect(srcStatus).toMatchObject({ state: 'migrated', vcpu: { parked: true } });
      expect(dstStatus).toMatchObject({ state: 'stopped', vcpu: { parked: true }, memory: { dimms: [{ id: 'dimm4' }] } });
      const [srcBlocks, dstBlocks] = await Promise.all([c.call<Blocks>('query-memory'), dst.control.call<Blocks>('query-memory')]);
      expect(dstBlocks).toEqual(srcBlocks);
      expect(srcBlocks.blocks.map((b) => b.id)).toEqual(['ram', 'dimm4']);
      for (const b of srcBlocks.blocks) {
        const theirs = memfdSha(dst.pid, b.id, b.size);
        expect(memfdSha(src.pid, b.id, b.size), b.id).toBe(theirs);
        expect(theirs, b.id).toBe(b.sha256);
      }
      // The registers arrived as the kernel's structs, and the destination's guest counts on from them.
      const arrived = await dst.control.call<VcpuBytes>('query-vcpu');
      expect({ regs: arrived.regs, sregs: arrived.sregs }).toEqual(m.vcpu);
      const rbx = rbxOf(m.vcpu);
      expect(rbx).toBeGreaterThan(beforeMigration.guest.counter);
      await dst.control.call('cont');
      await waitFor('the destination guest to count past the migrated EBX', async () => (await status(dst.control)).guest.counter > rbx);
      // The paused source stored EBX (or was parked between `inc ebx` and the store): it never ran on.
      const srcCounter = (await status(c)).guest.counter;
      expect(rbx - srcCounter).toBeGreaterThanOrEqual(0);
      expect(rbx - srcCounter).toBeLessThanOrEqual(1);
      expect(await c.call<VcpuBytes>('query-vcpu')).toMatchObject(m.vcpu);

      // The destination owns the map it received: it unplugs a migrated DIMM like its own.
      const dstDel = await dst.control.call<Hotplug>('dimm-del', { id: 'dimm4' });
      expect(dstDel.removed).toEqual(['dimm4']);
      expect(memfdMappings(dst.pid).filter((x) => x.memfd === 'dimm4')).toEqual([]);
      expect((await status(dst.control)).vcpu.exits.mmio).toBe(0);
      expect(qsd.stderr).toEqual([]);
    },
  );

  it('backs guest memory with huge pages when asked (--hugetlb 2M): RAM and DIMMs mapped with 2 MiB pages', { timeout: 120_000 }, async () => {
    const pages = reserveHugePages(2 * MiB, 24);
    cleanups.push(() => pages.release());
    if (pages.missing) {
      if (IN_CI) throw new Error(pages.missing);
      console.warn(`hugetlb VMM test skipped: ${pages.missing}`);
      return;
    }
    const dir = tempDir('vmm-example-huge-');
    cleanups.push(() => fs.rmSync(dir, { recursive: true, force: true }));
    const v = await vmm(path.join(dir, 'vm'), ['--ram', '32M', '--hugetlb', '2M']);
    const add = await v.control.call<Hotplug>('dimm-add', { id: 'dimm1', size: 8 * MiB });
    const s = await status(v.control);
    expect(s.guest).toMatchObject({ offer: Number(add.added[0]?.gpa), ack: Number(add.added[0]?.gpa) });
    for (const name of ['ram', 'dimm1']) {
      const maps = memfdMappings(v.pid).filter((m) => m.memfd === name);
      expect(maps.length, name).toBeGreaterThan(0);
      for (const m of maps) expect(smapsAt(m.start, v.pid)?.KernelPageSize, name).toBe(2048);
    }
    // A DIMM that is not a whole number of huge pages is refused before anything is made.
    const odd = await v.control.call('dimm-add', { id: 'odd', size: 3 * MiB }).then(
      () => undefined,
      (e: { code: string }) => e.code,
    );
    expect(odd).toBe('MMB_ERR_INVALID_ARG');
    await v.control.call('dimm-del', { id: 'dimm1' });
    expect(memfdMappings(v.pid).filter((m) => m.memfd === 'dimm1')).toEqual([]);
    expect((await status(v.control)).vcpu.exits.mmio).toBe(0);
  });

  it('npm run example:vmm (the walkthrough) runs to the end and exits 0', { timeout: 180_000 }, async () => {
    const child = spawn(process.execPath, [path.join(ROOT, 'dist/examples/vmm/demo.js')], { stdio: ['ignore', 'pipe', 'pipe'] });
    cleanups.push(() => child.exitCode === null && child.kill('SIGKILL'));
    let out = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (out += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (out += d));
    const code = await new Promise<number | null>((r) => child.once('exit', r));
    expect(out).toContain('==> done');
    expect(code, out).toBe(0);
  });
});
