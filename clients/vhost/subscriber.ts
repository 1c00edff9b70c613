// The vhost-like client: what a device back-end needs of guest memory. It maps every region shared
// (read-only regions PROT_READ), never pins, translates guest-physical addresses to its own mappings fast
// (GuestMemory's table with a last-hit cache), reads and writes guest memory with bounds checks that
// refuse a range crossing a hole, and unmaps before it acks a removal.
//
// Descriptor buffers of a virtqueue are (gpa, len) pairs: translate() turns one into an iovec of views,
// which may span adjacent regions but never a hole; resolve() is the allocation-free form for the common
// case of a buffer inside one region.
import { GuestMemory, type GuestPointer } from '../memory.js';
import { MappingSubscriber } from '../plain.js';
import type { SubscriberOptions } from '../subscriber.js';
import type { BrokerTarget } from '../connection.js';

export interface VhostOptions extends SubscriberOptions {
  /** How many memory regions the back-end can hold (vhost-user: 8 baseline, 32 or 509 with slots). */
  maxRegions?: number;
}

export class VhostSubscriber extends MappingSubscriber {
  static override async attach(target: BrokerTarget, opts: VhostOptions): Promise<VhostSubscriber> {
    const sub = new VhostSubscriber(target, new GuestMemory(), { kind: 'vhost', ...opts });
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

  /** Copies guest memory out. */
  read(gpa: number, length: number): Uint8Array {
    return this.memory.read(gpa, length);
  }

  /** Copies into guest memory; every region touched must be writable. */
  write(gpa: number, data: Uint8Array): void {
    this.memory.write(gpa, data);
  }
}
