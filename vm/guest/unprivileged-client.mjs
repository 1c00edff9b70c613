// A vfio-like client (VfioSubscriber) in its own process, started by scenario.mjs as uid 1000 (no
// capabilities, so no CAP_IPC_LOCK) under a small RLIMIT_MEMLOCK (`ulimit -l` in the shell that execs
// it). The kernel then charges what it pins against that limit and refuses beyond it.
//
// argv: --socket PATH --space NAME --name NAME --backend type1|iommufd --device BDF
// stdout, one JSON object per line: {"event":"ready",...} (or "attachFailed" and exit 2), "change",
//   "committed", "rolledBack", "error", and the answers to commands.
// stdin, one JSON command per line: {"cmd":"domain"} {"cmd":"exit"}
import fs from 'node:fs';
import readline from 'node:readline';
import { parseArgs } from 'node:util';
import { VfioSubscriber } from '/mmb/dist/index.js';

const { values } = parseArgs({
  options: { socket: { type: 'string' }, space: { type: 'string' }, name: { type: 'string' }, backend: { type: 'string' }, device: { type: 'string' } },
});
const out = (ev) => process.stdout.write(JSON.stringify(ev) + '\n');

/** What the kernel says about this process: uid, effective capabilities, memlock limit, VmLck / VmPin. */
function self() {
  const status = fs.readFileSync('/proc/self/status', 'utf8');
  const field = (name) => /^(\S+):\s+(.*)$/m.exec(status.split('\n').find((l) => l.startsWith(`${name}:`)) ?? '')?.[2]?.trim();
  const limits =
    fs
      .readFileSync('/proc/self/limits', 'utf8')
      .split('\n')
      .find((l) => l.startsWith('Max locked memory')) ?? '';
  const capEff = BigInt(`0x${field('CapEff') ?? '0'}`);
  return {
    uid: process.getuid(),
    capEff: `0x${capEff.toString(16)}`,
    capIpcLock: (capEff & (1n << 14n)) !== 0n,
    memlockLimit: Number(limits.split(/\s+/)[3]),
    vmLckKiB: Number.parseInt(field('VmLck') ?? 'NaN', 10),
    vmPinKiB: Number.parseInt(field('VmPin') ?? 'NaN', 10),
  };
}

const domain = (sub) => {
  const d = sub.domain;
  return {
    active: d.active,
    devices: d.devices,
    pinnedBytes: d.pinnedBytes,
    mappings: d.mappings.map((m) => ({ region: m.region, gpa: m.gpa, size: m.size })),
  };
};

let sub;
try {
  sub = await VfioSubscriber.attach(values.socket, {
    space: values.space,
    name: values.name,
    backend: values.backend,
    devices: [values.device],
    reconnect: false,
  });
} catch (err) {
  out({ event: 'attachFailed', code: err.code, message: err.message, ...self() });
  process.exit(2);
}
sub.on('change', (ev) =>
  out({ event: 'change', generation: ev.change.generation, added: ev.change.added.map((r) => r.name), removed: ev.change.removed.map((r) => r.name) }),
);
sub.on('committed', (generation) => out({ event: 'committed', generation }));
sub.on('rolledBack', (generation) => out({ event: 'rolledBack', generation }));
sub.on('error', (e) => out({ event: 'error', code: e.code, message: e.message }));
out({ event: 'ready', pid: process.pid, ...self(), domain: domain(sub) });

for await (const line of readline.createInterface({ input: process.stdin })) {
  const cmd = JSON.parse(line);
  if (cmd.cmd === 'domain') out({ event: 'domain', ...self(), domain: domain(sub) });
  else if (cmd.cmd === 'exit') break;
}
await sub.close();
out({ event: 'closed' });
process.exit(0);
