// The control commands a subscriber process answers (README.md, "The control protocol"), by what the
// subscriber can do: guest memory (read, write, regions), memslots (kvm), an IOMMU domain (vfio). The
// scripted client answers all that apply, plus the fault commands; `mmbroker attach --control` answers
// the same commands but never the faults.
import type { GuestMemory, Subscriber } from '../clients/index.js';
import type { KvmSubscriber } from '../clients/kvm/index.js';
import type { VfioSubscriber } from '../clients/vfio/index.js';
import { ClientRefusedError } from '../protocol/index.js';
import type { CommandHandler } from './control.js';

export type Commands = Record<string, CommandHandler>;

/** The regions of the subscriber's view, with the address each is mapped at in this process (if it is). */
export function regionsOf(sub: Subscriber, memory: GuestMemory): Record<string, unknown>[] {
  const mapped = memory.regions();
  return sub
    .regions()
    .map((r) => ({ id: r.id, name: r.name, gpa: r.gpa, size: r.size, readonly: r.readonly, address: mapped.find((m) => m.region.key === r.key)?.address }));
}

/** read, write, regions. */
export function memoryCommands(sub: Subscriber, memory: GuestMemory): Commands {
  return {
    read: (c) => ({ event: 'read', gpa: c.gpa, hex: Buffer.from(memory.read(Number(c.gpa), Number(c.len))).toString('hex') }),
    write: (c) => {
      memory.write(Number(c.gpa), Buffer.from(String(c.hex), 'hex'));
      return { event: 'wrote', gpa: c.gpa };
    },
    regions: () => ({ event: 'regions', generation: sub.generation, regions: regionsOf(sub, memory) }),
  };
}

/** slots; run (a vCPU writes bytes into guest memory and halts). */
export function kvmCommands(kvm: KvmSubscriber): Commands {
  return {
    slots: () => ({ event: 'slots', backend: kvm.backend, slots: kvm.slots() }),
    run: async (c) => {
      const writes = ((c.writes ?? []) as { gpa: number; hex: string }[]).map((w) => ({ gpa: Number(w.gpa), bytes: Buffer.from(String(w.hex), 'hex') }));
      const r = await kvm.runProgram({ codeGpa: Number(c.codeGpa), writes });
      return { event: 'ran', ...r };
    },
  };
}

/** domain, attach-device (with `ioas` in shadow mode), detach-device. */
export function vfioCommands(vfio: VfioSubscriber): Commands {
  return {
    domain: () => ({ event: 'domain', ...vfio.domain }),
    'attach-device': async (c) => {
      // `ioas` (shadow mode): the I/O address space the device joins.
      await vfio.attachDevice(String(c.device), c.ioas !== undefined ? { ioas: String(c.ioas) } : {});
      return { event: 'domain', ...vfio.domain };
    },
    'detach-device': async (c) => {
      await vfio.detachDevice(String(c.device));
      return { event: 'domain', ...vfio.domain };
    },
  };
}

/**
 * The fault commands (scripted clients only, never the shipped `mmbroker attach`): nack-next refuses the
 * next transaction that adds memory (MMB_ERR_CLIENT_REFUSED, after applying it: the change is undone);
 * hold-next applies it and never acks (prints a `holding` event) until the change becomes void.
 */
export function faultCommands(sub: Subscriber, out: (line: Record<string, unknown>) => void): Commands {
  let armed: 'nack' | 'hold' | undefined;
  sub.on('change', (ev) => {
    if (armed === undefined || ev.change.cause !== 'txn' || ev.change.added.length === 0) return;
    const what = armed;
    armed = undefined;
    if (what === 'nack') {
      ev.waitUntil(Promise.reject(new ClientRefusedError(`refusing generation ${ev.change.generation} on request (fault injection)`)));
      return;
    }
    out({ event: 'holding', generation: ev.change.generation });
    // Settles only when the change becomes void (rolled back, connection closed): the subscriber races it
    // against its own closing, so close() still works.
    ev.waitUntil(new Promise((resolve) => ev.signal.addEventListener('abort', resolve, { once: true })));
  });
  const arm = (what: 'nack' | 'hold') => () => {
    armed = what;
    return { event: 'armed', fault: what };
  };
  return { 'nack-next': arm('nack'), 'hold-next': arm('hold') };
}
