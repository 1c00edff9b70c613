// Live migration between two instances of this VMM, in QEMU's order:
//   source                                       destination (started with --incoming)
//   migrate {to: <its control socket>} -------->  migrate-incoming: where memory goes
//   pre-copy of guest memory (clients/migration): rounds while the guest runs, then PAUSE: the vCPU
//     is parked and the disk drained through the subscribers' 'pause' events; the last dirty pages
//     are copied and the copy verified; the source stays paused for good
//   the vCPU's registers (KVM_GET_REGS/SREGS) -->  migrate-finish: takes the map over as its owner,
//                                                  loads the registers into its own vCPU, waits for `cont`
//
// Guest memory moves in ONE call, sendMemory(). Today the destination is an address space of the
// destination VMM's embedded broker, reached over its socket: SpaceDestination creates a memfd per region
// there and the pages are written through this process's mappings of them (a same-host migration; the
// memfds stay with the destination broker when this side lets go). A TCP transport replaces that one
// call: the destination answers migrate-incoming with a URL it receives on (`receive()`), and the source
// sends with `migrateTo(url)` instead of `new Migration(...).run()`; nothing else here changes.
//
// The vCPU registers are the VMM's to carry: the broker migrates memory, not device or CPU state.
import { Migration, MappingSubscriber, OwnerClient, SpaceDestination, isMmbError, type Broker, type MigrationResult } from '../../index.js';
import { SPACE } from './layout.js';
import type { VcpuState } from './vcpu.js';

/** Where the destination wants guest memory: today its broker socket and space. */
export interface Incoming {
  broker: string;
  space: string;
}

/** What the source hands over once memory is across: the vCPU and the VMM's own books. */
export interface Handover {
  vcpu: { regs: string; sregs: string };
  /** Which regions are DIMMs (the rest of the map is RAM). */
  dimms: string[];
}

/**
 * Pre-copies the space's memory to the destination and leaves the source paused (every writer stopped:
 * PAUSE acked by the kvm client, the bridge, the device process). Rejects, with the source resumed, if
 * anything fails or the copy does not verify.
 */
export async function sendMemory(broker: Broker, owner: OwnerClient, to: Incoming): Promise<MigrationResult> {
  // The reader maps guest memory to copy it and writes nothing (writes: false: no dirty log, no pause).
  const reader = await MappingSubscriber.attach(broker, { space: SPACE, name: 'migration-reader', writes: false });
  try {
    // The device process is the soft VFIO stand-in: its "device" does no DMA, so nothing writes after the
    // pause. A vfio client with a device is a migration blocker all the same (it cannot declare that, nor
    // carry device state: docs/migration.md, "Devices"), so the risk is accepted here, knowingly; a VMM
    // with a real device lacking VFIO migration support must not.
    const result = await new Migration(owner, reader, new SpaceDestination(to.broker, to.space)).run({ keepPaused: true, acceptDeviceRisk: true });
    if (result.verified !== true) throw new Error('the destination does not hold what the paused source holds');
    return result;
  } catch (err) {
    // The engine resumes the writers when it fails; this covers a copy that did not verify too.
    await owner.resume().catch(() => undefined);
    throw err;
  } finally {
    await reader.close();
  }
}

export function encodeState(s: VcpuState): Handover['vcpu'] {
  return { regs: Buffer.from(s.regs).toString('base64'), sregs: Buffer.from(s.sregs).toString('base64') };
}

export function decodeState(v: Handover['vcpu']): VcpuState {
  return { regs: new Uint8Array(Buffer.from(v.regs, 'base64')), sregs: new Uint8Array(Buffer.from(v.sregs, 'base64')) };
}

/**
 * The destination becomes the owner of the map the migration built. The migration's owner connection
 * (from the source process) closed before the source sent migrate-finish, but the broker learns that
 * from the socket's EOF on its own event loop, and no event tells this side when: until then ATTACH is
 * refused with MMB_ERR_OWNER_EXISTS, so it is retried for a bounded time.
 */
export async function takeOver(broker: Broker): Promise<OwnerClient> {
  const deadline = Date.now() + 5000;
  for (;;) {
    try {
      return await OwnerClient.attach(broker, { space: SPACE, name: 'vmm' });
    } catch (err) {
      if (!isMmbError(err, 'MMB_ERR_OWNER_EXISTS') || Date.now() > deadline) throw err;
      await new Promise((r) => setTimeout(r, 5));
    }
  }
}
