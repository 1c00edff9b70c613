// A split virtqueue driver (virtio 1.x, section 2.7), just enough to prove that a back-end does real I/O
// into broker-managed guest memory: descriptor table, available and used rings live in guest memory (a
// writable region the back-end was given), written through this process's own mappings; buffers are
// guest-physical addresses; a kick eventfd tells the back-end, a call eventfd (on uv_poll) tells us.
//
// No indirect descriptors, no event index, no packed ring: those features are not negotiated. Every
// request has a deadline (a back-end that dies on a bad address never answers).
import { constants, native, type PollHandle } from '../../native/index.js';
import { DisconnectedError, InvalidArgError, TimeoutError, toMmbError, type MmbError } from '../../protocol/index.js';
import type { VhostUserFrontend } from './frontend.js';
import { uaddrOf } from './memtable.js';
import { Feature, bit } from './messages.js';

/** What the driver needs of guest memory: a view of [gpa, gpa + len) inside one mapping. */
export interface QueueMemory {
  slice(gpa: number, length: number): Uint8Array;
}

/** One buffer of a descriptor chain. `write`: the device writes it (device-writable). */
export interface QueueBuffer {
  gpa: number;
  len: number;
  write?: boolean;
}

export interface VirtqueueOptions {
  /** The queue's index at the back-end (virtio-blk: 0; virtio-net: 0 = RX, 1 = TX). */
  index: number;
  /** Number of descriptors, a power of two up to 32768. Default 16. */
  size?: number;
  /** Guest-physical address of the rings (Virtqueue.ringBytes(size) bytes, 16-byte aligned). */
  gpa: number;
  /** Deadline of each request, in ms. Default 5000. */
  timeoutMs?: number;
}

const VIRTQ_DESC_F_NEXT = 1;
const VIRTQ_DESC_F_WRITE = 2;
const DESC_BYTES = 16;

const align = (n: number, a: number) => Math.ceil(n / a) * a;

/** Offsets of the three parts of a split ring of `size` descriptors. */
export function ringLayout(size: number): { desc: number; avail: number; used: number; bytes: number } {
  const desc = 0;
  const avail = size * DESC_BYTES;
  const used = align(avail + 6 + 2 * size, 64);
  return { desc, avail, used, bytes: align(used + 6 + 8 * size, 64) };
}

interface Pending {
  head: number;
  count: number;
  resolve: (len: number) => void;
  reject: (err: MmbError) => void;
  timer: NodeJS.Timeout;
}

export class Virtqueue {
  readonly index: number;
  readonly size: number;
  readonly gpa: number;
  private readonly timeoutMs: number;
  private readonly layout: ReturnType<typeof ringLayout>;
  readonly kickFd: number;
  readonly callFd: number;
  private poll: PollHandle | undefined;
  private free: number[];
  private availIdx = 0;
  private lastUsed = 0;
  private readonly pending = new Map<number, Pending>();
  private _closed = false;
  /** Requests completed, kicks sent, call notifications seen. */
  readonly stats = { completed: 0, kicks: 0, calls: 0 };

  /** Bytes of guest memory the rings of a `size`-descriptor queue take. */
  static ringBytes(size: number): number {
    return ringLayout(size).bytes;
  }

  constructor(
    private readonly frontend: VhostUserFrontend,
    private readonly memory: QueueMemory,
    opts: VirtqueueOptions,
  ) {
    const size = opts.size ?? 16;
    if (!Number.isInteger(size) || size < 1 || size > 32768 || (size & (size - 1)) !== 0) throw new InvalidArgError(`queue size ${size} is not a power of two <= 32768`);
    if (opts.gpa % 16 !== 0) throw new InvalidArgError(`ring address 0x${opts.gpa.toString(16)} is not 16-byte aligned`);
    this.index = opts.index;
    this.size = size;
    this.gpa = opts.gpa;
    this.timeoutMs = opts.timeoutMs ?? 5000;
    this.layout = ringLayout(size);
    this.free = Array.from({ length: size }, (_, i) => size - 1 - i);
    this.kickFd = native.eventfd(0, constants.EFD_CLOEXEC | constants.EFD_NONBLOCK);
    this.callFd = native.eventfd(0, constants.EFD_CLOEXEC | constants.EFD_NONBLOCK);
  }

  /**
   * Zeroes the rings and hands the queue to the back-end: SET_VRING_NUM, SET_VRING_BASE 0, SET_VRING_ADDR
   * (user addresses of the rings), SET_VRING_KICK, SET_VRING_CALL, and SET_VRING_ENABLE when
   * VHOST_USER_F_PROTOCOL_FEATURES was negotiated. Each one confirmed.
   */
  async start(): Promise<void> {
    this.view(0, this.layout.bytes).fill(0);
    const fe = this.frontend;
    await fe.setVringNum(this.index, this.size);
    await fe.setVringBase(this.index, 0);
    await fe.setVringAddr(this.index, uaddrOf(this.gpa + this.layout.desc), uaddrOf(this.gpa + this.layout.used), uaddrOf(this.gpa + this.layout.avail));
    await fe.setVringKick(this.index, this.kickFd);
    await fe.setVringCall(this.index, this.callFd);
    if (fe.negotiated.features & bit(Feature.PROTOCOL_FEATURES)) await fe.setVringEnable(this.index, true);
    this.poll = native.pollStart(this.callFd, constants.POLL_READABLE, () => this.onCall());
    native.pollRef(this.poll, false);
  }

  /** Descriptors not in use. */
  get freeDescriptors(): number {
    return this.free.length;
  }

  /**
   * Makes the chain `bufs` available to the device and kicks it. Resolves with the number of bytes the
   * device wrote into the chain (used.len) once it is used; rejects after the deadline.
   */
  submit(bufs: readonly QueueBuffer[]): Promise<number> {
    if (this._closed) return Promise.reject(new DisconnectedError(`virtqueue ${this.index} is closed`));
    if (bufs.length === 0) return Promise.reject(new InvalidArgError('an empty descriptor chain'));
    if (bufs.length > this.free.length) return Promise.reject(new InvalidArgError(`virtqueue ${this.index}: ${bufs.length} descriptors needed, ${this.free.length} free`));
    for (const b of bufs) {
      if (!Number.isSafeInteger(b.gpa) || b.gpa < 0 || !Number.isInteger(b.len) || b.len < 0 || b.len > 0xffff_ffff) {
        return Promise.reject(new InvalidArgError(`bad buffer ${b.gpa}+${b.len}`));
      }
    }
    const desc = this.dataView(this.layout.desc, this.size * DESC_BYTES);
    const ids = bufs.map(() => this.free.pop() as number);
    bufs.forEach((b, i) => {
      const at = (ids[i] as number) * DESC_BYTES;
      desc.setBigUint64(at, BigInt(b.gpa), true);
      desc.setUint32(at + 8, b.len, true);
      const last = i === bufs.length - 1;
      desc.setUint16(at + 12, (last ? 0 : VIRTQ_DESC_F_NEXT) | (b.write ? VIRTQ_DESC_F_WRITE : 0), true);
      desc.setUint16(at + 14, last ? 0 : (ids[i + 1] as number), true);
    });
    const head = ids[0] as number;
    const done = new Promise<number>((resolve, reject) => {
      const timer = setTimeout(() => {
        if (!this.reapSafely() || !this.pending.has(head)) return;
        this.pending.delete(head);
        // The descriptors stay with the device: never reuse them.
        reject(new TimeoutError(`virtqueue ${this.index}: the back-end did not use the buffer within ${this.timeoutMs} ms`));
      }, this.timeoutMs);
      this.pending.set(head, { head, count: bufs.length, resolve, reject, timer });
    });
    const avail = this.dataView(this.layout.avail, 4 + 2 * this.size);
    avail.setUint16(4 + 2 * (this.availIdx % this.size), head, true);
    // The ring entry is written before the index that publishes it (x86 keeps stores in order; the kick's
    // write(2) orders both before the device wakes up).
    this.availIdx = (this.availIdx + 1) & 0xffff;
    avail.setUint16(2, this.availIdx, true);
    native.eventfdWrite(this.kickFd, 1);
    this.stats.kicks++;
    return done;
  }

  private onCall(): void {
    if (this._closed) return;
    try {
      native.eventfdRead(this.callFd);
    } catch {
      // Nothing to read: reap anyway.
    }
    this.stats.calls++;
    this.reapSafely();
  }

  /**
   * reap() from a poll or timer callback, where a throw would be an uncaught exception: if the rings can
   * no longer be read (their region was removed), every pending request fails and the queue closes.
   */
  private reapSafely(): boolean {
    try {
      this.reap();
      return true;
    } catch (err) {
      this.fail(toMmbError(err));
      return false;
    }
  }

  /** Completes every used entry not seen yet. */
  private reap(): void {
    if (this._closed) return;
    const used = this.dataView(this.layout.used, 4 + 8 * this.size);
    const idx = used.getUint16(2, true);
    while (this.lastUsed !== idx) {
      const at = 4 + 8 * (this.lastUsed % this.size);
      const id = used.getUint32(at, true);
      const len = used.getUint32(at + 4, true);
      this.lastUsed = (this.lastUsed + 1) & 0xffff;
      const p = this.pending.get(id);
      if (!p) continue;
      this.pending.delete(id);
      clearTimeout(p.timer);
      this.release(p.head);
      this.stats.completed++;
      p.resolve(len);
    }
  }

  /** Returns the chain starting at `head` to the free list. */
  private release(head: number): void {
    const desc = this.dataView(this.layout.desc, this.size * DESC_BYTES);
    let id = head;
    for (let n = 0; n < this.size; n++) {
      this.free.push(id);
      const flags = desc.getUint16(id * DESC_BYTES + 12, true);
      if (!(flags & VIRTQ_DESC_F_NEXT)) return;
      id = desc.getUint16(id * DESC_BYTES + 14, true);
    }
  }

  private view(off: number, len: number): Uint8Array {
    return this.memory.slice(this.gpa + off, len);
  }

  private dataView(off: number, len: number): DataView {
    const v = this.view(off, len);
    return new DataView(v.buffer, v.byteOffset, v.byteLength);
  }

  /**
   * Stops the ring at the back-end (GET_VRING_BASE: it no longer touches the rings or buffers) and closes
   * the queue. Resolves with the back-end's next available index: the number of chains it took.
   */
  async stop(): Promise<number> {
    if (this._closed) throw new DisconnectedError(`virtqueue ${this.index} is closed`);
    try {
      return await this.frontend.getVringBase(this.index);
    } finally {
      this.close();
    }
  }

  /** Stops watching and closes our ends of the eventfds; pending requests fail. */
  close(): void {
    this.fail(new DisconnectedError(`virtqueue ${this.index} was closed`));
  }

  private fail(reason: MmbError): void {
    if (this._closed) return;
    this._closed = true;
    if (this.poll) native.pollClose(this.poll);
    this.poll = undefined;
    for (const p of this.pending.values()) {
      clearTimeout(p.timer);
      p.reject(reason);
    }
    this.pending.clear();
    for (const fd of [this.kickFd, this.callFd]) {
      try {
        native.close(fd);
      } catch {
        // Already closed.
      }
    }
  }
}
