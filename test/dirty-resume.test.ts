// A subscriber that reconnects keeps no dirty bitmap of an earlier connection: the broker sends every
// current bitmap at each attach, so anything else it holds is a region that stopped logging while it
// was away, or belongs to a broker that restarted. Found by the hotplug harness (leaks: a client held
// more `dirty:` memfds than there were logging regions after a broker restart or an eviction).
// The broker runs in its own process so /proc/self shows the subscriber's descriptors only.
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { MappingSubscriber, OwnerClient, createSealedMemfd } from '../clients/index.js';
import { native } from '../native/index.js';
import { fdCensus } from '../testkit/procfs.js';
import { spawnBroker, stopProcess, tempDir, waitFor } from './helpers/procs.js';
import { defer, runCleanups } from './helpers/embedded.js';

const MiB = 1 << 20;
afterEach(runCleanups);

/** `dirty:` memfds this process holds open, per the kernel. */
const bitmapFds = () => fdCensus(process.pid, '').bitmaps;

async function serve(socket: string) {
  // The shipped default: spaces start unpublished, so a restart never hands a subscriber an empty map.
  const b = await spawnBroker(socket, ['--space', 'vm0'], { published: false });
  defer(() => stopProcess(b, 'SIGKILL'));
  return b;
}

describe('dirty bitmaps across reconnects', () => {
  it('a restarted broker: the old bitmap is dropped, the new one kept', async () => {
    const socket = path.join(tempDir(), 'b.sock');
    const first = await serve(socket);
    const fd = createSealedMemfd('ram', 2 * MiB);
    defer(() => native.close(fd));
    // Two logging regions before the restart, one after: the new broker numbers its one bitmap 1, so the
    // old bitmap 2 would linger.
    const publish = async (regions: number) => {
      const owner = await OwnerClient.attach(socket, { space: 'vm0' });
      const { backing } = await owner.addBacking(fd, 'ram');
      await owner.commit(
        Array.from({ length: regions }, (_, i) => ({ op: 'add' as const, name: `r${i}`, gpa: i * MiB, size: MiB, backing, offset: i * MiB, logDirty: true })),
      );
      await owner.publish();
      return owner;
    };
    const owner1 = await publish(2);
    const sub = await MappingSubscriber.attach(socket, { space: 'vm0', reconnectDelayMs: 10 });
    defer(() => sub.close());
    expect(bitmapFds()).toBe(2);
    await stopProcess(first, 'SIGKILL');
    owner1.close();
    await serve(socket);
    const owner2 = await publish(1);
    defer(() => owner2.close());
    await waitFor('the subscriber to resync with the new broker', () => sub.connected && sub.generation === 1 && sub.regions().length === 1);
    expect(bitmapFds()).toBe(1);
  });

  it('logging stopped while the subscriber was away: its bitmap is dropped on resume', async () => {
    const socket = path.join(tempDir(), 'b.sock');
    await serve(socket);
    const owner = await OwnerClient.attach(socket, { space: 'vm0', publish: true });
    defer(() => owner.close());
    const ram = await owner.createBacking(2 * MiB, 'ram');
    defer(() => native.close(ram.fd));
    await owner.addRegion({ name: 'ram', gpa: 0, size: 2 * MiB, backing: ram.backing, logDirty: true });
    const sub = await MappingSubscriber.attach(socket, { space: 'vm0', reconnect: true, reconnectDelayMs: 200 });
    defer(() => sub.close());
    expect(bitmapFds()).toBe(1);
    const reconnected = new Promise((r) => sub.once('reconnected', r));
    sub.dropConnection();
    await owner.commit([{ op: 'set', region: 'ram', logDirty: false }]);
    await reconnected;
    await waitFor('the resume to be applied', () => sub.generation === owner.generation);
    expect(bitmapFds()).toBe(0);
  });
});
