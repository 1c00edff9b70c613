// A split virtqueue driver (virtio 1.x, section 2.7), just enough to prove that a back-end does real I/O
// into broker-managed guest memory: descriptor table, available and used rings live in guest memory (a
// writable region the back-end was given), written through this process's own mappings; buffers are
// guest-physical addresses; a kick eventfd tells the back-end, a call eventfd (on uv_poll) tells us.
// Behind a guest IOMMU (VIRTIO_F_ACCESS_PLATFORM negotiated) the device sees only IOVAs: the rings are
// given to it at their IOVA (`iova`, which the IOAS must map to `gpa`), and buffers carry IOVAs too; the
// back-end translates both through its IOTLB (iotlb.ts). This process still writes the rings by GPA.
//
// No indirect descriptors, no event index, no packed ring: those features are not negotiated. Every
// request has a deadline (a back-end that dies on a bad address never answers).
//
// The ring can be stopped and restarted while requests keep coming (rings.ts drives it: around a memory
// reshape, and while migration pauses the writers). halt() holds new requests in this process (nothing
// is written to guest memory for them), waits until the requests the back-end took have completed when
// the queue drains (`drain`, default true: libvhost-user answers GET_VRING_BASE without waiting for its
// requests in flight, which would complete into memory that is meanwhile remapped), then stops the ring
// at the back-end (GET_VRING_BASE). resume() sets it up again the way QEMU's vhost_virtqueue_start does
// (SET_VRING_NUM, SET_VRING_BASE with the index GET_VRING_BASE returned, SET_VRING_ADDR, SET_VRING_KICK,
// SET_VRING_CALL, SET_VRING_ENABLE) and posts what was held. Nothing is lost, and a held request's
// deadline starts when it is posted.
import { constants, native, type PollHandle } from '../../native/index.js';
import { DisconnectedError, InvalidArgError, TimeoutError, toMmbError, type MmbError, asGpa, hex } from '../../protocol/index.js';
import type { VhostUserFrontend } from './frontend.js';
import { uaddrOf, type GuestRange } from './memtable.js';
import { Feature, VRING_F_LOG, bit } from './messages.js';
import type { RingQueue, Rings } from './rings.js';

/** What the driver needs of guest memory: a view of [gpa, gpa + len) inside one mapping. */
export interface QueueMemory {
  slice(gpa: number, length: number): Uint8Array;
  /**
   * Where the driver's own writes to guest memory (descriptors, the available ring, request headers)
   * are marked dirty while logging is on: GuestMemory.dirty, set by the subscriber.
   */
  readonly dirty?: { mark(gpa: number, length: number): void } | undefined;
}

/** One buffer of a descriptor chain. `write`: the device writes it (device-writable). */
export interface QueueBuffer {
  /**
   * The buffer's address as the device sees it: its guest-physical address, or its IOVA when the device
   * translates through an IOAS (VIRTIO_F_ACCESS_PLATFORM).
   */
  addr: number;
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
  /**
   * The rings' IOVA, required when VIRTIO_F_ACCESS_PLATFORM was negotiated (the device then translates
   * every address through its IOTLB): the IOAS must map [iova, iova + ringBytes) to the rings' GPAs,
   * writable. SET_VRING_ADDR then carries IOVAs, as QEMU sends them (vhost_memory_map is the identity
   * behind an IOMMU), and so does the used ring's log address (DPDK translates it to a GPA itself).
   */
  iova?: number;
  /** Deadline of each request, in ms. Default 5000. */
  timeoutMs?: number;
  /**
   * Before the ring is stopped, wait until every request the back-end took has completed. Right for
   * request/response queues (virtio-blk, virtio-net TX); not for queues whose buffers wait for the device
   * for as long as it likes (virtio-net RX): those stay posted across the stop. Default true.
   */
  drain?: boolean;
  /** The back-end's running rings (rings.ts): this queue joins them once started. */
  rings?: Rings;
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

/** A request held while the ring is stopped: posted when it runs again. */
interface Held {
  bufs: readonly QueueBuffer[];
  prepare: (() => void) | undefined;
  resolve: (len: number) => void;
  reject: (err: MmbError) => void;
}

/** 'running': requests go to the ring; 'holding': they wait here, the ring drains; 'stopped': GET_VRING_BASE done. */
type State = 'running' | 'holding' | 'stopped';

export class Virtqueue implements RingQueue {
  readonly index: number;
  readonly size: number;
  readonly gpa: number;
  /** The rings' IOVA when the device translates through an IOAS; undefined otherwise. */
  readonly iova: number | undefined;
  private readonly timeoutMs: number;
  private readonly layout: ReturnType<typeof ringLayout>;
  private readonly drain: boolean;
  private readonly rings: Rings | undefined;
  readonly kickFd: number;
  readonly callFd: number;
  private poll: PollHandle | undefined;
  private free: number[];
  private availIdx = 0;
  private lastUsed = 0;
  private readonly pending = new Map<number, Pending>();
  private held: Held[] = [];
  private drainWaiters: (() => void)[] = [];
  private state: State = 'running';
  /** What GET_VRING_BASE returned at the last stop: where the back-end resumes. */
  private base = 0;
  private _closed = false;
  /** Requests completed, requests that waited for a stopped ring, kicks sent, call notifications seen, stops (GET_VRING_BASE) and restarts. */
  readonly stats = { completed: 0, held: 0, kicks: 0, calls: 0, stops: 0, restarts: 0 };

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
    if (!Number.isInteger(size) || size < 1 || size > 32768 || (size & (size - 1)) !== 0)
      throw new InvalidArgError(`queue size ${size} is not a power of two <= 32768`);
    if (opts.gpa % 16 !== 0) throw new InvalidArgError(`ring address ${hex(opts.gpa)} is not 16-byte aligned`);
    if (frontend.negotiated.iommu) {
      if (opts.iova === undefined)
        throw new InvalidArgError(`virtqueue ${opts.index}: the device translates through an IOAS (VIRTIO_F_ACCESS_PLATFORM): give the rings' IOVA`);
      if (!Number.isSafeInteger(opts.iova) || opts.iova < 0 || opts.iova % 16 !== 0)
        throw new InvalidArgError(`ring IOVA ${opts.iova} is not a 16-byte aligned address`);
    }
    this.iova = frontend.negotiated.iommu ? opts.iova : undefined;
    this.index = opts.index;
    this.size = size;
    this.gpa = opts.gpa;
    this.timeoutMs = opts.timeoutMs ?? 5000;
    this.drain = opts.drain ?? true;
    this.rings = opts.rings;
    this.layout = ringLayout(size);
    this.free = Array.from({ length: size }, (_, i) => size - 1 - i);
    this.kickFd = native.eventfd(0, constants.EFD_CLOEXEC | constants.EFD_NONBLOCK);
    this.callFd = native.eventfd(0, constants.EFD_CLOEXEC | constants.EFD_NONBLOCK);
  }

  /** Guest-physical range of the rings (descriptor table, available and used ring). */
  get ringRange(): GuestRange {
    return { gpa: asGpa(this.gpa), bytes: this.layout.bytes };
  }

  /** Whether requests go to the ring now (not held by a stop). */
  get running(): boolean {
    return this.state === 'running' && !this._closed;
  }

  /** Requests posted to the ring and not completed yet. */
  get inFlight(): number {
    return this.pending.size;
  }

  /** Requests waiting in this process for the ring to run again (nothing of them is in guest memory). */
  get waiting(): number {
    return this.held.length;
  }

  /**
   * Zeroes the rings and hands the queue to the back-end: SET_VRING_NUM, SET_VRING_BASE 0, SET_VRING_ADDR
   * (user addresses of the rings, the used ring's GPA for logging), SET_VRING_KICK, SET_VRING_CALL, and
   * SET_VRING_ENABLE when VHOST_USER_F_PROTOCOL_FEATURES was negotiated. Each one confirmed. Then it joins
   * the back-end's rings (stopped with them from then on).
   */
  async start(): Promise<void> {
    const ring = this.view(0, this.layout.bytes);
    ring.fill(0);
    this.memory.dirty?.mark(this.gpa, this.layout.bytes);
    await this.configure(this.rings?.logging ?? false);
    this.poll = native.pollStart(this.callFd, constants.POLL_READABLE, () => this.onCall());
    native.pollRef(this.poll, false);
    await this.rings?.add(this);
  }

  /** The vring setup messages, in QEMU's order (vhost_virtqueue_start). */
  private async configure(logging: boolean): Promise<void> {
    const fe = this.frontend;
    await fe.setVringNum(this.index, this.size);
    await fe.setVringBase(this.index, this.base);
    await this.setAddr(logging);
    await fe.setVringKick(this.index, this.kickFd);
    await fe.setVringCall(this.index, this.callFd);
    if (fe.negotiated.features & bit(Feature.PROTOCOL_FEATURES)) await fe.setVringEnable(this.index, true);
  }

  private setAddr(logging: boolean): Promise<void> {
    const l = this.layout;
    // Behind an IOMMU every ring address is an IOVA; otherwise a user address of the memory table.
    const at = (off: number) => (this.iova !== undefined ? BigInt(this.iova + off) : uaddrOf(this.gpa + off));
    const log = this.iova !== undefined ? this.iova + l.used : this.gpa + l.used;
    return this.frontend.setVringAddr(this.index, at(l.desc), at(l.used), at(l.avail), logging ? VRING_F_LOG : 0, BigInt(log));
  }

  /** Turns the back-end's logging of used-ring writes on or off (SET_VRING_ADDR), if the ring runs. */
  async setLogging(on: boolean): Promise<void> {
    if (this.state === 'running' && !this._closed) await this.setAddr(on);
  }

  /** Descriptors not in use. */
  get freeDescriptors(): number {
    return this.free.length;
  }

  /**
   * Makes the chain `bufs` available to the device and kicks it. Resolves with the number of bytes the
   * device wrote into the chain (used.len) once it is used; rejects after the deadline. `prepare` runs
   * right before the chain is posted (it writes what the device reads, e.g. a request header): while the
   * ring is stopped the request waits here, and nothing of it is written to guest memory.
   */
  submit(bufs: readonly QueueBuffer[], prepare?: () => void): Promise<number> {
    if (this._closed) return Promise.reject(new DisconnectedError(`virtqueue ${this.index} is closed`));
    if (bufs.length === 0) return Promise.reject(new InvalidArgError('an empty descriptor chain'));
    if (bufs.length > this.size)
      return Promise.reject(new InvalidArgError(`virtqueue ${this.index}: ${bufs.length} descriptors needed, the queue has ${this.size}`));
    for (const b of bufs) {
      if (!Number.isSafeInteger(b.addr) || b.addr < 0 || !Number.isInteger(b.len) || b.len < 0 || b.len > 0xffff_ffff) {
        return Promise.reject(new InvalidArgError(`bad buffer ${b.addr}+${b.len}`));
      }
    }
    if (this.state === 'running' && this.held.length === 0) {
      if (bufs.length > this.free.length)
        return Promise.reject(new InvalidArgError(`virtqueue ${this.index}: ${bufs.length} descriptors needed, ${this.free.length} free`));
      return new Promise<number>((resolve, reject) => this.post({ bufs, prepare, resolve, reject }));
    }
    this.stats.held++;
    return new Promise<number>((resolve, reject) => this.held.push({ bufs, prepare, resolve, reject }));
  }

  /** Writes the chain into the ring, publishes it and kicks. */
  private post(r: Held): void {
    const { bufs } = r;
    try {
      r.prepare?.();
    } catch (err) {
      r.reject(toMmbError(err));
      return;
    }
    const desc = this.dataView(this.layout.desc, this.size * DESC_BYTES);
    const ids = bufs.map(() => this.free.pop() as number);
    bufs.forEach((b, i) => {
      const at = (ids[i] as number) * DESC_BYTES;
      desc.setBigUint64(at, BigInt(b.addr), true);
      desc.setUint32(at + 8, b.len, true);
      const last = i === bufs.length - 1;
      desc.setUint16(at + 12, (last ? 0 : VIRTQ_DESC_F_NEXT) | (b.write ? VIRTQ_DESC_F_WRITE : 0), true);
      desc.setUint16(at + 14, last ? 0 : (ids[i + 1] as number), true);
    });
    const head = ids[0] as number;
    const timer = setTimeout(() => {
      if (!this.reapSafely() || !this.pending.has(head)) return;
      this.pending.delete(head);
      this.drained();
      // The descriptors stay with the device: never reuse them.
      r.reject(new TimeoutError(`virtqueue ${this.index}: the back-end did not use the buffer within ${this.timeoutMs} ms`));
    }, this.timeoutMs);
    this.pending.set(head, { head, count: bufs.length, resolve: r.resolve, reject: r.reject, timer });
    const avail = this.dataView(this.layout.avail, 4 + 2 * this.size);
    const slot = this.availIdx % this.size;
    avail.setUint16(4 + 2 * slot, head, true);
    // The ring entry is written before the index that publishes it (x86 keeps stores in order; the kick's
    // write(2) orders both before the device wakes up).
    this.availIdx = (this.availIdx + 1) & 0xffff;
    avail.setUint16(2, this.availIdx, true);
    const dirty = this.memory.dirty;
    if (dirty) {
      for (const id of ids) dirty.mark(this.gpa + this.layout.desc + id * DESC_BYTES, DESC_BYTES);
      dirty.mark(this.gpa + this.layout.avail, 4);
      dirty.mark(this.gpa + this.layout.avail + 4 + 2 * slot, 2);
    }
    this.kick();
  }

  private kick(): void {
    native.eventfdWrite(this.kickFd, 1);
    this.stats.kicks++;
  }

  /** Posts held requests while descriptors last. */
  private releaseHeld(): void {
    while (this.state === 'running' && !this._closed && this.held.length > 0) {
      const r = this.held[0] as Held;
      if (r.bufs.length > this.free.length) return; // waits for completions (reap() calls back here)
      this.held.shift();
      this.post(r);
    }
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
    this.drained();
    this.releaseHeld();
  }

  /** Wakes halt() once nothing is in flight. */
  private drained(): void {
    if (this.pending.size > 0 || this.drainWaiters.length === 0) return;
    for (const w of this.drainWaiters.splice(0)) w();
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
   * Stops the ring and keeps it: new requests are held here, requests in flight complete first (with
   * `drain`), then GET_VRING_BASE (the back-end no longer touches the rings or any buffer). Each request
   * in flight is bounded by its deadline, so this is too.
   */
  async halt(): Promise<void> {
    if (this._closed || this.state !== 'running') return;
    this.state = 'holding';
    if (this.drain && this.pending.size > 0) {
      await new Promise<void>((resolve) => {
        this.drainWaiters.push(resolve);
        this.drained();
      });
    }
    if (this._closed) return;
    this.base = await this.frontend.getVringBase(this.index);
    this.state = 'stopped';
    this.stats.stops++;
  }

  /** Sets the stopped ring up again at the back-end (logging as `logging` says) and posts what was held. */
  async resume(logging: boolean): Promise<void> {
    if (this._closed || this.state === 'running') return;
    if (this.state === 'holding') {
      // Stopped before GET_VRING_BASE went out (a stop that failed half way): the ring never stopped.
      this.state = 'running';
      this.releaseHeld();
      return;
    }
    await this.configure(logging);
    this.state = 'running';
    this.stats.restarts++;
    // Buffers that stayed posted across the stop (a receive queue) need the back-end to look again.
    if (this.pending.size > 0) this.kick();
    this.releaseHeld();
  }

  /**
   * Stops the ring at the back-end (GET_VRING_BASE: it no longer touches the rings or buffers) and closes
   * the queue. Resolves with the back-end's next available index: the number of chains it took.
   */
  async stop(): Promise<number> {
    if (this._closed) throw new DisconnectedError(`virtqueue ${this.index} is closed`);
    try {
      return this.state === 'stopped' ? this.base : await this.frontend.getVringBase(this.index);
    } finally {
      this.close();
    }
  }

  /** Stops watching and closes our ends of the eventfds; pending and held requests fail. */
  close(): void {
    this.fail(new DisconnectedError(`virtqueue ${this.index} was closed`));
  }

  private fail(reason: MmbError): void {
    if (this._closed) return;
    this._closed = true;
    this.rings?.delete(this);
    if (this.poll) native.pollClose(this.poll);
    this.poll = undefined;
    for (const p of this.pending.values()) {
      clearTimeout(p.timer);
      p.reject(reason);
    }
    this.pending.clear();
    for (const h of this.held.splice(0)) h.reject(reason);
    for (const w of this.drainWaiters.splice(0)) w();
    for (const fd of [this.kickFd, this.callFd]) {
      try {
        native.close(fd);
      } catch {
        // Already closed.
      }
    }
  }
}
