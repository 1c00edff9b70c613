// Limits a broker announces in HELLO are the ones its clients live by: a broker configured beyond the
// defaults (more fds per frame, larger frames) still serves the library's socket clients.
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { Broker } from '../broker/index.js';
import { MappingSubscriber, OwnerClient } from '../clients/index.js';
import { native } from '../native/index.js';
import { isMmbError } from '../protocol/index.js';
import { memfdMaps, tempDir } from './helpers/procs.js';
import { defer, runCleanups } from './helpers/embedded.js';

afterEach(runCleanups);

describe('announced limits', () => {
  it('a socket subscriber follows a commit that brings 70 backings to a broker allowing 100 fds per frame', async () => {
    const broker = new Broker({ spaces: ['vm0'], protocol: { maxFdsPerFrame: 100, maxFrameBytes: 2 << 20 } });
    defer(() => broker.close());
    const socket = path.join(tempDir(), 'b.sock');
    broker.listen(socket);
    const owner = await OwnerClient.attach(broker, { space: 'vm0' });
    defer(() => owner.close());
    const sub = await MappingSubscriber.attach(socket, { space: 'vm0', reconnect: false });
    defer(() => sub.close());
    let dropped = false;
    sub.on('disconnected', () => (dropped = true));
    const ops = [];
    for (let i = 0; i < 70; i++) {
      const b = await owner.createBacking(4096, `many${i}`);
      native.close(b.fd);
      ops.push({ op: 'add' as const, name: `many${i}`, gpa: i * 4096, size: 4096, backing: b.backing, offset: 0 });
    }
    const r = await owner.commit(ops);
    expect(dropped).toBe(false);
    expect(broker.status('vm0').spaces[0]!.clients.find((c) => c.role === 'subscriber')?.ackedGeneration).toBe(r.generation);
    expect(sub.regions()).toHaveLength(70);
    expect(memfdMaps(process.pid, 'many69')).toHaveLength(1);
  });

  it('refuses impossible limits at construction', () => {
    for (const protocol of [{ maxFdsPerFrame: 254 }, { maxFrameBytes: 0 }, { maxNameBytes: 100 }]) {
      let err: unknown;
      try {
        new Broker({ protocol });
      } catch (e) {
        err = e;
      }
      expect(isMmbError(err, 'MMB_ERR_INVALID_ARG'), JSON.stringify(protocol)).toBe(true);
    }
  });

  it('enforces its configured ops-per-commit limit', async () => {
    const broker = new Broker({ spaces: ['vm0'], protocol: { maxOpsPerCommit: 2 } });
    defer(() => broker.close());
    const owner = await OwnerClient.attach(broker, { space: 'vm0' });
    defer(() => owner.close());
    const err = await owner.commit([0, 1, 2].map((i) => ({ op: 'remove' as const, region: i + 1 }))).catch((e) => e);
    expect(err.code).toBe('MMB_ERR_BAD_MESSAGE');
  });
});
