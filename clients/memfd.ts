import fs from 'node:fs';
import { constants, filePageSize, native } from '../native/index.js';
import { InvalidArgError } from '../protocol/index.js';

export interface SealedMemfdOptions {
  /** Also forbid growing it (F_SEAL_GROW). Default false: growing cannot hurt a client that maps it. */
  sealGrow?: boolean;
  /**
   * Back it with huge pages (MFD_HUGETLB): `true` for the system's default huge page size, or the page
   * size in bytes (2 MiB or 1 GiB on x86-64: MFD_HUGE_2MB, MFD_HUGE_1GB). The size must then be a multiple
   * of the huge page size, and the kernel's pool must hold enough pages to fault them in.
   */
  hugetlb?: boolean | number;
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
  const flags = constants.MFD_CLOEXEC | constants.MFD_ALLOW_SEALING | (opts.hugetlb ? constants.MFD_HUGETLB | hugePageFlag(opts.hugetlb) : 0);
  const fd = native.memfdCreate(name, flags);
  try {
    // The kernel picks the default pool for a size it has no pool of: say so instead of mapping wrong pages.
    if (typeof opts.hugetlb === 'number' && filePageSize(fd) !== opts.hugetlb) {
      throw new InvalidArgError(`memfd ${JSON.stringify(name)}: this kernel gave ${filePageSize(fd)}-byte pages, not ${opts.hugetlb}`);
    }
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

/** memfd_create's huge page size bits: log2(page size) << MFD_HUGE_SHIFT (26); 0 for the default size. */
function hugePageFlag(pageSize: boolean | number): number {
  if (pageSize === true) return 0;
  if (typeof pageSize !== 'number' || !Number.isSafeInteger(pageSize) || pageSize < 2 ** 16 || !Number.isInteger(Math.log2(pageSize))) {
    throw new InvalidArgError(`hugetlb page size must be a power of two of at least 64 KiB (2 MiB, 1 GiB), got ${pageSize}`);
  }
  return Math.log2(pageSize) << 26;
}
