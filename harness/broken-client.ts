// BROKEN ON PURPOSE. A client process for `mmbroker harness --self-test`, with one planted bug, to prove
// the harness's checks can fail. Never use it for anything else.
//
//   --mode skip-unmap  a plain subscriber that acks a removal without unmapping the memory (it keeps a
//                      mapping of every removed region): "no stale mapping" must catch it in /proc/PID/maps;
//   --mode pin-twice   a soft vfio-like subscriber that pins every region a second time (one more mapping,
//                      mlocked, as a client pinning per device instead of per domain would): "pins" must
//                      catch it in VmLck.
//   --mode ignore-eviction
//                      a plain subscriber that, in the vote of a transaction removing a region it maps,
//                      keeps a mapping of that region of its own and drops its connection; it reconnects
//                      with resume.client and acks its sync, so the broker counts it reconciled (fenced),
//                      while it still maps that region: the one way of ignoring the broker that the broker
//                      cannot see. It lets go lazily, when it is next asked anything, so by the time the
//                      space settles the mapping is gone: only "done-means-done", at the moment the
//                      removal is reported done (the owner's answer held until /proc was read), sees it.
//   --mode teardown-on-wait
//                      a plain subscriber that, when it reattaches to a restarted broker's unpublished space
//                      (the 'waiting' event), unmaps everything, as a client taking the empty snapshot of a
//                      space nobody republished yet for the map would; it maps it all again once the map is
//                      published. "restart-keeps-memory" must catch it in the restart window.
//   --mode keep-pin-after-unmap
//                      a soft vfio-like subscriber in shadow mode (--ioas ID) that, whenever an IOAS change
//                      unmaps IOVAs, maps and mlocks the guest pages they pointed at once more and keeps
//                      them (as a client that forgot its unpin would): "iova-pins" must catch it in VmLck.
//
// Otherwise it is the testkit's scripted client (testkit/scripted.ts): the same control protocol, the
// same ready line, the same clean exit on SIGTERM.
import { parseArgs } from 'node:util';
import { MappingSubscriber, GuestMemory, type SubscriberOptions } from '../clients/index.js';
import type { ApplyContext, Change, LocalBacking, ViewRegion } from '../clients/view.js';
import type { IoasChange } from '../clients/ioas-view.js';
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

/**
 * In a vote whose commit removes regions it maps: keeps a mapping of each, and drops the connection (so the
 * vote is never acked). Once per region: when the transaction is voted again after it reconnected, it votes.
 */
class EvictionIgnoringMemory extends GuestMemory {
  private readonly kept: Mapping[] = [];
  private readonly tried = new Set<string>();
  drop: () => void = () => undefined;

  /** Lets go of what it kept (lazily, too late). */
  release(): void {
    for (const m of this.kept.splice(0)) native.munmap(m);
  }

  check(change: Change, backings: ReadonlyMap<number, LocalBacking>): void {
    const fresh = change.removed.filter((r) => !this.tried.has(r.key));
    if (fresh.length === 0) return;
    for (const r of fresh) {
      this.tried.add(r.key);
      const b = backings.get(r.backing);
      if (b) this.kept.push(native.mmap(b.fd, r.offset, r.size, constants.PROT_READ, constants.MAP_SHARED));
    }
    this.drop();
  }
}

/** Unmaps everything on tearDown() (keeping a descriptor of each backing) and maps it all again at the next change. */
class TearDownMemory extends GuestMemory {
  private torn: { regions: ViewRegion[]; backings: Map<number, LocalBacking> } | undefined;

  tearDown(backing: (id: number) => LocalBacking | undefined): void {
    if (this.torn) return;
    const regions = this.regions().map((m) => m.region);
    const backings = new Map<number, LocalBacking>();
    for (const r of regions) {
      const b = backing(r.backing);
      if (b && !backings.has(r.backing)) backings.set(r.backing, { ...b, fd: native.dup(b.fd) });
    }
    super.apply({ generation: 0, cause: 'sync', removed: regions, updated: [], added: [] }, backings);
    this.torn = { regions, backings };
  }

  override apply(change: Change, backings: ReadonlyMap<number, LocalBacking>, ctx?: ApplyContext): void {
    const torn = this.torn;
    if (torn) {
      this.torn = undefined;
      super.apply({ generation: change.generation, cause: 'sync', removed: [], updated: [], added: torn.regions }, torn.backings);
      for (const b of torn.backings.values()) native.close(b.fd);
    }
    super.apply(change, backings, ctx);
  }
}

/** A plain subscriber around one of the broken memories above. */
class BrokenSubscriber extends MappingSubscriber {
  static async attachWith(socket: string, memory: GuestMemory, opts: SubscriberOptions): Promise<BrokenSubscriber> {
    const sub = new BrokenSubscriber(socket, memory, { kind: 'plain', ...opts });
    await sub.start();
    return sub;
  }
}

/** After every IOAS unmap, pins the unmapped guest pages again and keeps them: the planted bug. */
function keepPinAfterUnmap(sub: VfioSubscriber): void {
  const kept: Mapping[] = [];
  sub.on('ioas', (c: IoasChange) => {
    for (const m of c.unmapped) {
      const r = sub.regions().find((x) => x.gpa <= m.gpa && m.gpa + m.size <= x.gpa + x.size);
      const b = r && sub.backing(r.backing);
      if (!r || !b) continue;
      const map = native.mmap(b.fd, r.offset + (m.gpa - r.gpa), m.size, constants.PROT_READ, constants.MAP_SHARED);
      kept.push(map);
      void native.mlock(map, 0, m.size);
    }
  });
}

/** Pins every region a second time, whatever the devices: the planted bug. */
function pinTwice(sub: VfioSubscriber): void {
  const extra = new Map<string, Mapping>();
  sub.on('change', (ev) => {
    ev.waitUntil(
      (async () => {
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
      })(),
    );
  });
}

const { values } = parseArgs({
  options: {
    mode: { type: 'string' },
    socket: { type: 'string' },
    space: { type: 'string' },
    name: { type: 'string' },
    device: { type: 'string', multiple: true },
    ioas: { type: 'string' },
  },
});
const opts = { space: values.space ?? 'default', name: values.name ?? `broken-${process.pid}` };
const socket = values.socket ?? '';
await runScripted({ kind: values.mode === 'pin-twice' || values.mode === 'keep-pin-after-unmap' ? 'vfio' : 'plain' }, async () => {
  if (values.mode === 'skip-unmap') {
    const sub = await BrokenSubscriber.attachWith(socket, new LeakyMemory(), opts);
    return { sub, memory: sub.memory, ready: () => ({ broken: values.mode }) };
  }
  if (values.mode === 'ignore-eviction') {
    const memory = new EvictionIgnoringMemory();
    // It comes back after a second: by then the transaction it left waits for it to be fenced.
    const sub = await BrokenSubscriber.attachWith(socket, memory, { ...opts, reconnectDelayMs: 1000 });
    memory.drop = () => sub.dropConnection();
    // Lazily: when it is next asked anything, before it answers.
    process.stdin.on('data', () => memory.release());
    return { sub, memory, ready: () => ({ broken: values.mode }) };
  }
  if (values.mode === 'teardown-on-wait') {
    const memory = new TearDownMemory();
    const sub = await BrokenSubscriber.attachWith(socket, memory, opts);
    sub.on('waiting', () => memory.tearDown((id) => sub.backing(id)));
    return { sub, memory, ready: () => ({ broken: values.mode }) };
  }
  if (values.mode === 'pin-twice') {
    const v = await VfioSubscriber.attach(socket, { ...opts, backend: 'soft', devices: values.device ?? ['dev0'] });
    pinTwice(v);
    return { sub: v, memory: v.memory, commands: vfioCommands(v), ready: () => ({ broken: values.mode }) };
  }
  if (values.mode === 'keep-pin-after-unmap') {
    const v = await VfioSubscriber.attach(socket, { ...opts, backend: 'soft', ioas: values.ioas ?? 'io0', devices: values.device ?? ['dev0'] });
    keepPinAfterUnmap(v);
    return { sub: v, memory: v.memory, commands: vfioCommands(v), ready: () => ({ broken: values.mode }) };
  }
  throw new Error(`--mode ${values.mode}: skip-unmap, pin-twice, ignore-eviction, teardown-on-wait or keep-pin-after-unmap`);
});
