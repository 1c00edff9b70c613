// `mmbroker demo` (= npm start): the main job on an embedded default. A broker and its owner (the VMM)
// run in this process with a kvm-like client (a real KVM VM and vCPU where /dev/kvm works); a device
// and a vfio-like (soft) client run as separate processes (`mmbroker attach ... --json --control`).
// Memory is hotplugged and unplugged, refusals are shown to leave no trace, and every claim is checked
// against the kernel's own view (/proc/PID/maps, VmLck) rather than the broker's counters.
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Broker } from '../../broker/index.js';
import { FileDestination, KvmSubscriber, MappingSubscriber, Migration, OwnerClient } from '../../clients/index.js';
import { IoasOwner } from '../../clients/ioas-owner.js';
import { constants, native } from '../../native/index.js';
import { isMmbError, type MmbError } from '../../protocol/index.js';
import { formatBytes, formatSize, hex, parseCommand, type Command } from '../args.js';
import { JsonProc } from '../../testkit/jsonproc.js';
import { memfdMappedBytes, vmLckKiB } from '../../testkit/procfs.js';
import { draw } from '../picture.js';

const usage = `Usage: mmbroker demo [--json]

Runs a broker with an embedded owner and three kinds of clients: kvm-like (in this process, a real KVM VM
where /dev/kvm works), device (kind vhost) and vfio-like (soft backend) as separate processes. Hotplugs and unplugs
memory, shows refused hotplugs rolled back, migrates the space live to a sparse image, then puts a second
vfio-like client behind a guest IOMMU (shadow mode: it pins only what the IOMMU maps), and prints what
each client did, checked against /proc. Finishes on its own in well under a minute.

Options:
  --json      print only the final summary, as JSON
  -h, --help  show this help`;

const MiB = 2 ** 20;
const cliPath = fileURLToPath(new URL('../mmbroker.js', import.meta.url));

interface Step {
  step: string;
  ok: boolean;
  ms: number;
  generation: number;
  detail: string;
}

/**
 * Whether a child can run without CAP_IPC_LOCK under an RLIMIT_MEMLOCK of `bytes`: root with setpriv and
 * prlimit, and a hard limit of at least `bytes` to lower it to (raising it would need CAP_SYS_RESOURCE).
 */
function canLimitMemlock(bytes: number): boolean {
  if (process.getuid?.() !== 0) return false;
  if (!['setpriv', 'prlimit'].every((t) => spawnSync(t, ['--version'], { stdio: 'ignore' }).status === 0)) return false;
  const hard = /^Max locked memory\s+\S+\s+(\S+)/m.exec(fs.readFileSync('/proc/self/limits', 'utf8'))?.[1];
  return hard === 'unlimited' || Number(hard) >= bytes;
}

export const demo: Command = {
  name: 'demo',
  summary: 'live demo on an embedded default (what `npm start` runs)',
  usage,
  async run(argv) {
    const values = parseCommand(argv, { json: { type: 'boolean' } }, usage);
    if (!values) return 0;
    const quiet = values.json ?? false;
    const say = (who: string, text: string) => {
      if (!quiet) console.log(`${`[${who}]`.padEnd(9)} ${text}`);
    };
    const steps: Step[] = [];
    const started = performance.now();
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'mmbroker-demo-'));
    const socket = path.join(dir, 'broker.sock');
    // Sizes fit under the usual 8 MiB RLIMIT_MEMLOCK: the vfio-like process runs without CAP_IPC_LOCK, so
    // the kernel itself limits what it can pin (and lowering a limit needs no privilege).
    const pinBudget = 12 * MiB;
    const memlockLimit = 8 * MiB;
    const broker = new Broker({ name: 'demo', spaces: ['vm0'], limits: { ackTimeoutMs: 15_000, pinBudgetBytes: pinBudget } });
    broker.listen(socket);
    const procs: JsonProc[] = [];
    const fds: number[] = [];
    let owner: OwnerClient | undefined;
    let kvm: KvmSubscriber | undefined;

    const generation = () => broker.status('vm0').spaces[0]?.generation ?? 0;
    const step = async (name: string, fn: () => Promise<string>, refusal?: string) => {
      const t0 = performance.now();
      try {
        const detail = await fn();
        if (refusal) throw new Error(`expected ${refusal}, but it was accepted`);
        steps.push({ step: name, ok: true, ms: +(performance.now() - t0).toFixed(1), generation: generation(), detail });
      } catch (err) {
        const ok = refusal !== undefined && isMmbError(err, refusal as MmbError['code']);
        const e = err as MmbError;
        const who = e.client ? ` (${e.client.kind} client "${e.client.name}", pid ${e.client.pid})` : '';
        const detail = isMmbError(err) ? `${e.code}${who}: ${e.cause instanceof Error ? e.cause.message : e.message}` : String(err);
        say(ok ? 'owner' : 'FAILED', ok ? `refused, as it should be: ${detail}` : detail);
        steps.push({ step: name, ok, ms: +(performance.now() - t0).toFixed(1), generation: generation(), detail });
      }
    };
    const attach = async (kind: string, args: string[], wrap: string[] = []) => {
      const cmd = [...wrap, process.execPath, cliPath, 'attach', kind, '--socket', socket, '--space', 'vm0', '--json', '--control', ...args];
      const child = spawn(cmd[0] as string, cmd.slice(1), { stdio: ['pipe', 'pipe', 'pipe'] });
      const p = new JsonProc(child);
      procs.push(p);
      await p.next('attached', () => true, 20_000);
      return p;
    };
    const memfd = async (name: string, size: number) => {
      const b = await (owner as OwnerClient).createBacking(size, name);
      fds.push(b.fd);
      return b;
    };

    try {
      say('broker', `address space "vm0" served in-process and on ${socket}; pin budget ${formatSize(pinBudget)}`);
      owner = await OwnerClient.attach(broker, { space: 'vm0', name: 'vmm' });
      const o = owner;
      const ram = await memfd('ram', 4 * MiB);
      await step('base RAM', async () => {
        const r = await o.addRegion({ name: 'ram', gpa: 0, size: 4 * MiB, backing: ram.backing });
        say('owner', `base RAM 4 MiB at 0x0 (memfd "ram"): generation ${r.generation}`);
        return '4 MiB at 0x0';
      });

      // The three kinds of clients.
      kvm = await KvmSubscriber.attach(broker, { space: 'vm0', name: 'kvm' });
      const k = kvm;
      say(
        'kvm',
        `in this process: ${k.hypervisor === 'kvm' ? `a real KVM VM (/dev/kvm), ${k.maxSlots} slots` : `memslots in software (${k.softwareReason})`}; slot ${k.slots()[0]?.slot} = ram`,
      );
      const vhost = await attach('vhost', ['--name', 'vhost-blk', '--max-regions', '32']);
      say(
        'vhost',
        `pid ${vhost.pid}: a device back-end's view, 32 slots, maps ram (${formatSize(memfdMappedBytes(vhost.pid, 'ram'))}), never pins (VmLck ${vmLckKiB(vhost.pid)} KiB)`,
      );
      const limited = canLimitMemlock(memlockLimit);
      const vfio = await attach(
        'vfio',
        ['--name', 'vfio-nic', '--backend', 'soft', '--device', '0000:00:04.0', '--device', '0000:00:05.0'],
        limited ? ['prlimit', `--memlock=${memlockLimit}:${memlockLimit}`, '--', 'setpriv', '--bounding-set=-ipc_lock', '--'] : [],
      );
      const pinned = () => vmLckKiB(vfio.pid) * 1024;
      say(
        'vfio',
        `pid ${vfio.pid}: soft backend (a software stand-in: no IOMMU on this machine), 2 devices in one domain; ` +
          `pinned ${formatSize(pinned())} (VmLck)${limited ? `, running without CAP_IPC_LOCK under RLIMIT_MEMLOCK ${formatSize(memlockLimit)}` : ''}`,
      );
      steps.push({
        step: 'clients attached',
        ok: pinned() >= 4 * MiB && memfdMappedBytes(vhost.pid, 'ram') === 4 * MiB,
        ms: 0,
        generation: generation(),
        detail: `vfio VmLck ${formatSize(pinned())}, vhost maps ram`,
      });

      // Hotplug, placed by the broker below 4 GiB (the demo's vCPU runs in 32-bit mode) and away from
      // every reserved range (the vfio client reported the MSI window).
      const dimm = await memfd('dimm0', 2 * MiB);
      let dimmGpa = 0;
      await step('hotplug dimm0', async () => {
        // Placed by the broker above the MSI window the vfio client reported, below 4 GiB.
        dimmGpa = await o.findFree(2 * MiB, { align: 2 * MiB, min: 0xfee0_0000, max: 2 ** 32 });
        const r = await o.addRegion({ name: 'dimm0', gpa: dimmGpa, size: 2 * MiB, backing: dimm.backing });
        const slot = k.slots().find((x) => x.name === 'dimm0');
        say(
          'owner',
          `hotplugged dimm0 2 MiB at ${hex(dimmGpa)} (placed by FIND_FREE past the reserved MSI window): generation ${r.generation}, acked by all three`,
        );
        say(
          'kernel',
          `kvm slot ${slot?.slot} accepted by KVM_SET_USER_MEMORY_REGION; vhost maps dimm0 (${formatSize(memfdMappedBytes(vhost.pid, 'dimm0'))}); vfio VmLck ${formatSize(pinned())}`,
        );
        if (pinned() < 6 * MiB || memfdMappedBytes(vhost.pid, 'dimm0') !== 2 * MiB || !slot)
          throw new Error('the kernel does not show dimm0 where it should be');
        return `2 MiB at ${hex(dimmGpa)}; vfio VmLck ${formatSize(pinned())}`;
      });

      // A vCPU writes into the hotplugged memory; the device process reads it through its own mapping.
      await step('vCPU write, read by another process', async () => {
        const message = Buffer.from(`written by a vCPU at ${hex(dimmGpa + 0x100)}`);
        if (k.hypervisor === 'kvm') {
          await k.runProgram({ codeGpa: 0x1000, writes: [{ gpa: dimmGpa + 0x100, bytes: message }] });
          say('kvm', `a real vCPU (32-bit protected mode) wrote ${JSON.stringify(message.toString())} and halted`);
        } else {
          const d = native.mmap(dimm.fd, 0, 4096, constants.PROT_READ | constants.PROT_WRITE, constants.MAP_SHARED);
          new Uint8Array(d.buffer).set(message, 0x100);
          native.munmap(d);
          say('owner', 'no usable /dev/kvm: the owner wrote the bytes instead of a vCPU');
        }
        const read = await vhost.request({ cmd: 'read', gpa: dimmGpa + 0x100, len: message.length }, 'read');
        const got = Buffer.from(String(read.hex), 'hex').toString();
        say('vhost', `pid ${vhost.pid} read ${JSON.stringify(got)} through its own mapping`);
        if (got !== message.toString()) throw new Error(`vhost read ${JSON.stringify(got)}`);
        return got;
      });

      // Refusals that change nothing: a reserved IOVA range, the pin budget.
      await step(
        'hotplug over the MSI window',
        () => o.addRegion({ name: 'msi', gpa: 0xfee0_0000, size: MiB, backing: dimm.backing }).then(() => ''),
        'MMB_ERR_RESERVED_RANGE',
      );
      const big = await memfd('big', 8 * MiB);
      await step(
        'hotplug beyond the pin budget',
        () => o.addRegion({ name: 'big', gpa: 2 ** 33, size: 8 * MiB, backing: big.backing }).then(() => ''),
        'MMB_ERR_PIN_BUDGET',
      );
      say(
        'kernel',
        `after both refusals: vhost maps "big" ${formatSize(memfdMappedBytes(vhost.pid, 'big'))}, vfio VmLck ${formatSize(pinned())}, kvm has ${k.slots().length} slots`,
      );

      // A refusal after the fact: the kernel will not let the vfio process pin more than its
      // RLIMIT_MEMLOCK, so it nacks, and the kvm and vhost clients that applied the hotplug roll it back.
      if (limited) {
        const dimm1 = await memfd('dimm1', 4 * MiB);
        const before = { slots: k.slots().length, vfio: pinned() };
        // Within the broker's budget (10M of 12M), beyond what the kernel lets the process lock (8M).
        await step(
          'hotplug refused by the kernel, rolled back',
          () => o.addRegion({ name: 'dimm1', gpa: 2 ** 32, size: 4 * MiB, backing: dimm1.backing }).then(() => ''),
          'MMB_ERR_PIN_FAILED',
        );
        await vhost.next('rolledBack');
        say('vhost', `pid ${vhost.pid} had mapped dimm1 and rolled it back`);
        const after = { slots: k.slots().length, vfio: pinned(), vhost: memfdMappedBytes(vhost.pid, 'dimm1') };
        say(
          'kernel',
          `after the rollback: kvm ${after.slots} slots (was ${before.slots}), vhost maps dimm1 ${formatSize(after.vhost)}, vfio VmLck ${formatSize(after.vfio)} (was ${formatSize(before.vfio)})`,
        );
        steps.push({
          step: 'rollback left no trace',
          ok: after.slots === before.slots && after.vhost === 0 && after.vfio === before.vfio,
          ms: 0,
          generation: generation(),
          detail: `kvm slots ${after.slots}, vhost maps ${formatSize(after.vhost)}, vfio VmLck ${formatSize(after.vfio)}`,
        });
      } else {
        say('demo', 'not root, or setpriv/prlimit missing: skipping the kernel-refused hotplug (it needs a child without CAP_IPC_LOCK)');
      }

      // Unplug: complete only once every client let go.
      await step('unplug dimm0', async () => {
        const r = await o.removeRegion('dimm0');
        const left = { vhost: memfdMappedBytes(vhost.pid, 'dimm0'), vfio: pinned(), kvm: k.slots().some((x) => x.name === 'dimm0') };
        say('owner', `unplugged dimm0: generation ${r.generation}, completed once every client let go`);
        say('kernel', `vhost maps dimm0 ${formatSize(left.vhost)}, vfio VmLck ${formatSize(left.vfio)}, kvm slot ${left.kvm ? 'still there' : 'deleted'}`);
        if (left.vhost !== 0 || left.kvm || left.vfio >= 6 * MiB) throw new Error('something still holds dimm0');
        return `vfio VmLck ${formatSize(left.vfio)}`;
      });

      // Live migration of the space to a sparse image, while the vhost back-end keeps writing.
      await step('live migration to a sparse image', async () => {
        const reader = await MappingSubscriber.attach(broker, { space: 'vm0', name: 'migration', kind: 'migration', writes: false });
        const image = path.join(dir, 'vm0.img');
        let writing = true;
        let writes = 0;
        const guest = (async () => {
          while (writing) {
            const reply = await vhost
              .request({ cmd: 'write', gpa: 0x2000 + (writes % 512) * 4096, hex: Buffer.from(`write ${writes}`).toString('hex') }, 'wrote')
              .catch(() => undefined);
            if (reply) writes++;
            await new Promise((r) => setTimeout(r, 2));
          }
        })();
        try {
          const r = await new Migration(o, reader, new FileDestination(image)).run({
            stopBytes: 64 * 1024,
            maxRounds: 10,
            onProgress: (p) =>
              say(
                'migrate',
                `round ${p.round} ${p.phase}: ${formatBytes(p.bytes)} copied${p.phase === 'full' ? '' : `, dirty rate ${formatBytes(p.dirtyRate)}/s`}`,
              ),
          });
          writing = false;
          await guest;
          const probe = Buffer.alloc(16);
          const fd = fs.openSync(image, 'r');
          fs.readSync(fd, probe, 0, 16, 0x1000);
          fs.closeSync(fd);
          say(
            'migrate',
            `${r.rounds.length} rounds, ${formatBytes(r.totalBytes)} sent for ${formatSize(r.memoryBytes)}, downtime ${r.downtimeMs} ms, ${r.stopReason}, image ${r.verified ? 'verified identical to the paused source' : 'NOT identical'}`,
          );
          say('migrate', `the guest kept writing meanwhile (${writes} writes by the vhost process)`);
          if (r.stopReason === 'not-shrinking') {
            say(
              'migrate',
              'rounds did not shrink: the vfio client has no IOMMU dirty tracking, so every writable page its device can reach counts as dirty at each sync (as QEMU counts it for such devices)',
            );
          }
          if (!r.verified) throw new Error('the image differs from the source');
          return `${r.rounds.length} rounds, ${formatBytes(r.totalBytes)} sent, downtime ${r.downtimeMs} ms, verified`;
        } finally {
          writing = false;
          await guest;
          await reader.close();
        }
      });

      // A device behind the guest's IOMMU (docs/ioas.md): in shadow mode a vfio-like client pins only what
      // the guest's IOMMU maps for it, next to the one above that pins all guest RAM.
      await step('shadow mode: pins only what the IOMMU maps', async () => {
        const io = await IoasOwner.create(o, 'nic-iommu');
        const shadow = await attach('vfio', ['--name', 'vfio-shadow', '--backend', 'soft', '--ioas', 'nic-iommu', '--device', 'nic1']);
        const shadowPinned = () => vmLckKiB(shadow.pid) * 1024;
        const attachedPins = shadowPinned();
        // The guest's driver maps 16 buffers of 4 KiB for its device's DMA, at IOVAs of the guest's choosing.
        await io.commit(Array.from({ length: 16 }, (_, i) => ({ op: 'map' as const, iova: 0x8000_0000 + i * 4096, gpa: 0x10_0000 + i * 4096, size: 4096 })));
        const mapped = shadowPinned();
        const ram = broker.status('vm0').spaces[0]?.bytes ?? 0;
        say('vfio', `pid ${vfio.pid} pins all ${formatSize(ram)} of guest RAM: VmLck ${formatSize(pinned())}`);
        say(
          'vfio',
          `pid ${shadow.pid}, shadow mode (IOAS "nic-iommu"): VmLck ${formatBytes(attachedPins)} when attached, ${formatBytes(mapped)} once the guest's IOMMU mapped 16 pages`,
        );
        await io.unmap(0x8000_0000, 16 * 4096);
        const after = shadowPinned();
        say('owner', `the guest's invalidation of those 16 pages returned once the shadow client let go: its VmLck ${formatBytes(after)}`);
        if (attachedPins !== 0 || mapped !== 16 * 4096 || after !== 0) throw new Error('the shadow client did not pin exactly what the IOAS mapped');
        return `whole-map vfio VmLck ${formatSize(pinned())}; shadow VmLck 0, ${formatBytes(mapped)} mapped, 0 after the unmap`;
      });

      const st = broker.status('vm0').spaces[0];
      const summary = {
        space: 'vm0',
        generation: st?.generation,
        regions: st?.regions.map((r) => ({ name: r.name, gpa: r.gpa, size: r.size })),
        clients: st?.clients.map((c) => ({
          name: c.name,
          kind: c.kind,
          backend: c.backend,
          pid: c.pid,
          ackedGeneration: c.ackedGeneration,
          regions: c.regions,
          pin: c.pin,
        })),
        pinBudget: st?.pinBudget,
        steps,
        ok: steps.every((s) => s.ok),
        seconds: +((performance.now() - started) / 1000).toFixed(2),
      };
      if (quiet) console.log(JSON.stringify(summary, null, 2));
      else {
        console.log('\nSummary');
        for (const s of steps)
          console.log(
            `  ${s.ok ? 'ok  ' : 'FAIL'} ${s.step.padEnd(42)} gen ${String(s.generation).padStart(2)} ${String(s.ms).padStart(8)} ms  ${s.detail.slice(0, 100)}`,
          );
        console.log('\n  clients at the end:');
        for (const c of summary.clients ?? []) {
          console.log(
            `    ${c.kind.padEnd(6)} ${c.name.padEnd(12)} pid ${String(c.pid).padEnd(7)} acked gen ${c.ackedGeneration}  ${c.backend ?? ''}${c.pin ? `  pinned ${formatSize(c.pin.actual ?? 0)} (predicted ${formatSize(c.pin.predicted)})` : ''}`,
          );
        }
        console.log(`\n  ${summary.ok ? 'all steps ok' : 'SOME STEPS FAILED'} in ${summary.seconds} s`);
        // The map as it ends, as `mmbroker status` draws it (the reserved MSI window the vfio client reported,
        // who maps and pins what).
        console.log(`\nThe map at the end (mmbroker status --socket ${socket}):\n`);
        console.log(draw(broker.status('vm0')));
      }
      return summary.ok ? 0 : 1;
    } finally {
      for (const p of procs) await p.stop('SIGTERM');
      await kvm?.close();
      owner?.close();
      for (const fd of fds) native.close(fd);
      await broker.close();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  },
};
