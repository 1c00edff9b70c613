// `mmbroker demo` (= npm start): a live tour on an embedded default. A broker and its owner run in this
// process; subscribers run as separate processes (`mmbroker attach`) and in-process. Memory is
// hotplugged and unplugged, refused changes are shown to leave no trace, and every claim is checked
// against the kernel's own view (/proc/PID/maps) rather than the broker's counters.
import { parseArgs } from 'node:util';
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Broker } from '../../broker/index.js';
import { MappingSubscriber, OwnerClient, type Subscriber } from '../../clients/index.js';
import { constants, native } from '../../native/index.js';
import { ClientRefusedError, isMmbError, type MmbError } from '../../protocol/index.js';
import { formatSize, hex, HELP, parsed, type Command } from '../args.js';

const usage = `Usage: mmbroker demo [--json] [--keep]

Runs a broker with an embedded owner and a few subscribers (two as separate processes), hotplugs and
unplugs memory, shows refused changes rolled back, and prints what each client did, checked against
/proc. Finishes on its own.

Options:
  --json      print only the final summary, as JSON
  -h, --help  show this help`;

interface Step {
  step: string;
  ok: boolean;
  generation: number;
  ms: number;
  detail: string;
}

const cliPath = fileURLToPath(new URL('../mmbroker.js', import.meta.url));

/** Lines of /proc/PID/maps that map memfd `name`. */
function memfdMappings(pid: number, name: string): string[] {
  try {
    return fs.readFileSync(`/proc/${pid}/maps`, 'utf8').split('\n').filter((l) => l.includes(`/memfd:${name} `) || l.endsWith(`/memfd:${name}`) || l.includes(`/memfd:${name} (deleted)`));
  } catch {
    return [];
  }
}

async function until(what: string, check: () => boolean | Promise<boolean>, timeoutMs = 10_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

export const demo: Command = {
  name: 'demo',
  summary: 'live demo on an embedded default (what `npm start` runs)',
  usage,
  async run(argv) {
    const { values } = parsed(() => parseArgs({ args: argv, strict: true, options: { ...HELP,  json: { type: 'boolean' } } }));
    if (values.help) {
      console.log(usage);
      return 0;
    }
    const quiet = values.json ?? false;
    const say = (who: string, text: string) => {
      if (!quiet) console.log(`${`[${who}]`.padEnd(12)} ${text}`);
    };
    const steps: Step[] = [];
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'mmbroker-demo-'));
    const socket = path.join(dir, 'broker.sock');
    const broker = new Broker({ name: 'demo-broker', spaces: ['vm0'], limits: { ackTimeoutMs: 5000 } });
    broker.listen(socket);
    const children: ChildProcess[] = [];
    const subs: Subscriber[] = [];
    const started = performance.now();
    let owner: OwnerClient | undefined;

    const record = async (step: string, fn: () => Promise<{ generation: number; detail: string }>, expectRefusal = false) => {
      const t0 = performance.now();
      try {
        const r = await fn();
        steps.push({ step, ok: !expectRefusal, generation: r.generation, ms: +(performance.now() - t0).toFixed(2), detail: r.detail });
      } catch (err) {
        if (!expectRefusal || !isMmbError(err)) throw err;
        const e = err as MmbError;
        const detail = `${e.code}: ${e.message}`;
        say('owner', `refused as expected: ${detail}`);
        steps.push({ step, ok: true, generation: owner?.generation ?? 0, ms: +(performance.now() - t0).toFixed(2), detail });
      }
    };

    try {
      say('broker', `serving address space "vm0" on ${socket} (and in-process)`);
      owner = await OwnerClient.attach(broker, { space: 'vm0', name: 'vmm' });
      const o = owner;

      // Base RAM, written by the owner before anyone subscribes.
      const ram = await o.createBacking(256 << 20, 'ram');
      const ramMap = native.mmap(ram.fd, 0, 256 << 20, constants.PROT_READ | constants.PROT_WRITE, constants.MAP_SHARED);
      new Uint8Array(ramMap.buffer).set(new TextEncoder().encode('hello from the VMM'), 0x1000);
      await record('base RAM', async () => {
        const r = await o.addRegion({ name: 'ram', gpa: 0, size: 256 << 20, backing: ram.backing });
        say('owner', `base RAM 256M at 0x0 committed: generation ${r.generation}`);
        return { generation: r.generation, detail: '256M at 0x0' };
      });

      // Two subscribers in their own processes, one in this process.
      for (const n of ['backend-a', 'backend-b']) {
        const child = spawn(process.execPath, [cliPath, 'attach', '--socket', socket, '--space', 'vm0', '--name', n, '--json'], {
          stdio: ['ignore', 'pipe', 'inherit'],
        });
        children.push(child);
        child.stdout?.setEncoding('utf8');
        child.stdout?.on('data', (chunk: string) => {
          for (const line of chunk.split('\n').filter(Boolean)) {
            try {
              const ev = JSON.parse(line) as { event: string; region?: string; address?: number; generation?: number };
              if (ev.event === 'mapped') say(n, `mapped ${ev.region} at ${hex(ev.address ?? 0)} (pid ${child.pid})`);
              else if (ev.event === 'unmapped') say(n, `unmapped ${ev.region}`);
              else if (ev.event === 'attached') say(n, `attached at generation ${ev.generation} (pid ${child.pid})`);
              else if (ev.event === 'rolledBack') say(n, `rolled back generation ${ev.generation}`);
            } catch {
              say(n, line);
            }
          }
        });
      }
      const local = await MappingSubscriber.attach(broker, { space: 'vm0', name: 'in-process', maxRegions: 2 });
      subs.push(local);
      say('in-process', `attached; reads guest 0x1000: ${JSON.stringify(new TextDecoder().decode(local.memory.read(0x1000, 18)))}`);
      await until('both subscriber processes to attach', () => broker.status('vm0').spaces[0]?.clients.filter((c) => c.role === 'subscriber' && c.state === 'ready').length === 3);

      // A faulty device back-end: it refuses any region named "faulty*".
      const picky = await MappingSubscriber.attach(broker, { space: 'vm0', name: 'picky-backend' });
      subs.push(picky);
      picky.on('change', (ev) => {
        const bad = ev.change.added.find((r) => r.name.startsWith('faulty'));
        if (bad) ev.waitUntil(Promise.reject(new ClientRefusedError(`cannot handle region ${JSON.stringify(bad.name)}`)));
      });

      // Hotplug.
      const dimm = await o.createBacking(128 << 20, 'dimm0');
      await record('hotplug dimm0', async () => {
        const r = await o.addRegion({ name: 'dimm0', gpa: 2 ** 32, size: 128 << 20, backing: dimm.backing });
        const seen = children.map((c) => memfdMappings(c.pid as number, 'dimm0').length);
        say('owner', `hotplugged dimm0 128M at 0x100000000: generation ${r.generation}, acked by all 4 subscribers`);
        say('kernel', `/proc/PID/maps of the subscriber processes show memfd:dimm0 mapped ${seen.join(' and ')} time(s)`);
        return { generation: r.generation, detail: `128M at 0x100000000; /proc maps: ${seen.join(',')}` };
      });

      // Refusals: before anything changes, and after a client refused.
      await record('overlapping hotplug', () => o.addRegion({ name: 'bad', gpa: 0x1000_0000 - 0x1000, size: 0x2000, backing: dimm.backing }).then(() => ({ generation: 0, detail: 'unexpectedly accepted' })), true);
      await record('hotplug beyond a client limit', () => o.addRegion({ name: 'dimm1', gpa: 2 ** 33, size: 4096, backing: dimm.backing }).then(() => ({ generation: 0, detail: 'unexpectedly accepted' })), true);
      subs.splice(subs.indexOf(local), 1);
      await local.close();
      const faulty = await o.createBacking(64 << 20, 'faulty0');
      await record('hotplug refused by a client', () => o.addRegion({ name: 'faulty0', gpa: 2 ** 34, size: 64 << 20, backing: faulty.backing }).then(() => ({ generation: 0, detail: 'unexpectedly accepted' })), true);
      const leftovers = children.map((c) => memfdMappings(c.pid as number, 'faulty0').length);
      say('kernel', `after the rollback, memfd:faulty0 mappings in the subscriber processes: ${leftovers.join(' and ')}`);
      steps.push({ step: 'rollback left no mapping', ok: leftovers.every((n) => n === 0), generation: o.generation, ms: 0, detail: `/proc maps: ${leftovers.join(',')}` });
      native.close(faulty.fd);
      await o.dropBacking(faulty.backing);

      // Unplug.
      await record('unplug dimm0', async () => {
        const r = await o.removeRegion('dimm0');
        const seen = children.map((c) => memfdMappings(c.pid as number, 'dimm0').length);
        say('owner', `unplugged dimm0: generation ${r.generation}, completed after every subscriber unmapped it`);
        say('kernel', `memfd:dimm0 mappings in the subscriber processes now: ${seen.join(' and ')}`);
        return { generation: r.generation, detail: `/proc maps after: ${seen.join(',')}` };
      });
      native.close(dimm.fd);
      native.munmap(ramMap);
      native.close(ram.fd);

      const final = broker.status('vm0').spaces[0];
      const summary = {
        space: 'vm0',
        generation: final?.generation,
        regions: final?.regions.map((r) => ({ name: r.name, gpa: r.gpa, size: r.size })),
        clients: final?.clients.map((c) => ({ name: c.name, kind: c.kind, role: c.role, pid: c.pid, ackedGeneration: c.ackedGeneration })),
        steps,
        ok: steps.every((s) => s.ok),
        seconds: +((performance.now() - started) / 1000).toFixed(2),
      };
      if (quiet) console.log(JSON.stringify(summary, null, 2));
      else {
        console.log('\nSummary');
        for (const s of steps) console.log(`  ${s.ok ? 'ok  ' : 'FAIL'} ${s.step.padEnd(32)} gen ${String(s.generation).padStart(3)}  ${String(s.ms).padStart(8)} ms  ${s.detail.slice(0, 110)}`);
        console.log(`  final: generation ${summary.generation}, regions ${summary.regions?.map((r) => `${r.name}@${hex(r.gpa)}/${formatSize(r.size)}`).join(', ')}, ${summary.clients?.length} clients, ${summary.seconds} s`);
      }
      return summary.ok ? 0 : 1;
    } finally {
      for (const s of subs) await s.close();
      owner?.close();
      for (const c of children) c.kill('SIGTERM');
      await Promise.all(children.map((c) => new Promise((r) => (c.exitCode !== null ? r(null) : c.once('exit', r)))));
      await broker.close();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  },
};
