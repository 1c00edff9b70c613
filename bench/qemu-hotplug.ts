// QEMU itself as the peer: the system users would pick instead of a broker is QEMU's own memory hotplug.
// A guest with N vhost-user-blk-pci devices, each served by its own qemu-storage-daemon; a DIMM hot-added
// over QMP (object-add memory-backend-memfd share=on, then device_add pc-dimm, timed); QEMU's memory
// listener sends every back-end ADD_MEM_REG and waits for its REPLY_ACK one back-end after the other
// before device_add returns. Beside it, in the same run and against the same qemu-storage-daemon
// processes, the broker doing the same change: an embedded broker, one vhost-user bridge per back-end
// (clients/vhost-user, VhostUserSubscriber with mapMemory: false, as bench/vhost-user.ts), an owner adding a
// region of the DIMM's size from a memfd registered beforehand (as object-add creates QEMU's), timed until
// the commit's reply, which comes once every bridge had its back-end's REPLY_ACK.
//
// Each figure is split into what does not depend on N and the slope per back-end: QEMU's device-model cost
// is measured directly with N = 0 (device_add of a pc-dimm into a guest with no vhost-user device), and both
// slopes are least-squares fits of the medians over the N >= 1 measured. Goal: our slope per back-end below
// QEMU's.
//
// The guest (vm/hotplug-guest.mjs): the VM test's Debian kernel under TCG with its virtio-blk driver (and
// virtio_pci, virtio, virtio_ring) loaded from a small busybox initramfs, so that each vhost-user-blk device
// is started and its back-end has the memory table; hot-added memory stays offline, so QEMU's ACPI unplug
// of a DIMM (device_del, DEVICE_DELETED) is granted at once and the next iteration starts from the same
// state. Checked at the moment each add returns, not after things settle: every qemu-storage-daemon's
// /proc/PID/maps has the new memfd's inode (and none after the removal).
//
// Rounds alternate QEMU and the broker for each N, with the same qemu-storage-daemons (each serves one
// front-end at a time). Not pinned: the back-ends need both CPUs.
//
//   npm run bench:qemu-hotplug -- [--backends 0,1,4,16] [--iterations N] [--warmup N] [--rounds R]
//                                 [--dimm-mib N] [--json]      (BENCH_ITERATIONS sets the default of --iterations)
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';
import { Broker } from '../broker/index.js';
import { OwnerClient } from '../clients/index.js';
import { BLK_FEATURES, VhostUserSubscriber } from '../clients/vhost-user/index.js';
import { native } from '../native/index.js';
import { have, iterations, report, rootDir, runMain, summarize, type Measurement } from './lib.js';
import { Qmp } from './qmp.js';
import { QSD, type Backend } from './vhost-user-backends.js';
import { backendImage, qsdVersion, startBackends, stopBackends } from './vhu-peer.js';

const { values } = parseArgs({
  options: {
    backends: { type: 'string', default: '0,1,4,16' },
    iterations: { type: 'string', default: String(iterations(40)) },
    warmup: { type: 'string', default: '5' },
    rounds: { type: 'string', default: '2' },
    'dimm-mib': { type: 'string', default: '128' },
    json: { type: 'boolean', default: false },
  },
});
const COUNTS = String(values.backends).split(',').map(Number);
const ITER = Number(values.iterations);
const WARMUP = Number(values.warmup);
const ROUNDS = Number(values.rounds);
const DIMM = Number(values['dimm-mib']) * 2 ** 20;
const QEMU = 'qemu-system-x86_64';
const GUEST_RAM_MIB = 256;
const BOOT_TIMEOUT_MS = 240_000;
/** Where the broker puts its region: above 4 GiB, where QEMU's device memory (the DIMMs) starts. */
const GPA = 0x1_0000_0000;
const log = (s: string) => {
  if (!values.json) console.error(s);
};

interface Guest {
  kernel: string;
  initrd: string;
  modules: string[];
  release: string;
}

/** The guest's kernel and initramfs (vm/hotplug-guest.mjs, plain JavaScript run as it is). */
async function guest(): Promise<Guest> {
  const mod = (await import(pathToFileURL(path.join(rootDir(), 'vm', 'hotplug-guest.mjs')).href)) as {
    hotplugGuest: (o: { log: (s: string) => void }) => Guest;
  };
  return mod.hotplugGuest({ log });
}

/** Inodes of the memfds process `pid` holds open (/proc/PID/fd). */
function memfdInodes(pid: number): Set<number> {
  const out = new Set<number>();
  for (const fd of fs.readdirSync(`/proc/${pid}/fd`)) {
    try {
      if (!fs.readlinkSync(`/proc/${pid}/fd/${fd}`).startsWith('/memfd:')) continue;
      out.add(fs.statSync(`/proc/${pid}/fd/${fd}`).ino);
    } catch {
      // Closed meanwhile.
    }
  }
  return out;
}

/** Whether process `pid` maps the file with inode `ino` (the kernel's view: /proc/PID/maps). */
function maps(pid: number, ino: number): boolean {
  for (const line of fs.readFileSync(`/proc/${pid}/maps`, 'utf8').split('\n')) {
    const f = line.split(/\s+/);
    if (Number(f[4]) === ino && f[4] !== '0') return true;
  }
  return false;
}

/** Throws unless every back-end maps `ino` (or, `present` false, none does). */
function checkBackends(backends: readonly Backend[], ino: number, present: boolean, what: string): void {
  const wrong = backends.filter((b) => maps(b.pid, ino) !== present);
  if (wrong.length > 0)
    throw new Error(`${what}: ${wrong.length} of ${backends.length} qemu-storage-daemons ${present ? 'do not map' : 'still map'} the memfd (inode ${ino})`);
}

class Vm {
  private out = '';
  private readonly exited: Promise<void>;

  private constructor(
    readonly proc: ChildProcess,
    readonly qmp: Qmp,
  ) {
    this.exited = new Promise((resolve) => proc.once('exit', () => resolve()));
  }

  get pid(): number {
    return this.proc.pid as number;
  }

  /** QEMU with one vhost-user-blk-pci device per back-end, booted until the guest has every disk. */
  static async boot(dir: string, g: Guest, backends: readonly Backend[], name: string): Promise<Vm> {
    const qmpSocket = path.join(dir, `${name}.qmp`);
    fs.rmSync(qmpSocket, { force: true });
    const args = [
      '-machine',
      'q35,accel=tcg',
      '-cpu',
      'max',
      '-smp',
      '1',
      '-m',
      `${GUEST_RAM_MIB}M,slots=4,maxmem=${GUEST_RAM_MIB + 4 * (DIMM >> 20)}M`,
      // vhost-user needs guest memory the back-ends can map: a shared memfd, as the DIMMs are.
      '-object',
      `memory-backend-memfd,id=ram,size=${GUEST_RAM_MIB}M,share=on`,
      '-machine',
      'memory-backend=ram',
      '-nodefaults',
      '-display',
      'none',
      '-no-reboot',
      '-serial',
      'stdio',
      '-qmp',
      `unix:${qmpSocket},server=on,wait=off`,
      ...backends.flatMap((b, i) => ['-chardev', `socket,id=vu${i},path=${b.socket}`, '-device', `vhost-user-blk-pci,chardev=vu${i},num-queues=1`]),
      '-kernel',
      g.kernel,
      '-initrd',
      g.initrd,
      '-append',
      `console=ttyS0 panic=-1 loglevel=3 mmb.disks=${backends.length}`,
    ];
    const proc = spawn(QEMU, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    proc.stdout?.setEncoding('utf8').on('data', (d: string) => (out = (out + d).slice(-20_000)));
    proc.stderr?.setEncoding('utf8').on('data', (d: string) => (err = (err + d).slice(-20_000)));
    const t0 = Date.now();
    for (;;) {
      const m = /MMB-GUEST-(READY|FAIL)([^\n]*)\n/.exec(out);
      if (m?.[1] === 'READY') break;
      if (m || proc.exitCode !== null || proc.signalCode !== null || Date.now() - t0 > BOOT_TIMEOUT_MS) {
        proc.kill('SIGKILL');
        throw new Error(
          `the guest with ${backends.length} vhost-user-blk devices did not come up: ${m ? m[0] : `QEMU ${proc.exitCode ?? proc.signalCode ?? 'still booting'}`}\n${err.slice(-2000)}\n${out.slice(-2000)}`,
        );
      }
      await new Promise((r) => setTimeout(r, 50));
    }
    log(`  ${name}: guest up with ${backends.length} virtio disk(s) in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
    const vm = new Vm(proc, await Qmp.connect(qmpSocket));
    vm.out = out;
    return vm;
  }

  /** quit over QMP, then waits for QEMU to exit (SIGKILL after 10 s). */
  async quit(): Promise<void> {
    try {
      await this.qmp.execute('quit');
    } catch {
      // It may close the connection before answering.
    }
    this.qmp.close();
    const t = setTimeout(() => this.proc.kill('SIGKILL'), 10_000);
    await this.exited;
    clearTimeout(t);
  }
}

/** QEMU: hot-adds (timed: device_add) and unplugs a DIMM, `warmup` + `n` times. Microseconds of each add. */
async function qemuRound(dir: string, g: Guest, backends: readonly Backend[], n: number, name: string): Promise<number[]> {
  const vm = await Vm.boot(dir, g, backends, name);
  const adds: number[] = [];
  try {
    for (let i = -WARMUP; i < n; i++) {
      const id = `dimm${i + WARMUP}`;
      const before = memfdInodes(vm.pid);
      await vm.qmp.execute('object-add', { 'qom-type': 'memory-backend-memfd', id: `${id}-mem`, size: DIMM, share: true });
      const added = [...memfdInodes(vm.pid)].filter((x) => !before.has(x));
      if (added.length !== 1) throw new Error(`object-add made ${added.length} new memfds in QEMU, not one`);
      const ino = added[0] as number;
      const t0 = process.hrtime.bigint();
      await vm.qmp.execute('device_add', { driver: 'pc-dimm', id, memdev: `${id}-mem` });
      const t1 = process.hrtime.bigint();
      checkBackends(backends, ino, true, `right after device_add of ${id}`);
      if (i >= 0) adds.push(Number(t1 - t0) / 1000);
      // The guest acknowledges the insertion (ACPI _OST), and only then is asked to eject: an unplug request
      // that arrives while it still handles the insertion can be lost. It grants the unplug (its memory
      // block was never onlined); QEMU then removes the region from every back-end (REM_MEM_REG) before it
      // says DEVICE_DELETED.
      await vm.qmp.event(
        (e) =>
          e.event === 'ACPI_DEVICE_OST' &&
          (e.data?.info as { device?: string; source?: number } | undefined)?.device === id &&
          (e.data?.info as { source?: number }).source === 1,
        `the guest's _OST of ${id}'s insertion`,
        30_000,
      );
      await vm.qmp.execute('device_del', { id });
      await vm.qmp.event((e) => e.event === 'DEVICE_DELETED' && e.data?.device === id, `DEVICE_DELETED of ${id}`, 30_000);
      checkBackends(backends, ino, false, `after DEVICE_DELETED of ${id}`);
      await vm.qmp.execute('object-del', { id: `${id}-mem` });
      vm.qmp.events.splice(0);
    }
  } finally {
    await vm.quit();
  }
  return adds;
}

/**
 * The broker: owner.addRegion() of a DIMM-sized region from a memfd registered beforehand (as object-add
 * made QEMU's), through one bridge per back-end; then its removal. Microseconds of each add and removal.
 */
async function brokerRound(backends: readonly Backend[], n: number): Promise<{ add: number[]; rem: number[] }> {
  const broker = new Broker({ spaces: ['vm0'], limits: { ackTimeoutMs: 30_000 } });
  const owner = await OwnerClient.attach(broker, { space: 'vm0' });
  const subs: VhostUserSubscriber[] = [];
  const out = { add: [] as number[], rem: [] as number[] };
  let fd = -1;
  try {
    const b = await owner.createBacking(DIMM, 'dimm');
    fd = b.fd;
    const ino = native.fstat(fd).ino;
    for (const [i, be] of backends.entries()) {
      subs.push(
        await VhostUserSubscriber.attach(broker, {
          space: 'vm0',
          name: `vu${i}`,
          backendSocket: be.socket,
          virtioFeatures: BLK_FEATURES,
          mapMemory: false,
          reconnect: false,
        }),
      );
    }
    for (let i = -WARMUP; i < n; i++) {
      const t0 = process.hrtime.bigint();
      await owner.addRegion({ name: 'dimm', gpa: GPA, size: DIMM, backing: b.backing });
      const t1 = process.hrtime.bigint();
      checkBackends(backends, ino, true, 'right after the commit that adds the region');
      const t2 = process.hrtime.bigint();
      await owner.removeRegion('dimm');
      const t3 = process.hrtime.bigint();
      checkBackends(backends, ino, false, 'right after the commit that removes the region');
      if (i >= 0) {
        out.add.push(Number(t1 - t0) / 1000);
        out.rem.push(Number(t3 - t2) / 1000);
      }
    }
  } finally {
    for (const s of subs) await s.close();
    owner.close();
    if (fd >= 0) native.close(fd);
    await broker.close();
  }
  return out;
}

/** Least squares through (x, y): slope and intercept. */
function fit(points: readonly [number, number][]): { slope: number; intercept: number } {
  const n = points.length;
  const mx = points.reduce((s, [x]) => s + x, 0) / n;
  const my = points.reduce((s, [, y]) => s + y, 0) / n;
  const sxx = points.reduce((s, [x]) => s + (x - mx) ** 2, 0);
  const slope = points.reduce((s, [x, y]) => s + (x - mx) * (y - my), 0) / sxx;
  return { slope, intercept: my - slope * mx };
}

async function main(): Promise<void> {
  for (const tool of [QEMU, QSD]) if (!have(tool)) throw new Error(`${tool} is not installed (apt-get install qemu-system-x86 qemu-system-common)`);
  const withBackends = COUNTS.filter((n) => n >= 1);
  if (withBackends.length < 2) throw new Error('--backends needs at least two counts of 1 or more (the slopes are fits)');
  const g = await guest();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'mmb-bench-qemu-'));
  const image = backendImage(dir);
  const qemu = new Map<number, number[]>();
  const ours = new Map<number, { add: number[]; rem: number[] }>();
  const checks: string[] = [];
  try {
    for (const n of COUNTS) {
      log(`${n} back-end(s): ${ROUNDS} rounds of ${ITER} hot-adds (+${WARMUP} warm-up) by QEMU${n > 0 ? ' and by the broker' : ''}`);
      const backends = n > 0 ? await startBackends(dir, image, n, `qsd${n}`) : [];
      try {
        qemu.set(n, []);
        if (n > 0) ours.set(n, { add: [], rem: [] });
        for (let r = 0; r < ROUNDS; r++) {
          const q = await qemuRound(dir, g, backends, ITER, `qemu-${n}-${r}`);
          qemu.get(n)!.push(...q);
          let line = `  round ${r + 1}: QEMU device_add ${summarize(q).median.toFixed(0)} us`;
          if (n > 0) {
            const o = await brokerRound(backends, ITER);
            ours.get(n)!.add.push(...o.add);
            ours.get(n)!.rem.push(...o.rem);
            line += `, broker add ${summarize(o.add).median.toFixed(0)} us`;
          }
          log(line);
        }
      } finally {
        await stopBackends(backends);
      }
    }
    checks.push(
      "after every device_add reply, every qemu-storage-daemon's /proc/PID/maps had the new DIMM's memfd (its inode, found in QEMU's /proc/PID/fd after object-add), and none had it after DEVICE_DELETED",
      "after every commit's reply, every qemu-storage-daemon's /proc/PID/maps had the region's memfd, and none had it after the removal's reply",
      'qemu-storage-daemon printed nothing on stderr',
    );
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }

  const results: Measurement[] = [];
  const q = new Map([...qemu].map(([n, s]) => [n, summarize(s)]));
  const o = new Map([...ours].map(([n, s]) => [n, summarize(s.add)]));
  for (const n of COUNTS) {
    results.push({
      name: `QEMU: device_add pc-dimm, ${n} vhost-user-blk back-end(s)`,
      series: 'QEMU device_add',
      x: n,
      unit: 'us',
      ...(q.get(n) as { median: number; p99: number }),
      iterations: (qemu.get(n) as number[]).length,
      note:
        n === 0
          ? "QEMU's device-model cost: the same hot-add into a guest without vhost-user devices"
          : 'QMP device_add until its reply; the memfd was made by object-add before',
    });
  }
  for (const n of withBackends) {
    const m = o.get(n) as { median: number; p99: number };
    const peer = q.get(n) as { median: number };
    results.push({
      name: `broker: add, ${n} back-end(s) through the bridge`,
      series: 'broker add',
      x: n,
      unit: 'us',
      ...m,
      iterations: ours.get(n)!.add.length,
      peer: { name: `QEMU device_add, ${n} back-end(s)`, median: peer.median },
      ratio: m.median / peer.median,
      note: 'owner.addRegion() on the embedded broker until its reply: one transaction, sent to every bridge at once, each acked after its ADD_MEM_REG was REPLY_ACKed',
    });
    results.push({
      name: `broker: remove, ${n} back-end(s) through the bridge`,
      series: 'broker remove',
      x: n,
      unit: 'us',
      ...summarize(ours.get(n)!.rem),
      iterations: ours.get(n)!.rem.length,
    });
  }
  const qf = fit(withBackends.map((n) => [n, (q.get(n) as { median: number }).median]));
  const of = fit(withBackends.map((n) => [n, (o.get(n) as { median: number }).median]));
  const fitNote = `least squares through the medians at ${withBackends.join(', ')} back-ends`;
  results.push(
    {
      name: 'QEMU: per back-end',
      series: 'slope',
      unit: 'us',
      median: qf.slope,
      p99: qf.slope,
      iterations: withBackends.length,
      note: `${fitNote}; its intercept ${qf.intercept.toFixed(0)} us (measured without back-ends: ${(q.get(0)?.median ?? NaN).toFixed(0)} us)`,
    },
    {
      name: 'broker: per back-end',
      series: 'slope',
      unit: 'us',
      median: of.slope,
      p99: of.slope,
      iterations: withBackends.length,
      peer: { name: 'QEMU, per back-end', median: qf.slope },
      ratio: of.slope / qf.slope,
      goal: "< QEMU's per back-end",
      met: of.slope < qf.slope,
      note: `${fitNote}; its intercept ${of.intercept.toFixed(0)} us`,
    },
  );
  if (q.has(0)) {
    const dm = q.get(0) as { median: number; p99: number };
    results.push({
      name: 'QEMU: device-model cost (without back-ends)',
      series: 'device model',
      unit: 'us',
      ...dm,
      iterations: (qemu.get(0) as number[]).length,
      note: `device_add of a pc-dimm into the same guest without vhost-user devices: QMP, the DIMM's realize and plug, the memory transaction, ACPI; the fit's intercept with back-ends: ${qf.intercept.toFixed(0)} us`,
    });
  }
  report('qemu-hotplug', results, {
    qemu: spawnSync(QEMU, ['--version'], { encoding: 'utf8' }).stdout.split('\n')[0],
    qsd: qsdVersion(),
    guest: `Debian kernel ${g.release} under TCG (-machine q35,accel=tcg -cpu max -smp 1, ${GUEST_RAM_MIB} MiB in a shared memfd), virtio-blk modules ${g.modules.join(' ')} from a busybox initramfs (vm/hotplug-guest.mjs)`,
    dimm: `${DIMM / 2 ** 20} MiB memory-backend-memfd,share=on; device_add pc-dimm (timed), device_del after DEVICE_DELETED (the guest grants the unplug), object-del`,
    broker:
      'embedded Broker, OwnerClient in the same process, one VhostUserSubscriber per back-end (mapMemory: false: a pure bridge, as QEMU maps nothing new on device_add either), the region added from a memfd registered before the timing',
    backends: COUNTS.join(', '),
    iterations: ITER,
    warmup: WARMUP,
    rounds: ROUNDS,
    pinning: 'none (the back-ends need both CPUs)',
    checks,
  });
}

runMain(main);
