// The typed face of the C addon (native/src/*.c: built by node-gyp into build/Release/mmb_native.node, or
// prebuilt into prebuilds/<platform>-<arch>/ for the package).
//
// The boundary is deliberately thin (the serialport / sharp model): C performs one syscall per call on
// flat, already-validated arguments and reports failures as errors carrying `code` ('EINVAL'), `errno`
// (negative, as in Node's own fs errors) and `syscall` ('mmap'). Every policy decision (what to map,
// when to pin, what is a valid backing) is made in TypeScript.
//
// File descriptors are plain numbers. Every fd the addon creates or receives is O_CLOEXEC; sockets are
// O_NONBLOCK. Ownership is explicit: whoever receives an fd from a call must close() it.
import fs from 'node:fs';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

/** An error raised by a failed syscall in the addon. */
export interface NativeError extends Error {
  /** errno name, e.g. 'EINVAL'. */
  code: string;
  /** Negative errno value, Node style (-22 for EINVAL). */
  errno: number;
  /** The failing syscall, e.g. 'memfd_create'. */
  syscall: string;
}

/**
 * A failed or refused ioctl (KVM, VFIO, iommufd: every one goes through native/src/ioctl_gate.c): a
 * NativeError with `syscall: 'ioctl'` that also names the request ('VFIO_IOMMU_MAP_DMA'; '0x5413 (not
 * allowed)' for a number outside the whitelist). The message reads 'ioctl NAME failed: ... (CODE)'.
 */
export interface IoctlError extends NativeError {
  syscall: 'ioctl';
  request: string;
}

/**
 * A live mmap of (part of) a file. `buffer` is an external ArrayBuffer over the mapping; munmap()
 * detaches it, so views created from it read as empty afterwards instead of touching unmapped memory.
 * If a Mapping is garbage-collected while still mapped, its finalizer unmaps it.
 */
export interface Mapping {
  readonly buffer: ArrayBuffer;
  /** Host virtual address of the first byte, as shown in /proc/PID/maps. */
  readonly address: number;
  readonly length: number;
}

export interface FileStat {
  size: number;
  /** st_mode, including the file-type bits. */
  mode: number;
  dev: number;
  ino: number;
}

export interface Credentials {
  pid: number;
  uid: number;
  gid: number;
}

export interface Accepted extends Credentials {
  fd: number;
  /**
   * The peer's pidfd (SO_PEERPIDFD, Linux 6.5+), O_CLOEXEC, owned by the caller; -1 when the kernel
   * lacks SO_PEERPIDFD or the peer had already exited. It names the process that connected, for as long
   * as the fd is open: never a later process that reused its pid.
   */
  pidfd: number;
}

export interface Received {
  /** Bytes written into the caller's buffer; 0 means the peer closed the stream (EOF). */
  bytes: number;
  /** Descriptors that arrived with these bytes (SCM_RIGHTS), in order, each O_CLOEXEC. */
  fds: number[];
  /** MSG_CTRUNC was set: the kernel dropped descriptors. Those that did arrive were closed. */
  ctrunc: boolean;
}

/** An opaque uv_poll handle. */
export interface PollHandle {
  readonly fd: number;
}

export interface NativeConstants {
  MFD_CLOEXEC: number;
  MFD_ALLOW_SEALING: number;
  MFD_HUGETLB: number;
  F_SEAL_SEAL: number;
  F_SEAL_SHRINK: number;
  F_SEAL_GROW: number;
  F_SEAL_WRITE: number;
  F_SEAL_FUTURE_WRITE: number;
  PROT_NONE: number;
  PROT_READ: number;
  PROT_WRITE: number;
  MAP_SHARED: number;
  MAP_PRIVATE: number;
  MAP_NORESERVE: number;
  MAP_POPULATE: number;
  EFD_CLOEXEC: number;
  EFD_NONBLOCK: number;
  EFD_SEMAPHORE: number;
  /** uv_poll event bits. */
  POLL_READABLE: number;
  POLL_WRITABLE: number;
  POLL_DISCONNECT: number;
  SHUT_RD: number;
  SHUT_WR: number;
  SHUT_RDWR: number;
  /** sysconf(_SC_PAGESIZE). */
  pageSize: number;
  /** The kernel's cap on descriptors in one SCM_RIGHTS message (SCM_MAX_FD). */
  SCM_MAX_FD: number;
}

export interface Native {
  constants: NativeConstants;

  // --- memory objects ---------------------------------------------------------------------------
  /** memfd_create(2). Returns the new fd. */
  memfdCreate(name: string, flags: number): number;
  ftruncate(fd: number, size: number): void;
  fstat(fd: number): FileStat;
  /** fcntl(F_ADD_SEALS). */
  addSeals(fd: number, seals: number): void;
  /** fcntl(F_GET_SEALS). Fails with EINVAL on files that do not support sealing. */
  getSeals(fd: number): number;
  /**
   * lseek(SEEK_DATA), or SEEK_HOLE when `hole`: the next offset >= `offset` where data (or a hole) starts;
   * -1 when no data follows. For reading sparse memory without faulting its holes in.
   */
  seekData(fd: number, offset: number, hole: boolean): number;
  /** fcntl(F_DUPFD_CLOEXEC). */
  dup(fd: number): number;
  close(fd: number): void;

  // --- mappings ---------------------------------------------------------------------------------
  /**
   * mmap(2) of `length` bytes of `fd` at `offset` (page aligned). `length` is capped by the runtime's
   * largest ArrayBuffer (`buffer.constants.MAX_LENGTH`: 4 GiB on Node 20); a longer mapping throws
   * Node's ERR_BUFFER_TOO_LARGE and leaves nothing mapped, so map large backings in pieces.
   */
  mmap(fd: number, offset: number, length: number, prot: number, flags: number): Mapping;
  /**
   * `length` bytes of `fd` mapped at one contiguous range of host addresses, as consecutive Mappings of
   * at most `chunk` bytes (a page multiple): for memory a KVM memslot or a DMA mapping must see as one
   * range while no ArrayBuffer may exceed 4 GiB. Unmapping every chunk releases the whole range. The range
   * starts at a multiple of `align` (a power of two, default the page size; `chunk` a multiple of it),
   * raised to the huge page size for a hugetlbfs file, whose `offset`, `length` and `chunk` must then be
   * multiples of its huge page size (EINVAL otherwise).
   */
  mmapChunked(fd: number, offset: number, length: number, prot: number, flags: number, chunk: number, align?: number): Mapping[];
  /** fstatfs(2) of an open file: its filesystem's magic number (f_type) and block size (f_bsize). */
  fstatfs(fd: number): { type: number; bsize: number };
  /**
   * munmap(2) and detach the buffer. EBUSY while an mlock/munlock on it is still running (or if its
   * buffer was detached by someone else, e.g. transferred: the memory may still be in use there).
   */
  munmap(mapping: Mapping): void;
  /**
   * mlock(2) of [offset, offset+length) of the mapping, run on a libuv worker thread. Every failure
   * rejects the promise: ERANGE if the range is not inside the mapping, EINVAL if it was unmapped.
   */
  mlock(mapping: Mapping, offset: number, length: number): Promise<void>;
  /** munlock(2), run on a libuv worker thread; fails like mlock(). */
  munlock(mapping: Mapping, offset: number, length: number): Promise<void>;

  // --- dirty bitmaps (bit i = page i, little-endian 64-bit words), atomic in shared memory ----------
  /** Atomically sets bits [firstBit, firstBit + count) of a bitmap mapping. */
  bitmapSet(mapping: Mapping, firstBit: number, count: number): void;
  /** Atomically ORs `src` (whole 64-bit words) into the bitmap at `byteOffset` (8-aligned). */
  bitmapOr(mapping: Mapping, byteOffset: number, src: Uint8Array): void;
  /**
   * Clears [byteOffset, byteOffset + length) of the bitmap and ORs what was set into `dst`, losing no
   * bit set concurrently by another process (plain load, atomic swap of non-zero words). Returns the
   * number of bits that were set.
   */
  bitmapFetchClear(mapping: Mapping, byteOffset: number, length: number, dst: Uint8Array): number;
  /**
   * ORs [byteOffset, byteOffset + length) into `dst` and zeroes it with plain loads and stores, skipping
   * zero cache lines; returns the bits that were set. Only for memory no other writer touches any more
   * (the retired half of a double-buffered bitmap).
   */
  bitmapTake(mapping: Mapping, byteOffset: number, length: number, dst: Uint8Array): number;

  // --- eventfd ----------------------------------------------------------------------------------
  eventfd(initval: number, flags: number): number;
  /** read(2) of the 8-byte counter; null when it would block (EAGAIN: create the fd with EFD_NONBLOCK). */
  eventfdRead(fd: number): number | null;
  eventfdWrite(fd: number, value: number): void;

  // --- Unix stream sockets ----------------------------------------------------------------------
  /**
   * socket+bind+listen on `path`; the socket file is created with permission bits `mode` (or tighter,
   * where the umask removed bits, which are then added back by path before listen()).
   */
  socketListen(path: string, backlog: number, mode: number): number;
  /**
   * The same for the socket `name` (one component) inside the directory open as `dirFd` (O_PATH will
   * do): bound through /proc/self/fd/DIRFD/NAME, mode fixed with fchmodat(dirFd), removed with
   * unlinkat(dirFd) on failure; no other path is resolved. ENAMETOOLONG when the /proc path exceeds
   * sun_path (about 80 bytes of name), EINVAL for a name with "/" or a dot entry.
   */
  socketListenAt(dirFd: number, name: string, backlog: number, mode: number): number;
  /** Non-blocking connect; throws ECONNREFUSED / ENOENT / EAGAIN (listener backlog full). */
  socketConnect(path: string): number;
  /**
   * accept4 with the peer's SO_PEERCRED and SO_PEERPIDFD; null when no connection is pending. Throws
   * (and closes the connection) when even the pidfd cannot be allocated (EMFILE).
   */
  socketAccept(fd: number): Accepted | null;
  /** socketpair(AF_UNIX, SOCK_STREAM); both ends non-blocking and close-on-exec. */
  socketPair(): [number, number];
  /** getsockopt(SO_PEERCRED). */
  peerCred(fd: number): Credentials;
  /**
   * getsockopt(SO_PEERPIDFD) on any connected Unix socket: a pidfd (O_CLOEXEC, owned by the caller) for
   * the process that connected it or made the socketpair; -1 when the kernel lacks SO_PEERPIDFD
   * (ENOPROTOOPT) or that process has exited and been reaped.
   */
  peerPidfd(fd: number): number;
  /**
   * pidfd_send_signal(2): signals exactly the process the pidfd names (signal 0 only checks). Throws
   * ESRCH once it has exited, EPERM when this process may not signal it.
   */
  pidfdSendSignal(pidfd: number, signal: number): void;
  /**
   * pidfd_open(2) -> pidfd (O_CLOEXEC). Only for this process's own children, before they are reaped
   * (before child_process's 'exit' event): any other pid may have been reused by the time it is opened.
   * A peer's pidfd comes from socketAccept / peerPidfd instead.
   */
  pidfdOpen(pid: number): number;
  /**
   * sendmsg(2) with MSG_NOSIGNAL; `fds` (possibly empty) travel as one SCM_RIGHTS control message with
   * the first byte. Returns bytes sent, or null when the socket buffer is full (nothing was sent).
   * The caller keeps ownership of `fds`. More than SCM_MAX_FD fds throw E2BIG, and fds with empty
   * `data` throw EINVAL (a stream socket would silently drop them); nothing is sent in either case.
   */
  sendmsg(fd: number, data: Uint8Array, fds: readonly number[]): number | null;
  /**
   * recvmsg(2) with MSG_CMSG_CLOEXEC into `buf` (non-empty), accepting up to `maxFds` descriptors
   * (0..SCM_MAX_FD). Returns null when it would block. On any failure every descriptor received by
   * this call is closed first.
   */
  recvmsg(fd: number, buf: Uint8Array, maxFds: number): Received | null;
  shutdown(fd: number, how: number): void;

  // --- event loop integration -------------------------------------------------------------------
  /**
   * Watch `fd` with uv_poll. `callback(status, events)` runs on the main thread with `this` = the
   * handle; status is 0 or a negative errno; a throw becomes an uncaught exception. The handle keeps
   * the event loop alive unless pollRef(handle, false), and stays open (it is not garbage-collected)
   * until pollClose(). One handle per fd: a second pollStart on a watched fd throws EEXIST.
   */
  pollStart(fd: number, events: number, callback: (status: number, events: number) => void): PollHandle;
  /** Change the watched events (0 pauses the watch without closing it). */
  pollUpdate(handle: PollHandle, events: number): void;
  pollRef(handle: PollHandle, ref: boolean): void;
  /** Stop watching and release the handle (uv_close). Idempotent. Does not close the fd. */
  pollClose(handle: PollHandle): void;

  // --- service manager ----------------------------------------------------------------------------
  /**
   * sd_notify(3)'s datagram: sends `message` ("READY=1", ...; at most 4095 bytes) to the AF_UNIX datagram
   * socket `socketPath` (a path, or an abstract address written "@name", as in $NOTIFY_SOCKET), without
   * blocking. Throws errno-style (ENOENT, ECONNREFUSED: nobody listens; EAGAIN: its buffer is full).
   */
  notifySend(socketPath: string, message: string): void;
}

const here = path.dirname(fileURLToPath(import.meta.url));
// The package root, where build/ and prebuilds/ are: above native/ (the sources, as the tests run them) or
// above dist/native/ (the compiled tree, as the package runs).
const root = [path.resolve(here, '..'), path.resolve(here, '../..')].find((dir) => fs.existsSync(path.join(dir, 'binding.gyp'))) ?? path.resolve(here, '../..');

/**
 * Loads the addon the way node-gyp-build finds it: a local build first (build/Release, what `npm ci` in a
 * checkout and `npm rebuild` compile), else the prebuilt binary for this platform, architecture and libc
 * shipped in prebuilds/ (linux-x64 and linux-arm64, glibc). A failure names the platform and says how to
 * get an addon, instead of surfacing the loader's internals.
 */
function load(): Native {
  const require = createRequire(import.meta.url);
  const nodeGypBuild = require('node-gyp-build') as { (dir: string): unknown; resolve(dir: string): string };
  const platform = `${process.platform}-${process.arch}`;
  const rebuild = 'compile it with `npm rebuild memmap-broker` (in a checkout of memmap-broker: `npm ci`), which needs python3, make and a C compiler';
  let file: string;
  try {
    file = nodeGypBuild.resolve(root);
  } catch (err) {
    let shipped: string[] = [];
    try {
      shipped = fs.readdirSync(path.join(root, 'prebuilds'));
    } catch {
      // none shipped (a checkout before `npm run prebuilds`)
    }
    const prebuilt =
      shipped.length > 0 ? `the package's prebuilt ones are for ${shipped.sort().join(' and ')} (glibc 2.33 or later)` : 'the package has no prebuilt one';
    throw new Error(
      `memmap-broker: no native addon for ${platform}: ${prebuilt} and none was compiled here (no ${path.join(root, 'build/Release')}); ${rebuild}`,
      {
        cause: err,
      },
    );
  }
  try {
    return require(file) as Native;
  } catch (err) {
    throw new Error(`memmap-broker: the native addon ${file} does not load on this system (${(err as Error).message.split('\n')[0]}); ${rebuild}`, {
      cause: err,
    });
  }
}

export const native: Native = load();
export const constants: NativeConstants = native.constants;
export const PAGE_SIZE: number = native.constants.pageSize;

/**
 * The pid a pidfd names, from /proc/self/fdinfo ("Pid:"): 0 when the process lives in a pid namespace
 * this one cannot see, -1 once it has exited (Linux 5.x+). For logs and checks; signal through the pidfd.
 */
export function pidOfPidfd(pidfd: number): number {
  const m = /^Pid:\s*(-?\d+)$/m.exec(fs.readFileSync(`/proc/self/fdinfo/${pidfd}`, 'utf8'));
  if (!m) throw new Error(`fd ${pidfd} is not a pidfd`);
  return Number(m[1]);
}

/** linux/magic.h: the filesystems of shared memory files (memfds and /dev/shm live on tmpfs). */
export const HUGETLBFS_MAGIC = 0x958458f6;
export const TMPFS_MAGIC = 0x01021994;

/**
 * The page size a mapping of `fd` is made of: its huge page size (2 MiB, 1 GiB: hugetlbfs's f_bsize) for
 * a hugetlbfs file (an MFD_HUGETLB memfd included), else the system page size. Offsets, lengths and
 * addresses of its mappings must be multiples of it.
 */
export function filePageSize(fd: number): number {
  const st = native.fstatfs(fd);
  return st.type === HUGETLBFS_MAGIC ? st.bsize : PAGE_SIZE;
}

/** A page size for messages: "4 KiB", "2 MiB", "1 GiB". */
export function pageSizeName(bytes: number): string {
  for (const [unit, n] of [
    ['GiB', 2 ** 30],
    ['MiB', 2 ** 20],
    ['KiB', 2 ** 10],
  ] as const)
    if (bytes >= n && bytes % n === 0) return `${bytes / n} ${unit}`;
  return `${bytes} bytes`;
}

/** True if `err` is an ioctl error of the addon (see IoctlError), with the given errno name if one is given. */
export function isIoctlError(err: unknown, code?: string): err is IoctlError {
  return isNativeError(err, code) && err.syscall === 'ioctl' && typeof (err as IoctlError).request === 'string';
}

/** True if `err` is an error raised by the addon with the given errno name. */
export function isNativeError(err: unknown, code?: string): err is NativeError {
  return (
    err instanceof Error &&
    typeof (err as NativeError).syscall === 'string' &&
    typeof (err as NativeError).code === 'string' &&
    (code === undefined || (err as NativeError).code === code)
  );
}
