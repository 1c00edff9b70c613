// The minimal C subscriber (examples/c-subscriber-min) against a real broker, judged by the kernel at the
// moment each commit resolves: its /proc/PID/maps, and guest bytes read through /proc/PID/mem at the
// address it mapped. It follows hotplug, a read-only change, unplug and a rollback caused by another
// subscriber (the full C client refusing). Needs gcc and libmsgpack-dev; under CI a missing one fails.
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { Broker } from '../broker/index.js';
import { OwnerClient, type CreatedBacking } from '../clients/index.js';
import { constants, native, type Mapping } from '../native/index.js';
import { IN_CI } from './helpers/ci.js';
import { LineProc, buildCExample, missingCToolchain } from './helpers/examples.js';
import { ROOT, memfdMaps, tempDir } from './helpers/procs.js';

const DIR = path.join(ROOT, 'examples/c-subscriber-min');
const FULL = path.join(ROOT, 'examples/c-subscriber');
const MiB = 1 << 20;
const GPA = 0x4000_0000;
const missing = missingCToolchain();
const skip = missing !== undefined && !IN_CI;
if (skip) console.warn(`c-subscriber-min tests skipped: ${missing}; run apt-get install libmsgpack-dev`);

/** `pid`'s mappings of memfd `name`: start address, size, permissions. */
const maps = (pid: number, name: string) =>
  memfdMaps(pid, name).map((line) => {
    const m = /^([0-9a-f]+)-([0-9a-f]+) (\S+)/.exec(line) as RegExpExecArray;
    const start = parseInt(m[1] as string, 16);
    return { start, size: parseInt(m[2] as string, 16) - start, perms: m[3] as string };
  });

/** `length` bytes of `pid`'s memory at host address `address` (we are its parent: ptrace access). */
function peek(pid: number, address: number, length: number): string {
  const fd = fs.openSync(`/proc/${pid}/mem`, 'r');
  try {
    const out = Buffer.alloc(length);
    fs.readSync(fd, out, 0, length, address);
    return out.toString('hex');
  } finally {
    fs.closeSync(fd);
  }
}

describe.skipIf(skip)(`minimal C subscriber${skip ? ` (skipped: ${missing})` : ''}`, () => {
  let dir: string;
  let socket: string;
  let broker: Broker;
  let owner: OwnerClient;
  let procs: LineProc[];
  let owned: { backing: CreatedBacking; map: Mapping }[];

  beforeAll(() => {
    buildCExample(DIR);
    buildCExample(FULL);
  });

  const start = () => {
    const p = new LineProc(path.join(DIR, 'c-subscriber-min'), [socket, 'vm0']);
    procs.push(p);
    return p;
  };
  /** A backing of `size` bytes the owner also maps, with `bytes` written at `offset`. */
  const backing = async (name: string, size: number, offset = 0, bytes = Buffer.alloc(0)) => {
    const b = await owner.createBacking(size, name);
    const map = native.mmap(b.fd, 0, size, constants.PROT_READ | constants.PROT_WRITE, constants.MAP_SHARED);
    new Uint8Array(map.buffer).set(bytes, offset);
    owned.push({ backing: b, map });
    return b;
  };

  beforeEach(async () => {
    procs = [];
    owned = [];
    dir = tempDir('mmb-c-min-');
    socket = path.join(dir, 'broker.sock');
    broker = new Broker({ spaces: ['vm0'], limits: { ackTimeoutMs: 5000 } });
    broker.listen(socket);
    owner = await OwnerClient.attach(broker, { space: 'vm0' });
  });

  afterEach(async () => {
    for (const p of procs) await p.stop();
    owner.close();
    await broker.close();
    for (const o of owned) {
      native.munmap(o.map);
      native.close(o.backing.fd);
    }
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('maps what it is given before it acks, at the right GPA, follows a read-only change, and unmaps before a removal resolves', async () => {
    const PATTERN = randomBytes(32);
    const ram = await backing('ram', 16 * MiB, 0x2000, PATTERN);
    await owner.addRegion({ name: 'ram', gpa: 0, size: 16 * MiB, backing: ram.backing });
    const c = start();
    await c.waitFor(/^synced generation=1$/);
    const [r] = maps(c.pid, 'ram');
    expect(r).toMatchObject({ size: 16 * MiB, perms: 'rw-s' });
    expect(peek(c.pid, (r?.start ?? 0) + 0x2000, 32)).toBe(PATTERN.toString('hex'));

    const DIMM = randomBytes(16);
    const dimm = await backing('dimm0', 2 * MiB, 0x1000, DIMM);
    const added = await owner.addRegion({ name: 'dimm0', gpa: GPA, size: 2 * MiB, backing: dimm.backing, readonly: true });
    // Resolved: the C process acked, so the kernel shows the mapping now, with the owner's bytes in it.
    const [d] = maps(c.pid, 'dimm0');
    expect(d).toMatchObject({ size: 2 * MiB, perms: 'r--s' });
    expect(peek(c.pid, (d?.start ?? 0) + 0x1000, 16)).toBe(DIMM.toString('hex'));
    await c.waitFor(new RegExp(`^mapped id=${added.added[0]?.id} gpa=0x40000000 size=0x200000 addr=0x${d?.start.toString(16)}$`));

    await owner.commit([{ op: 'set', region: 'dimm0', readonly: false }]);
    expect(maps(c.pid, 'dimm0')).toEqual([expect.objectContaining({ size: 2 * MiB, perms: 'rw-s' })]);

    await owner.removeRegion('dimm0');
    expect(maps(c.pid, 'dimm0')).toEqual([]);
    expect(maps(c.pid, 'ram')).toHaveLength(1);
    expect(broker.status('vm0').spaces[0]?.clients.find((x) => x.pid === c.pid)).toMatchObject({ kind: 'c-subscriber-min', ackedGeneration: 4 });

    await owner.dropBacking(dimm.backing);
    await c.waitFor(new RegExp(`^backing-gone id=${dimm.backing}$`));
    expect(fs.readdirSync(`/proc/${c.pid}/fd`).some((fd) => fs.readlinkSync(`/proc/${c.pid}/fd/${fd}`).startsWith('/memfd:dimm0 '))).toBe(false);
    expect(await c.stop()).toMatchObject({ signal: 'SIGTERM' }); // no handler: the plain default
  });

  it('undoes a transaction another subscriber refused before the owner gets the refusal, and leaves with 0 on shutdown', async () => {
    const c = start();
    const refuser = new LineProc(path.join(FULL, 'c-subscriber'), ['--socket', socket, '--space', 'vm0', '--nack-region', 'bad']);
    procs.push(refuser);
    await c.waitFor(/^synced generation=0$/);
    await refuser.waitFor(/^synced gen=0 /);
    const bad = await backing('bad', 2 * MiB);
    await expect(owner.addRegion({ name: 'bad', gpa: GPA, size: 2 * MiB, backing: bad.backing })).rejects.toMatchObject({
      code: 'MMB_ERR_CLIENT_REFUSED',
      client: { kind: 'c-subscriber' },
    });
    expect(maps(c.pid, 'bad')).toEqual([]);
    await c.waitFor(/^rolledback generation=1$/);
    expect(c.lines.join('\n')).toMatch(/\nmapped id=\d+ gpa=0x40000000 [^\n]*\nacked seq=\d+\nunmapped id=\d+\nacked seq=\d+\nrolledback generation=1/);

    await broker.close();
    expect(await c.closed).toEqual({ code: 0, signal: null });
    expect(c.lines.at(-1)).toBe('goodbye code=MMB_ERR_SHUTDOWN');
  });
});
