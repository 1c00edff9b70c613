// An owner that disconnects while its commit is still being acked, and a new owner that attaches: the new
// owner's ATTACH is answered once that commit settled, so the generation it gets (and any STATUS) says
// whether the commit happened. Found by the hotplug harness (owner-disconnect fault): the new owner read
// the old generation, decided the commit was lost, and the commit landed afterwards.
import { afterEach, describe, expect, it } from 'vitest';
import { Broker } from '../broker/index.js';
import { MappingSubscriber, OwnerClient } from '../clients/index.js';
import { native } from '../native/index.js';
import { isMmbError } from '../protocol/index.js';
import { waitFor } from './helpers/procs.js';
import { defer, runCleanups } from './helpers/embedded.js';

const MiB = 1 << 20;
afterEach(runCleanups);

describe('owner reattach', () => {
  it('a new owner attaching while the old owner\'s commit is in flight learns its outcome', async () => {
    const b = new Broker({ spaces: ['vm0'], limits: { ackTimeoutMs: 10_000 } });
    defer(() => b.close());
    const first = await OwnerClient.attach(b, { space: 'vm0' });
    const ram = await first.createBacking(2 * MiB, 'ram');
    defer(() => native.close(ram.fd));
    const sub = await MappingSubscriber.attach(b, { space: 'vm0' });
    defer(() => sub.close());
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    let applied = false;
    sub.once('change', (e) => {
      applied = true;
      e.waitUntil(gate);
    });
    const heard = first.addRegion({ name: 'ram', gpa: 0, size: 2 * MiB, backing: ram.backing }).then(() => 'committed', (err: unknown) => (isMmbError(err) ? err.code : String(err)));
    await waitFor('the subscriber to apply the change', () => applied);
    first.close();
    expect(await heard).toBe('MMB_ERR_DISCONNECTED');
    let attached: OwnerClient | undefined;
    const attaching = waitFor('a new owner to attach', async () => {
      try {
        return await OwnerClient.attach(b, { space: 'vm0' });
      } catch (err) {
        if (isMmbError(err, 'MMB_ERR_OWNER_EXISTS')) return undefined;
        throw err;
      }
    }).then((o) => (attached = o));
    // Let the ATTACH reach the broker before the transaction may complete.
    await new Promise((r) => setTimeout(r, 50));
    release();
    const second = await attaching;
    defer(() => second.close());
    expect(attached).toBe(second);
    // The subscriber acked, so the commit landed: the new owner's generation says so.
    expect(second.generation).toBe(1);
    expect((await second.status('vm0')).spaces[0]?.regions.map((r) => r.name)).toEqual(['ram']);
  });
});
