// `mmbroker attach vhost-user` as its own process between a broker process and a real
// qemu-storage-daemon: hotplug with `mmbroker map add` lands in the back-end's /proc/PID/maps before the
// command returns, `map remove` takes it out before it returns, and the bridge exits 1 when the back-end
// goes away. Under --control it also maps guest memory and answers read / write / table. With --ioas the
// back-end's device follows an I/O address space as its IOTLB: dpdk-testpmd (iommu-support=1) gets the
// `ioas map` before it returns and the invalidation of `ioas unmap` before that returns;
// qemu-storage-daemon, which cannot translate IOVAs, is refused with MMB_ERR_UNSUPPORTED.
import { spawn, spawnSync } from 'node:child_process';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { QSD, TESTPMD } from '../bench/vhost-user-backends.js';
import { CLI, JsonProc, memfdMaps, runCli, spawnBroker, stopProcess, waitFor } from './helpers/procs.js';
import { defer } from './helpers/embedded.js';
import { IN_CI } from './helpers/ci.js';
import { realBackends, tool } from './helpers/vhost-user-real.js';

// The kind is wired into cli/commands/attach.ts separately from clients/vhost-user/: until then this file
// is skipped (and says so), except under CI=true, where that is a failure.
const CLI_HAS_KIND = spawnSync(process.execPath, [CLI, 'attach', '--help'], { encoding: 'utf8' }).stdout.includes('vhost-user');
if (!CLI_HAS_KIND && !IN_CI) console.warn('mmbroker attach vhost-user tests skipped: the CLI does not list the vhost-user kind yet');
const describeQsd = describe.skipIf((!tool(QSD, 'mmbroker attach vhost-user tests').have || !CLI_HAS_KIND) && !IN_CI);
const describeDpdk = describe.skipIf((!tool(TESTPMD, 'mmbroker attach vhost-user --ioas tests').have || !CLI_HAS_KIND) && !IN_CI);

const backends = realBackends();

/** A broker process serving space vm0 on DIR/broker.sock, stopped after the test. */
async function brokerIn(dir: string): Promise<string> {
  const socket = path.join(dir, 'broker.sock');
  const broker = await spawnBroker(socket, ['--space', 'vm0']);
  defer(() => stopProcess(broker));
  return socket;
}

/** `mmbroker attach vhost-user ARGS --json --control` once it printed its back-end line; stopped after the test. */
async function bridgeProcess(args: string[]) {
  const child = spawn(process.execPath, [CLI, 'attach', 'vhost-user', ...args, '--json', '--control'], { stdio: ['pipe', 'pipe', 'pipe'] });
  const bridge = new JsonProc(child);
  defer(() => bridge.stop());
  const backend = await bridge.next('backend', () => true, 20_000);
  return { child, bridge, backend };
}

describeQsd('mmbroker attach vhost-user', () => {
  it('bridges a broker process to qemu-storage-daemon: map add / remove reach the back-end before they return; exits 1 when the back-end goes', async () => {
    const { dir, qsd } = await backends.qsd('mmb-vhu-cli-', 2048);
    const socket = await brokerIn(dir);

    const { child, bridge, backend } = await bridgeProcess(['--socket', socket, '--space', 'vm0', '--backend-socket', qsd.socket, '--name', 'blk0']);
    expect(backend.memMode).toBe('slots');
    expect(backend.maxSlots).toBe(32);
    await bridge.next('attached');

    const add = await runCli(['map', 'add', '--socket', socket, '--space', 'vm0', '--gpa', '0x100000000', '--size', '16M', '--name', 'dimm0']);
    expect(add.code, add.stderr).toBe(0);
    // The backing is the broker's memfd; the back-end maps it by the time `map add` returned.
    expect(memfdMaps(qsd.pid, 'dimm0')).toHaveLength(1);
    expect(memfdMaps(bridge.pid, 'dimm0')).toHaveLength(1);
    const table = await bridge.request({ cmd: 'table' }, 'table');
    expect(table.table).toEqual([{ name: 'dimm0', gpa: 0x1_0000_0000, size: 16 << 20, mmapOffset: 0 }]);
    // --control maps guest memory in the bridge too.
    await bridge.request({ cmd: 'write', gpa: 0x1_0000_0100, hex: Buffer.from('bridged').toString('hex') }, 'wrote');
    const read = await bridge.request({ cmd: 'read', gpa: 0x1_0000_0100, len: 7 }, 'read');
    expect(Buffer.from(String(read.hex), 'hex').toString()).toBe('bridged');

    const rem = await runCli(['map', 'remove', '--socket', socket, '--space', 'vm0', '--name', 'dimm0']);
    expect(rem.code, rem.stderr).toBe(0);
    expect(memfdMaps(qsd.pid, 'dimm0')).toEqual([]);
    expect(memfdMaps(bridge.pid, 'dimm0')).toEqual([]);

    const exited = new Promise<number | null>((r) => child.once('exit', (code) => r(code)));
    await qsd.stop();
    const code = await Promise.race([exited, waitFor('the bridge to exit', () => false, 10_000).catch(() => 'timeout' as const)]);
    expect(code).toBe(1);
  });
});

describeQsd('mmbroker attach vhost-user --ioas: a back-end that cannot translate', () => {
  it('qemu-storage-daemon in an IOAS: exit 1 with MMB_ERR_UNSUPPORTED naming VIRTIO_F_ACCESS_PLATFORM; nothing attached', async () => {
    const { dir, qsd } = await backends.qsd('mmb-vhu-cli-', 2048);
    const socket = await brokerIn(dir);
    expect((await runCli(['ioas', 'create', '--socket', socket, '--space', 'vm0', '--ioas', 'dma0'])).code).toBe(0);
    const r = await runCli(['attach', 'vhost-user', '--socket', socket, '--space', 'vm0', '--backend-socket', qsd.socket, '--ioas', 'dma0', '--name', 'blk0']);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/MMB_ERR_UNSUPPORTED/);
    expect(r.stderr).toMatch(/does not offer VIRTIO_F_ACCESS_PLATFORM/);
    expect(r.stderr).not.toMatch(/^\s+at /m);
    const st = JSON.parse((await runCli(['status', '--socket', socket, '--space', 'vm0', '--json'])).stdout) as {
      spaces: { clients: { name: string }[]; ioas?: { name: string; attached: unknown[] }[] }[];
    };
    expect(st.spaces[0]!.clients.map((c) => c.name)).not.toContain('blk0');
    expect(st.spaces[0]!.ioas).toMatchObject([{ name: 'dma0', attached: [] }]);
  });
});

describeDpdk('mmbroker attach vhost-user --ioas: dpdk-testpmd', () => {
  it("the IOAS is the back-end's IOTLB: ioas map is in it when the command returns, ioas unmap returns once it was invalidated", async () => {
    const { dir, pmd } = await backends.testpmd('mmb-vhu-cli-', { iommu: true });
    const socket = await brokerIn(dir);
    const args = ['--socket', socket, '--space', 'vm0'];
    expect((await runCli(['map', 'add', ...args, '--gpa', '0', '--size', '16M', '--name', 'ram'])).code).toBe(0);
    expect((await runCli(['ioas', 'create', ...args, '--ioas', 'net0'])).code).toBe(0);
    const { bridge, backend } = await bridgeProcess([...args, '--backend-socket', pmd.socket, '--ioas', 'net0', '--name', 'net0-dev']);
    expect(backend).toMatchObject({ memMode: 'table', ioas: 'net0' });
    await bridge.next('attached');
    const st = JSON.parse((await runCli(['status', ...args, '--json'])).stdout) as {
      spaces: { ioas?: { name: string; attached: { client: { name: string }; devices: string[] }[] }[] }[];
    };
    expect(st.spaces[0]!.ioas).toMatchObject([{ name: 'net0', attached: [{ client: { name: 'net0-dev' }, devices: ['net0-dev'] }] }]);

    const mapped = await runCli(['ioas', 'map', ...args, '--ioas', 'net0', '--iova', '0x80000000', '--gpa', '0x200000', '--size', '64K']);
    expect(mapped.code, mapped.stderr).toBe(0);
    type Table = { iotlb: { mappings: { iova: number; gpa: number; size: number }[]; stats: { updates: number; invalidates: number } } };
    const t1 = (await bridge.request({ cmd: 'table' }, 'table')) as unknown as Table;
    expect(t1.iotlb.mappings).toMatchObject([{ iova: 0x8000_0000, gpa: 0x20_0000, size: 64 << 10 }]);
    expect(t1.iotlb.stats.updates).toBe(1);

    const unmapped = await runCli(['ioas', 'unmap', ...args, '--ioas', 'net0', '--iova', '0x80000000', '--size', '64K']);
    expect(unmapped.code, unmapped.stderr).toBe(0);
    const t2 = (await bridge.request({ cmd: 'table' }, 'table')) as unknown as Table;
    expect(t2.iotlb.mappings).toEqual([]);
    expect(t2.iotlb.stats.invalidates).toBe(1);
  });
});
