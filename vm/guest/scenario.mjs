// The VM test's scenario, run by the guest's /init (vm/guest/init) inside QEMU (q35, intel-iommu, two edu
// devices bound to vfio-pci). It runs the project's own stack from dist/: a broker (embedded, also
// listening on a socket), an owner (in-process), and a vfio-like client (VfioSubscriber, over the
// socket) with a real IOMMU backend (type1 or iommufd) and an edu device attached. It then makes edu's
// DMA engine read and write guest memory through the IOMMU mappings the client made, and judges every
// claim by what the device and the kernel do: the bytes the DMA moved (read through the owner's own
// mapping of the memfd), DMAR faults in the kernel log, VmLck / VmPin in /proc/self/status, the
// descriptors in /proc/self/fd.
//
// Output on the serial console, one line each: "MMB-VM-STEP {json}" per step (ok or not, with what was
// measured), then "MMB-VM-RESULT {json}". Exit code 0 when every step passed.
// argv: --backend type1|iommufd --devices BDF,BDF --timeout SECONDS
import { spawn } from 'node:child_process';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import readline from 'node:readline';
import { parseArgs } from 'node:util';
import {
  Broker,
  MappingSubscriber,
  Migration,
  MigrationBlockedError,
  OwnerClient,
  SpaceDestination,
  VfioSubscriber,
  native,
  constants,
  isMmbError,
  fromInclusive,
  rangeContains,
  toInclusive,
} from '/mmb/dist/index.js';
import { realSys, structs } from '/mmb/dist/clients/vfio/index.js';
import { IoasOwner } from '/mmb/dist/clients/ioas-owner.js';
import { Rng } from '/mmb/dist/testkit/rng.js';
import { Edu, EDU_MAX_DMA } from './edu.mjs';

const { values } = parseArgs({ options: { backend: { type: 'string' }, devices: { type: 'string' }, timeout: { type: 'string' } } });
const backend = values.backend ?? 'type1';
const devices = (values.devices ?? '').split(',').filter(Boolean);
const timeoutS = Number(values.timeout ?? 90);
const started = Date.now();

const KiB = 1024;
const MiB = 2 ** 20;
const hex = (n) => `0x${n.toString(16)}`;
const SOCKET = '/run/mmb/broker.sock';
const UNPRIV_UID = 1000;
const MEMLOCK_KIB = 1024; // RLIMIT_MEMLOCK of the unprivileged client
// GPAs (= IOVAs) stay below 256 MiB: edu masks DMA addresses to 28 bits.
const GPA_RAM = 0x0400_0000; // 64 MiB
const GPA_BASE = 0x0800_0000; // 128 MiB
const GPA_BIG = 0x0900_0000; // 144 MiB
const GPA_SMALL = 0x0a00_0000; // 160 MiB
// Shadow mode (docs/ioas.md): RAM the guest's IOMMU maps at IOVAs unrelated to its GPAs.
const GPA_IOMMU = 0x0c00_0000; // 192 MiB, 8 MiB of it
const IOVA_SRC = 0x0200_0000; // -> GPA_IOMMU + 0x10000, 64 KiB, read-only
const IOVA_DST = 0x0300_0000; // -> GPA_IOMMU + 0x200000, 64 KiB
// Hugetlb memory: 2 MiB pages reserved by the scenario, a 1 GiB page by the kernel at boot (vm/run.mjs:
// hugepagesz=1G hugepages=1 with 4 GiB of guest RAM). A 1 GiB region must sit on a 1 GiB boundary and edu
// reaches only [0, 256 MiB): it goes at GPA 0, once nothing else is below 1 GiB.
const GPA_HUGE = 0x0e00_0000; // 224 MiB, two 2 MiB pages
const GiB = 2 ** 30;
const MSI_WINDOW = { start: 0xfee0_0000, last: 0xfeef_ffff };
const MSI = fromInclusive(MSI_WINDOW);
/** Whether one of `ranges` (half-open, as the client holds them) covers the MSI window. */
const coversMsi = (ranges) => ranges.some((r) => rangeContains(r.start, r.size, MSI.start, MSI.size));
const PIECE = 1 * MiB; // the vfio client's pinChunkBytes

// --- reporting --------------------------------------------------------------------------------------
const print = (tag, obj) => process.stdout.write(`${tag} ${JSON.stringify(obj)}\n`);
const results = [];
let current = 'setup';

class StepFailure extends Error {}
function check(cond, message, detail) {
  if (!cond) throw new StepFailure(detail === undefined ? message : `${message} (${JSON.stringify(detail)})`);
}

async function step(name, fn) {
  current = name;
  const t0 = Date.now();
  try {
    const detail = (await fn()) ?? {};
    const r = { step: name, ok: true, ms: Date.now() - t0, ...detail };
    results.push(r);
    print('MMB-VM-STEP', r);
    return detail;
  } catch (err) {
    const r = { step: name, ok: false, ms: Date.now() - t0, message: describe(err) };
    if (!(err instanceof StepFailure) && err?.stack) r.stack = String(err.stack).split('\n').slice(0, 8).join('\n');
    results.push(r);
    print('MMB-VM-STEP', r);
    throw err;
  }
}

function describe(err) {
  if (isMmbError(err)) return `${err.code}${err.client ? ` (client ${err.client.name})` : ''}: ${err.message}`;
  return err instanceof Error ? err.message : String(err);
}

function finish(ok, extra = {}) {
  print('MMB-VM-RESULT', { ok, backend, devices, ms: Date.now() - started, steps: results.map((r) => `${r.step}:${r.ok ? 'ok' : 'FAILED'}`), ...extra });
  process.exit(ok ? 0 : 1);
}

const deadline = setTimeout(() => {
  print('MMB-VM-STEP', { step: current, ok: false, message: `the scenario's ${timeoutS} s deadline passed during this step` });
  results.push({ step: current, ok: false });
  finish(false, { step: current, message: `timed out after ${timeoutS} s in step ${current}` });
}, timeoutS * 1000);
deadline.unref();

// --- the kernel's view -----------------------------------------------------------------------------------
/** VmLck and VmPin of this process (KiB): type1 charges its pins to locked_vm, iommufd to pinned_vm. */
function pins(pid = 'self') {
  const s = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  const kb = (f) => Number(new RegExp(`^${f}:\\s+(\\d+) kB$`, 'm').exec(s)?.[1] ?? NaN);
  return { vmLck: kb('VmLck'), vmPin: kb('VmPin') };
}
/** The kernel's counter for what `backend` pins, in bytes. */
function pinnedByKernel(pid = 'self') {
  const p = pins(pid);
  return (backend === 'type1' ? p.vmLck : p.vmPin) * KiB;
}
/** VFIO / iommufd descriptors this process holds, by what they point at. */
function vfioFds() {
  return fs
    .readdirSync('/proc/self/fd')
    .map((fd) => {
      try {
        return fs.readlinkSync(`/proc/self/fd/${fd}`);
      } catch {
        return '';
      }
    })
    .filter((t) => t.startsWith('/dev/vfio') || t === '/dev/iommu' || t.includes('vfio'))
    .sort();
}
function dmesg() {
  return execFileSync('dmesg', { encoding: 'utf8' }).split('\n');
}
/** Kernel log lines added since `before` (a dmesg() result) that match `re`, waiting up to `ms`. */
async function newKernelLines(before, re, ms = 3000) {
  const end = Date.now() + ms;
  for (;;) {
    const seen = new Set(before);
    const lines = dmesg().filter((l) => !seen.has(l) && re.test(l));
    if (lines.length > 0 || Date.now() > end) return lines;
    await sleep(100);
  }
}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** What /proc/self/smaps says of the mapping of this process that starts at `address`. */
function smapsAt(address) {
  const block = fs
    .readFileSync('/proc/self/smaps', 'utf8')
    .split(/\n(?=[0-9a-f]+-[0-9a-f]+ )/)
    .find((b) => b.startsWith(`${address.toString(16)}-`));
  if (!block) return undefined;
  const kb = (f) => Number(new RegExp(`^${f}:\\s+(\\d+) kB$`, 'm').exec(block)?.[1] ?? NaN);
  return { line: block.split('\n')[0], kernelPageSizeKiB: kb('KernelPageSize'), hugetlbKiB: kb('Shared_Hugetlb') + kb('Private_Hugetlb') };
}
/** A hugetlb pool's page count (its nr_hugepages), in pages of `size` bytes. */
const hugePool = (size) => `/sys/kernel/mm/hugepages/hugepages-${size / KiB}kB/nr_hugepages`;
const poolPages = (size) => Number(fs.readFileSync(hugePool(size), 'utf8'));

// --- memory helpers --------------------------------------------------------------------------------------
const pattern = (length, seed) => new Uint8Array(new Rng(seed).bytes(length));
const equal = (a, b) => a.length === b.length && a.every((v, i) => v === b[i]);
const firstDiff = (a, b) => a.findIndex((v, i) => v !== b[i]);

/** A backing the owner creates, registers and maps itself: the owner's view of guest memory. */
async function ownerBacking(owner, size, name, opts = {}) {
  const b = await owner.createBacking(size, name, opts);
  const map = native.mmap(b.fd, 0, size, constants.PROT_READ | constants.PROT_WRITE, constants.MAP_SHARED);
  return { id: b.backing, fd: b.fd, map, bytes: new Uint8Array(map.buffer), size };
}

async function rejection(p) {
  try {
    await p;
  } catch (err) {
    return err;
  }
  return undefined;
}

function region(sub, name) {
  return sub.domain.mappings.find((m) => m.region === name);
}

// --- the unprivileged client process ---------------------------------------------------------------------
class Child {
  constructor(args) {
    // uid 1000 has no capabilities (no CAP_IPC_LOCK); `ulimit -l` sets its RLIMIT_MEMLOCK (KiB).
    this.proc = spawn('/bin/sh', ['-c', `ulimit -l ${MEMLOCK_KIB} && exec node /mmb/vm/guest/unprivileged-client.mjs "$@"`, 'sh', ...args], {
      uid: UNPRIV_UID,
      gid: UNPRIV_UID,
      stdio: ['pipe', 'pipe', 'pipe'],
      cwd: '/mmb',
    });
    this.events = [];
    this.waiters = [];
    this.stderr = '';
    this.proc.stderr.setEncoding('utf8').on('data', (d) => (this.stderr += d));
    readline.createInterface({ input: this.proc.stdout }).on('line', (line) => {
      let ev;
      try {
        ev = JSON.parse(line);
      } catch {
        ev = { event: 'text', line };
      }
      this.events.push(ev);
      for (const w of [...this.waiters]) w();
    });
    this.exit = new Promise((r) => this.proc.on('exit', (code, signal) => r({ code, signal })));
  }

  next(event, ms = 20000, from = 0) {
    return new Promise((resolve, reject) => {
      const look = () => {
        const ev = this.events.slice(from).find((e) => e.event === event || e.event === 'attachFailed');
        if (!ev) return false;
        this.waiters = this.waiters.filter((w) => w !== look);
        clearTimeout(timer);
        if (ev.event === 'attachFailed' && event !== 'attachFailed') reject(new StepFailure(`unprivileged client failed to attach: ${ev.code}: ${ev.message}`));
        else resolve(ev);
        return true;
      };
      const timer = setTimeout(() => {
        this.waiters = this.waiters.filter((w) => w !== look);
        reject(new StepFailure(`no "${event}" from the unprivileged client in ${ms} ms; stderr: ${this.stderr.slice(-2000)}`));
      }, ms);
      if (!look()) this.waiters.push(look);
    });
  }

  async request(cmd, event) {
    const from = this.events.length;
    this.proc.stdin.write(JSON.stringify(cmd) + '\n');
    return this.next(event, 20000, from);
  }
}

// --- every VFIO / iommufd call this process makes, with the kernel's answer ----------------------------------
// The backends call the kernel through realSys; wrapping it records each request and its errno, so that a
// failure the client swallows (a detach, an unset-container) cannot go unnoticed.
const calls = [];
const REQUEST_NAMES = new Map(Object.entries(structs.REQUEST).map(([name, nr]) => [nr, name]));
// One number, two requests: VFIO_IOMMU_DIRTY_PAGES on the container, VFIO_DEVICE_FEATURE on a device.
const requestName = (fd, nr) =>
  nr === structs.REQUEST.VFIO_IOMMU_DIRTY_PAGES
    ? fs.readlinkSync(`/proc/self/fd/${fd}`) === '/dev/vfio/vfio'
      ? 'VFIO_IOMMU_DIRTY_PAGES'
      : 'VFIO_DEVICE_FEATURE'
    : (REQUEST_NAMES.get(nr) ?? `request ${nr}`);
for (const fn of ['open', 'ioctlInt', 'ioctl', 'ioctlAsync', 'groupGetDeviceFd']) {
  const orig = realSys[fn];
  realSys[fn] = (...args) => {
    const what = fn === 'open' ? `open ${args[0]}` : fn === 'groupGetDeviceFd' ? 'VFIO_GROUP_GET_DEVICE_FD' : requestName(args[0], args[1]);
    const record = (errno) => calls.push({ step: current, what, errno });
    try {
      const r = orig(...args);
      if (r instanceof Promise)
        return r.then(
          (v) => (record(null), v),
          (e) => (record(e?.code ?? String(e)), Promise.reject(e)),
        );
      record(null);
      return r;
    } catch (e) {
      record(e?.code ?? String(e));
      throw e;
    }
  };
}
/** Failures the scenario provokes on purpose, by step: anything else failing is a finding. */
const EXPECTED_FAILURES = [
  { what: 'IOMMU_IOAS_IOVA_RANGES', errno: 'EMSGSIZE' }, // the "how many ranges?" call
  // edu has no VFIO migration driver; the emulated intel-iommu has no dirty tracking (iommufd).
  { what: 'VFIO_DEVICE_FEATURE', errno: 'ENOTTY' },
  { what: 'IOMMU_HWPT_SET_DIRTY_TRACKING', errno: 'EOPNOTSUPP' }, // asked each time logging starts
  { step: 'dirty-tracking', what: 'IOMMU_HWPT_ALLOC', errno: 'EOPNOTSUPP' },
  { step: 'msi-window-refused', what: /MAP/, errno: 'EINVAL' },
  { step: 'detach-while-bar-mapped', what: 'VFIO_GROUP_UNSET_CONTAINER', errno: 'EBUSY' }, // the device is still open
  // (the nesting step adds the errno with which the kernel refuses a nesting parent, if it does)
];

// --- the scenario ----------------------------------------------------------------------------------------
let broker;
let owner;
let vfio;
const edus = new Map();
let ram;
const changes = [];

try {
  check(devices.length >= 1, 'no edu device was bound to vfio-pci');
  const [dev0, dev1] = devices;

  await step('attach', async () => {
    fs.mkdirSync('/run/mmb', { recursive: true, mode: 0o755 });
    // Subscribers may be root or the unprivileged client's uid (the socket is opened to everyone: 0666).
    broker = new Broker({ spaces: ['vm0'], limits: { ackTimeoutMs: 30000 }, access: { subscribers: { uids: [0, UNPRIV_UID] } } });
    broker.listen(SOCKET, { mode: 0o666 });
    owner = await OwnerClient.attach(broker, { space: 'vm0' });
    const before = vfioFds();
    // Pieces of 1 MiB: a 2 MiB region takes two MAP_DMA / IOAS_MAP calls, and a DMA can cross them.
    vfio = await VfioSubscriber.attach(SOCKET, { space: 'vm0', name: 'vfio-edu', backend, devices: [dev0], reconnect: false, pinChunkBytes: PIECE });
    vfio.on('change', (ev) =>
      changes.push({
        at: Date.now(),
        generation: ev.change.generation,
        added: ev.change.added.map((r) => r.name),
        removed: ev.change.removed.map((r) => r.name),
      }),
    );
    const d = vfio.domain;
    check(d.backend === backend && d.active && !d.software, 'the client has an active hardware domain', d);
    check(coversMsi(d.reserved), `the kernel's usable IOVA ranges exclude the MSI window ${hex(MSI_WINDOW.start)}-${hex(MSI_WINDOW.last)}`, d.reserved);
    const limits = vfio.backend.limits();
    const st = (await owner.status()).spaces[0].clients.find((c) => c.name === 'vfio-edu');
    check(st?.backend === backend && coversMsi((st.reserved ?? []).map((r) => fromInclusive(r))), 'the broker has the reported reserved ranges', st);
    const info = vfio.device(dev0).info();
    return {
      device: dev0,
      usable: (limits.usable ?? []).map((r) => `${hex(Number(r.start))}-0x${r.last.toString(16)}`),
      reserved: d.reserved.map((r) => toInclusive(r)).map((r) => `${hex(r.start)}-${hex(r.last)}`),
      coherent: d.coherent ?? null,
      dmaAvailable: d.dmaAvailable ?? null,
      deviceInfo: info,
      fds: vfioFds().filter((f) => !before.includes(f)),
    };
  });

  await step('edu', async () => {
    const e = new Edu(vfio.device(dev0));
    edus.set(dev0, e);
    return { device: dev0, id: hex(e.id), bar0: { offset: hex(e.bar.offset), size: hex(e.bar.size) }, pciCommand: hex(e.command) };
  });

  await step('reserved-before-open', async () => {
    // A client that will attach a device later reports the reserved regions sysfs shows for the device's
    // IOMMU group before anything of it is opened (VfioSubscriber reserveFor), in a space of its own so that
    // only its report counts: placement avoids them and RAM over them is refused from the start.
    const dev = dev1 ?? dev0;
    const file = `/sys/bus/pci/devices/${dev}/iommu_group/reserved_regions`;
    const sysfs = fs.readFileSync(file, 'utf8').trim().split('\n');
    broker.createSpace('vm-early');
    const early = await OwnerClient.attach(broker, { space: 'vm-early' });
    const callsBefore = calls.length;
    const sub = await VfioSubscriber.attach(SOCKET, { space: 'vm-early', name: 'vfio-early', backend, devices: [], reserveFor: [dev], reconnect: false });
    const opened = calls
      .slice(callsBefore)
      .filter((c) => c.what.startsWith('open '))
      .map((c) => c.what.slice('open '.length));
    check(sub.domain.devices.length === 0 && !sub.domain.active, 'the client has no device', sub.domain);
    check(
      opened.every((p) => p === '/dev/vfio/vfio' || p === '/dev/iommu'),
      'it opened no group or device node, only the container / iommufd',
      opened,
    );
    const st = broker.status('vm-early').spaces[0].clients.find((c) => c.name === 'vfio-early');
    const reported = (st?.reserved ?? []).map((r) => `${hex(r.start)}-${hex(r.last)}`);
    check(reported.includes(`${hex(MSI_WINDOW.start)}-${hex(MSI_WINDOW.last)}`), 'the broker has the MSI window sysfs shows, from the first REPORT', {
      sysfs,
      reported,
    });
    const placed = await early.findFree(4 * MiB, { align: 2 * MiB, min: 0xfec0_0000 });
    check(placed === 0xff00_0000, 'FIND_FREE steps over the window', hex(placed));
    const b = await early.createBacking(2 * MiB, 'early-ram');
    const err = await rejection(early.addRegion({ name: 'over-msi', gpa: MSI_WINDOW.start, size: 2 * MiB, backing: b.backing }));
    check(
      isMmbError(err) && err.code === 'MMB_ERR_RESERVED_RANGE' && err.client?.name === 'vfio-early',
      'RAM over the window is refused, naming the client that has no device yet',
      { code: err?.code, client: err?.client },
    );
    await sub.close();
    native.close(b.fd);
    early.close();
    return { device: dev, sysfs, opened, reported, findFree: hex(placed), refused: { code: err.code, client: err.client.name } };
  });

  await step('hotplug-dma', async () => {
    ram = await ownerBacking(owner, 2 * MiB, 'dma-ram');
    const k0 = pinnedByKernel();
    const avail0 = vfio.domain.dmaAvailable;
    await owner.addRegion({ name: 'dma-ram', gpa: GPA_RAM, size: ram.size, backing: ram.id });
    const m = region(vfio, 'dma-ram');
    check(
      m && m.iova === GPA_RAM && m.size === ram.size && m.pieces === ram.size / PIECE,
      `the client mapped the region at IOVA = GPA in ${ram.size / PIECE} pieces`,
      vfio.domain.mappings,
    );
    const k1 = pinnedByKernel();
    check(k1 - k0 === ram.size, `the kernel counts ${ram.size} more bytes pinned (${backend === 'type1' ? 'VmLck' : 'VmPin'})`, { before: k0, after: k1 });
    const avail1 = vfio.domain.dmaAvailable;
    if (backend === 'type1') check(avail0 - avail1 === m.pieces, 'type1 DMA_AVAIL went down by one per piece', { avail0, avail1 });

    const edu = edus.get(dev0);
    const copies = [];
    // One copy inside the first piece, one from across the boundary between the two pieces.
    for (const [src, dst, seed] of [
      [0x1000, 0x10000, 0xc0ffee],
      [PIECE - 0x800, PIECE + 0x40000, 0x5eed],
    ]) {
      const data = pattern(EDU_MAX_DMA, seed);
      ram.bytes.set(data, src);
      ram.bytes.fill(0, dst, dst + 2 * EDU_MAX_DMA);
      const t0 = Date.now();
      await edu.copy(GPA_RAM + src, GPA_RAM + dst, EDU_MAX_DMA);
      const got = ram.bytes.slice(dst, dst + EDU_MAX_DMA);
      check(
        equal(got, data),
        `the DMA copy of ${EDU_MAX_DMA} bytes from ${hex(GPA_RAM + src)} arrived at ${hex(GPA_RAM + dst)} (first difference at byte ${firstDiff(got, data)})`,
      );
      check(ram.bytes[dst + EDU_MAX_DMA] === 0, 'nothing beyond the transfer was written');
      copies.push({ from: hex(GPA_RAM + src), to: hex(GPA_RAM + dst), bytes: EDU_MAX_DMA, ms: Date.now() - t0 });
    }
    return { gpa: hex(GPA_RAM), size: ram.size, pieces: m.pieces, copies, kernelPinnedDelta: k1 - k0, dmaAvailable: [avail0 ?? null, avail1 ?? null] };
  });

  await step('hugetlb-2m', async () => {
    // Memory of 2 MiB pages (a hugetlb memfd), pinned and IOMMU-mapped by the client and reached by edu.
    const HUGE = 2 * MiB;
    const nr0 = poolPages(HUGE);
    fs.writeFileSync(hugePool(HUGE), String(nr0 + 2));
    check(poolPages(HUGE) === nr0 + 2, 'the guest reserved two 2 MiB pages', { nr0, nr1: poolPages(HUGE) });
    const size = 2 * HUGE;
    const huge = await ownerBacking(owner, size, 'huge-2m', { hugetlb: HUGE });
    // Off a huge page boundary: refused at planning.
    const off = await rejection(owner.addRegion({ name: 'huge-off', gpa: GPA_HUGE + 4 * KiB, size: HUGE, backing: huge.id }));
    check(isMmbError(off) && off.code === 'MMB_ERR_UNALIGNED', 'a region off the 2 MiB boundary is refused before anything is sent', { code: off?.code });
    const k0 = pinnedByKernel();
    const avail0 = vfio.domain.dmaAvailable;
    await owner.addRegion({ name: 'huge-2m', gpa: GPA_HUGE, size, backing: huge.id });
    const m = region(vfio, 'huge-2m');
    check(m && m.iova === GPA_HUGE && m.pieces === size / PIECE, `mapped at IOVA = GPA in ${size / PIECE} pieces`, vfio.domain.mappings);
    const local = vfio.memory.regions().find((x) => x.region.name === 'huge-2m');
    const sm = smapsAt(local.address);
    check(local.address % HUGE === 0 && sm?.kernelPageSizeKiB === HUGE / KiB, 'the client maps it on a 2 MiB boundary, with 2 MiB pages', {
      address: hex(local.address),
      sm,
    });
    check(sm.hugetlbKiB === size / KiB, 'pinning faulted both huge pages in', sm);
    const k1 = pinnedByKernel();
    check(k1 - k0 === size, `the kernel counts ${size} more bytes pinned`, { k0, k1 });
    const avail1 = vfio.domain.dmaAvailable;
    if (backend === 'type1') check(avail0 - avail1 === m.pieces, 'type1 DMA_AVAIL went down by one per piece', { avail0, avail1 });
    const copies = [];
    // Inside the first page, and from the end of the first page into the second.
    for (const [src, dst, seed] of [
      [0x1000, HUGE + 0x1000, 0x2b16],
      [HUGE - 0x800, HUGE + 0x80000, 0x2b17],
    ]) {
      const data = pattern(EDU_MAX_DMA, seed);
      huge.bytes.set(data, src);
      huge.bytes.fill(0, dst, dst + EDU_MAX_DMA);
      await edus.get(dev0).copy(GPA_HUGE + src, GPA_HUGE + dst, EDU_MAX_DMA);
      check(equal(huge.bytes.slice(dst, dst + EDU_MAX_DMA), data), `the DMA copy from ${hex(GPA_HUGE + src)} arrived at ${hex(GPA_HUGE + dst)}`);
      copies.push({ from: hex(GPA_HUGE + src), to: hex(GPA_HUGE + dst) });
    }
    await owner.removeRegion('huge-2m');
    check(pinnedByKernel() === k0 && !region(vfio, 'huge-2m'), 'removed: unpinned in the kernel', { k0, now: pinnedByKernel() });
    native.munmap(huge.map);
    native.close(huge.fd);
    await owner.dropBacking(huge.id);
    fs.writeFileSync(hugePool(HUGE), String(nr0));
    return {
      pages: 2,
      unaligned: off.code,
      hostAddress: hex(local.address),
      smaps: sm,
      pieces: m.pieces,
      kernelPinnedDelta: k1 - k0,
      dmaAvailable: [avail0 ?? null, avail1 ?? null],
      copies,
    };
  });

  await step('dirty-tracking', async () => {
    // The kernel's dirty tracking, read by the client while the region logs. type1: VFIO_IOMMU_DIRTY_PAGES
    // (without a vendor driver, every mapped page of a GET_BITMAP range is reported); iommufd: the emulated
    // intel-iommu has no dirty bits, so SET_DIRTY_TRACKING answers EOPNOTSUPP and every page counts.
    const migration = vfio.migrationSupport();
    check(
      migration.devices.length === 1 && !migration.devices[0].supported && /ENOTTY/.test(migration.devices[0].reason),
      'edu has no VFIO migration support (VFIO_DEVICE_FEATURE: ENOTTY)',
      migration,
    );
    const callsBefore = calls.length;
    await owner.commit([{ op: 'set', region: 'dma-ram', logDirty: true }]);
    const tracking = vfio.domain.dirtyTracking;
    const st = (await owner.status()).spaces[0].clients.find((c) => c.name === 'vfio-edu');
    if (backend === 'type1') check(tracking?.mode === 'type1', 'type1 tracks dirty pages (VFIO_IOMMU_DIRTY_PAGES)', tracking);
    else check(tracking?.mode === 'none' && /EOPNOTSUPP/.test(tracking.reason ?? ''), 'iommufd: no dirty tracking on this IOMMU (EOPNOTSUPP)', tracking);
    const extra = {};
    if (backend === 'iommufd') {
      // What the kernel says directly: no dirty capability, and a DIRTY_TRACKING page table is refused.
      const b = vfio.backend.binding(dev0);
      const info = structs.pack('iommu_hw_info', { dev_id: b.devid, data_len: 0 });
      realSys.ioctl(vfio.backend.iommufd, structs.REQUEST.IOMMU_GET_HW_INFO, info);
      extra.hwCapabilities = Number(structs.unpack('iommu_hw_info', info).out_capabilities);
      const alloc = structs.pack('iommu_hwpt_alloc', { flags: structs.IOMMUFD.IOMMU_HWPT_ALLOC_DIRTY_TRACKING, dev_id: b.devid, pt_id: vfio.backend.ioasId });
      const e = await rejection(Promise.resolve().then(() => realSys.ioctl(vfio.backend.iommufd, structs.REQUEST.IOMMU_HWPT_ALLOC, alloc)));
      extra.hwptAllocDirty = e ? e.code : 'accepted';
      check(extra.hwCapabilities === 0 && extra.hwptAllocDirty === 'EOPNOTSUPP', 'the emulated IOMMU offers no dirty tracking', extra);
    }
    // A device write after a clean sync is in the next one (with every other page the kernel reports).
    (await owner.dirtySync()).release();
    const data = pattern(EDU_MAX_DMA, 0xd1d);
    ram.bytes.set(data, 0x3000);
    await edus.get(dev0).copy(GPA_RAM + 0x3000, GPA_RAM + 0x9000, EDU_MAX_DMA);
    check(equal(ram.bytes.slice(0x9000, 0x9000 + EDU_MAX_DMA), data), 'the DMA landed');
    const snap = await owner.dirtySync();
    const r = snap.regions.find((x) => x.name === 'dma-ram');
    const bit = (p) => (r.bits[p >> 3] >> (p & 7)) & 1;
    const pages = ram.size / 4096;
    check(r && bit(9) === 1 && r.dirty === pages, `the written page (and, as the kernel reports, all ${pages} pages) is dirty`, { dirty: r?.dirty });
    snap.release();
    if (backend === 'type1') {
      // The kernel's own bitmap for the region: every mapped page, though the device wrote one.
      const bits = vfio.backend.readDirty(GPA_RAM, ram.size);
      extra.kernelBitmapPages = bits.reduce((n, b) => n + (b.toString(2).match(/1/g) ?? []).length, 0);
      check(extra.kernelBitmapPages === pages, 'type1 reports every mapped page (no vendor driver pins pages)', extra);
    }
    await owner.commit([{ op: 'set', region: 'dma-ram', logDirty: false }]);
    check(vfio.domain.dirtyTracking === undefined, 'tracking stops with the last logging region');
    const stAfter = (await owner.status()).spaces[0].clients.find((c) => c.name === 'vfio-edu');
    const dirtyCalls = calls
      .slice(callsBefore)
      .filter((c) => /DIRTY/.test(c.what))
      .map((c) => `${c.what}${c.errno ? ` ${c.errno}` : ''}`);
    // The backend's name, and while it logs, the tracker in use (REPORT.dirtyTracking, feature MIGRATION).
    const said = (c) => (c?.dirtyTracking && c.dirtyTracking !== 'none' ? `${c.backend} (dirty: ${c.dirtyTracking})` : c?.backend);
    return {
      tracking,
      backendWhileLogging: said(st),
      backendAfter: said(stAfter),
      dirtyPages: r.dirty,
      deviceMigration: migration.devices[0],
      dirtyCalls,
      ...extra,
    };
  });

  await step('migrate-with-dma', async () => {
    // A migration of vm0 into another space while edu DMAs into it: blocked (edu cannot be quiesced and
    // has no migratable state) until the risk is accepted; then the device's write after the first copy
    // is at the destination, carried by the kernel's report (type1) or the all-dirty rule (iommufd).
    broker.createSpace('vm1');
    const reader = await MappingSubscriber.attach(broker, { space: 'vm0', name: 'migration-reader', writes: false, reconnect: false });
    const blocked = await rejection(new Migration(owner, reader, new SpaceDestination(broker, 'vm1')).run());
    check(blocked instanceof MigrationBlockedError && blocked.client?.name === 'vfio-edu', 'the migration is blocked by the vfio client', {
      code: blocked?.code,
      client: blocked?.client,
      message: blocked?.message,
    });
    const data = pattern(EDU_MAX_DMA, 0x1a7e);
    ram.bytes.set(data, 0x5000);
    ram.bytes.fill(0, 0xa000, 0xa000 + EDU_MAX_DMA);
    let dmaAfterFirstCopy = false;
    const result = await new Migration(owner, reader, new SpaceDestination(broker, 'vm1')).run({
      acceptDeviceRisk: true,
      keepPaused: true,
      onProgress: async (p) => {
        if (p.round !== 0) return;
        await edus.get(dev0).copy(GPA_RAM + 0x5000, GPA_RAM + 0xa000, EDU_MAX_DMA);
        dmaAfterFirstCopy = equal(ram.bytes.slice(0xa000, 0xa000 + EDU_MAX_DMA), data);
      },
    });
    const copy = await MappingSubscriber.attach(broker, { space: 'vm1', name: 'copy', writes: false, reconnect: false });
    const there = copy.memory.read(GPA_RAM + 0xa000, EDU_MAX_DMA);
    await owner.resume();
    await copy.close();
    await reader.close();
    check(dmaAfterFirstCopy && result.verified === true, 'migrated and verified after a DMA write following the first copy', {
      verified: result.verified,
      dmaAfterFirstCopy,
    });
    check(equal(there, data), 'the bytes the device wrote after the first copy are at the destination');
    return {
      blocked: { code: blocked.code, client: blocked.client.name },
      verified: result.verified,
      rounds: result.rounds.map((r) => `${r.phase}:${r.pages}`),
      acceptedRisks: result.acceptedRisks.map((b) => b.client.name),
      dmaAfterFirstCopy,
    };
  });

  await step('readonly-toggle', async () => {
    // A fresh pattern the device reads while the region is read-only; its buffer then holds it.
    const src = 0x60000;
    const dst = 0x70000;
    const data = pattern(EDU_MAX_DMA, 0x0dd);
    ram.bytes.set(data, src);
    ram.bytes.fill(0x33, dst, dst + EDU_MAX_DMA);
    const k0 = pinnedByKernel();
    await owner.commit([{ op: 'set', region: 'dma-ram', readonly: true }]);
    const m = region(vfio, 'dma-ram');
    check(m?.readonly === true && pinnedByKernel() === k0, 'the client re-mapped the region read-only (pinned once)', { m, k0, k1: pinnedByKernel() });
    const edu = edus.get(dev0);
    const before = dmesg();
    await edu.dma({ src: GPA_RAM + src, dst: 0x40000, count: EDU_MAX_DMA, toRam: false });
    await edu.dma({ src: 0x40000, dst: GPA_RAM + dst, count: EDU_MAX_DMA, toRam: true });
    check(
      ram.bytes.slice(dst, dst + EDU_MAX_DMA).every((b) => b === 0x33),
      'a DMA write into the read-only region did not land',
    );
    const faults = await newKernelLines(before, /DMAR:.*DMA Write/);
    check(
      faults.some((l) => l.includes(`fault addr ${hex(GPA_RAM + dst)}`)),
      'the guest kernel logged the write fault',
      faults,
    );
    await owner.commit([{ op: 'set', region: 'dma-ram', readonly: false }]);
    check(region(vfio, 'dma-ram')?.readonly === false && pinnedByKernel() === k0, 'writable again, pinned once', region(vfio, 'dma-ram'));
    await edu.dma({ src: 0x40000, dst: GPA_RAM + dst, count: EDU_MAX_DMA, toRam: true });
    check(equal(ram.bytes.slice(dst, dst + EDU_MAX_DMA), data), 'the device had read the region while it was read-only, and writes land again');
    return { dmarWrite: faults.map((l) => l.replace(/^\[[^\]]*\]\s*/, '')) };
  });

  await step('replace-in-one-commit', async () => {
    // One transaction removes the region and adds another backing at the same GPA: the old IOVA mapping
    // must be gone before the new one is made (the kernel refuses overlaps), and DMA reaches the new memory.
    const other = await ownerBacking(owner, ram.size, 'dma-ram-b');
    const data = pattern(EDU_MAX_DMA, 0xb0b);
    other.bytes.set(data, 0x1000);
    ram.bytes.fill(0x44, 0x80000, 0x80000 + EDU_MAX_DMA);
    const g0 = (await owner.status()).spaces[0].generation;
    const k0 = pinnedByKernel();
    await owner.commit([
      { op: 'remove', region: 'dma-ram' },
      { op: 'add', name: 'dma-ram-b', gpa: GPA_RAM, size: other.size, backing: other.id, offset: 0 },
    ]);
    const g1 = (await owner.status()).spaces[0].generation;
    check(
      g1 === g0 + 1 && region(vfio, 'dma-ram-b')?.gpa === GPA_RAM && !region(vfio, 'dma-ram'),
      'one generation; the client maps the new backing at the same GPA',
      vfio.domain.mappings,
    );
    check(pinnedByKernel() === k0, 'the kernel pins the same amount (old unpinned, new pinned)', { k0, k1: pinnedByKernel() });
    await edus.get(dev0).copy(GPA_RAM + 0x1000, GPA_RAM + 0x80000, EDU_MAX_DMA);
    check(equal(other.bytes.slice(0x80000, 0x80000 + EDU_MAX_DMA), data), 'the DMA went to the new memory');
    check(
      ram.bytes.slice(0x80000, 0x80000 + EDU_MAX_DMA).every((b) => b === 0x44),
      'and not to the old one',
    );
    await owner.commit([
      { op: 'remove', region: 'dma-ram-b' },
      { op: 'add', name: 'dma-ram', gpa: GPA_RAM, size: ram.size, backing: ram.id, offset: 0 },
    ]);
    check(region(vfio, 'dma-ram') && pinnedByKernel() === k0, 'and back');
    native.munmap(other.map);
    native.close(other.fd);
    await owner.dropBacking(other.id);
    return { generations: [g0, g1] };
  });

  await step('rollback-while-pinning', async () => {
    // Another subscriber refuses a 64 MiB hotplug once the vfio client has mapped a few of its 64 pieces:
    // the broker rolls back at once, and the client must unmap (UNMAP_DMA / IOAS_UNMAP) what it mapped.
    const bulk = await owner.createBacking(64 * MiB, 'bulk');
    native.close(bulk.fd);
    const k0 = pinnedByKernel();
    const avail0 = vfio.domain.dmaAvailable;
    const progress = [];
    const onProgress = (p) => p.region === 'bulk' && progress.push(p.done);
    vfio.on('pinProgress', onProgress);
    const nacker = await MappingSubscriber.attach(broker, { space: 'vm0', name: 'nacker', reconnect: false });
    nacker.on('change', (ev) => {
      if (!ev.change.added.some((r) => r.name === 'bulk')) return;
      ev.waitUntil(
        (async () => {
          const end = Date.now() + 20000;
          while (progress.length < 3 && Date.now() < end) await sleep(5);
          throw new Error('nacker refuses bulk');
        })(),
      );
    });
    const g0 = (await owner.status()).spaces[0].generation;
    const err = await rejection(owner.addRegion({ name: 'bulk', gpa: 0x1_0000_0000, size: 64 * MiB, backing: bulk.backing }));
    vfio.off('pinProgress', onProgress);
    await nacker.close();
    check(isMmbError(err) && err.client?.name === 'nacker', 'the hotplug was refused by the other subscriber', { code: err?.code, client: err?.client });
    check((await owner.status()).spaces[0].generation === g0 && !region(vfio, 'bulk'), 'rolled back');
    check(progress.length >= 3 && progress.at(-1) < 64 * MiB, 'the vfio client had pinned part of it, not all', progress);
    check(pinnedByKernel() === k0, 'the kernel holds none of it pinned', { k0, k1: pinnedByKernel() });
    if (backend === 'type1') check(vfio.domain.dmaAvailable === avail0, 'every DMA mapping was given back', { avail0, avail1: vfio.domain.dmaAvailable });
    await owner.dropBacking(bulk.backing);
    return { code: err.code, client: err.client?.name, piecesPinnedBeforeRollback: progress.length, bytesPinnedBeforeRollback: progress.at(-1) };
  });

  await step('remove-then-dma-faults', async () => {
    const k0 = pinnedByKernel();
    const order = [];
    const onChange = (ev) => {
      if (ev.change.removed.some((r) => r.name === 'dma-ram'))
        order.push({ what: 'client-unmapped', mapped: Boolean(region(vfio, 'dma-ram')), kernelPinned: pinnedByKernel() });
    };
    vfio.on('change', onChange);
    await owner.removeRegion('dma-ram');
    order.push({ what: 'removal-complete', mapped: Boolean(region(vfio, 'dma-ram')), kernelPinned: pinnedByKernel() });
    vfio.off('change', onChange);
    check(order.length === 2 && order[0].what === 'client-unmapped', 'the removal completed only after the client had unmapped', order);
    check(!order[0].mapped && order[0].kernelPinned === k0 - ram.size, 'when the client acked, the kernel had already unpinned the region', { k0, order });

    // The owner still maps the memfd; the device must no longer reach it.
    const dst = 0x20000;
    ram.bytes.fill(0x5a, dst, dst + EDU_MAX_DMA + 1);
    const before = dmesg();
    const edu = edus.get(dev0);
    await edu.dma({ src: 0x40000, dst: GPA_RAM + dst, count: EDU_MAX_DMA, toRam: true }); // the buffer still holds the pattern
    const untouched = ram.bytes.slice(dst, dst + EDU_MAX_DMA).every((b) => b === 0x5a);
    check(untouched, 'a DMA write to the removed GPA did not reach the old memory');
    const faults = await newKernelLines(before, /DMAR:.*DMA Write/);
    const want = `fault addr ${hex(GPA_RAM + dst)}`;
    check(
      faults.some((l) => l.includes(want)),
      `the guest kernel logged a DMAR write fault at ${hex(GPA_RAM + dst)}`,
      faults,
    );
    // A read from the removed GPA faults too (the device gets no data from the old memory).
    const before2 = dmesg();
    await edu.dma({ src: GPA_RAM + 0x1000, dst: 0x40000, count: 64, toRam: false });
    const readFaults = await newKernelLines(before2, /DMAR:.*DMA Read/);
    check(
      readFaults.some((l) => l.includes(`fault addr ${hex(GPA_RAM + 0x1000)}`)),
      'a DMA read from the removed GPA faulted too',
      readFaults,
    );
    return { order, dmarWrite: faults.map((l) => l.replace(/^\[[^\]]*\]\s*/, '')), dmarRead: readFaults.map((l) => l.replace(/^\[[^\]]*\]\s*/, '')) };
  });

  await step('msi-window-refused', async () => {
    const over = await ownerBacking(owner, 1 * MiB, 'over-msi');
    const g0 = (await owner.status()).spaces[0].generation;
    const seen = changes.length;
    const err = await rejection(owner.addRegion({ name: 'over-msi', gpa: MSI_WINDOW.start, size: over.size, backing: over.id }));
    check(isMmbError(err), 'hotplugging RAM over the MSI window is refused', String(err));
    check(err.code === 'MMB_ERR_RESERVED_RANGE' && err.client?.name === 'vfio-edu', 'refused with MMB_ERR_RESERVED_RANGE naming the vfio client', {
      code: err.code,
      client: err.client,
      message: err.message,
    });
    const s = (await owner.status()).spaces[0];
    check(s.generation === g0 && !s.regions.some((r) => r.name === 'over-msi'), 'nothing changed: same generation, no such region', { g0, g1: s.generation });
    check(changes.length === seen && !region(vfio, 'over-msi'), 'the vfio client never saw the change');

    // The kernel itself refuses that IOVA: a raw map of the window through the backend fails.
    const piece = { iova: MSI_WINDOW.start, size: over.size, vaddr: over.map.address, mapping: over.map, offset: 0, readonly: false };
    const raw = await rejection(vfio.backend.map(piece));
    if (!raw) await vfio.backend.unmap(piece);
    check(raw, `the kernel refuses a ${backend} mapping at ${hex(MSI_WINDOW.start)} too`);
    native.munmap(over.map);
    native.close(over.fd);
    await owner.dropBacking(over.id);
    return { code: err.code, client: err.client?.name, message: err.message, kernelRefusal: `${raw.code} ${raw.errno}: ${raw.message}` };
  });

  if (dev1) {
    await step('rlimit-memlock-refused', async () => {
      // The device nodes the unprivileged client opens.
      const nodes = ['/dev/vfio/vfio', '/dev/iommu', `/dev/vfio/${fs.readlinkSync(`/sys/bus/pci/devices/${dev1}/iommu_group`).split('/').pop()}`];
      const cdevDir = `/sys/bus/pci/devices/${dev1}/vfio-dev`;
      if (fs.existsSync(cdevDir)) for (const c of fs.readdirSync(cdevDir)) nodes.push(`/dev/vfio/devices/${c}`);
      for (const n of nodes) if (fs.existsSync(n)) fs.chownSync(n, UNPRIV_UID, UNPRIV_UID);

      const base = await ownerBacking(owner, 256 * KiB, 'base');
      await owner.addRegion({ name: 'base', gpa: GPA_BASE, size: base.size, backing: base.id });
      const child = new Child(['--socket', SOCKET, '--space', 'vm0', '--name', 'vfio-unpriv', '--backend', backend, '--device', dev1]);
      const ready = await child.next('ready', 30000);
      check(ready.uid === UNPRIV_UID && !ready.capIpcLock, 'the client runs as uid 1000 without CAP_IPC_LOCK', ready);
      check(ready.memlockLimit === MEMLOCK_KIB * KiB, `its RLIMIT_MEMLOCK is ${MEMLOCK_KIB} KiB`, ready);
      check(ready.domain.pinnedBytes === base.size, 'under the limit, it pinned the existing 256 KiB region', ready.domain);

      const big = await ownerBacking(owner, 4 * MiB, 'big');
      const g0 = (await owner.status()).spaces[0].generation;
      const k0 = pinnedByKernel();
      const before = dmesg();
      const err = await rejection(owner.addRegion({ name: 'big', gpa: GPA_BIG, size: big.size, backing: big.id }));
      check(isMmbError(err), "a 4 MiB hotplug beyond the client's RLIMIT_MEMLOCK is refused", String(err));
      check(err.code === 'MMB_ERR_PIN_FAILED' && err.client?.name === 'vfio-unpriv', 'refused with MMB_ERR_PIN_FAILED naming the unprivileged client', {
        code: err.code,
        client: err.client,
        message: err.message,
      });
      const errno = isMmbError(err.cause) ? err.cause.errno : err.errno;
      const s = (await owner.status()).spaces[0];
      check(s.generation === g0 && !s.regions.some((r) => r.name === 'big'), 'rolled back: same generation, no such region', { g0, g1: s.generation });
      check(!region(vfio, 'big') && pinnedByKernel() === k0, 'the other vfio client holds nothing of it (unmapped, unpinned in the kernel)', {
        k0,
        k1: pinnedByKernel(),
      });
      const d = await child.request({ cmd: 'domain' }, 'domain');
      check(
        d.domain.pinnedBytes === base.size && d.domain.mappings.length === 1,
        'the refusing client is alive, still with only the old region pinned',
        d.domain,
      );
      const rlimitLog = await newKernelLines(before, /RLIMIT_MEMLOCK/, backend === 'type1' ? 3000 : 300);
      if (backend === 'type1') check(rlimitLog.length > 0, 'type1 logged the RLIMIT_MEMLOCK refusal', rlimitLog);

      // Under the limit it still works: a 512 KiB hotplug is pinned by both clients.
      const small = await ownerBacking(owner, 512 * KiB, 'small');
      await owner.addRegion({ name: 'small', gpa: GPA_SMALL, size: small.size, backing: small.id });
      const d2 = await child.request({ cmd: 'domain' }, 'domain');
      check(d2.domain.pinnedBytes === base.size + small.size, 'a hotplug under the limit is pinned by the unprivileged client', d2.domain);
      check(Boolean(region(vfio, 'small')), 'and by the other client');
      const childPins = { vmLckKiB: d2.vmLckKiB, vmPinKiB: d2.vmPinKiB };

      await owner.commit([
        { op: 'remove', region: 'small' },
        { op: 'remove', region: 'base' },
      ]);
      await child.request({ cmd: 'exit' }, 'closed');
      const exit = await child.exit;
      check(exit.code === 0, 'the unprivileged client exited cleanly', { exit, stderr: child.stderr.slice(-1000) });
      for (const b of [base, big, small]) {
        native.munmap(b.map);
        native.close(b.fd);
        await owner.dropBacking(b.id).catch(() => undefined);
      }
      return {
        child: { uid: ready.uid, capEff: ready.capEff, memlockLimit: ready.memlockLimit, underLimit: childPins },
        code: err.code,
        errno,
        client: err.client?.name,
        message: err.message,
        kernelLog: rlimitLog.map((l) => l.replace(/^\[[^\]]*\]\s*/, '')),
      };
    });

    await step('two-devices-one-domain', async () => {
      await owner.addRegion({ name: 'shared', gpa: GPA_RAM, size: ram.size, backing: ram.id });
      const k1 = pinnedByKernel();
      const fdsOne = vfioFds();
      await vfio.attachDevice(dev1);
      const d = vfio.domain;
      check(d.devices.length === 2 && d.devices.includes(dev1), 'both devices are in the domain', d.devices);
      check(d.pinnedBytes === ram.size && pinnedByKernel() === k1, 'the second device pinned nothing more (client and kernel counters)', {
        pinnedBytes: d.pinnedBytes,
        k1,
        now: pinnedByKernel(),
      });
      edus.set(dev1, new Edu(vfio.device(dev1)));

      const data = pattern(EDU_MAX_DMA, 0xbeef);
      ram.bytes.set(data, 0x1000);
      const copies = [];
      for (const [i, dev] of [dev0, dev1].entries()) {
        const dst = 0x30000 + i * 0x2000;
        ram.bytes.fill(0, dst, dst + EDU_MAX_DMA);
        await edus.get(dev).copy(GPA_RAM + 0x1000, GPA_RAM + dst, EDU_MAX_DMA);
        check(equal(ram.bytes.slice(dst, dst + EDU_MAX_DMA), data), `${dev} copied through the shared mapping`);
        copies.push({ device: dev, to: hex(GPA_RAM + dst) });
      }

      // Hot-remove the first device: the other keeps working, nothing is unpinned.
      edus.get(dev0).close();
      edus.delete(dev0);
      await vfio.detachDevice(dev0);
      check(
        vfio.domain.active && vfio.domain.pinnedBytes === ram.size && pinnedByKernel() === k1,
        'after removing one device the domain and its pins stay',
        vfio.domain,
      );
      const dst = 0x38000;
      ram.bytes.fill(0, dst, dst + EDU_MAX_DMA);
      await edus.get(dev1).copy(GPA_RAM + 0x1000, GPA_RAM + dst, EDU_MAX_DMA);
      check(equal(ram.bytes.slice(dst, dst + EDU_MAX_DMA), data), `${dev1} still DMAs after ${dev0} left`);

      // Remove the last: the domain is released, everything unpinned, the device fds closed.
      edus.get(dev1).close();
      edus.delete(dev1);
      await vfio.detachDevice(dev1);
      const released = vfio.domain;
      const k2 = pinnedByKernel();
      const fdsNone = vfioFds();
      check(!released.active && released.pinnedBytes === 0 && released.devices.length === 0, 'the last device released the domain', released);
      check(k2 === k1 - ram.size, 'the kernel unpinned the region with the domain', { k1, k2 });
      check(
        fdsNone.length < fdsOne.length && !fdsNone.some((f) => f === 'anon_inode:[vfio-device]' || /^\/dev\/vfio\/(\d+|devices\/)/.test(f)),
        'no group or device descriptor is left open',
        fdsNone,
      );

      // A new first device creates the domain again and pins what is mapped.
      await vfio.attachDevice(dev0);
      const e = new Edu(vfio.device(dev0));
      edus.set(dev0, e);
      const dst2 = 0x40000;
      ram.bytes.fill(0, dst2, dst2 + EDU_MAX_DMA);
      await e.copy(GPA_RAM + 0x1000, GPA_RAM + dst2, EDU_MAX_DMA);
      check(equal(ram.bytes.slice(dst2, dst2 + EDU_MAX_DMA), data), 'a re-created domain maps the memory again');
      check(pinnedByKernel() === k1 && vfio.domain.pinnedBytes === ram.size, 'and pins it once', { k1, now: pinnedByKernel() });
      return { copies, afterHotRemove: hex(GPA_RAM + dst), fdsWithOneDevice: fdsOne, fdsWithNone: fdsNone, kernelPinned: { withDomain: k1, released: k2 } };
    });
  }

  if (dev1) {
    await step('detach-while-bar-mapped', async () => {
      // The BAR mapping outlives the detach: the kernel keeps the device open (type1: its group in the
      // container; iommufd: bound), so the client detaches it on its side and says so (EBUSY).
      const err = await rejection(vfio.detachDevice(dev0));
      check(isMmbError(err) && err.code === 'MMB_ERR_IOMMU' && err.errno === 'EBUSY', 'detaching a device whose BAR is still mapped is reported', {
        code: err?.code,
        errno: err?.errno,
        message: err?.message,
      });
      const d = vfio.domain;
      check(!d.active && d.devices.length === 0 && d.pinnedBytes === 0 && pinnedByKernel() === 0, 'the device is detached and everything unpinned', d);
      // Once the BAR is unmapped the kernel lets go: the device attaches again and DMA works.
      edus.get(dev0).close();
      edus.delete(dev0);
      await vfio.attachDevice(dev0);
      const e = new Edu(vfio.device(dev0));
      edus.set(dev0, e);
      const data = pattern(EDU_MAX_DMA, 0xfeed);
      ram.bytes.set(data, 0x1000);
      ram.bytes.fill(0, 0x48000, 0x48000 + EDU_MAX_DMA);
      await e.copy(GPA_RAM + 0x1000, GPA_RAM + 0x48000, EDU_MAX_DMA);
      check(equal(ram.bytes.slice(0x48000, 0x48000 + EDU_MAX_DMA), data), 'after unmapping the BAR the device attaches again and DMAs');
      return { message: err.message };
    });
  }

  if (dev1) {
    // Shadow mode: a second vfio client, its device (the second edu) behind the guest's IOMMU, follows an
    // I/O address space of the broker; the kernel pins only what the IOAS maps.
    const shadowState = {};
    await step('shadow-dma', async () => {
      const io = await IoasOwner.create(owner, 'edu-iommu');
      const mem = await ownerBacking(owner, 8 * MiB, 'iommu-ram');
      await owner.addRegion({ name: 'iommu-ram', gpa: GPA_IOMMU, size: mem.size, backing: mem.id });
      // (The whole-map client of the first edu pinned the new region too; from here on only the IOAS moves.)
      const ramBytes = (await owner.status()).spaces[0].bytes;
      const k0 = pinnedByKernel();
      const shadow = await VfioSubscriber.attach(SOCKET, {
        space: 'vm0',
        name: 'vfio-shadow',
        backend,
        ioas: 'edu-iommu',
        devices: [dev1],
        reconnect: false,
        pinChunkBytes: PIECE,
      });
      const k1 = pinnedByKernel();
      check(shadow.shadowing && shadow.domain.devices.includes(dev1), 'the shadow-mode client has the second edu in its domain', shadow.domain);
      check(k1 === k0, `attaching in shadow mode pinned nothing (the IOAS is empty), though the space has ${ramBytes} bytes of RAM`, { k0, k1 });
      const edu = new Edu(shadow.device(dev1));
      Object.assign(shadowState, { io, mem, shadow, edu, k1 });

      // The guest's IOMMU maps two buffers, at IOVAs that are not their GPAs; one read-only.
      await io.commit([
        { op: 'map', iova: IOVA_SRC, gpa: GPA_IOMMU + 0x10000, size: 0x10000, readonly: true },
        { op: 'map', iova: IOVA_DST, gpa: GPA_IOMMU + 0x200000, size: 0x10000 },
      ]);
      const k2 = pinnedByKernel();
      check(k2 - k1 === 0x20000, `the kernel pins exactly the mapped bytes (128 KiB), not the ${mem.size} bytes of the region`, { k1, k2 });
      shadowState.k2 = k2;

      const data = pattern(EDU_MAX_DMA, 0x10a5);
      mem.bytes.set(data, 0x11000);
      mem.bytes.fill(0, 0x200000, 0x200000 + 2 * EDU_MAX_DMA);
      await edu.copy(IOVA_SRC + 0x1000, IOVA_DST, EDU_MAX_DMA);
      const got = mem.bytes.slice(0x200000, 0x200000 + EDU_MAX_DMA);
      check(
        equal(got, data),
        `DMA from IOVA ${hex(IOVA_SRC + 0x1000)} to IOVA ${hex(IOVA_DST)} moved the bytes between the guest-physical pages they map (${hex(GPA_IOMMU + 0x11000)} -> ${hex(GPA_IOMMU + 0x200000)}; first difference at byte ${firstDiff(got, data)})`,
      );

      // Read-only for the device: its write faults and lands nowhere.
      const before = dmesg();
      mem.bytes.fill(0x77, 0x12000, 0x12000 + 64);
      await edu.dma({ src: 0x40000, dst: IOVA_SRC + 0x2000, count: 64, toRam: true });
      check(
        mem.bytes.slice(0x12000, 0x12000 + 64).every((b) => b === 0x77),
        'a DMA write to the read-only IOVA did not land',
      );
      const roFaults = await newKernelLines(before, /DMAR:.*DMA Write/);
      check(
        roFaults.some((l) => l.includes(`fault addr ${hex(IOVA_SRC + 0x2000)}`)),
        'the guest kernel logged the write fault at the IOVA',
        roFaults,
      );

      // RAM an IOAS maps cannot be unplugged (the guest's own offlining would fail too).
      const refused = await rejection(owner.removeRegion('iommu-ram'));
      check(isMmbError(refused) && refused.code === 'MMB_ERR_RAM_MAPPED', 'removing RAM the IOAS maps is refused', {
        code: refused?.code,
        message: refused?.message,
      });
      const st = (await owner.status()).spaces[0].ioas?.find((x) => x.name === 'edu-iommu');
      return {
        ramBytes,
        kernelPinned: { beforeAttach: k0, afterAttach: k1, afterMap: k2 },
        mappedBytes: 0x20000,
        copy: { from: hex(IOVA_SRC + 0x1000), to: hex(IOVA_DST), gpaFrom: hex(GPA_IOMMU + 0x11000), gpaTo: hex(GPA_IOMMU + 0x200000) },
        dmarWriteReadOnly: roFaults.map((l) => l.replace(/^\[[^\]]*\]\s*/, '')),
        removeRefused: refused.code,
        status: st,
      };
    });

    await step('nesting', async () => {
      // Whether the (emulated) IOMMU offers iommufd's nested translation, asked of the kernel.
      if (backend !== 'iommufd') {
        // type1's only nesting type enabled nesting on ARM SMMUs alone (iommu_enable_nesting); what this kernel says of it:
        const b = shadowState.shadow.ioasDomains()[0].backend;
        const ext = realSys.ioctlInt(b.container, structs.REQUEST.VFIO_CHECK_EXTENSION, 6 /* VFIO_TYPE1_NESTING_IOMMU */);
        return {
          backend,
          checkExtensionType1Nesting: ext,
          nesting: 'not applicable: nested translation for a guest is iommufd HWPT nesting; type1 has none on Intel',
        };
      }
      const b = shadowState.shadow.ioasDomains()[0].backend;
      const { devid } = b.binding(dev1);
      const info = structs.pack('iommu_hw_info', { dev_id: devid, data_len: structs.LAYOUTS.iommu_hw_info_vtd.size });
      const data = new Uint8Array(structs.LAYOUTS.iommu_hw_info_vtd.size);
      realSys.ioctl(b.iommufd, structs.REQUEST.IOMMU_GET_HW_INFO, info, data);
      const type = structs.get('iommu_hw_info', info, 'out_data_type');
      const vtd = structs.unpack('iommu_hw_info_vtd', data);
      const ecap = BigInt(vtd.ecap_reg);
      const ecapNest = (ecap & structs.VTD_ECAP_NEST) !== 0n;
      let parent;
      try {
        const arg = structs.pack('iommu_hwpt_alloc', {
          flags: structs.IOMMUFD.IOMMU_HWPT_ALLOC_NEST_PARENT,
          dev_id: devid,
          pt_id: b.ioasId,
          data_type: 0,
          data_len: 0,
        });
        realSys.ioctl(b.iommufd, structs.REQUEST.IOMMU_HWPT_ALLOC, arg);
        const id = structs.get('iommu_hwpt_alloc', arg, 'out_hwpt_id');
        realSys.ioctl(b.iommufd, structs.REQUEST.IOMMU_DESTROY, structs.pack('iommu_destroy', { id }));
        parent = { allocated: true, hwpt: id };
      } catch (err) {
        parent = { allocated: false, errno: err?.code ?? String(err), message: err?.message };
        EXPECTED_FAILURES.push({ step: 'nesting', what: 'IOMMU_HWPT_ALLOC', errno: parent.errno });
      }
      return {
        backend,
        hwInfoType: type === structs.IOMMUFD.IOMMU_HW_INFO_TYPE_INTEL_VTD ? 'intel-vtd' : type,
        capReg: `0x${BigInt(vtd.cap_reg).toString(16)}`,
        ecapReg: `0x${ecap.toString(16)}`,
        ecapNest,
        nestParent: parent,
        nesting: ecapNest && parent.allocated ? 'offered' : 'not offered',
      };
    });

    await step('shadow-unmap-faults', async () => {
      const { io, mem, shadow, edu, k1, k2 } = shadowState;
      // The guest's invalidation of the destination: done only once the host IOMMU no longer maps it.
      const order = [];
      const onIoas = (c) => c.unmapped.length > 0 && order.push({ what: 'client-unmapped', kernelPinned: pinnedByKernel() });
      shadow.on('ioas', onIoas);
      const r = await io.unmap(IOVA_DST, 0x10000);
      order.push({ what: 'unmap-complete', kernelPinned: pinnedByKernel() });
      shadow.off('ioas', onIoas);
      check(order.map((o) => o.what).join() === 'client-unmapped,unmap-complete', 'the unmap completed only after the client had unmapped', order);
      check(order[0].kernelPinned === k2 - 0x10000, 'when the client acked, the kernel had already unpinned the 64 KiB', { k2, order });

      // The device can no longer reach the page: its write faults and does not land.
      mem.bytes.fill(0x5a, 0x200000, 0x200000 + EDU_MAX_DMA + 1);
      const before = dmesg();
      await edu.dma({ src: 0x40000, dst: IOVA_DST, count: EDU_MAX_DMA, toRam: true });
      check(
        mem.bytes.slice(0x200000, 0x200000 + EDU_MAX_DMA).every((b) => b === 0x5a),
        'a DMA write to the unmapped IOVA did not reach the page it used to map',
      );
      const faults = await newKernelLines(before, /DMAR:.*DMA Write/);
      check(
        faults.some((l) => l.includes(`fault addr ${hex(IOVA_DST)}`)),
        `the guest kernel logged a DMAR write fault at IOVA ${hex(IOVA_DST)}`,
        faults,
      );

      // Everything unmapped: the kernel's counter is back; the device leaves; the RAM can go now.
      await io.unmap(0, 0x1000_0000);
      const k3 = pinnedByKernel();
      check(k3 === k1, 'with the IOAS empty, the client pins nothing', { k1, k3 });
      edu.close();
      await shadow.detachDevice(dev1);
      await shadow.close();
      await io.destroy();
      await owner.removeRegion('iommu-ram');
      native.munmap(mem.map);
      native.close(mem.fd);
      await owner.dropBacking(mem.id).catch(() => undefined);
      return { unmapped: r.unmapped, order, dmarWrite: faults.map((l) => l.replace(/^\[[^\]]*\]\s*/, '')), kernelPinnedAfter: k3 };
    });
  }

  await step('hugetlb-1g', async () => {
    // A 1 GiB page (reserved at boot: vm/run.mjs), pinned and mapped whole by the client. edu reaches
    // [0, 256 MiB) of it: DMA covers that quarter; the pinning and the mapping cover all of it.
    const pages = poolPages(GiB);
    check(pages >= 1, 'the guest has a 1 GiB page (hugepagesz=1G hugepages=1 on its command line)', { pages });
    if (region(vfio, 'shared')) await owner.removeRegion('shared');
    check(
      vfio.domain.mappings.every((x) => x.gpa >= GiB),
      'nothing else is mapped below 1 GiB',
      vfio.domain.mappings,
    );
    const huge = await ownerBacking(owner, GiB, 'huge-1g', { hugetlb: GiB });
    const k0 = pinnedByKernel();
    const avail0 = vfio.domain.dmaAvailable;
    const t0 = Date.now();
    await owner.addRegion({ name: 'huge-1g', gpa: 0, size: GiB, backing: huge.id });
    const addMs = Date.now() - t0;
    const m = region(vfio, 'huge-1g');
    check(m && m.iova === 0 && m.pieces === GiB / PIECE, `mapped at IOVA 0 in ${GiB / PIECE} pieces`, m);
    const local = vfio.memory.regions().find((x) => x.region.name === 'huge-1g');
    const sm = smapsAt(local.address);
    check(
      local.address % GiB === 0 && sm?.kernelPageSizeKiB === GiB / KiB && sm.hugetlbKiB === GiB / KiB,
      'the client maps it on a 1 GiB boundary with its 1 GiB page, faulted in',
      { address: hex(local.address), sm },
    );
    const k1 = pinnedByKernel();
    check(k1 - k0 === GiB, 'the kernel counts 1 GiB more pinned', { k0, k1 });
    const avail1 = vfio.domain.dmaAvailable;
    const st = (await owner.status()).spaces[0].clients.find((c) => c.name === 'vfio-edu');
    if (backend === 'type1')
      check(avail0 - avail1 === m.pieces && st?.dmaAvailable === avail1, 'type1 DMA_AVAIL went down by one per piece, and the broker knows', {
        avail0,
        avail1,
        broker: st?.dmaAvailable,
      });
    const copies = [];
    for (const [src, dst, seed] of [
      [0x1000, 0x0800_0000, 0x1a1],
      [0x0ff0_0000, 0x2000, 0x1a2],
    ]) {
      const data = pattern(EDU_MAX_DMA, seed);
      huge.bytes.set(data, src);
      huge.bytes.fill(0, dst, dst + EDU_MAX_DMA);
      await edus.get(dev0).copy(src, dst, EDU_MAX_DMA);
      check(equal(huge.bytes.slice(dst, dst + EDU_MAX_DMA), data), `the DMA copy from ${hex(src)} arrived at ${hex(dst)}`);
      copies.push({ from: hex(src), to: hex(dst) });
    }
    await owner.removeRegion('huge-1g');
    check(pinnedByKernel() === k0, 'removed: unpinned in the kernel', { k0, now: pinnedByKernel() });
    native.munmap(huge.map);
    native.close(huge.fd);
    await owner.dropBacking(huge.id);
    return {
      pages,
      hostAddress: hex(local.address),
      smaps: sm,
      pieces: m.pieces,
      kernelPinnedDelta: k1 - k0,
      dmaAvailable: [avail0 ?? null, avail1 ?? null],
      addMs,
      copies,
    };
  });

  await step('close', async () => {
    for (const e of edus.values()) e.close();
    edus.clear();
    if (region(vfio, 'shared')) await owner.removeRegion('shared');
    await vfio.close();
    const left = vfioFds();
    check(left.length === 0, 'closing the client closed every VFIO / iommufd descriptor', left);
    native.munmap(ram.map);
    native.close(ram.fd);
    owner.close();
    await broker.close();
    const failures = calls.filter((c) => c.errno !== null);
    const unexpected = failures.filter(
      (c) =>
        !EXPECTED_FAILURES.some(
          (x) => (x.step === undefined || x.step === c.step) && (typeof x.what === 'string' ? x.what === c.what : x.what.test(c.what)) && x.errno === c.errno,
        ),
    );
    check(unexpected.length === 0, 'no VFIO / iommufd call failed unexpectedly', unexpected);
    const counts = {};
    for (const c of calls) counts[c.what] = (counts[c.what] ?? 0) + 1;
    return { kernelPinnedAfter: pinnedByKernel(), calls: counts, expectedFailures: failures.map((c) => `${c.step}: ${c.what} ${c.errno}`) };
  });
  finish(true);
} catch (err) {
  finish(false, { step: current, message: describe(err) });
}
