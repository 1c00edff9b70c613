// The disk: a vhost-user-blk device served by an unmodified qemu-storage-daemon. The broker's vhost-user
// bridge (VhostUserSubscriber) is the VMM's side of the device: it follows the map as the daemon's memory
// table (ADD_MEM_REG / REM_MEM_REG, each confirmed before the bridge acks a transaction), and the VMM
// itself is the virtio driver (VirtioBlk): rings and buffers live in guest RAM, and the I/O comes from a
// workload here, not from the guest program. The workload keeps DEPTH requests in flight at all times
// (each job writes a pattern and reads it back into another buffer, and compares), so every DIMM change
// happens with real READs and WRITEs in flight through the daemon.
//
// Two duties towards a migration, which the bridge does not do for the VMM (see the README, "Limits"):
//   - dirty pages: qemu-storage-daemon writes guest memory (READ data, used ring, status bytes) without
//     telling anyone, and so does this driver through raw views. After every completion the workload marks
//     what the request touched in the bridge's dirty log, so a pre-copy round never misses those pages.
//   - pausing: on the broker's PAUSE the bridge's 'pause' event makes the workload stop submitting and
//     wait for what is in flight; the ack, and so the migration's last round, waits for that.
import type { Logger } from 'pino';
import { BLK_FEATURES, VhostUserSubscriber, VirtioBlk, type Broker } from '../../index.js';
import { DISK_AREA_GPA, DISK_BUFFERS_GPA, SPACE } from './layout.js';

/** Requests in flight at once (VirtioBlk's 16 descriptors hold 5 three-descriptor chains). */
export const DEPTH = 4;
/** Bytes per request. */
export const REQUEST_BYTES = 64 * 1024;
const QUEUE_SIZE = 16;

export interface DiskStats {
  /** Requests completed (WRITEs and READs), and those in flight now. */
  completed: number;
  inflight: number;
  /** Requests failed, and READs that did not return what was written. */
  errors: number;
  mismatches: number;
  lastError: string | undefined;
  /** Whether the workload runs (false while paused for a migration or stopped). */
  running: boolean;
}

export class Disk {
  private running = false;
  private jobs: Promise<void>[] = [];
  private nextId = 1;
  private readonly inflightIds = new Set<number>();
  private readonly stats = { completed: 0, errors: 0, mismatches: 0, lastError: undefined as string | undefined };

  private constructor(
    readonly bridge: VhostUserSubscriber,
    private readonly blk: VirtioBlk,
  ) {}

  /**
   * Connects to the daemon's socket, negotiates, attaches the bridge to the embedded broker (its memory
   * table is confirmed by the daemon before this resolves) and starts the virtqueue in guest RAM.
   */
  static async attach(broker: Broker, backendSocket: string, logger?: Logger): Promise<Disk> {
    const bridge = await VhostUserSubscriber.attach(broker, {
      space: SPACE,
      name: 'disk0',
      backendSocket,
      virtioFeatures: BLK_FEATURES,
      ...(logger ? { logger } : {}),
    });
    let blk: VirtioBlk;
    try {
      blk = await VirtioBlk.start(bridge, { gpa: DISK_AREA_GPA, queueSize: QUEUE_SIZE });
    } catch (err) {
      await bridge.close();
      throw err;
    }
    const disk = new Disk(bridge, blk);
    if (blk.capacity !== undefined && blk.capacity * 512 < DEPTH * REQUEST_BYTES) {
      await disk.close();
      throw new Error(`the disk has ${blk.capacity} sectors; the workload needs ${(DEPTH * REQUEST_BYTES) / 512}`);
    }
    bridge.on('pause', (e) => e.waitUntil(e.paused ? disk.quiesce() : Promise.resolve(disk.start())));
    return disk;
  }

  /** Starts the workload (a no-op if it runs). */
  start(): void {
    if (this.running) return;
    this.running = true;
    this.jobs = Array.from({ length: DEPTH }, (_, j) => this.job(j));
  }

  /** Stops submitting and resolves once nothing is in flight. */
  async quiesce(): Promise<void> {
    this.running = false;
    await Promise.all(this.jobs);
  }

  /** Ids of the requests in flight now (submitted to the daemon, not completed). */
  inflight(): ReadonlySet<number> {
    return new Set(this.inflightIds);
  }

  status(): DiskStats {
    return { ...this.stats, inflight: this.inflightIds.size, running: this.running };
  }

  /** Job j writes its own sectors from one buffer and reads them back into another, until stopped. */
  private async job(j: number): Promise<void> {
    const sector = (j * REQUEST_BYTES) / 512;
    const out = DISK_BUFFERS_GPA + j * 2 * REQUEST_BYTES;
    const back = out + REQUEST_BYTES;
    const memory = this.bridge.memory;
    for (let round = 1; this.running; round++) {
      try {
        const pattern = memory.slice(out, REQUEST_BYTES);
        new DataView(pattern.buffer, pattern.byteOffset, pattern.byteLength).setUint32(0, round, true);
        pattern.fill(((j << 4) | (round & 0xf)) & 0xff, 4);
        await this.request(() => this.blk.write(sector, out, REQUEST_BYTES), out);
        await this.request(() => this.blk.read(sector, back, REQUEST_BYTES), back);
        if (Buffer.compare(memory.slice(back, REQUEST_BYTES), memory.slice(out, REQUEST_BYTES)) !== 0) this.stats.mismatches++;
      } catch (err) {
        this.stats.errors++;
        this.stats.lastError = (err as Error).message;
        return;
      }
    }
  }

  private async request(io: () => Promise<void>, buffer: number): Promise<void> {
    const id = this.nextId++;
    this.inflightIds.add(id);
    try {
      await io();
      this.stats.completed++;
    } finally {
      this.inflightIds.delete(id);
      // The driver wrote the ring, the header and (WRITE) the buffer; the daemon wrote the used ring, the
      // status byte and (READ) the buffer. Marked after the completion, so the writes are all in place.
      this.bridge.dirty.mark(DISK_AREA_GPA, VirtioBlk.areaBytes(QUEUE_SIZE));
      this.bridge.dirty.mark(buffer, REQUEST_BYTES);
    }
  }

  /** Stops the workload, the queue (GET_VRING_BASE) and the bridge: the daemon unmaps guest memory. */
  async close(): Promise<void> {
    await this.quiesce();
    await this.blk.stop().catch(() => undefined);
    this.blk.close();
    await this.bridge.close();
  }
}
