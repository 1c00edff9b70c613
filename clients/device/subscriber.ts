// The device client: what a device implemented in software (a device model, or a device back-end process
// such as a virtio device served outside the VMM) needs of guest memory. It maps every region shared
// (read-only regions PROT_READ), never pins, translates guest-physical addresses to its own mappings fast
// (GuestMemory's table with a last-hit cache), reads and writes guest memory with bounds checks that
// refuse a range crossing a hole, and unmaps before it acks a removal.
//
// Descriptor buffers of a virtqueue are (gpa, len) pairs: translate() turns one into an iovec of views,
// which may span adjacent regions but never a hole; resolve() is the allocation-free form for the common
// case of a buffer inside one region.
//
// Behind a guest IOMMU (VIRTIO_F_ACCESS_PLATFORM) the addresses are IOVAs: the device is attached to an
// I/O address space (attachIoas, feature IOAS) and translates through it with the same allocation-free
// search (iova(ioas).resolve(), clients/ioas-table.ts). An unmap is acked once the table no longer has
// the mapping: from then on a lookup of that IOVA fails, as the device's access would fault.
import { GuestMemory, type GuestPointer } from '../memory.js';
import { IovaTables, type IovaTranslation } from '../ioas-table.js';
import { MappingSubscriber } from '../plain.js';
import type { SubscriberOptions } from '../subscriber.js';
import type { BrokerTarget } from '../connection.js';

export interface DeviceOptions extends SubscriberOptions {
  /** How many memory regions the back-end can hold (vhost-user: 8 baseline, 32 or 509 with slots). */
  maxRegions?: number;
}

/**
 * Attaches with ATTACH.kind 'vhost' (the wire name this kind has always had: kept so that brokers, STATUS
 * readers and `mmbroker attach vhost` see no change).
 */
export class DeviceSubscriber extends MappingSubscriber {
  private readonly iovas: IovaTables;

  protected constructor(target: BrokerTarget, memory: GuestMemory, opts: DeviceOptions) {
    super(target, memory, opts);
    this.iovas = new IovaTables(memory);
    this.followIoas(this.iovas);
  }

  static override async attach(target: BrokerTarget, opts: DeviceOptions): Promise<DeviceSubscriber> {
    const sub = new DeviceSubscriber(target, new GuestMemory(), { kind: 'vhost', ...opts });
    await sub.start();
    await sub.report({ backend: 'mmap', pinned: 0 }).catch(() => undefined);
    return sub;
  }

  /** An iovec for the guest buffer [gpa, gpa + length): views into this process's mappings. */
  translate(gpa: number, length: number): Uint8Array[] {
    return this.memory.segments(gpa, length);
  }

  /**
   * The hot-path lookup: points `out` at the memory of [gpa, gpa + length) without allocating (the bytes
   * are `out.bytes[out.offset ...]`), or returns false when the range needs translate() (it crosses a
   * region or 1 GiB boundary, or a hole: translate() then says which). See GuestMemory.resolve().
   */
  resolve(gpa: number, length: number, out: GuestPointer): boolean {
    return this.memory.resolve(gpa, length, out);
  }

  /**
   * The IOVA translation table of an I/O address space this back-end's device is attached to
   * (attachIoas). Keep it: its resolve(iova, length, out, write?) is the hot-path lookup, allocation-free.
   */
  iova(ioas: string): IovaTranslation {
    return this.iovas.table(ioas);
  }

  /** Copies guest memory out. */
  read(gpa: number, length: number): Uint8Array {
    return this.memory.read(gpa, length);
  }

  /** Copies into guest memory; every region touched must be writable. */
  write(gpa: number, data: Uint8Array): void {
    this.memory.write(gpa, data);
  }
}
