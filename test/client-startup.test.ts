// A client stopped while it starts up detaches cleanly: every client process the project starts. The harness once saw "vfio client vfio-4 exited
// SIGTERM after SIGTERM (expected a clean detach, 0)": the client printed its ready line before it handled
// SIGTERM, and a SIGTERM in between ended it by the default action. Here the client stops itself at each
// moment of its start-up (testkit/moments.ts: its connect(), the broker's first answer, every line it
// prints up to and including the ready line), gets SIGTERM there, and must exit 0 having detached, with
// the broker listing it no more.
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { OwnerClient } from '../clients/index.js';
import { native } from '../native/index.js';
import { BrokerProc } from '../testkit/broker.js';
import { JsonProc, type SpawnOptions } from '../testkit/jsonproc.js';
import { signalWhenStopped, stopAt, type Moment } from '../testkit/moments.js';
import { BROKEN_CLIENT } from '../harness/procs.js';
import { SCRIPTED_CLIENT } from '../testkit/clients.js';
import { CLI } from '../testkit/paths.js';
import { waitFor } from '../testkit/wait.js';
import { tempDir } from './helpers/procs.js';

const MiB = 2 ** 20;
let dir: string;
let socket: string;
let broker: BrokerProc;
let owner: OwnerClient;

beforeAll(async () => {
  dir = tempDir('mmb-startup-');
  socket = path.join(dir, 'broker.sock');
  broker = await BrokerProc.start({ socket, spaces: ['vm0'] });
  // `mmbroker serve` starts its spaces unpublished: clients wait for the owner's map until it publishes.
  owner = await OwnerClient.attach(socket, { space: 'vm0', name: 'startup-owner', publish: true });
  // Something to map and pin during the initial sync.
  const b = await owner.createBacking(4 * MiB, 'ram');
  native.close(b.fd);
  await owner.addRegion({ name: 'ram', gpa: 0, size: 4 * MiB, backing: b.backing });
});

afterAll(async () => {
  owner?.close();
  await broker?.stop('SIGTERM');
  fs.rmSync(dir, { recursive: true, force: true });
});

const listed = async (pid: number) => ((await owner.status('vm0')).spaces[0]?.clients ?? []).some((c) => c.pid === pid);

/**
 * Every client process the project starts: the shipped `mmbroker attach` of each kind (ready line
 * "attached"), the testkit's scripted client of each kind as the harness runs it, and the self-test's
 * broken clients (ready line "ready").
 */
const KINDS: Record<string, { script: string; args: string[]; ready: string }> = {
  'mmbroker attach plain': { script: CLI, args: ['attach', 'plain', '--json', '--control'], ready: 'attached' },
  'mmbroker attach vhost': { script: CLI, args: ['attach', 'vhost', '--json', '--control'], ready: 'attached' },
  'mmbroker attach kvm': { script: CLI, args: ['attach', 'kvm', '--json', '--control'], ready: 'attached' },
  'mmbroker attach vfio': { script: CLI, args: ['attach', 'vfio', '--backend', 'soft', '--device', 'd0', '--json', '--control'], ready: 'attached' },
  'scripted plain': { script: SCRIPTED_CLIENT, args: ['plain'], ready: 'ready' },
  'scripted vhost': { script: SCRIPTED_CLIENT, args: ['vhost'], ready: 'ready' },
  'scripted kvm': { script: SCRIPTED_CLIENT, args: ['kvm'], ready: 'ready' },
  'scripted vfio': { script: SCRIPTED_CLIENT, args: ['vfio', '--device', 'd0', '--device', 'd1'], ready: 'ready' },
  'broken skip-unmap': { script: BROKEN_CLIENT, args: ['--mode', 'skip-unmap'], ready: 'ready' },
  'broken pin-twice': { script: BROKEN_CLIENT, args: ['--mode', 'pin-twice', '--device', 'd0'], ready: 'ready' },
};

function spawnClient(kind: string, name: string, opts: SpawnOptions = {}): JsonProc {
  const k = KINDS[kind] as (typeof KINDS)[string];
  return JsonProc.spawn(k.script, [...k.args, '--socket', socket, '--space', 'vm0', '--name', name], { ...opts, name: `${kind} (${name})` });
}

const tag = (kind: string) => kind.replace(/^mmbroker /, '').replace(/ /g, '-');

describe.each(Object.keys(KINDS))('%s', (kind) => {
  it('SIGTERM at each moment of its start-up: it exits 0, detached, and the broker lists it no more', async () => {
    // A reference run says how many lines the client prints up to and including its ready line.
    const ref = spawnClient(kind, `${tag(kind)}-ref`);
    const ready = await ref.next(KINDS[kind]?.ready, () => true, 30_000);
    const lines = ref.lines.indexOf(ready) + 1;
    expect(await ref.stop('SIGTERM')).toBe(0);
    const moments: Moment[] = ['connect', 'recv:1', ...Array.from({ length: lines }, (_, i) => `line:${i + 1}` as const)];

    const outcomes: string[] = [];
    for (const m of moments) {
      const p = spawnClient(kind, `${tag(kind)}-${m.replace(':', '')}`, stopAt(m));
      const end = await signalWhenStopped(p, 'SIGTERM');
      const detached = await p
        .next('detached', () => true, 5_000)
        .then(
          () => true,
          () => false,
        );
      await waitFor(`the broker to drop ${p.describe()}`, async () => !(await listed(p.pid)), 10_000).catch(() => undefined);
      outcomes.push(`${m}: ${end.signal ?? `exit ${end.code}`}${detached ? ', detached' : ''}${(await listed(p.pid)) ? ', still listed' : ''}`);
    }
    expect(outcomes).toEqual(moments.map((m) => `${m}: exit 0, detached`));
  }, 120_000);
});

describe('the broker', () => {
  it('SIGTERM right after its "listening" line: it exits 0', async () => {
    const own = path.join(dir, 'own.sock');
    // A reference run says which line "listening" is (the version line comes first).
    const ref = JsonProc.spawn(CLI, ['serve', '--socket', own, '--log-level', 'info'], { name: 'broker-ref', stdin: 'ignore' });
    const listening = await ref.next(undefined, (l) => l.msg === 'listening', 30_000);
    const n = ref.lines.indexOf(listening) + 1;
    expect(await ref.stop('SIGTERM')).toBe(0);
    const p = JsonProc.spawn(CLI, ['serve', '--socket', own, '--log-level', 'info'], stopAt(`line:${n}`, { name: 'broker', stdin: 'ignore' }));
    const end = await signalWhenStopped(p, 'SIGTERM');
    expect(p.lines[n - 1]?.msg).toBe('listening');
    expect(end).toEqual({ code: 0, signal: null });
    expect(p.lines.at(-1)?.msg).toBe('broker closed');
  });
});
