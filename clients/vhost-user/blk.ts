// A minimal virtio-blk driver over one split virtqueue (virtio 1.x, section 5.2): READ, WRITE, FLUSH into
// guest memory the broker manages. Each request is a chain of three descriptors: the 16-byte header
// (device-readable), the data (device-writable for READ), the status byte (device-writable).
import { ClientRefusedError, InvalidArgError } from '../../protocol/index.js';
import type { VhostUserFrontend } from './frontend.js';
import { Feature, ProtocolFeature, bit } from './messages.js';
import type { Rings } from './rings.js';
import { Virtqueue, type QueueMemory } from './virtqueue.js';

/** Features the driver needs: VERSION_1 and FLUSH (no event index, no indirect descriptors). */
export const BLK_FEATURES = bit(Feature.VERSION_1) | bit(Feature.BLK_FLUSH);

export const VIRTIO_BLK_T_IN = 0;
export const VIRTIO_BLK_T_OUT = 1;
export const VIRTIO_BLK_T_FLUSH = 4;
export const VIRTIO_BLK_S_OK = 0;
export const SECTOR_BYTES = 512;

/** Bytes per request slot in the scratch area: header (16) and status (1), rounded up. */
const SLOT_BYTES = 32;

export interface BlkOptions {
  /** Guest-physical address of the driver's area (VirtioBlk.areaBytes(queueSize) bytes, writable). */
  gpa: number;
  /** Descriptors in the queue. Default 16 (5 requests in flight). */
  queueSize?: number;
  /** Deadline of each request, in ms. Default 5000. */
  timeoutMs?: number;
}

/**
 * The device side a driver needs: the back-end connection, guest memory as this process maps it, and
 * the back-end's rings (VhostUserSubscriber.rings), which its queues join so that reshapes and pauses
 * stop and restart them.
 */
export interface DeviceAccess {
  readonly frontend: VhostUserFrontend;
  readonly memory: QueueMemory;
  readonly rings?: Rings;
}

export class VirtioBlk {
  private readonly scratch: number;
  private readonly slots: number[];

  private constructor(
    private readonly access: DeviceAccess,
    readonly queue: Virtqueue,
    /** Capacity in 512-byte sectors (from the config space), or undefined without the CONFIG feature. */
    readonly capacity: number | undefined,
  ) {
    this.scratch = queue.gpa + Virtqueue.ringBytes(queue.size);
    this.slots = Array.from({ length: Math.floor(queue.size / 3) }, (_, i) => i);
  }

  /** Guest memory the driver needs at `gpa`: the rings and one header + status slot per request. */
  static areaBytes(queueSize = 16): number {
    return Virtqueue.ringBytes(queueSize) + Math.floor(queueSize / 3) * SLOT_BYTES;
  }

  /** Reads the capacity (GET_CONFIG) and starts queue 0. Needs BLK_FEATURES negotiated. */
  static async start(access: DeviceAccess, opts: BlkOptions): Promise<VirtioBlk> {
    const fe = access.frontend;
    let capacity: number | undefined;
    if (fe.hasProtocolFeature(ProtocolFeature.CONFIG)) {
      // struct virtio_blk_config starts with u64 capacity.
      capacity = Number((await fe.getConfig(0, 8)).readBigUInt64LE(0));
    }
    const queue = new Virtqueue(fe, access.memory, {
      index: 0,
      size: opts.queueSize ?? 16,
      gpa: opts.gpa,
      ...(opts.timeoutMs ? { timeoutMs: opts.timeoutMs } : {}),
      ...(access.rings ? { rings: access.rings } : {}),
    });
    try {
      await queue.start();
    } catch (err) {
      queue.close();
      throw err;
    }
    return new VirtioBlk(access, queue, capacity);
  }

  /** Reads `len` bytes (a multiple of 512) from `sector` into guest memory at `gpa`. */
  read(sector: number, gpa: number, len: number): Promise<void> {
    return this.request(VIRTIO_BLK_T_IN, sector, { addr: gpa, len, write: true });
  }

  /** Writes `len` bytes (a multiple of 512) of guest memory at `gpa` to `sector`. */
  write(sector: number, gpa: number, len: number): Promise<void> {
    return this.request(VIRTIO_BLK_T_OUT, sector, { addr: gpa, len, write: false });
  }

  /** Asks the device to make every completed write durable. */
  flush(): Promise<void> {
    return this.request(VIRTIO_BLK_T_FLUSH, 0, undefined);
  }

  private async request(type: number, sector: number, data: { addr: number; len: number; write: boolean } | undefined): Promise<void> {
    if (data && (data.len <= 0 || data.len % SECTOR_BYTES !== 0))
      throw new InvalidArgError(`a virtio-blk transfer is a positive multiple of ${SECTOR_BYTES} bytes, got ${data.len}`);
    if (!Number.isSafeInteger(sector) || sector < 0) throw new InvalidArgError(`bad sector ${sector}`);
    const slot = this.slots.pop();
    if (slot === undefined) throw new InvalidArgError('too many virtio-blk requests in flight');
    const hdrGpa = this.scratch + slot * SLOT_BYTES;
    const statusGpa = hdrGpa + 16;
    let keepSlot = false;
    // Written when the request is posted: while the ring is stopped (a pause) nothing goes to guest memory.
    const prepare = () => {
      const hdr = this.access.memory.slice(hdrGpa, 17);
      const dv = new DataView(hdr.buffer, hdr.byteOffset, 17);
      dv.setUint32(0, type, true);
      dv.setUint32(4, 0, true);
      dv.setBigUint64(8, BigInt(sector), true);
      dv.setUint8(16, 0xff);
      this.access.memory.dirty?.mark(hdrGpa, 17);
    };
    try {
      const chain = [{ addr: hdrGpa, len: 16 }, ...(data ? [data] : []), { addr: statusGpa, len: 1, write: true }];
      try {
        await this.queue.submit(chain, prepare);
      } catch (err) {
        // A request the device may still complete later: its slot must not be reused.
        keepSlot = true;
        throw err;
      }
      const status = this.access.memory.slice(statusGpa, 1)[0];
      if (status !== VIRTIO_BLK_S_OK) throw new ClientRefusedError(`virtio-blk request type ${type} at sector ${sector} failed with status ${status}`);
    } finally {
      if (!keepSlot) this.slots.push(slot);
    }
  }

  /** Stops the queue at the back-end (GET_VRING_BASE) and closes it; resolves with the requests it took. */
  stop(): Promise<number> {
    return this.queue.stop();
  }

  close(): void {
    this.queue.close();
  }
}
