import { native } from '../native/index.js';

/** Closes every descriptor, ignoring ones that are already closed (EBADF). */
export function closeAll(fds: readonly number[]): void {
  for (const fd of fds) {
    try {
      native.close(fd);
    } catch {
      // EBADF: someone else closed it already; nothing to release.
    }
  }
}
