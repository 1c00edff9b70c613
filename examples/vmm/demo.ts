#!/usr/bin/env node
// `npm run example:vmm`: the VMM prototype, end to end, narrated. Plays the management layer: starts
// qemu-storage-daemon, a source VMM with a disk, a device process attached over the VMM's broker socket and
// an incoming VMM, drives them through their control sockets, and checks each claim in the kernel's view
// (/proc/PID/maps, /proc/PID/status) at the moment the VMM answers. Exits 1 if a check fails.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { memfdMaps, vmLckKiB } from '../../testkit/procfs.js';
import type { ControlClient } from './control.js';
import { MiB } from './layout.js';
import { startDevice, startStorageDaemon, startVmm, type Daemon, type VmmProcess } from './processes.js';

type Status = {
  generation: number;
  guest: { counter: number; offer: number; ack: number };
  vcpu: { exits: { mmio: number }; hookParks: number; registers?: { rbx: number } };
  disk?: { completed: number; errors: number; mismatches: number };
};
type Hotplug = {
  generation: number;
  added: { id: string; gpa: string }[];
  removed: string[];
  hookParks: number;
  disk?: { inflightAtStart: number; inflightThroughout: number; completedDuring: number };
};

const say = (text: string) => console.log(text);
const step = (text: string) => say(`\n==> ${text}`);
const status = (c: ControlClient) => c.call<Status>('query-status');

async function main(): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vmm-demo-'));
  const image = path.join(dir, 'disk.img');
  fs.writeFileSync(image, Buffer.alloc(16 * MiB));
  const stops: (() => Promise<void>)[] = [];
  try {
    step('qemu-storage-daemon exports disk.img as vhost-user-blk, throttled to 1 MiB/s (as clouds throttle disks)');
    const qsd: Daemon = startStorageDaemon(dir, image, { bytesPerSecond: MiB });
    stops.push(() => qsd.stop());
    say(`    pid ${qsd.pid}, socket ${qsd.socket}`);

    step('the source VMM boots: embedded broker, 64 MiB of RAM on a memfd, a KVM vCPU running the guest loop, the disk');
    const src: VmmProcess = await startVmm(path.join(dir, 'src'), ['--disk-socket', qsd.socket]);
    stops.push(() => src.stop());
    let s = await status(src.control);
    say(`    pid ${src.pid}; generation ${s.generation}; guest counter ${s.guest.counter}; disk requests completed ${s.disk?.completed}`);
    assert.ok(memfdMaps(qsd.pid, 'ram').length > 0, 'qemu-storage-daemon maps guest RAM');
    say(`    kernel: qemu-storage-daemon maps memfd:ram (${memfdMaps(qsd.pid, 'ram').length} mapping)`);

    step('a device in another process attaches over the VMM broker socket: mmbroker attach vfio --backend soft');
    const device = await startDevice(src.brokerSocket);
    stops.push(async () => void (await device.stop('SIGTERM')));
    const locked0 = vmLckKiB(device.pid);
    say(`    pid ${device.pid}; kernel: VmLck ${locked0} KiB (all of RAM pinned; the soft stand-in mlocks what a VFIO device would pin)`);

    step('dimm-add dimm1 (64 MiB): placed by FIND_FREE, one transaction, the guest starts using it');
    const add = await src.control.call<Hotplug>('dimm-add', { id: 'dimm1', size: 64 * MiB });
    const lockedAfterAdd = vmLckKiB(device.pid);
    say(`    at ${add.added[0]?.gpa}, generation ${add.generation}; disk: ${JSON.stringify(add.disk)}`);
    say(`    kernel: qemu-storage-daemon maps memfd:dimm1: ${memfdMaps(qsd.pid, 'dimm1').length > 0}; device VmLck +${lockedAfterAdd - locked0} KiB`);
    assert.ok(memfdMaps(qsd.pid, 'dimm1').length > 0);
    assert.equal(lockedAfterAdd - locked0, 64 * 1024);
    s = await status(src.control);
    say(`    the guest acknowledged the offer: ack ${s.guest.ack === s.guest.offer}`);

    step('transaction: dimm2 and dimm3 (32 MiB each) in one transaction');
    const two = await src.control.call<Hotplug>('transaction', {
      actions: ['dimm2', 'dimm3'].map((id) => ({ type: 'dimm-add', data: { id, size: 32 * MiB } })),
    });
    say(`    generation ${add.generation} -> ${two.generation}; ${two.added.map((a) => `${a.id} at ${a.gpa}`).join(', ')}`);
    assert.equal(two.generation, add.generation + 1);

    step('a refusal: dimm-add over the MSI window the device reported as reserved');
    try {
      await src.control.call('dimm-add', { id: 'bad', size: 4 * MiB, gpa: 0xfee0_0000 });
      assert.fail('the broker accepted RAM over the MSI window');
    } catch (err) {
      const e = err as Error & { code: string; client?: { kind: string; name: string } };
      say(
        `    ${e.code}, refused by ${e.client?.kind} client ${JSON.stringify(e.client?.name)}; nothing changed: generation ${(await status(src.control)).generation}`,
      );
      assert.equal(e.code, 'MMB_ERR_RESERVED_RANGE');
    }

    step('stop; transaction: replace dimm1 at its own gpa by dimm4 (bytes copied), unplug dimm2; cont');
    await src.control.call('stop');
    const gpa1 = Number(add.added[0]?.gpa);
    const before = await src.control.call<{ sha256: string }>('query-memory', { gpa: gpa1, size: 64 * MiB });
    const swap = await src.control.call<Hotplug>('transaction', {
      actions: [
        { type: 'dimm-del', data: { id: 'dimm1' } },
        { type: 'dimm-add', data: { id: 'dimm4', size: 64 * MiB, gpa: gpa1 } },
        { type: 'dimm-del', data: { id: 'dimm2' } },
      ],
    });
    const after = await src.control.call<{ sha256: string }>('query-memory', { gpa: gpa1, size: 64 * MiB });
    say(
      `    generation ${swap.generation}; the kvm client parked the vCPU through the hook ${swap.hookParks} time(s); same bytes at ${add.added[0]?.gpa}: ${before.sha256 === after.sha256}`,
    );
    say(
      `    kernel: qemu-storage-daemon maps dimm1 ${memfdMaps(qsd.pid, 'dimm1').length}, dimm2 ${memfdMaps(qsd.pid, 'dimm2').length}, dimm4 ${memfdMaps(qsd.pid, 'dimm4').length} time(s)`,
    );
    assert.equal(before.sha256, after.sha256);
    assert.equal(memfdMaps(qsd.pid, 'dimm1').length + memfdMaps(qsd.pid, 'dimm2').length, 0);
    await src.control.call('cont');

    step('dimm-del dimm3: the guest lets go of it first, then one transaction');
    const del = await src.control.call<Hotplug>('dimm-del', { id: 'dimm3' });
    say(`    generation ${del.generation}; kernel: qemu-storage-daemon maps dimm3 ${memfdMaps(qsd.pid, 'dimm3').length} time(s) when the VMM answers`);
    assert.equal(memfdMaps(qsd.pid, 'dimm3').length, 0);
    s = await status(src.control);
    say(
      `    guest exits to a missing memslot so far: ${s.vcpu.exits.mmio}; disk: ${s.disk?.completed} requests completed, ${s.disk?.errors} errors, ${s.disk?.mismatches} mismatches`,
    );
    assert.equal(s.vcpu.exits.mmio, 0);

    step('migration: an incoming VMM, then migrate (pre-copy of memory, then the vCPU registers)');
    const dst = await startVmm(path.join(dir, 'dst'), ['--incoming']);
    stops.push(() => dst.stop());
    const m = await src.control.call<{ rounds: number; stopReason: string; downtimeMs: number; memoryBytes: number; totalBytes: number; verified: boolean }>(
      'migrate',
      { uri: dst.controlSocket },
    );
    say(
      `    ${m.rounds} rounds (${m.stopReason}), ${m.totalBytes / MiB} MiB sent for ${m.memoryBytes / MiB} MiB of memory, downtime ${m.downtimeMs} ms, verified ${m.verified}`,
    );
    const [a, b] = await Promise.all([src.control.call<{ blocks: unknown[] }>('query-memory'), dst.control.call<{ blocks: unknown[] }>('query-memory')]);
    assert.deepEqual(b, a);
    say(`    every block's sha256 equal on both sides (source paused, destination not started): ${(a.blocks as { id: string }[]).map((x) => x.id).join(', ')}`);
    const saved = (await status(src.control)).vcpu.registers?.rbx ?? 0;
    await dst.control.call('cont');
    let counter = 0;
    while ((counter = (await status(dst.control)).guest.counter) <= saved) await new Promise((r) => setTimeout(r, 10));
    say(`    the destination's guest counts on from its registers: EBX was ${saved} at the pause, the counter is now ${counter}`);

    step('done');
  } finally {
    for (const stop of stops.reverse()) await stop().catch(() => undefined);
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((err: Error) => {
  console.error(`\nexample:vmm failed: ${err.message}`);
  process.exit(1);
});
