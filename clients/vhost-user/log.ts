// The vhost-user dirty log (docs/interop/vhost-user.rst, "Migration"): one shared memfd that the back-end
// maps (VHOST_USER_SET_LOG_BASE with VHOST_USER_PROTOCOL_F_LOG_SHMFD) and sets bits in while
// VHOST_F_LOG_ALL is on. Bit (gpa / 4096) % 8 of byte gpa / 4096 / 8 stands for the 4 KiB page at gpa;
// the log covers guest-physical addresses from 0 up to the end of the highest region the back-end has
// (QEMU's vhost_get_log_size: whole u64 words of 64 pages). Back-ends set bits with atomic byte ORs after
// the write they stand for (libvhost-user's vu_log_write, DPDK's vhost_log_page).
//
// collect() folds the log into the subscriber's dirty bitmaps with an atomic get-and-clear per u64 word
// (native bitmapFetchClear): a bit the back-end sets while we read is either in what we took or stays
// for the next sync, never lost. The log only grows (ftruncate of the same memfd, then SET_LOG_BASE with
// the new size): bits set through the back-end's old, smaller mapping are in the same file, so growing
// loses nothing either.
import { constants, native, type Mapping } from '../../native/index.js';
import { createSealedMemfd } from '../memfd.js';
import type { DirtyLog } from '../dirty.js';
import { LOG_CHUNK_BYTES, LOG_PAGE_BYTES } from './messages.js';

/** Bytes of log that cover guest-physical addresses [0, end), rounded up to whole 4 KiB pages of log. */
export function logBytesFor(end: number): number {
  const words = Math.max(1, Math.ceil(end / LOG_CHUNK_BYTES));
  return Math.ceil((words * 8) / 4096) * 4096;
}

/** The name of the log's memfd (as /proc/PID/fd shows it: `/memfd:vhost-log`). */
export const VHOST_LOG_NAME = 'vhost-log';

export class VhostLog {
  readonly fd: number;
  private mapping: Mapping;
  private _size: number;
  private scratch: Uint8Array;
  /** Pages found dirty by collect() since the log was created. */
  collected = 0;

  constructor(end: number) {
    this._size = logBytesFor(end);
    this.fd = createSealedMemfd(VHOST_LOG_NAME, this._size);
    try {
      this.mapping = native.mmap(this.fd, 0, this._size, constants.PROT_READ | constants.PROT_WRITE, constants.MAP_SHARED);
    } catch (err) {
      native.close(this.fd);
      throw err;
    }
    this.scratch = new Uint8Array(this._size);
  }

  /** Bytes of the log (what SET_LOG_BASE's mmap_size says). */
  get size(): number {
    return this._size;
  }

  /** The end of the guest-physical range the log covers. */
  get covers(): number {
    return this._size * 8 * LOG_PAGE_BYTES;
  }

  /**
   * Grows the log to cover [0, end); returns true when it grew (the back-end must then be sent
   * SET_LOG_BASE again before it may write above the old end). Never shrinks.
   */
  grow(end: number): boolean {
    const size = logBytesFor(end);
    if (size <= this._size) return false;
    native.ftruncate(this.fd, size);
    const mapping = native.mmap(this.fd, 0, size, constants.PROT_READ | constants.PROT_WRITE, constants.MAP_SHARED);
    native.munmap(this.mapping);
    this.mapping = mapping;
    this._size = size;
    this.scratch = new Uint8Array(size);
    return true;
  }

  /**
   * Takes every bit the back-end set (atomically clearing it in the log) and marks those pages dirty in
   * `dirty` (the subscriber's bitmaps; pages of regions that do not log are ignored there). Returns the
   * number of pages taken.
   */
  collect(dirty: DirtyLog): number {
    const bits = this.scratch;
    const n = native.bitmapFetchClear(this.mapping, 0, this._size, bits);
    if (n === 0) return 0;
    this.collected += n;
    // Runs of set bits, skipping zero bytes: a sparse log of a large guest costs one pass over its bytes.
    let start = -1;
    for (let byte = 0; byte < bits.length; byte++) {
      const v = bits[byte] as number;
      if (v === 0 && start < 0) continue;
      if (v === 0xff && start >= 0) continue;
      for (let b = 0; b < 8; b++) {
        const page = byte * 8 + b;
        if (v & (1 << b)) {
          if (start < 0) start = page;
        } else if (start >= 0) {
          dirty.mark(start * LOG_PAGE_BYTES, (page - start) * LOG_PAGE_BYTES);
          start = -1;
        }
      }
    }
    if (start >= 0) dirty.mark(start * LOG_PAGE_BYTES, (bits.length * 8 - start) * LOG_PAGE_BYTES);
    bits.fill(0);
    return n;
  }

  /** Clears the log without looking (logging starts over). */
  clear(): void {
    native.bitmapFetchClear(this.mapping, 0, this._size, this.scratch);
    this.scratch.fill(0);
  }

  close(): void {
    native.munmap(this.mapping);
    native.close(this.fd);
  }
}
