#!/usr/bin/env node
// The VMM as a process:
//   node dist/examples/vmm/main.js --dir DIR [--ram 64M] [--hugetlb 2M|1G] [--disk-socket PATH] [--incoming]
// Prints one JSON line {"event":"ready", ...} on stdout once both sockets accept connections, serves until
// SIGTERM, SIGINT or the `quit` command, then takes the machine apart and exits 0. Logs (pino) go to stderr.
import fs from 'node:fs';
import { pino } from 'pino';
import { parseArgs } from 'node:util';
import { parseSize } from '../../index.js';
import { Vmm } from './vmm.js';

const usage = `Usage: node dist/examples/vmm/main.js --dir DIR [options]
  --dir DIR             a private directory (created 0700 if missing) for broker.sock and control.sock
  --ram SIZE            guest RAM (default 64M)
  --hugetlb SIZE        back guest memory with huge pages of SIZE (2M or 1G; the kernel's pool must hold them)
  --disk-socket PATH    qemu-storage-daemon's vhost-user-blk socket: the VM gets a disk with I/O running
  --incoming            wait for a migration (\`migrate\` from another instance) instead of booting
  --log-level LEVEL     pino level on stderr (default warn)`;

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      dir: { type: 'string' },
      ram: { type: 'string' },
      hugetlb: { type: 'string' },
      'disk-socket': { type: 'string' },
      incoming: { type: 'boolean' },
      'log-level': { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help || !values.dir) {
    console.error(usage);
    process.exit(values.help ? 0 : 2);
  }
  fs.mkdirSync(values.dir, { recursive: true, mode: 0o700 });
  const logger = pino({ level: values['log-level'] ?? 'warn' }, pino.destination(2));
  const vmm = await Vmm.start({
    dir: values.dir,
    ...(values.ram ? { ram: parseSize(values.ram, '--ram') } : {}),
    ...(values.hugetlb ? { hugetlb: parseSize(values.hugetlb, '--hugetlb') } : {}),
    ...(values['disk-socket'] ? { diskSocket: values['disk-socket'] } : {}),
    incoming: values.incoming ?? false,
    logger,
  });
  const exit = () => process.exit(0);
  vmm.onQuit = exit;
  for (const signal of ['SIGTERM', 'SIGINT'] as const) process.once(signal, () => void vmm.shutdown().finally(exit));
  console.log(JSON.stringify({ event: 'ready', pid: process.pid, state: vmm.state, control: vmm.controlSocket, broker: vmm.brokerSocket }));
}

main().catch((err: Error & { code?: string }) => {
  console.error(`vmm: ${err.code ? `${err.code}: ` : ''}${err.message}`);
  process.exit(1);
});
