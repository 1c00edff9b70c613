// A subscriber evicted while it applies its initial map, or again while it resyncs (its applier slower than the ack deadline, as a vfio-like
// client pinning a large region is) must end up with one connection, not two. Found by the hotplug
// harness (leaks: a vfio process held two broker connections after pinning 1 GiB took longer than the
// deadline; both were attached and acked every change).
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { GuestMemory, MappingSubscriber, Subscriber, type Change, type LocalBacking } from '../clients/index.js';
import { native } from '../native/index.js';
import { tempDir, waitFor } from './helpers/procs.js';
import { defer, embeddedBroker, ownerOf, runCleanups } from './helpers/embedded.js';

const MiB = 1 << 20;
afterEach(runCleanups);

/** A broker with a 150 ms ack deadline on a socket, its owner, and a 2 MiB backing. */
async function listening() {
  const b = embeddedBroker({ limits: { ackTimeoutMs: 150 } });
  const socket = path.join(tempDir(), 'b.sock');
  b.listen(socket);
  const owner = await ownerOf(b);
  const ram = await owner.createBacking(2 * MiB, 'ram');
  defer(() => native.close(ram.fd));
  return { b, socket, owner, ram };
}

describe('reconnect', () => {
  it('evicted during its resync, again and again: one connection at the end', async () => {
    const { b, socket, owner, ram } = await listening();
    const sub = await MappingSubscriber.attach(socket, { space: 'vm0', name: 'slow', reconnectDelayMs: 5 });
    defer(() => sub.close());
    // The transaction and the next two resyncs each take longer than the deadline.
    let slow = 3;
    sub.on('change', (e) => {
      if (slow-- > 0) e.waitUntil(new Promise((r) => setTimeout(r, 300)));
    });
    let reconnects = 0;
    sub.on('reconnected', () => reconnects++);
    await owner.addRegion({ name: 'ram', gpa: 0, size: 2 * MiB, backing: ram.backing });
    const subscribers = () => b.status('vm0').spaces[0]!.clients.filter((c) => c.role === 'subscriber');
    // Settled: every slow change is behind us, and a connection of the client acked generation 1.
    await waitFor(
      'the client to resync',
      () => slow < 0 && sub.generation === 1 && subscribers().some((c) => c.ackedGeneration === 1 && c.state === 'ready'),
      15_000,
    );
    // Any other reconnect attempt still under way has had time to attach: its backoff is at most 1 s.
    const seen = reconnects;
    await waitFor(
      'reconnect attempts to stop',
      async () => {
        await new Promise((r) => setTimeout(r, 1500));
        return reconnects === seen;
      },
      15_000,
    );
    expect(subscribers().map((c) => c.name)).toEqual(['slow']);
    expect(sub.connected).toBe(true);
  });

  it('evicted while applying its initial map: the attach tries again and succeeds, with no second connection', async () => {
    const { b, socket, owner, ram } = await listening();
    await owner.addRegion({ name: 'ram', gpa: 0, size: 2 * MiB, backing: ram.backing });
    // An applier whose first change takes longer than the deadline, as pinning gigabytes does.
    const memory = new GuestMemory();
    let calls = 0;
    const slow = {
      async apply(change: Change, backings: ReadonlyMap<number, LocalBacking>) {
        if (calls++ === 0) await new Promise((r) => setTimeout(r, 400));
        memory.apply(change, backings);
      },
      close: () => memory.close(),
    };
    const sub = await Subscriber.create(socket, slow, { space: 'vm0', name: 'slow-start', reconnectDelayMs: 5 });
    defer(() => sub.close());
    expect(sub.connected).toBe(true);
    expect(memory.regions().map((m) => m.region.name)).toEqual(['ram']);
    const subscribers = () => b.status('vm0').spaces[0]!.clients.filter((c) => c.role === 'subscriber');
    await waitFor('its ack to reach the broker', () => subscribers().some((c) => c.state === 'ready'));
    expect(subscribers().map((c) => [c.name, c.ackedGeneration, c.state])).toEqual([['slow-start', 1, 'ready']]);
  });
});
