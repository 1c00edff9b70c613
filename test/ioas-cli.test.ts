// The command line of I/O address spaces (docs/ioas.md), between processes, with the kernel as the judge:
// `mmbroker serve`, `map add`, `ioas create`, `attach vfio --ioas` (a shadow-mode client, soft backend),
// `ioas map` / `ioas unmap` (which returns only once the client let go: its VmLck, read right then),
// `status` (the IOAS section and --json), `ioas destroy` refused while a device is attached.
import { spawn } from 'node:child_process';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BrokerProc, CLI, JsonProc, runCli, spawnBroker, stopProcess, tempDir, vmLckKiB } from './helpers/procs.js';

let socket: string;
let broker: BrokerProc;
let vfio: JsonProc | undefined;
const args = () => ['--socket', socket, '--space', 'vm0'];

beforeAll(async () => {
  socket = path.join(tempDir(), 'run', 'mmb.sock');
  broker = await spawnBroker(socket, ['--space', 'vm0']);
});

afterAll(async () => {
  if (vfio) await stopProcess(vfio.child);
  if (broker) expect(await stopProcess(broker)).toBe(0);
});

describe('mmbroker ioas', () => {
  it('create, attach vfio --ioas, map, status, unmap (returns once the client let go), destroy', async () => {
    expect((await runCli(['map', 'add', ...args(), '--gpa', '0', '--size', '16M', '--name', 'ram'])).code).toBe(0);
    const created = await runCli(['ioas', 'create', ...args(), '--ioas', 'nic0']);
    expect(created.code, created.stderr).toBe(0);
    expect(created.stdout).toMatch(/created IOAS "nic0"/);

    const child = spawn(
      process.execPath,
      [CLI, 'attach', 'vfio', ...args(), '--name', 'shadow', '--backend', 'soft', '--ioas', 'nic0', '--device', 'nic-dev', '--json'],
      { stdio: ['ignore', 'pipe', 'pipe'] },
    );
    vfio = new JsonProc(child);
    await vfio.next('attached', () => true, 20_000);
    // 16 MiB of RAM in the space, none of it pinned: the IOAS maps nothing yet.
    expect(vmLckKiB(vfio.pid)).toBe(0);

    const mapped = await runCli(['ioas', 'map', ...args(), '--ioas', 'nic0', '--iova', '0x80000000', '--gpa', '0x200000', '--size', '64K']);
    expect(mapped.code, mapped.stderr).toBe(0);
    expect(mapped.stdout).toMatch(/generation 1: mapped IOVA 0x80000000 -> gpa 0x200000, 64 ?Ki?B?/);
    expect(vmLckKiB(vfio.pid)).toBe(64);

    const st = await runCli(['status', ...args()]);
    expect(st.code, st.stderr).toBe(0);
    expect(st.stdout).toMatch(/ioas nic0 {2}generation 1 {2}1 mapping\(s\), 64\.0 KiB/);
    expect(st.stdout).toMatch(/vfio client "shadow" \(#\d+, pid \d+\): nic-dev; soft/);
    const json = JSON.parse((await runCli(['status', ...args(), '--json'])).stdout) as {
      spaces: { ioas?: { name: string; mappings: number; attached: { client: { name: string }; devices: string[] }[] }[] }[];
    };
    expect(json.spaces[0]?.ioas).toMatchObject([{ name: 'nic0', mappings: 1, attached: [{ client: { name: 'shadow' }, devices: ['nic-dev'] }] }]);

    // RAM under the mapping cannot be removed; the IOAS cannot be destroyed while the device is attached.
    const removal = await runCli(['map', 'remove', ...args(), '--name', 'ram']);
    expect(removal.code).toBe(1);
    expect(removal.stderr).toMatch(/MMB_ERR_RAM_MAPPED \(EBUSY\)/);
    const destroy = await runCli(['ioas', 'destroy', ...args(), '--ioas', 'nic0']);
    expect(destroy.code).toBe(1);
    expect(destroy.stderr).toMatch(/MMB_ERR_IOAS_BUSY/);

    const unmapped = await runCli(['ioas', 'unmap', ...args(), '--ioas', 'nic0', '--iova', '0x80000000', '--size', '64K']);
    // Read as soon as the command returned: the client had unlocked the pages by then.
    const after = vmLckKiB(vfio.pid);
    expect(unmapped.code, unmapped.stderr).toBe(0);
    expect(unmapped.stdout).toMatch(/unmapped 64\.0 KiB in \[0x80000000, 0x80010000\); no attached client maps it any more/);
    expect(after).toBe(0);

    await stopProcess(vfio.child);
    vfio = undefined;
    const gone = await runCli(['ioas', 'destroy', ...args(), '--ioas', 'nic0']);
    expect(gone.code, gone.stderr).toBe(0);
  });

  it('refuses bad use with a typed error and the usage', async () => {
    const noIoas = await runCli(['ioas', 'map', ...args(), '--ioas', 'missing', '--iova', '0', '--gpa', '0', '--size', '4K']);
    expect(noIoas.code).toBe(1);
    expect(noIoas.stderr).toMatch(/MMB_ERR_NO_IOAS/);
    // Usage mistakes: one line, exit 2 (the CLI's convention).
    const bad = await runCli(['ioas', 'frobnicate', ...args()]);
    expect(bad.code).toBe(2);
    expect(bad.stderr).toMatch(/unknown ioas command/);
    const notVfio = await runCli(['attach', 'vhost', ...args(), '--ioas', 'x']);
    expect(notVfio.code).toBe(2);
    expect(notVfio.stderr).toMatch(/--ioas is an option of the vfio kind/);
  });
});
