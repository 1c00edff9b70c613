// The processes around a VMM, started the way a management layer (libvirt, a cloud agent) starts them:
// the storage daemon that serves the disk, the VMM itself, and a device model in a process of its own.
// The walkthrough (demo.ts) and test/vmm-example.test.ts use these; the VMM does not.
import { spawn, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { JsonProc } from '../../testkit/jsonproc.js';
import { ControlClient } from './control.js';

// Child processes run the compiled files, also when this module is loaded from its sources (the tests).
const ROOT = fileURLToPath(new URL('../..', import.meta.url)).replace(/\/dist\/?$/, '');
const MAIN = path.join(ROOT, 'dist/examples/vmm/main.js');
const MMBROKER = path.join(ROOT, 'dist/cli/mmbroker.js');

export interface Daemon {
  readonly proc: ChildProcess;
  readonly pid: number;
  readonly socket: string;
  /** Lines it printed on stderr (qemu-storage-daemon prints nothing unless something is wrong). */
  readonly stderr: string[];
  stop(): Promise<void>;
}

/**
 * qemu-storage-daemon exporting `image` as vhost-user-blk on DIR/blk.sock. `bytesPerSecond` puts the disk
 * behind a throttle group, as clouds throttle disks: requests then stay in flight long enough to be in
 * flight across a memory transaction.
 */
export function startStorageDaemon(dir: string, image: string, opts: { bytesPerSecond?: number } = {}): Daemon {
  const socket = path.join(dir, 'blk.sock');
  const throttle = opts.bytesPerSecond
    ? ['--object', `throttle-group,id=tg0,x-bps-total=${opts.bytesPerSecond}`, '--blockdev', 'driver=throttle,node-name=disk0,throttle-group=tg0,file=file0']
    : [];
  const proc = spawn(
    'qemu-storage-daemon',
    [
      '--blockdev',
      `driver=file,node-name=${opts.bytesPerSecond ? 'file0' : 'disk0'},filename=${image}`,
      ...throttle,
      '--export',
      `type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path=${socket},writable=on,num-queues=1`,
    ],
    { stdio: ['ignore', 'ignore', 'pipe'] },
  );
  const stderr: string[] = [];
  proc.stderr?.setEncoding('utf8').on('data', (d: string) => stderr.push(...d.split('\n').filter((l) => l.trim() !== '')));
  // The VMM's vhost-user connect retries until the daemon listens: no readiness to wait for here.
  return { proc, pid: proc.pid as number, socket, stderr, stop: () => stop(proc) };
}

export interface VmmProcess {
  readonly proc: JsonProc;
  readonly pid: number;
  readonly control: ControlClient;
  readonly controlSocket: string;
  readonly brokerSocket: string;
  stop(): Promise<void>;
}

/** Runs examples/vmm/main.js; resolves once it printed "ready", with a control connection to it. */
export async function startVmm(dir: string, args: readonly string[] = [], timeoutMs = 30_000): Promise<VmmProcess> {
  const proc = new JsonProc(spawn(process.execPath, [MAIN, '--dir', dir, ...args], { stdio: ['ignore', 'pipe', 'pipe'] }));
  const ready = (await proc.next('ready', () => true, timeoutMs)) as unknown as { pid: number; control: string; broker: string };
  const control = await ControlClient.connect(ready.control);
  return {
    proc,
    pid: ready.pid,
    control,
    controlSocket: ready.control,
    brokerSocket: ready.broker,
    stop: async () => {
      control.close();
      await proc.stop('SIGTERM', 10_000);
    },
  };
}

/**
 * A device model in another process, attached over the VMM's broker socket: `mmbroker attach vfio
 * --backend soft`, the software stand-in for a VFIO device (an IOVA table and real mlock pinning; no
 * IOMMU on this machine). It pins all guest memory and reports the x86 MSI window as reserved.
 */
export async function startDevice(brokerSocket: string, name = 'nic0'): Promise<JsonProc> {
  const proc = new JsonProc(
    spawn(
      process.execPath,
      [MMBROKER, 'attach', 'vfio', '--backend', 'soft', '--device', name, '--name', name, '--socket', brokerSocket, '--space', 'vm0', '--json'],
      { stdio: ['ignore', 'pipe', 'pipe'] },
    ),
  );
  await proc.next('attached', () => true, 30_000);
  return proc;
}

function stop(proc: ChildProcess): Promise<void> {
  if (proc.exitCode !== null || proc.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => {
    proc.once('exit', () => resolve());
    proc.kill('SIGTERM');
  });
}
