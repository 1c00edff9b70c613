// Real vhost-user back-ends as child processes, for the interop tests, the benchmarks and the hotplug
// harness's bridge clients: a fresh qemu-storage-daemon (vhost-user-blk export of a raw image) or
// dpdk-testpmd (net_vhost vdev, io forwarding) per use, started with its own socket, watched for error
// lines on stderr, stopped by PID.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';

export const QSD = 'qemu-storage-daemon';
export const TESTPMD = 'dpdk-testpmd';

/** Whether `cmd` is on the PATH. */
export function have(cmd: string): boolean {
  return spawnSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' }).status === 0;
}

export interface Backend {
  readonly name: string;
  readonly pid: number;
  /** The vhost-user socket (the back-end listens, the front-end connects). */
  readonly socket: string;
  /** Every vhost-user socket it serves (`socket` first): one per device. */
  readonly sockets: readonly string[];
  readonly proc: ChildProcess;
  /** Everything it printed on stderr so far, by line. */
  readonly stderr: string[];
  /** Lines of stderr that are errors (for qemu-storage-daemon: any line at all). */
  errors(): string[];
  /** SIGTERM by PID, SIGKILL after `graceMs`; resolves once it exited. */
  stop(graceMs?: number): Promise<void>;
}

interface StartOptions {
  /** Run under `taskset -c CPUS` (e.g. "0"), for timings. */
  cpus?: string;
  /** How long to wait for the socket to appear. Default 10 s. */
  timeoutMs?: number;
}

function launch(
  name: string,
  cmd: string,
  args: string[],
  sockets: readonly string[],
  isError: (line: string) => boolean,
  opts: StartOptions,
): Promise<Backend> {
  const socket = sockets[0] as string;
  const argv = opts.cpus !== undefined ? ['taskset', '-c', opts.cpus, cmd, ...args] : [cmd, ...args];
  // stdin stays an open pipe: dpdk-testpmd exits when its stdin reaches EOF.
  const proc = spawn(argv[0] as string, argv.slice(1), { stdio: ['pipe', 'pipe', 'pipe'] });
  const stderr: string[] = [];
  const stdout: string[] = [];
  let partial = '';
  proc.stderr?.setEncoding('utf8').on('data', (d: string) => {
    const lines = (partial + d).split('\n');
    partial = lines.pop() ?? '';
    stderr.push(...lines.filter((l) => l.trim() !== ''));
  });
  proc.stdout?.setEncoding('utf8').on('data', (d: string) => {
    stdout.push(d);
    if (stdout.length > 200) stdout.splice(0, 100);
  });
  const exited = new Promise<void>((resolve) => proc.once('exit', () => resolve()));
  const b: Backend = {
    name,
    get pid() {
      return proc.pid as number;
    },
    socket,
    sockets,
    proc,
    stderr,
    errors: () => [...stderr, ...(partial.trim() ? [partial] : [])].filter(isError),
    async stop(graceMs = 3000) {
      if (proc.exitCode !== null || proc.signalCode !== null) return;
      try {
        process.kill(proc.pid as number, 'SIGTERM');
      } catch {
        return;
      }
      const t = setTimeout(() => {
        try {
          process.kill(proc.pid as number, 'SIGKILL');
        } catch {
          // Gone meanwhile.
        }
      }, graceMs);
      await exited;
      clearTimeout(t);
    },
  };
  const deadline = Date.now() + (opts.timeoutMs ?? 10_000);
  return new Promise<Backend>((resolve, reject) => {
    const check = () => {
      if (proc.exitCode !== null || proc.signalCode !== null) {
        reject(new Error(`${name} exited (${proc.exitCode ?? proc.signalCode}) before listening: ${stderr.join('\n')} ${stdout.join('')}`));
        return;
      }
      if (sockets.every((x) => fs.existsSync(x))) {
        resolve(b);
        return;
      }
      if (Date.now() > deadline) {
        void b.stop(0);
        reject(new Error(`${name} did not create ${socket} within ${opts.timeoutMs ?? 10_000} ms: ${stderr.join('\n')}`));
        return;
      }
      setTimeout(check, 10);
    };
    proc.once('error', reject);
    check();
  });
}

/** A raw image of `sectors` 512-byte sectors whose sector i is filled with a pattern of i. */
export function makeImage(file: string, sectors: number): void {
  const buf = Buffer.alloc(sectors * 512);
  for (let s = 0; s < sectors; s++) patternSector(s).copy(buf, s * 512);
  fs.writeFileSync(file, buf);
}

/** The known content of sector `s` of a makeImage() image. */
export function patternSector(s: number): Buffer {
  const b = Buffer.alloc(512);
  for (let i = 0; i < 512; i += 8) {
    b.writeUInt32LE(s, i);
    b.writeUInt32LE((Math.imul(i + 1, 2654435761) ^ s) >>> 0, i + 4);
  }
  return b;
}

/**
 * qemu-storage-daemon exporting `image` as vhost-user-blk on DIR/NAME.sock, writable, one queue.
 * Any line on its stderr counts as an error.
 */
export function startQsd(dir: string, image: string, opts: StartOptions & { name?: string } = {}): Promise<Backend> {
  const socket = path.join(dir, `${opts.name ?? 'qsd'}.sock`);
  fs.rmSync(socket, { force: true });
  return launch(
    'qemu-storage-daemon',
    QSD,
    [
      '--blockdev',
      `driver=file,node-name=disk0,filename=${image}`,
      '--export',
      `type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path=${socket},writable=on,num-queues=1`,
    ],
    [socket],
    () => true,
    opts,
  );
}

/**
 * dpdk-testpmd with a net_vhost vdev on DIR/NAME.sock, forwarding in io mode: what arrives on the
 * front-end's TX queue goes back out on its RX queue. No huge pages, no PCI, its own file prefix.
 * `iommu`: the vdev supports a guest IOMMU (iommu-support=1: IOMMU_PLATFORM, the IOTLB). `devices`: that
 * many vdevs (ports) in the one process, each on its own socket (`sockets`), forwarded to each other.
 * Lines of stderr that say error / fail / invalid / cannot / panic (or come from VHOST_CONFIG, which logs
 * at error level only here) count as errors.
 */
export function startTestpmd(dir: string, opts: StartOptions & { name?: string; lcores?: string; iommu?: boolean; devices?: number } = {}): Promise<Backend> {
  const name = opts.name ?? 'testpmd';
  // One net_vhost vdev per device: DIR/NAME.sock, then DIR/NAME-1.sock, ...
  const sockets = Array.from({ length: opts.devices ?? 1 }, (_, i) => path.join(dir, i === 0 ? `${name}.sock` : `${name}-${i}.sock`));
  for (const s of sockets) fs.rmSync(s, { force: true });
  const prefix = `mmb-${process.pid}-${name}-${Date.now().toString(36)}`;
  return launch(
    'dpdk-testpmd',
    TESTPMD,
    [
      '-l',
      opts.lcores ?? '0-1',
      '--no-huge',
      '-m',
      '1024',
      '--no-pci',
      '--file-prefix',
      prefix,
      '--log-level',
      'lib.vhost.config:error',
      // iommu-support=1: the vdev offers VIRTIO_F_IOMMU_PLATFORM and translates through its IOTLB when
      // the front-end negotiates it (a guest IOMMU; docs/vhost-user.md).
      ...sockets.flatMap((s, i) => ['--vdev', `net_vhost${i},iface=${s},queues=1${opts.iommu ? ',iommu-support=1' : ''}`]),
      '--',
      '--nb-cores=1',
      '--forward-mode=io',
      '--total-num-mbufs=8192',
      '--stats-period',
      '3600',
    ],
    sockets,
    (line) => /VHOST_CONFIG|error|fail|invalid|cannot|panic/i.test(line),
    opts,
  );
}
