// BROKEN ON PURPOSE. A client process for `mmbroker harness --self-test`, with one planted bug, to prove
// the harness's checks can fail. Never use it for anything else.
//
//   --mode skip-unmap  a plain subscriber that acks a removal without unmapping the memory (it keeps a
//                      mapping of every removed region): "no stale mapping" must catch it in /proc/PID/maps;
//   --mode pin-twice   a soft vfio-like subscriber that pins every region a second time (one more mapping,
//                      mlocked, as a client pinning per device instead of per domain would): "pins" must
//                      catch it in VmLck.
//
// Otherwise it is the testkit's scripted client (testkit/scripted.ts): the same control protocol, the
// same ready line, the same clean exit on SIGTERM.
import { parseArgs } from 'node:util';
import { MappingSubscriber, GuestMemory, type SubscriberOptions } from '../clients/index.js';
import type { Change, LocalBacking } from '../clients/view.js';
import { VfioSubscriber } from '../clients/vfio/index.js';
import { constants, native, type Mapping } from '../native/index.js';
import { vfioCommands } from '../testkit/commands.js';
import { runScripted } from '../testkit/scripted.js';

/** Acks removals but leaves a mapping of each removed region behind: the planted bug. */
class LeakyMemory extends GuestMemory {
  readonly leaked: Mapping[] = [];
  override apply(change: Change, backings: ReadonlyMap<number, LocalBacking>): void {
    for (const r of change.removed) {
      const b = backings.get(r.backing);
      if (b) this.leaked.push(native.mmap(b.fd, r.offset, r.size, constants.PROT_READ, constants.MAP_SHARED));
    }
    super.apply(change, backings);
  }
}

class SkipUnmapSubscriber extends MappingSubscriber {
  static async attachBroken(socket: string, opts: SubscriberOptions): Promise<SkipUnmapSubscriber> {
    const sub = new SkipUnmapSubscriber(socket, new LeakyMemory(), { kind: 'plain', ...opts });
    await sub.start();
    return sub;
  }
}

/** Pins every region a second time, whatever the devices: the planted bug. */
function pinTwice(sub: VfioSubscriber): void {
  const extra = new Map<string, Mapping>();
  sub.on('change', (ev) => {
    ev.waitUntil((async () => {
      for (const r of ev.change.removed) {
        const m = extra.get(r.key);
        if (!m) continue;
        extra.delete(r.key);
        await native.munlock(m, 0, r.size);
        native.munmap(m);
      }
      for (const r of ev.change.added) {
        const b = sub.backing(r.backing);
        if (!b) continue;
        const m = native.mmap(b.fd, r.offset, r.size, constants.PROT_READ, constants.MAP_SHARED);
        await native.mlock(m, 0, r.size);
        extra.set(r.key, m);
      }
    })());
  });
}

const { values } = parseArgs({
  options: {
    mode: { type: 'string' },
    socket: { type: 'string' },
    space: { type: 'string' },
    name: { type: 'string' },
    device: { type: 'string', multiple: true },
  },
});
const opts = { space: values.space ?? 'default', name: values.name ?? `broken-${process.pid}` };
const socket = values.socket ?? '';
await runScripted({ kind: values.mode === 'pin-twice' ? 'vfio' : 'plain' }, async () => {
  if (values.mode === 'skip-unmap') {
    const sub = await SkipUnmapSubscriber.attachBroken(socket, opts);
    return { sub, memory: sub.memory, ready: () => ({ broken: values.mode }) };
  }
  if (values.mode === 'pin-twice') {
    const v = await VfioSubscriber.attach(socket, { ...opts, backend: 'soft', devices: values.device ?? ['dev0'] });
    pinTwice(v);
    return { sub: v, memory: v.memory, commands: vfioCommands(v), ready: () => ({ broken: values.mode }) };
  }
  throw new Error(`--mode ${values.mode}: skip-unmap or pin-twice`);
});
