import fs from 'node:fs';
import { constants, native } from '../native/index.js';
import { InvalidArgError } from '../protocol/index.js';

export interface SealedMemfdOptions {
  /** Also forbid growing it (F_SEAL_GROW). Default false: growing cannot hurt a client that maps it. */
  sealGrow?: boolean;
  /** Back it with huge pages (MFD_HUGETLB); the size must then be a multiple of the huge page size. */
  hugetlb?: boolean;
  /** Bytes to put at its start before anything is sealed (a ROM's image). */
  contents?: Uint8Array;
  /**
   * Memory nobody may write (a ROM): sealed with F_SEAL_FUTURE_WRITE after `contents` is copied in, so no
   * process, root included, can map it writable or write() it any more. The broker then serves it
   * read-only to every subscriber: regions over it must be read-only.
   */
  sealWrites?: boolean;
}

/**
 * Creates a memfd of `size` bytes that the broker will accept as a backing: close-on-exec, sealed against
 * shrinking (so no client can truncate it under the others and SIGBUS them). Returns the fd; the caller
 * closes it.
 */
export function createSealedMemfd(name: string, size: number, opts: SealedMemfdOptions = {}): number {
  if (!Number.isSafeInteger(size) || size <= 0) throw new InvalidArgError(`invalid memfd size ${size}`);
  const flags = constants.MFD_CLOEXEC | constants.MFD_ALLOW_SEALING | (opts.hugetlb ? constants.MFD_HUGETLB : 0);
  const fd = native.memfdCreate(name, flags);
  try {
    native.ftruncate(fd, size);
    if (opts.contents && opts.contents.length > 0) {
      if (opts.contents.length > size) throw new InvalidArgError(`contents of ${opts.contents.length} bytes do not fit in ${size}`);
      // Through a mapping, which works for hugetlb memfds too (they have no write()); unmapped before sealing.
      const m = native.mmap(fd, 0, size, constants.PROT_READ | constants.PROT_WRITE, constants.MAP_SHARED);
      new Uint8Array(m.buffer).set(opts.contents);
      native.munmap(m);
    }
    native.addSeals(fd, constants.F_SEAL_SHRINK | (opts.sealGrow ? constants.F_SEAL_GROW : 0) | (opts.sealWrites ? constants.F_SEAL_FUTURE_WRITE : 0));
    // No uid but ours may reopen it through /proc (a memfd is born 0777); the broker does the same at
    // BACKING_ADD, but a broker of another uid without root could not (see broker/backings.ts).
    fs.fchmodSync(fd, 0);
  } catch (err) {
    native.close(fd);
    throw err;
  }
  return fd;
}
