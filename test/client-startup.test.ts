// A client stopped while it starts up detaches cleanly. The harness once saw "vfio client vfio-4 exited
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
import { CLI, DIST } from '../testkit/paths.js';
import { waitFor } from '../testkit/wait.js';
import { tempDir } from './helpers/procs.js';

const MiB = 2 ** 20;
const BROKEN_CLIENT = path.join(DIST, 'harness/broken-client.js');
let dir: string;
let socket: string;
let broker: BrokerProc;
let owner: OwnerClient;

beforeAll(async () => {
  dir = tempDir('mmb-startup-');
  socket = path.join(dir, 'broker.sock');
  broker = await BrokerProc.start({ socket, spaces: ['vm0'] });
  owner = await OwnerClient.attach(socket, { space: 'vm0', name: 'startup-owner' });
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

/** How the harness runs a client of each kind (harness/procs.ts), the self-test's broken ones included. */
const KINDS: Record<string, { script: string; args: string[]; ready: string }> = {
  plain: { script: CLI, args: ['attach', 'plain', '--json', '--control'], ready: 'attached' },
  vhost: { script: CLI, args: ['attach', 'vhost', '--json', '--control'], ready: 'attached' },
  kvm: { script: CLI, args: ['attach', 'kvm', '--json', '--control'], ready: 'attached' },
  vfio: { script: CLI, args: ['attach', 'vfio', '--backend', 'soft', '--device', 'd0', '--json', '--control'], ready: 'attached' },
  'broken skip-unmap': { script: BROKEN_CLIENT, args: ['--mode', 'skip-unmap'], ready: 'attached' },
  'broken pin-twice': { script: BROKEN_CLIENT, args: ['--mode', 'pin-twice', '--device', 'd0'], ready: 'attached' },
};

function spawnClient(kind: string, name: string, opts: SpawnOptions = {}): JsonProc {
  const k = KINDS[kind] as (typeof KINDS)[string];
  return JsonProc.spawn(k.script, [...k.args, '--socket', socket, '--space', 'vm0', '--name', name], { ...opts, name: `${kind} client ${name}` });
}

describe.each(Object.keys(KINDS))('a %s client', (kind) => {
  it('SIGTERM at each moment of its start-up: it exits 0, detached, and the broker lists it no more', async () => {
    // A reference run says how many lines the client prints up to and including its ready line.
    const ref = spawnClient(kind, `${kind.replace(' ', '-')}-ref`);
    const ready = await ref.next(KINDS[kind]?.ready, () => true, 30_000);
    const lines = ref.lines.indexOf(ready) + 1;
    expect(await ref.stop('SIGTERM')).toBe(0);
    const moments: Moment[] = ['connect', 'recv:1', ...Array.from({ length: lines }, (_, i) => `line:${i + 1}` as const)];

    const outcomes: string[] = [];
    for (const m of moments) {
      const p = spawnClient(kind, `${kind.replace(' ', '-')}-${m.replace(':', '')}`, stopAt(m));
      const end = await signalWhenStopped(p, 'SIGTERM');
      const detached = await p.next('detached', () => true, 5_000).then(() => true, () => false);
      await waitFor(`the broker to drop ${p.describe()}`, async () => !(await listed(p.pid)), 10_000).catch(() => undefined);
      outcomes.push(`${m}: ${end.signal ?? `exit ${end.code}`}${detached ? ', detached' : ''}${(await listed(p.pid)) ? ', still listed' : ''}`);
    }
    expect(outcomes).toEqual(moments.map((m) => `${m}: exit 0, detached`));
  }, 120_000);
});

describe('the broker', () => {
  it('SIGTERM right after its "listening" line: it exits 0', async () => {
    const own = path.join(dir, 'own.sock');
    const p = JsonProc.spawn(CLI, ['serve', '--socket', own, '--log-level', 'info'], stopAt('line:1', { name: 'broker', stdin: 'ignore' }));
    const end = await signalWhenStopped(p, 'SIGTERM');
    expect(p.lines[0]?.msg).toBe('listening');
    expect(end).toEqual({ code: 0, signal: null });
    expect(p.lines.at(-1)?.msg).toBe('broker closed');
  });
});
