#!/usr/bin/env node
// Runs the VM test once: prepares a guest kernel and an initramfs, boots QEMU (q35, intel-iommu, two edu
// devices, TCG), lets the guest run vm/guest/scenario.mjs, and judges the serial console.
//
//   node vm/run.mjs [--backend type1|iommufd] [--kernel debian|custom] [--build-kernel]
//                   [--timeout SECONDS] [--artifacts DIR] [--edus N] [--verbose] [--script FILE]
//
// --script runs another script of vm/guest/ in the guest instead of scenario.mjs (experiments).
// --backend type1 boots Debian's kernel (its vfio modules); iommufd boots the custom kernel built by
// vm/build-kernel.sh (cached; built here only with --build-kernel, else exit 3 when missing).
// The serial log is written to <artifacts>/vm-<backend>.log (default test/artifacts/). The last line of
// stdout is a JSON summary: {ok, backend, kernel, steps, result, timings, log, message?, tail?}.
// Exit: 0 passed, 1 a guest step failed or the VM timed out, 2 cannot run (no qemu, no kernel), 3 the
// custom kernel is not built.
import { spawn, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { fileURLToPath } from 'node:url';
import { cacheDir, customKernel, debianKernel } from './kernel.mjs';
import { buildInitramfs } from './initramfs.mjs';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
export const QEMU = 'qemu-system-x86_64';

const { values } = parseArgs({
  options: {
    backend: { type: 'string', default: 'type1' },
    kernel: { type: 'string' },
    'build-kernel': { type: 'boolean', default: false },
    timeout: { type: 'string', default: '240' },
    artifacts: { type: 'string', default: path.join(ROOT, 'test/artifacts') },
    edus: { type: 'string', default: '2' },
    verbose: { type: 'boolean', default: false },
    script: { type: 'string', default: 'scenario.mjs' },
  },
});
const backend = values.backend;
const kernelKind = values.kernel ?? (backend === 'iommufd' ? 'custom' : 'debian');
const timeoutS = Number(values.timeout);
const log = (msg) => process.stderr.write(`[vm ${backend}] ${msg}\n`);
const t0 = Date.now();
const timings = {};

function done(code, summary) {
  process.stdout.write(JSON.stringify({ backend, kernel: kernelKind, ...summary, timings: { ...timings, totalMs: Date.now() - t0 } }) + '\n');
  process.exit(code);
}

if (!['type1', 'iommufd'].includes(backend)) done(2, { ok: false, message: `unknown backend ${backend}` });
if (!['debian', 'custom'].includes(kernelKind)) done(2, { ok: false, message: `unknown kernel ${kernelKind}` });
try {
  execFileSync(QEMU, ['--version'], { stdio: 'ignore' });
} catch {
  done(2, { ok: false, message: `${QEMU} is not installed: apt-get install --no-install-recommends qemu-system-x86 busybox-static` });
}

// 1. The kernel.
let kernel;
let kit;
try {
  if (kernelKind === 'debian') {
    kit = debianKernel({ log });
    kernel = path.join(kit.dir, kit.kernel);
  } else {
    kernel = await customKernel({ build: values['build-kernel'], log });
    if (!kernel)
      done(3, { ok: false, message: 'the custom iommufd kernel is not built: run vm/build-kernel.sh (about 8 minutes on 2 cores), or pass --build-kernel' });
  }
} catch (err) {
  done(2, { ok: false, message: `no guest kernel: ${err.message}` });
}
timings.kernelMs = Date.now() - t0;

// 2. The initramfs.
const runDir = path.join(cacheDir(), 'run');
fs.mkdirSync(runDir, { recursive: true });
const initrd = path.join(runDir, `initrd-${backend}-${process.pid}.img`);
try {
  const t = Date.now();
  buildInitramfs({ root: ROOT, kit, out: initrd, log });
  timings.initramfsMs = Date.now() - t;
  log(`initramfs ${(fs.statSync(initrd).size / 2 ** 20).toFixed(1)} MiB in ${timings.initramfsMs} ms`);
} catch (err) {
  fs.rmSync(initrd, { force: true });
  done(2, { ok: false, message: `cannot build the initramfs: ${err.message}` });
}

// 3. QEMU. intel-iommu must come before the devices it translates for.
fs.mkdirSync(values.artifacts, { recursive: true });
const logFile = path.join(values.artifacts, `vm-${backend}.log`);
const guestTimeout = Math.max(30, timeoutS - 30);
const args = [
  '-machine',
  'q35,accel=tcg',
  '-cpu',
  'max',
  '-smp',
  '1',
  // 4 GiB, of which the kernel takes one 1 GiB page at boot (hugepagesz=1G hugepages=1, below) for the
  // hugetlb-1g step: with 1 to 3 GiB there is no free, 1 GiB-aligned block left by then (QEMU loads the
  // initrd high in low memory, the kernel's memmap comes from the top of RAM). Guest RAM is allocated on
  // the host only as it is touched: the 1 GiB page when the step faults it in.
  '-m',
  '4G',
  '-device',
  'intel-iommu,intremap=on,eim=off',
  ...Array.from({ length: Number(values.edus) }, () => ['-device', 'edu']).flat(),
  '-nodefaults',
  '-display',
  'none',
  '-no-reboot',
  '-serial',
  'stdio',
  '-kernel',
  kernel,
  '-initrd',
  initrd,
  // no_timer_check: under TCG on a loaded host the kernel's early check of the IO-APIC timer (through
  // interrupt remapping, with intel_iommu=on) can miss its ticks and panic ("timer doesn't work through
  // Interrupt-remapped IO-APIC"); the timer works, the check is what a slow emulated CPU fails.
  '-append',
  `console=ttyS0 panic=-1 loglevel=3 intel_iommu=on no_timer_check hugepagesz=1G hugepages=1 mmb.backend=${backend} mmb.timeout=${guestTimeout} mmb.script=${values.script}`,
];
log(`${QEMU} ${args.join(' ')}`);
const out = fs.createWriteStream(logFile);
out.write(`# ${new Date().toISOString()} ${QEMU} ${args.join(' ')}\n`);
const qemuStart = Date.now();
const qemu = spawn(QEMU, args, { stdio: ['ignore', 'pipe', 'pipe'] });
let serial = '';
let pending = '';
const onData = (d) => {
  serial += d;
  out.write(d);
  pending += d;
  let nl;
  while ((nl = pending.indexOf('\n')) >= 0) {
    const line = pending.slice(0, nl).replace(/\r$/, '');
    pending = pending.slice(nl + 1);
    if (timings.bootMs === undefined && line.startsWith('MMB-VM-INIT')) timings.bootMs = Date.now() - qemuStart;
    if (values.verbose || /^MMB-VM-(STEP|RESULT|EXIT)|^MMB-VM-INIT/.test(line)) log(line.length > 600 ? `${line.slice(0, 600)}...` : line);
    // busybox's own init took over: /init did not run (and would wait for a console forever).
    if (line.includes("can't run '/etc/init.d/rcS'")) {
      stuck = 'the guest kernel did not run /init (busybox init started instead)';
      qemu.kill('SIGKILL');
    }
  }
};
qemu.stdout.setEncoding('utf8').on('data', onData);
qemu.stderr.setEncoding('utf8').on('data', onData);
let timedOut = false;
let stuck;
const killer = setTimeout(() => {
  timedOut = true;
  qemu.kill('SIGKILL');
}, timeoutS * 1000);
const onSignal = () => {
  qemu.kill('SIGKILL');
  fs.rmSync(initrd, { force: true });
  process.exit(130);
};
process.on('SIGTERM', onSignal);
process.on('SIGINT', onSignal);
const exit = await new Promise((resolve) => qemu.on('exit', (code, signal) => resolve({ code, signal })));
clearTimeout(killer);
await new Promise((r) => out.end(r));
fs.rmSync(initrd, { force: true });
timings.vmMs = Date.now() - qemuStart;

// 4. The verdict, from the guest's own lines.
const lines = serial.split('\n').map((l) => l.replace(/\r$/, ''));
const json = (tag) =>
  lines
    .filter((l) => l.startsWith(`${tag} `))
    .map((l) => {
      try {
        return JSON.parse(l.slice(tag.length + 1));
      } catch {
        return { unparsable: l };
      }
    });
const steps = json('MMB-VM-STEP');
const result = json('MMB-VM-RESULT').pop();
const guestExit = /^MMB-VM-EXIT (\d+)/m.exec(serial)?.[1];
// The console's last lines before the guest's kernel-log dump (which stays in the log file).
const dumpAt = lines.indexOf('MMB-VM-DMESG-BEGIN');
const tail = (dumpAt >= 0 ? lines.slice(0, dumpAt) : lines)
  .filter((l) => !l.startsWith('MMB-VM-STEP'))
  .slice(-40)
  .join('\n');
const summary = { steps, result, qemuExit: exit, guestExit: guestExit === undefined ? null : Number(guestExit), log: logFile };
if (timedOut)
  done(1, { ok: false, ...summary, message: `the VM did not finish within ${timeoutS} s (killed); last step: ${steps.at(-1)?.step ?? 'none'}`, tail });
if (stuck) done(1, { ok: false, ...summary, message: stuck, tail });
const failed = steps.find((s) => !s.ok);
if (!result && !failed) done(1, { ok: false, ...summary, message: `the guest printed no result (QEMU exit ${exit.code ?? exit.signal})`, tail });
if (failed || !result.ok) {
  done(1, {
    ok: false,
    ...summary,
    message: `guest step ${failed?.step ?? result?.step ?? '?'} failed: ${failed?.message ?? result?.message ?? 'see the log'}`,
    tail,
  });
}
if (guestExit !== '0')
  done(1, {
    ok: false,
    ...summary,
    message: `the guest's scenario reported success but ${guestExit === undefined ? 'printed no exit status' : `exited with ${guestExit}`}`,
    tail,
  });
done(0, { ok: true, ...summary });
