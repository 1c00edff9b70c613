// The Python clients (examples/python: the standard library's send_fds/recv_fds and the msgpack package)
// against a broker process (`mmbroker serve`). The subscriber maps the owner's bytes at their GPA and acks;
// a removal resolves only once the Python subscriber has unmapped it. That is judged at the moment: the
// Python owner talks to the broker through the testkit's relay (testkit/relay.ts), which reads the
// subscriber's /proc/PID/maps when the broker's reply to the owner's COMMIT passes, before the owner can
// see it.
// Needs python3 with msgpack (Debian: python3-msgpack); under CI a missing one fails.
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { fetchStatus } from '../clients/index.js';
import { OwnerRelay, type CommitReply, type CommitRequest } from '../testkit/relay.js';
import { IN_CI } from './helpers/ci.js';
import { LineProc } from './helpers/examples.js';
import { ROOT, memfdMaps, spawnBroker, stopProcess, tempDir, waitFor, type BrokerProc } from './helpers/procs.js';

const DIR = path.join(ROOT, 'examples/python');
const GPA = 0x4000_0000;
const MiB = 1 << 20;

/** Debian's python3 first (python3-msgpack is installed for it), then whatever python3 is on PATH. */
function findPython(): { python?: string; missing?: string } {
  for (const python of ['/usr/bin/python3', 'python3']) {
    const r = spawnSync(python, ['-c', 'import msgpack, socket; socket.send_fds; print(msgpack.version)'], { encoding: 'utf8' });
    if (r.status === 0) return { python };
  }
  return { missing: 'no python3 (3.9 or later) with the msgpack package' };
}
const { python, missing } = findPython();
const skip = missing !== undefined && !IN_CI;
if (skip) console.warn(`Python client tests skipped: ${missing}; run apt-get install python3-msgpack`);

/** A mapping line of /proc/PID/maps as size and permissions. */
const shape = (line: string) => {
  const m = /^([0-9a-f]+)-([0-9a-f]+) (\S+)/.exec(line) as RegExpExecArray;
  return { size: parseInt(m[2] as string, 16) - parseInt(m[1] as string, 16), perms: m[3] };
};

interface Moment {
  /** The owner's COMMIT, as it went to the broker. */
  request: CommitRequest;
  /** The broker's REPLY to it, before the owner had it. */
  reply: CommitReply;
  /** Each subscriber's mappings of memfds, by memfd name, read at that moment. */
  maps: Map<number, Map<string, string[]>>;
}

describe.skipIf(skip)(`Python clients${skip ? ` (skipped: ${missing}; apt-get install python3-msgpack)` : ''}`, () => {
  let dir: string;
  let socket: string;
  let broker: BrokerProc;
  let relay: OwnerRelay;
  let moments: Moment[];
  let procs: LineProc[];
  let subscribers: LineProc[];

  const py = (script: string, args: string[], opts: { stdin?: boolean } = {}) => {
    if (!python) throw new Error(`${missing}: CI needs the Debian package python3-msgpack (apt-get install python3-msgpack)`);
    const p = new LineProc(python, [path.join(DIR, script), ...args], opts);
    procs.push(p);
    return p;
  };
  const subscriber = (name: string, extra: string[] = []) => {
    const p = py('subscriber.py', ['--socket', socket, '--space', 'vm0', '--name', name, ...extra]);
    subscribers.push(p);
    return p;
  };
  const owner = () => py('owner.py', ['--socket', path.join(dir, 'relay.sock'), '--space', 'vm0'], { stdin: true });
  const client = async (p: LineProc) => (await fetchStatus(socket, 'vm0')).spaces[0]?.clients.find((c) => c.pid === p.pid);

  beforeEach(async () => {
    procs = [];
    subscribers = [];
    dir = tempDir('mmb-python-');
    socket = path.join(dir, 'broker.sock');
    broker = await spawnBroker(socket, ['--space', 'vm0']);
    moments = [];
    // The Python owner talks to the broker through the testkit's relay: as the broker's reply to a COMMIT
    // passes, the subscribers' /proc/PID/maps are read, and only then is the reply forwarded.
    relay = OwnerRelay.start(socket, path.join(dir, 'relay.sock'), {
      onCommitReply: (request, reply) => {
        const maps = new Map(subscribers.map((s) => [s.pid, new Map(['dimm0', 'bad'].map((n) => [n, memfdMaps(s.pid, n)]))]));
        moments.push({ request, reply, maps });
      },
    });
  });

  afterEach(async () => {
    for (const p of procs) await p.stop();
    relay.close();
    expect(relay.errors).toEqual([]);
    await stopProcess(broker);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it("the subscriber maps the owner's bytes at their GPA and acks; a removal resolves only after it unmapped (its /proc/PID/maps read as the reply passes)", async () => {
    const PATTERN = randomBytes(16).toString('hex');
    const sub = subscriber('py-sub', ['--peek', `0x${(GPA + 0x1000).toString(16)}:16`]);
    const own = owner();
    await own.waitFor(/^attached client=\d+ generation=0$/);
    await sub.waitFor(/^synced generation=0 regions=0$/);

    own.send(`add dimm0 0x${GPA.toString(16)} 2M 0x1000:${PATTERN}`);
    const added = await own.waitFor(/^added name=dimm0 id=\d+ gpa=0x40000000 size=0x200000 backing=\d+ generation=(\d+)$/);
    const generation = Number(added[1]);
    // When the owner was told "added", the Python process had the 2 MiB memfd mapped shared, read-write...
    const atAdd = moments[0] as Moment;
    expect(atAdd.reply).toMatchObject({ result: { generation } });
    expect((atAdd.maps.get(sub.pid)?.get('dimm0') ?? []).map(shape)).toEqual([{ size: 2 * MiB, perms: 'rw-s' }]);
    // ...its ack is the broker's record, and it reads the owner's bytes at their guest-physical address.
    expect(await client(sub)).toMatchObject({ kind: 'python', name: 'py-sub', ackedGeneration: generation, transport: 'socket' });
    await sub.waitFor(new RegExp(`^peek gpa=0x40001000 hex=${PATTERN}$`));

    own.send('remove dimm0');
    const removed = await own.waitFor(/^removed name=dimm0 generation=(\d+)$/);
    expect(Number(removed[1])).toBe(generation + 1);
    const atRemove = moments[1] as Moment;
    expect(atRemove.request).toMatchObject({ ops: [{ op: 'remove', region: 'dimm0' }] });
    expect(atRemove.maps.get(sub.pid)?.get('dimm0')).toEqual([]); // unmapped before the broker could answer
    // Its own account, in order (its stdout may trail the broker's answer): it unmapped, then acked.
    await waitFor('the subscriber to log its ack', () => /\nunmapped name=dimm0 id=\d+\nacked seq=\d+(\n|$)/.test(sub.lines.join('\n')));

    // The owner drops the memfd; the subscriber closes its descriptor of it when told it is gone.
    await own.waitFor(/^dropped backing=\d+ released=true$/);
    await sub.waitFor(/^backing-gone id=\d+$/);
    expect(fs.readdirSync(`/proc/${sub.pid}/fd`).some((fd) => fs.readlinkSync(`/proc/${sub.pid}/fd/${fd}`).startsWith('/memfd:dimm0 '))).toBe(false);

    own.child.stdin?.end();
    expect(await own.closed).toEqual({ code: 0, signal: null });
    expect(await sub.stop()).toEqual({ code: 0, signal: null });
  });

  it('a refusal by one Python subscriber rolls the other back before the owner gets the typed error', async () => {
    const applies = subscriber('py-applies');
    const refuses = subscriber('py-refuses', ['--refuse', 'bad']);
    const own = owner();
    await applies.waitFor(/^synced generation=0/);
    await refuses.waitFor(/^synced generation=0/);
    await own.waitFor(/^attached /);

    own.send(`add dimm0 0x${GPA.toString(16)} 2M`);
    await own.waitFor(/^added name=dimm0 .* generation=1$/);
    own.send(`add bad 0x${(GPA + 2 * MiB).toString(16)} 2M`);
    await own.waitFor(/^error code=MMB_ERR_CLIENT_REFUSED message=/);
    // At the moment the refusal reached the owner, neither process mapped "bad"; both still map dimm0.
    const at = moments.at(-1) as Moment;
    expect(at.reply).toMatchObject({ error: { code: 'MMB_ERR_CLIENT_REFUSED', client: { kind: 'python', name: 'py-refuses', pid: refuses.pid } } });
    for (const p of [applies, refuses]) {
      expect(at.maps.get(p.pid)?.get('bad'), p.lines.join('\n')).toEqual([]);
      expect(at.maps.get(p.pid)?.get('dimm0')).toHaveLength(1);
    }
    expect(applies.lines.join('\n')).toMatch(/\nmapped name=bad [^\n]*\nacked seq=\d+\nunmapped name=bad id=\d+\nacked seq=\d+\nrolledback generation=2/);
    expect(refuses.has(/^mapped name=bad /)).toBe(false);
    await own.waitFor(/^dropped backing=\d+ released=true$/); // the owner let go of the refused memfd

    own.child.stdin?.end();
    expect(await own.closed).toEqual({ code: 0, signal: null });
    for (const p of [applies, refuses]) expect(await p.stop()).toEqual({ code: 0, signal: null });
  });
});
