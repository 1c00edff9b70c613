// The CLI flow of the foundation issue, with /proc as the judge: `serve`, two `attach` processes,
// `map add`, `status --json`, `map remove`.
import { spawn } from 'node:child_process';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parseAddress, parseSize } from '../cli/args.js';
import { CLI, JsonProc, fdCount, memfdMaps, runCli, spawnBroker, stopProcess, tempDir, waitFor, type BrokerProc } from './helpers/procs.js';

let socket: string;
let broker: BrokerProc;
const attached: JsonProc[] = [];

interface StatusJson {
  spaces: {
    name: string;
    generation: number;
    regions: { name: string; gpa: number; size: number; readonly: boolean }[];
    clients: { kind: string; role: string; pid: number; ackedGeneration: number; name: string }[];
  }[];
}

async function statusJson(): Promise<StatusJson> {
  const r = await runCli(['status', '--socket', socket, '--json']);
  expect(r.code, r.stderr).toBe(0);
  return JSON.parse(r.stdout) as StatusJson;
}

beforeAll(async () => {
  socket = path.join(tempDir(), 'run', 'mmb.sock');
  broker = await spawnBroker(socket, ['--space', 'vm0', '--space', 'vm1']);
  for (const name of ['attach-a', 'attach-b']) {
    const child = spawn(process.execPath, [CLI, 'attach', '--socket', socket, '--space', 'vm0', '--name', name, '--json'], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    const p = new JsonProc(child);
    await p.next('attached');
    attached.push(p);
  }
});

afterAll(async () => {
  for (const p of attached) expect(await stopProcess(p.child)).toBe(0);
  if (broker) expect(await stopProcess(broker)).toBe(0);
});

describe('mmbroker CLI', () => {
  it('serve creates a 0600 socket in a 0700 directory', async () => {
    const fs = await import('node:fs');
    expect(fs.statSync(socket).mode & 0o777).toBe(0o600);
    expect(fs.statSync(path.dirname(socket)).mode & 0o777).toBe(0o700);
  });

  it('map add, status --json and map remove, with /proc agreeing with status', async () => {
    const baseFds = fdCount(broker.pid!);
    const add = await runCli(['map', 'add', '--socket', socket, '--space', 'vm0', '--gpa', '0x100000000', '--size', '128M', '--name', 'dimm0']);
    expect(add.code, add.stderr).toBe(0);
    const generation = Number(/generation (\d+)/.exec(add.stdout)?.[1]);
    expect(generation).toBe(1);

    // The command exited; the broker keeps the memory alive and both subscribers map it.
    const st = await statusJson();
    const vm0 = st.spaces.find((s) => s.name === 'vm0')!;
    expect(vm0.generation).toBe(1);
    expect(vm0.regions).toEqual([expect.objectContaining({ name: 'dimm0', gpa: 2 ** 32, size: 128 << 20, readonly: false })]);
    const subs = vm0.clients.filter((c) => c.role === 'subscriber');
    expect(subs.map((c) => c.pid).sort()).toEqual(attached.map((p) => p.pid).sort());
    for (const c of subs) {
      expect(c.ackedGeneration).toBe(1);
      const maps = memfdMaps(c.pid, 'dimm0');
      expect(maps).toHaveLength(1);
      const [start, end] = (maps[0] as string)
        .split(' ')[0]!
        .split('-')
        .map((h) => parseInt(h, 16)) as [number, number];
      expect(end - start).toBe(128 << 20);
    }
    expect(fdCount(broker.pid!)).toBe(baseFds + 1); // its one backing fd

    const rm = await runCli(['map', 'remove', '--socket', socket, '--space', 'vm0', '--name', 'dimm0']);
    expect(rm.code, rm.stderr).toBe(0);
    expect(rm.stdout).toContain('generation 2');
    for (const p of attached) expect(memfdMaps(p.pid, 'dimm0')).toHaveLength(0);
    expect((await statusJson()).spaces.find((s) => s.name === 'vm0')!.regions).toEqual([]);
    await waitFor('the broker to close the backing', () => fdCount(broker.pid!) === baseFds);
  });

  it('a refused map add exits 1 and prints the error code', async () => {
    const ok = await runCli(['map', 'add', '--socket', socket, '--space', 'vm1', '--gpa', '0', '--size', '2M', '--name', 'low']);
    expect(ok.code, ok.stderr).toBe(0);
    const clash = await runCli(['map', 'add', '--socket', socket, '--space', 'vm1', '--gpa', '0x100000', '--size', '2M']);
    expect(clash.code).toBe(1);
    expect(clash.stderr).toContain('MMB_ERR_OVERLAP');
    const unaligned = await runCli(['map', 'add', '--socket', socket, '--space', 'vm1', '--gpa', '0x10000100', '--size', '4096']);
    expect(unaligned.code).toBe(1);
    expect(unaligned.stderr).toContain('MMB_ERR_UNALIGNED');
    const missing = await runCli(['map', 'remove', '--socket', socket, '--space', 'vm1', '--name', 'nope']);
    expect(missing.code).toBe(1);
    expect(missing.stderr).toContain('MMB_ERR_NO_REGION');
    const nospace = await runCli(['map', 'add', '--socket', socket, '--space', 'vm9', '--gpa', '0', '--size', '4096']);
    expect(nospace.stderr).toContain('MMB_ERR_NO_SPACE');
    const nobroker = await runCli(['status', '--socket', path.join(tempDir(), 'none.sock')]);
    expect(nobroker.code).toBe(1);
    expect(nobroker.stderr).toContain('MMB_ERR_CONNECT (ENOENT)');
    const badsize = await runCli(['map', 'add', '--socket', socket, '--space', 'vm1', '--gpa', '0', '--size', '12X']);
    expect(badsize.code).toBe(2); // a usage mistake
    expect(badsize.stderr).toContain('MMB_ERR_INVALID_ARG');
  });

  it('every command has --help', async () => {
    for (const cmd of [['serve'], ['map'], ['map', 'add'], ['status'], ['attach'], ['demo']]) {
      const r = await runCli([...cmd, '--help']);
      expect(r.code, cmd.join(' ')).toBe(0);
      expect(r.stdout).toMatch(/^Usage/m);
    }
    const top = await runCli(['--help']);
    expect(top.stdout).toContain('serve');
  });

  it('parses sizes and addresses', () => {
    expect(parseSize('4096')).toBe(4096);
    expect(parseSize('128M')).toBe(128 << 20);
    expect(parseSize('4G')).toBe(4 * 2 ** 30);
    expect(parseSize('2MiB')).toBe(2 << 20);
    expect(() => parseSize('-1')).toThrow(/not a size/);
    expect(parseAddress('0x100000000')).toBe(2 ** 32);
    expect(parseAddress('4096')).toBe(4096);
    expect(() => parseAddress('0x10000000000000')).toThrow(/below 2\^52/);
    expect(() => parseAddress('12abc')).toThrow(/not an address/);
  });
});
