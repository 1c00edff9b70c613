// Migration of 1 GiB while a writer keeps dirtying memory: rounds to converge and bytes sent.
// The writer dirties at a rate of 1% of guest memory per round-0 time (about what a round 0 takes to
// copy): rounds shorten as the dirty set shrinks, as with a real guest, until one leaves at most 1 MiB.
// No peer: the figures are the migration's own (rounds, bytes sent against memory size, pause time).
//
//   npm run bench:migration -- [--mib N] [--json]   (BENCH_ITERATIONS sets the runs, 3 by default; --mib the
//   guest memory, 1024 by default: less is for a short run)
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { Broker } from '../broker/index.js';
import { MappingSubscriber, OwnerClient } from '../clients/index.js';
import { FileDestination, Migration, type MigrationResult } from '../clients/migration/index.js';
import { constants, native } from '../native/index.js';
import { iterations, report, runMain, summarize, type Measurement } from './lib.js';

const { values } = parseArgs({ options: { mib: { type: 'string', default: '1024' }, json: { type: 'boolean', default: false } } });
/** The guest memory migrated. */
const GIB = Number(values.mib) * 2 ** 20;
const SIZE_NAME = GIB >= 2 ** 30 ? `${GIB / 2 ** 30} GiB` : `${GIB / 2 ** 20} MiB`;
const PAGES = GIB / 4096;
const RUNS = iterations(3);

async function once(dir: string, run: number): Promise<MigrationResult> {
  const broker = new Broker({ spaces: ['vm0'], limits: { ackTimeoutMs: 30_000 } });
  const owner = await OwnerClient.attach(broker, { space: 'vm0' });
  const ram = await owner.createBacking(GIB, 'ram');
  // Real content everywhere: round 0 copies the whole GiB.
  for (const m of native.mmapChunked(ram.fd, 0, GIB, constants.PROT_READ | constants.PROT_WRITE, constants.MAP_SHARED, GIB)) {
    new Uint32Array(m.buffer).fill(0x01020304 + run);
    native.munmap(m);
  }
  await owner.addRegion({ name: 'ram', gpa: 0, size: GIB, backing: ram.backing });
  const writer = await MappingSubscriber.attach(broker, { space: 'vm0', name: 'guest' });
  const reader = await MappingSubscriber.attach(broker, { space: 'vm0', name: 'reader', writes: false });
  let seed = 12345 + run;
  const rnd = () => {
    seed ^= seed << 13;
    seed ^= seed >>> 17;
    seed ^= seed << 5;
    return (seed >>> 0) % PAGES;
  };
  let round0Ms = 0;
  const image = path.join(dir, `vm0-${run}.img`);
  const result = await new Migration(owner, reader, new FileDestination(image)).run({
    stopBytes: 1 << 20,
    maxRounds: 30,
    onProgress: (p) => {
      if (p.phase === 'full') round0Ms = p.ms;
      if (p.phase === 'final') return;
      // The guest wrote this while the round ran: 1% of memory per round-0 time.
      const n = Math.round((0.01 * PAGES * p.ms) / Math.max(1, round0Ms));
      for (let i = 0; i < n; i++) writer.memory.write(rnd() * 4096, Buffer.from([run, i & 0xff]));
    },
  });
  await writer.close();
  await reader.close();
  owner.close();
  native.close(ram.fd);
  await broker.close();
  fs.rmSync(image, { force: true });
  return result;
}

async function main(): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'mmb-bench-migration-'));
  const runs: MigrationResult[] = [];
  for (let i = 0; i < RUNS; i++) runs.push(await once(dir, i));
  fs.rmSync(dir, { recursive: true, force: true });
  const m = (name: string, unit: string, values: number[], note?: string): Measurement => ({ name, unit, ...summarize(values), iterations: values.length, ...(note ? { note } : {}) });
  report(
    'migration',
    [
      m('rounds (incl. round 0 and the paused round)', 'rounds', runs.map((r) => r.rounds.length), `converged in ${runs.filter((r) => r.converged).length} of ${runs.length} runs`),
      m('bytes sent / guest memory', 'x', runs.map((r) => r.totalBytes / r.memoryBytes)),
      m('bytes sent', 'MiB', runs.map((r) => r.totalBytes / 2 ** 20)),
      m('downtime (pause to last page copied)', 'ms', runs.map((r) => r.downtimeMs)),
      m(`writers paused, with verification of ${SIZE_NAME}`, 'ms', runs.map((r) => r.pausedMs)),
      m('whole migration', 'ms', runs.map((r) => r.ms)),
      m(`round 0 (${SIZE_NAME})`, 'ms', runs.map((r) => r.rounds[0]?.ms ?? 0)),
    ],
    { guestBytes: GIB, dirtyRate: '1% of guest memory per round-0 time', stopBytes: 1 << 20, verified: runs.every((r) => r.verified === true) },
  );
}

runMain(main);
