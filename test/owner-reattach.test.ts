// An owner that disconnects while its commit is still being acked, and a new owner that attaches: the new
// owner's ATTACH is answered once that commit settled, so the generation it gets (and any STATUS) says
// whether the commit happened. Found by the hotplug harness (owner-disconnect fault): the new owner read
// the old generation, decided the commit was lost, and the commit landed afterwards.
import { afterEach, describe, expect, it } from 'vitest';
import { OwnerClient } from '../clients/index.js';
import { native } from '../native/index.js';
import { isMmbError } from '../protocol/index.js';
import { waitFor } from './helpers/procs.js';
import { defer, embeddedBroker, runCleanups, subscriberOf } from './helpers/embedded.js';

const MiB = 1 << 20;
afterEach(runCleanups);

describe('owner reattach', () => {
  it("a new owner attaching while the old owner's commit is in flight learns its outcome", async () => {
    const b = embeddedBroker({ limits: { ackTimeoutMs: 10_000 } });
    const first = await OwnerClient.attach(b, { space: 'vm0' });
    const ram = await first.createBacking(2 * MiB, 'ram');
    defer(() => native.close(ram.fd));
    const sub = await subscriberOf(b);
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    let applied = false;
    sub.once('change', (e) => {
      applied = true;
      e.waitUntil(gate);
    });
    const heard = first.addRegion({ name: 'ram', gpa: 0, size: 2 * MiB, backing: ram.backing }).then(
      () => 'committed',
      (err: unknown) => (isMmbError(err) ? err.code : String(err)),
    );
    await waitFor('the subscriber to apply the change', () => applied);
    const ownerId = () => b.status('vm0').spaces[0]?.clients.find((c) => c.role === 'owner')?.id;
    const firstId = ownerId();
    expect(firstId).toBeDefined();
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
    // The ATTACH reaches the broker (which gives it the owner seat at once) before the transaction may
    // complete, and is not answered while that transaction is in flight.
    await waitFor('the new owner to take the seat', () => ownerId() !== undefined && ownerId() !== firstId);
    expect(attached, 'ATTACH answered while the old commit was in flight').toBeUndefined();
    release();
    const second = await attaching;
    defer(() => second.close());
    // The subscriber acked, so the commit landed: the new owner's generation says so.
    expect(second.generation).toBe(1);
    expect((await second.status('vm0')).spaces[0]?.regions.map((r) => r.name)).toEqual(['ram']);
  });
});
