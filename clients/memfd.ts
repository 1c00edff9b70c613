import { constants, native } from '../native/index.js';
import { InvalidArgError } from '../protocol/index.js';

export interface SealedMemfdOptions {
  /** Also forbid growing it (F_SEAL_GROW). Default false: growing cannot hurt a client that maps it. */
  sealGrow?: boolean;
  /** Back it with huge pages (MFD_HUGETLB); the size must then be a multiple of the huge page size. */
  hugetlb?: boolean;
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
    native.addSeals(fd, constants.F_SEAL_SHRINK | (opts.sealGrow ? constants.F_SEAL_GROW : 0));
  } catch (err) {
    native.close(fd);
    throw err;
  }
  return fd;
}
