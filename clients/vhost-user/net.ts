// A minimal virtio-net driver (virtio 1.x, section 5.1): queue 0 receives, queue 1 transmits, one queue
// pair, no offloads, no mergeable buffers. With VERSION_1 every packet is preceded by the 12-byte
// struct virtio_net_hdr (num_buffers included); this driver sends an all-zero header.
//
// Behind a guest IOMMU (the bridge follows an IOAS, VIRTIO_F_ACCESS_PLATFORM negotiated) the driver does
// what a guest's driver does after dma_map: every address it gives the device is an IOVA. The driver's
// area (rings and transmit headers) is at `gpa` for this process and at `iova` for the device (the IOAS
// must map one to the other); the frames' addresses given to receive() and transmit() are IOVAs.
import { InvalidArgError } from '../../protocol/index.js';
import type { DeviceAccess } from './blk.js';
import { Feature, bit } from './messages.js';
import { Virtqueue } from './virtqueue.js';

export const NET_FEATURES = bit(Feature.VERSION_1);
export const NET_HDR_BYTES = 12;
const HDR_SLOT_BYTES = 16;

export interface NetOptions {
  /** Guest-physical address of the driver's area (VirtioNet.areaBytes(queueSize) bytes, writable). */
  gpa: number;
  /**
   * The area's IOVA: required when the device translates through an IOAS (VIRTIO_F_ACCESS_PLATFORM), which
   * must map [iova, iova + areaBytes) to [gpa, ...), writable.
   */
  iova?: number;
  /** Descriptors per queue. Default 16. */
  queueSize?: number;
  /** Deadline of each transmit, in ms (receives wait as long as asked). Default 5000. */
  timeoutMs?: number;
}

export class VirtioNet {
  private readonly hdrBase: number;
  /** Where the device sees the headers: their IOVA behind an IOMMU, else their GPA. */
  private readonly hdrDevice: number;
  private readonly hdrSlots: number[];

  private constructor(
    private readonly access: DeviceAccess,
    readonly rx: Virtqueue,
    readonly tx: Virtqueue,
  ) {
    this.hdrBase = tx.gpa + Virtqueue.ringBytes(tx.size);
    this.hdrDevice = (tx.iova ?? tx.gpa) + Virtqueue.ringBytes(tx.size);
    this.hdrSlots = Array.from({ length: Math.floor(tx.size / 2) }, (_, i) => i);
  }

  static areaBytes(queueSize = 16): number {
    return 2 * Virtqueue.ringBytes(queueSize) + Math.floor(queueSize / 2) * HDR_SLOT_BYTES;
  }

  /** Starts the RX (0) and TX (1) queues. NET_FEATURES must have been negotiated. */
  static async start(access: DeviceAccess, opts: NetOptions): Promise<VirtioNet> {
    const size = opts.queueSize ?? 16;
    const t = opts.timeoutMs ? { timeoutMs: opts.timeoutMs } : {};
    const r = access.rings ? { rings: access.rings } : {};
    const ring = Virtqueue.ringBytes(size);
    const iova = (off: number) => (opts.iova !== undefined ? { iova: opts.iova + off } : {});
    // Receive buffers wait for frames as long as it takes: they stay posted across a ring stop.
    const rx = new Virtqueue(access.frontend, access.memory, { index: 0, size, gpa: opts.gpa, ...iova(0), drain: false, ...t, ...r });
    const tx = new Virtqueue(access.frontend, access.memory, { index: 1, size, gpa: opts.gpa + ring, ...iova(ring), ...t, ...r });
    try {
      await rx.start();
      await tx.start();
    } catch (err) {
      rx.close();
      tx.close();
      throw err;
    }
    return new VirtioNet(access, rx, tx);
  }

  /**
   * Posts a receive buffer of `len` bytes at `addr` (its GPA, or its IOVA behind an IOMMU; device-writable).
   * Resolves with the frame's length once the device filled it: the frame is at addr + NET_HDR_BYTES.
   */
  async receive(addr: number, len: number): Promise<number> {
    if (len < NET_HDR_BYTES + 14) throw new InvalidArgError(`a receive buffer needs at least ${NET_HDR_BYTES + 14} bytes`);
    const used = await this.rx.submit([{ addr, len, write: true }]);
    return used - NET_HDR_BYTES;
  }

  /**
   * Transmits the Ethernet frame of `len` bytes at `addr` (its GPA, or its IOVA behind an IOMMU); a zero
   * virtio_net_hdr goes in front.
   */
  async transmit(addr: number, len: number): Promise<void> {
    const slot = this.hdrSlots.pop();
    if (slot === undefined) throw new InvalidArgError('too many transmits in flight');
    const hdrGpa = this.hdrBase + slot * HDR_SLOT_BYTES;
    let keep = false;
    const prepare = () => {
      this.access.memory.slice(hdrGpa, NET_HDR_BYTES).fill(0);
      this.access.memory.dirty?.mark(hdrGpa, NET_HDR_BYTES);
    };
    try {
      try {
        await this.tx.submit(
          [
            { addr: this.hdrDevice + slot * HDR_SLOT_BYTES, len: NET_HDR_BYTES },
            { addr, len },
          ],
          prepare,
        );
      } catch (err) {
        keep = true;
        throw err;
      }
    } finally {
      if (!keep) this.hdrSlots.push(slot);
    }
  }

  /** Stops both queues at the back-end (GET_VRING_BASE) and closes them. */
  async stop(): Promise<void> {
    try {
      await this.rx.stop();
    } finally {
      await this.tx.stop().catch(() => undefined);
    }
  }

  close(): void {
    this.rx.close();
    this.tx.close();
  }
}
