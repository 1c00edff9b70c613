// A scripted subscriber process for tests: a MappingSubscriber in its own OS process, driven by JSON
// commands on stdin and reporting JSON events on stdout. It imports the compiled library (dist/), which
// `npm test` builds first.
//
// argv: --socket PATH --space NAME [--name NAME] [--nack PREFIX] [--nack-delay MS] [--ack-delay MS]
//       [--max-regions N] [--no-reconnect] [--reconnect-delay MS] [--coalesce]
// (--nack-delay: refuse a change adding a region named PREFIX... only after that long, so that others
//  hold it voted meanwhile; it prints {"event":"refusing"} when it starts waiting.)
// stdin commands: {"cmd":"read","gpa":N,"len":N} {"cmd":"write","gpa":N,"hex":"..."} {"cmd":"regions"}
//                 {"cmd":"drop"} {"cmd":"exit"}
//                 {"cmd":"hand-on","region":NAME}: starts test/fixtures/holder-proc.mjs with the region's
//                   backing fd, waits until it mapped it, and names it to the broker (DELEGATE);
//                   answers {"event":"delegated","pid":N}
import { spawn } from 'node:child_process';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { MappingSubscriber, ClientRefusedError } from '../../dist/index.js';
import { native } from '../../dist/native/index.js';
import { serveCommands } from '../../dist/cli/control.js';

const { values } = parseArgs({
  options: {
    socket: { type: 'string' },
    space: { type: 'string' },
    name: { type: 'string' },
    nack: { type: 'string' },
    'nack-delay': { type: 'string' },
    'ack-delay': { type: 'string' },
    'max-regions': { type: 'string' },
    'no-reconnect': { type: 'boolean' },
    'reconnect-delay': { type: 'string' },
    coalesce: { type: 'boolean' },
  },
});
const out = (ev) => process.stdout.write(JSON.stringify(ev) + '\n');

const sub = await MappingSubscriber.attach(values.socket, {
  space: values.space,
  name: values.name ?? `sub-${process.pid}`,
  reconnect: !values['no-reconnect'],
  ...(values['reconnect-delay'] ? { reconnectDelayMs: Number(values['reconnect-delay']) } : {}),
  ...(values['max-regions'] ? { maxRegions: Number(values['max-regions']) } : {}),
  ...(values.coalesce ? { coalesce: true } : {}),
});
const regions = () =>
  sub.memory.regions().map((m) => ({ id: m.region.id, name: m.region.name, gpa: m.region.gpa, size: m.region.size, address: m.address, readonly: m.region.readonly }));

sub.on('change', (ev) => {
  // A vote may prepare (stage) what its commit will add in place of something removed: that is refused too.
  const bad = values.nack && (ev.change.cause === 'txn' || ev.change.cause === 'sync') && [...ev.change.added, ...(ev.change.staged ?? [])].find((r) => r.name.startsWith(values.nack));
  if (bad && values['nack-delay']) {
    out({ event: 'refusing', region: bad.name, generation: ev.change.generation });
    ev.waitUntil(new Promise((_, reject) => setTimeout(() => reject(new ClientRefusedError(`refusing region ${bad.name}`)), Number(values['nack-delay']))));
  } else if (bad) ev.waitUntil(Promise.reject(new ClientRefusedError(`refusing region ${bad.name}`)));
  else if (values['ack-delay']) ev.waitUntil(new Promise((r) => setTimeout(r, Number(values['ack-delay']))));
  out({ event: 'change', cause: ev.change.cause, generation: ev.change.generation, added: ev.change.added.map((r) => r.name), removed: ev.change.removed.map((r) => r.name), updated: ev.change.updated.map((u) => u.after.name) });
});
sub.on('committed', (generation) => out({ event: 'committed', generation }));
sub.on('rolledBack', (generation) => out({ event: 'rolledBack', generation }));
sub.on('synced', (s) => out({ event: 'synced', generation: s.generation, mode: s.mode, added: s.change.added.map((r) => r.name), removed: s.change.removed.map((r) => r.name) }));
sub.on('disconnected', (reason) => out({ event: 'disconnected', code: reason?.code }));
sub.on('reconnected', (r) => out({ event: 'reconnected', ...r }));
sub.on('goodbye', (e) => out({ event: 'goodbye', code: e.code }));
sub.on('error', (e) => out({ event: 'error', code: e.code, message: e.message }));
out({ event: 'ready', pid: process.pid, id: sub.id, generation: sub.generation, regions: regions() });

serveCommands(
  {
    read: (c) => ({ event: 'read', hex: Buffer.from(sub.memory.read(c.gpa, c.len)).toString('hex') }),
    write: (c) => {
      sub.memory.write(c.gpa, Buffer.from(c.hex, 'hex'));
      return { event: 'wrote', gpa: c.gpa };
    },
    regions: () => ({ event: 'regions', generation: sub.generation, regions: regions() }),
    'hand-on': async (c) => {
      const r = sub.regions().find((x) => x.name === c.region);
      const b = r && sub.backing(r.backing);
      if (!b) throw new Error(`no region ${c.region}`);
      const holder = fileURLToPath(new URL('../fixtures/holder-proc.mjs', import.meta.url));
      const child = spawn(process.execPath, [holder, String(b.size)], { stdio: ['ignore', 'pipe', 'inherit', b.fd] });
      await new Promise((resolve) => readline.createInterface({ input: child.stdout }).once('line', resolve));
      await sub.delegate([{ name: `holder (pid ${child.pid})`, pidfd: native.pidfdOpen(child.pid) }]);
      return { event: 'delegated', pid: child.pid };
    },
    drop: () => {
      sub.dropConnection();
      return { event: 'dropped' };
    },
    exit: async () => {
      await sub.close();
      process.exit(0);
    },
  },
  { onEnd: () => sub.close().then(() => process.exit(0)) },
);
