// The client kinds as the command line runs them: `mmbroker attach kvm|vhost|vfio`, each in its own
// process, checked against the kernel's view of that process.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { IN_CI } from './helpers/ci.js';
import { CLI, JsonProc, memfdMaps, runCli, spawnBroker, stopProcess, tempDir, vmLckKiB, waitFor, type BrokerProc } from './helpers/procs.js';

const MiB = 1 << 20;
let socket: string;
let broker: BrokerProc;
const procs: JsonProc[] = [];
let space = 0;

async function attach(kind: string, args: string[]): Promise<JsonProc> {
  const child = spawn(process.execPath, [CLI, 'attach', kind, '--socket', socket, '--json', '--control', ...args], { stdio: ['pipe', 'pipe', 'pipe'] });
  const p = new JsonProc(child);
  procs.push(p);
  await p.next('attached', () => true, 20_000);
  return p;
}

const status = async (name: string) => {
  const r = await runCli(['status', '--socket', socket, '--space', name, '--json']);
  expect(r.code, r.stderr).toBe(0);
  return JSON.parse(r.stdout).spaces[0];
};

beforeAll(async () => {
  socket = path.join(tempDir(), 'broker.sock');
  broker = await spawnBroker(socket, ['--space', 's1', '--space', 's2', '--space', 's3', '--space', 's4', '--ack-timeout', '20000']);
});
afterEach(async () => {
  for (const p of procs.splice(0)) await p.stop('SIGTERM');
});
afterAll(async () => {
  if (broker) expect(await stopProcess(broker)).toBe(0);
});

describe('mmbroker attach vfio --backend soft', () => {
  it('Invariant 4: pin once, count once: VmLck rises by the region once for two devices, and drops back after the removal', async () => {
    const sp = `s${++space}`;
    const vfio = await attach('vfio', ['--space', sp, '--backend', 'soft', '--device', 'nic0', '--device', 'nic1', '--name', 'vfio-two']);
    const base = vmLckKiB(vfio.pid) * 1024;
    const add = await runCli(['map', 'add', '--socket', socket, '--space', sp, '--gpa', '0x100000000', '--size', '128M', '--name', 'pinme']);
    expect(add.code, add.stderr).toBe(0);
    const locked = vmLckKiB(vfio.pid) * 1024 - base;
    expect(locked).toBeGreaterThanOrEqual(128 * MiB);
    expect(locked).toBeLessThan(2 * 128 * MiB); // two devices, one domain: pinned once
    const domain = await vfio.request({ cmd: 'domain' }, 'domain');
    expect(domain.devices).toEqual(['nic0', 'nic1']);
    expect(domain.pinnedBytes).toBe(128 * MiB);
    // The broker's prediction and the client's report agree.
    const client = (await status(sp)).clients.find((c: { name: string }) => c.name === 'vfio-two');
    expect(client.pin).toMatchObject({ predicted: 128 * MiB, actual: 128 * MiB });
    expect(client.backend).toBe('soft');

    const rm = await runCli(['map', 'remove', '--socket', socket, '--space', sp, '--name', 'pinme']);
    expect(rm.code, rm.stderr).toBe(0);
    expect(vmLckKiB(vfio.pid) * 1024).toBe(base);
    expect(memfdMaps(vfio.pid, 'pinme')).toHaveLength(0);
  });

  it('a --pin-limit smaller than a new region: map add fails with a pin-budget code, no client maps the memfd, no generation', async () => {
    const sp = `s${++space}`;
    const vfio = await attach('vfio', ['--space', sp, '--backend', 'soft', '--pin-limit', '64M', '--name', 'vfio-small']);
    const vhost = await attach('vhost', ['--space', sp, '--name', 'vhost-too']);
    const before = (await status(sp)).generation;
    const add = await runCli(['map', 'add', '--socket', socket, '--space', sp, '--gpa', '0x100000000', '--size', '128M', '--name', 'toobig']);
    expect(add.code).toBe(1);
    expect(add.stderr).toContain('MMB_ERR_PIN_BUDGET');
    expect(add.stderr).toMatch(/refused by: vfio client "vfio-small"/);
    for (const p of [vfio, vhost]) expect(memfdMaps(p.pid, 'toobig')).toHaveLength(0);
    const st = await status(sp);
    expect(st.generation).toBe(before);
    expect(st.regions).toEqual([]);
    expect(vmLckKiB(vfio.pid)).toBe(0);
  });
});

// Without /dev/kvm the kvm client keeps its slots in software and has no vCPU. This machine kind has
// /dev/kvm; under CI a missing one is a failure, not a skip.
const noKvm = !fs.existsSync('/dev/kvm') && !IN_CI;

describe('mmbroker attach kvm', () => {
  it.skipIf(noKvm)('a real vCPU writes hotplugged memory, and an `attach vhost` process reads the bytes (needs /dev/kvm)', async () => {
    const sp = `s${++space}`;
    expect((await runCli(['map', 'add', '--socket', socket, '--space', sp, '--gpa', '0', '--size', '2M', '--name', 'kvm-ram'])).code).toBe(0);
    const kvm = await attach('kvm', ['--space', sp, '--name', 'vm-cpu']);
    expect(kvm.lines.find((e) => e.event === 'backend')?.backend).toBe('kvm');
    const vhost = await attach('vhost', ['--space', sp]);
    expect((await runCli(['map', 'add', '--socket', socket, '--space', sp, '--gpa', '0x40000000', '--size', '2M', '--name', 'kvm-dimm'])).code).toBe(0);
    await waitFor('the kvm client to have a slot for the hotplug', async () => {
      const slots = (await kvm.request({ cmd: 'slots' }, 'slots')).slots as { name: string }[];
      return slots.some((s) => s.name === 'kvm-dimm');
    });
    const message = Buffer.from('a vCPU wrote this');
    const ran = await kvm.request({ cmd: 'run', codeGpa: 0x1000, writes: [{ gpa: 0x4000_0040, hex: message.toString('hex') }] }, 'ran');
    expect(ran.rip).toBeGreaterThan(0x1000);
    const read = await vhost.request({ cmd: 'read', gpa: 0x4000_0040, len: message.length }, 'read');
    expect(Buffer.from(String(read.hex), 'hex').toString()).toBe(message.toString());
  });
});
