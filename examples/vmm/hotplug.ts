// DIMM hot-add and unplug, in the order a VMM follows so that neither the guest nor a device ever finds a
// hole where it uses memory:
//   1. plan: names, sizes and placement checked (FIND_FREE); nothing has changed yet;
//   2. offline: for every DIMM that goes away (and is not replaced at its address in the same
//      transaction) the guest is asked to stop using it, and the VMM waits for its ack (the mailbox plays
//      ACPI's eject request and _EJ0). A guest that does not let go in time fails the unplug, unchanged;
//   3. prepare: a memfd per new DIMM, registered as a backing;
//   4. replace: where a DIMM is replaced at its own gpa, the vCPUs are parked and its bytes copied into
//      the new memfd, so the guest finds the same data there (moving a DIMM onto huge pages, say);
//   5. commit: one transaction for all of it. Every subscriber applies it or none does: the kvm client
//      (memslots; it parks the vCPUs through the parkVcpus hook around a slot it deletes and re-creates),
//      the disk's bridge (qemu-storage-daemon's memory table, with I/O in flight), the device in the other
//      process (its IOMMU mappings and pins). A refusal anywhere changes nothing and names the refuser;
//   6. online: the guest is offered the newest DIMM and the VMM waits until it uses it.
import { native, constants, isMmbError, CHUNK_BYTES, type CommitResult, type KvmSubscriber, type Mapping } from '../../index.js';
import type { Disk } from './disk.js';
import { VmmError } from './errors.js';
import { readMailbox } from './guest.js';
import { ACK_GPA, OFFER_GPA, hex } from './layout.js';
import type { Action, Block, MachineMemory } from './memory.js';
import type { Vcpu } from './vcpu.js';

/** How long the guest gets to let go of a DIMM, or to start using one. */
const GUEST_DEADLINE_MS = 5000;
/** ACK is set to this before OFFER changes: the guest never writes it (DIMMs are page aligned). */
const ACK_UNSEEN = 0xffff_ffff;

export interface Machine {
  memory: MachineMemory;
  kvm: KvmSubscriber;
  vcpu: Vcpu | undefined;
  disk: Disk | undefined;
}

export interface HotplugResult {
  generation: number;
  added: { id: string; gpa: string; size: number }[];
  removed: string[];
  replaced: { from: string; to: string }[];
  /** The disk during the commit: requests in flight when it started, those still in flight when it
   * ended, and those that completed meanwhile. */
  disk?: { inflightAtStart: number; inflightThroughout: number; completedDuring: number };
  /** Times the kvm client parked the vCPUs through the hook during this transaction. */
  hookParks: number;
}

export async function applyActions(m: Machine, actions: readonly Action[]): Promise<HotplugResult> {
  const plan = await m.memory.plan(actions);
  const replacedIds = new Set(plan.replaced.map((r) => r.from.id));
  const leaving = plan.dels.filter((d) => !replacedIds.has(d.id));
  await offline(m, leaving);
  const prepared = await m.memory.prepare(plan);
  let parked = false;
  let result: CommitResult;
  let disk: HotplugResult['disk'];
  const parksBefore = m.vcpu?.hookParks ?? 0;
  try {
    if (plan.replaced.length > 0 && m.vcpu) {
      await m.vcpu.park();
      parked = true;
    }
    for (const r of plan.replaced) copyInto(m.kvm, r.from, prepared.created.find((b) => b.id === r.to) as Block);
    const inflight = m.disk?.inflight();
    const completed = m.disk?.status().completed ?? 0;
    result = await m.memory.commit(prepared);
    if (m.disk && inflight) {
      const now = m.disk.inflight();
      disk = {
        inflightAtStart: inflight.size,
        inflightThroughout: [...inflight].filter((id) => now.has(id)).length,
        completedDuring: m.disk.status().completed - completed,
      };
    }
  } catch (err) {
    // Nothing changed (unless the change committed and only its clean-up failed): the new memfds go, and
    // the guest gets back the DIMM it let go of.
    if (!isMmbError(err, 'MMB_ERR_COMMITTED_UNFENCED')) {
      await m.memory.discard(prepared);
      if (leaving.length > 0) await online(m, undefined).catch(() => undefined);
    }
    throw err;
  } finally {
    if (parked) m.vcpu?.unpark();
  }
  const fresh = prepared.created.filter((b) => !plan.replaced.some((r) => r.to === b.id));
  if (fresh.length > 0) await online(m, fresh[fresh.length - 1]);
  return {
    generation: result.generation,
    added: prepared.created.map((b) => ({ id: b.id, gpa: hex(b.gpa), size: b.size })),
    removed: plan.dels.map((d) => d.id),
    replaced: plan.replaced.map((r) => ({ from: r.from.id, to: r.to })),
    ...(disk ? { disk } : {}),
    hookParks: (m.vcpu?.hookParks ?? 0) - parksBefore,
  };
}

/**
 * Makes sure the guest uses none of `leaving`: if it was offered one, it is offered another DIMM that
 * stays (or none), and the VMM waits until the guest acknowledged the new offer.
 */
async function offline(m: Machine, leaving: readonly Block[]): Promise<void> {
  const { offer } = readMailbox((gpa, n) => m.kvm.memory.read(gpa, n));
  if (!leaving.some((d) => d.gpa === offer)) return;
  const stays = [...m.memory.dimms.values()].filter((d) => !leaving.includes(d));
  await offerAndWait(m, stays.at(-1)?.gpa ?? 0, `let go of DIMM ${JSON.stringify(leaving.find((d) => d.gpa === offer)?.id)}`);
}

/** Offers `dimm` (undefined: the newest DIMM, or none) to the guest; waits for its ack if it runs. */
async function online(m: Machine, dimm: Block | undefined): Promise<void> {
  const gpa = (dimm ?? [...m.memory.dimms.values()].at(-1))?.gpa ?? 0;
  if (!m.vcpu?.running) {
    m.kvm.memory.write(OFFER_GPA, u32(gpa));
    return;
  }
  await offerAndWait(m, gpa, `use DIMM ${dimm ? JSON.stringify(dimm.id) : hex(gpa)}`);
}

/**
 * Writes OFFER and waits until the guest wrote it back to ACK: an iteration that started after the write
 * read it (ACK was set to a value the guest never writes first). The guest must run: a parked guest
 * cannot answer, and unplugging under it could leave it about to touch a DIMM that is gone.
 */
async function offerAndWait(m: Machine, gpa: number, what: string): Promise<void> {
  if (!m.vcpu?.running) throw new VmmError('VMM_ERR_GUEST_BUSY', `the guest must run to ${what} (it is stopped: cont first)`);
  const memory = m.kvm.memory;
  memory.write(ACK_GPA, u32(ACK_UNSEEN));
  memory.write(OFFER_GPA, u32(gpa));
  const deadline = Date.now() + GUEST_DEADLINE_MS;
  while (readMailbox((a, n) => memory.read(a, n)).ack !== gpa) {
    if (Date.now() > deadline || !m.vcpu.running)
      throw new VmmError('VMM_ERR_GUEST_BUSY', `the guest did not ${what} within ${GUEST_DEADLINE_MS} ms (${m.vcpu.error ?? 'no answer'})`);
    // Guest memory is the only signal the guest gives; its vCPU thread needs the CPU to answer.
    await new Promise((r) => setTimeout(r, 1));
  }
}

/** Copies the bytes of `from` (through the kvm client's mapping) into the new memfd of `to`. */
function copyInto(kvm: KvmSubscriber, from: Block, to: Block): void {
  const chunks: Mapping[] = native.mmapChunked(to.fd as number, 0, to.size, constants.PROT_READ | constants.PROT_WRITE, constants.MAP_SHARED, CHUNK_BYTES);
  try {
    let done = 0;
    for (const view of kvm.memory.segments(from.gpa, from.size)) {
      for (let at = 0; at < view.length;) {
        const chunk = Math.floor((done + at) / CHUNK_BYTES);
        const off = (done + at) % CHUNK_BYTES;
        const n = Math.min(view.length - at, CHUNK_BYTES - off);
        new Uint8Array((chunks[chunk] as Mapping).buffer, off, n).set(view.subarray(at, at + n));
        at += n;
      }
      done += view.length;
    }
  } finally {
    for (const c of chunks) native.munmap(c);
  }
}

function u32(v: number): Uint8Array {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(v >>> 0);
  return b;
}
