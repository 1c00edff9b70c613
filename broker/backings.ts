// Backings of one address space: shareable memory objects registered once by the owner, referenced by
// id from any number of regions, sent to each subscriber once. The broker holds one fd per backing and
// closes it only when no committed or in-flight region slices it and the owner no longer holds it.
//
// Read-only has to hold against the subscriber that holds the descriptor. An O_RDONLY descriptor cannot
// be mapped writable, written, truncated, sealed or punched; but anyone who can name the file
// (/proc/self/fd/N) can open it again with the access its inode's mode allows, and a memfd is born 0777.
// So at registration the broker sets the inode's mode to 0: reopening it, read-write or not, then needs
// the inode's owner (the uid that created the memfd) or CAP_DAC_OVERRIDE. The broker makes its own
// read-only reopen when a subscriber first needs it if it has CAP_DAC_OVERRIDE (root), else at
// registration, before the mode changes. A memfd the owner sealed with F_SEAL_FUTURE_WRITE (or F_SEAL_WRITE) nobody can write
// through any new mapping or write(), root included: the broker hands out only its read-only reopen.
import fs from 'node:fs';
import { constants, HUGETLBFS_MAGIC, native, PAGE_SIZE, TMPFS_MAGIC } from '../native/index.js';
import { BackingInvalidError, BackingUnsealedError, NoBackingError, SpaceLimitError, type BackingInfo, hex } from '../protocol/index.js';

export interface Backing {
  id: number;
  name: string;
  size: number;
  /** The broker's own descriptor. */
  fd: number;
  dev: number;
  ino: number;
  /** Committed regions slicing this backing. */
  refs: number;
  /** Regions of the in-flight transaction slicing it (they may still commit). */
  inflight: number;
  /** The owner still holds it (registered it and has not dropped it, and is still connected). */
  held: boolean;
  /** A read-only reopen of the same memfd (see fdFor): made at registration, or on first need by a
   *  broker with CAP_DAC_OVERRIDE (so a backing nobody sees read-only costs one descriptor). */
  roFd?: number;
  /**
   * The page size of its memory: the huge page size (2 MiB, 1 GiB) of a hugetlbfs file (an MFD_HUGETLB
   * memfd), else the system page size. Regions slicing it are aligned to it (broker/map.ts).
   */
  pageSize: number;
  /** Sealed against shrinking (F_SEAL_SHRINK); false only for a file the owner registered as unsealed. */
  sealed: boolean;
  /** Sealed against writing (F_SEAL_FUTURE_WRITE or F_SEAL_WRITE): served read-only to everyone. */
  writeSealed: boolean;
}

/** Whether this process may open any file whatever its mode (CAP_DAC_OVERRIDE, bit 1 of CapEff). */
const dacOverride: boolean = (() => {
  const m = /^CapEff:\s*([0-9a-f]+)$/m.exec(fs.readFileSync('/proc/self/status', 'utf8'));
  return m !== null && (BigInt(`0x${m[1]}`) & 2n) !== 0n;
})();

const reopenReadOnly = (fd: number): number => fs.openSync(`/proc/self/fd/${fd}`, 'r');

const S_IFMT = 0o170000;
const S_IFREG = 0o100000;
const O_ACCMODE = 3;
const O_RDWR = 2;

type ErrorClass = new (message: string, options?: { cause?: unknown }) => Error;

export interface MemoryFdInfo {
  size: number;
  dev: number;
  ino: number;
  mode: number;
  /** F_GET_SEALS (0 for a file that cannot be sealed). */
  seals: number;
  /** Huge page size on hugetlbfs, else the system page size (fstatfs: f_type and f_bsize). */
  pageSize: number;
  /** F_SEAL_SHRINK is set. */
  sealed: boolean;
}

export interface InspectOptions {
  /**
   * Accept a file that is not sealed against shrinking, if it lives on tmpfs (/dev/shm) or hugetlbfs:
   * the memory of QEMU's memory-backend-file, which cannot be sealed (only memfds can). Whoever can write
   * the file could truncate it under everyone's mappings (SIGBUS), so only an owner that says so gets it.
   */
  allowUnsealed?: boolean;
}

/**
 * Checks that `fd` is memory the broker and its clients may map without fear: a regular shmem/hugetlbfs
 * file (memfd) opened read-write and sealed against shrinking, so nobody can truncate it under a mapping
 * (SIGBUS); with `allowUnsealed`, also an unsealed file on tmpfs or hugetlbfs. `invalid` and `unsealed`
 * are the errors to throw. Returns its stat, page size and whether it is sealed.
 */
export function inspectMemoryFd(fd: number, invalid: ErrorClass, unsealed: ErrorClass, opts: InspectOptions = {}): MemoryFdInfo {
  let st;
  let fsType: number;
  let fsBlock: number;
  try {
    st = native.fstat(fd);
    ({ type: fsType, bsize: fsBlock } = native.fstatfs(fd));
  } catch (err) {
    throw new invalid(`descriptor cannot be inspected: ${(err as Error).message}`, { cause: err });
  }
  if ((st.mode & S_IFMT) !== S_IFREG) throw new invalid('descriptor is not a regular memory file (memfd or hugetlbfs)');
  const sharedMemory = fsType === TMPFS_MAGIC || fsType === HUGETLBFS_MAGIC;
  let seals: number | undefined;
  try {
    seals = native.getSeals(fd);
  } catch (err) {
    if (!opts.allowUnsealed) throw new invalid('descriptor does not support sealing: it is not a memfd or hugetlbfs file', { cause: err });
  }
  const sealed = seals !== undefined && (seals & constants.F_SEAL_SHRINK) !== 0;
  if (!sealed) {
    if (!opts.allowUnsealed) throw new unsealed('memfd is not sealed against shrinking: add F_SEAL_SHRINK before passing it');
    if (!sharedMemory) {
      throw new invalid(`an unsealed backing must be a file on tmpfs (/dev/shm) or hugetlbfs; this one is on a filesystem of type ${hex(fsType)}`);
    }
  }
  // The kernel's view of the open mode: writable regions (and dirty-sync buffers) are mapped shared and writable.
  const flags = /^flags:\s*([0-7]+)$/m.exec(fs.readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8'));
  if (!flags || (parseInt(flags[1] as string, 8) & O_ACCMODE) !== O_RDWR) {
    throw new invalid('memfd must be open read-write');
  }
  return { size: st.size, dev: st.dev, ino: st.ino, mode: st.mode, seals: seals ?? 0, pageSize: fsType === HUGETLBFS_MAGIC ? fsBlock : PAGE_SIZE, sealed };
}

/**
 * Makes the memfd's inode inaccessible to every uid but its owner's (mode 0; see the top of this file).
 * A broker that may not change it (not root, not the uid that created it) accepts it only if the owner
 * did so already (no permission bits for group or others).
 */
function closeInode(fd: number, mode: number): void {
  try {
    fs.fchmodSync(fd, 0);
  } catch (err) {
    if ((mode & 0o077) === 0) return;
    throw new BackingInvalidError(
      `the memfd's mode (${(mode & 0o777).toString(8)}) lets other users reopen it through /proc read-write, and the broker may not change it (${(err as Error).message}): fchmod it to 0 (or 0600) before BACKING_ADD`,
      { cause: err },
    );
  }
}

/**
 * A backing must be memory anyone may map (see inspectMemoryFd); `allowUnsealed` (an owner that asked
 * for it explicitly) also admits an unsealed file on tmpfs or hugetlbfs.
 */
export const inspectBackingFd = (fd: number, allowUnsealed = false) => inspectMemoryFd(fd, BackingInvalidError, BackingUnsealedError, { allowUnsealed });

export class BackingTable {
  private readonly byId = new Map<number, Backing>();
  private nextId = 1;

  constructor(private readonly maxBackings: number) {}

  get size(): number {
    return this.byId.size;
  }

  all(): IterableIterator<Backing> {
    return this.byId.values();
  }

  get(id: number): Backing | undefined {
    return this.byId.get(id);
  }

  require(id: number): Backing {
    const b = this.byId.get(id);
    if (!b) throw new NoBackingError(`no backing with id ${id}`);
    return b;
  }

  backingSize(id: number): number | undefined {
    return this.byId.get(id)?.size;
  }

  backingPageSize(id: number): number | undefined {
    return this.byId.get(id)?.pageSize;
  }

  /**
   * Registers a descriptor after inspecting it, takes its read-only reopen and closes its inode to other
   * uids (see the top of this file). Takes ownership of `fd` only on success; a refusal leaves the memfd
   * as it was. `allowUnsealed`: the owner asked for an unsealed file on tmpfs or hugetlbfs (see
   * inspectMemoryFd); such a named file keeps its mode (others may open it by its path: it is the owner's
   * to protect, docs/security.md), and read-only regions of it hold only as far as that mode does.
   */
  add(fd: number, name: string | undefined, allowUnsealed = false): Backing {
    if (this.byId.size >= this.maxBackings) throw new SpaceLimitError(`the address space already has ${this.maxBackings} backings`);
    const st = inspectBackingFd(fd, allowUnsealed);
    const roFd = dacOverride ? undefined : reopenReadOnly(fd);
    try {
      if (st.sealed) closeInode(fd, st.mode);
    } catch (err) {
      if (roFd !== undefined) native.close(roFd);
      throw err;
    }
    const id = this.nextId++;
    const writeSealed = (st.seals & (constants.F_SEAL_WRITE | constants.F_SEAL_FUTURE_WRITE)) !== 0;
    const b: Backing = {
      id,
      name: name ?? `backing${id}`,
      size: st.size,
      fd,
      dev: st.dev,
      ino: st.ino,
      refs: 0,
      inflight: 0,
      held: true,
      pageSize: st.pageSize,
      sealed: st.sealed,
      writeSealed,
      ...(roFd !== undefined ? { roFd } : {}),
    };
    this.byId.set(id, b);
    return b;
  }

  /** True when nothing can use the backing any more. */
  isUnused(b: Backing): boolean {
    return !b.held && b.refs === 0 && b.inflight === 0;
  }

  /**
   * The descriptor to give a subscriber: the read-write one when it maps a writable region of the
   * backing (and the owner did not seal it against writes), else the read-only reopen, which cannot be
   * mapped writable (mmap PROT_WRITE|MAP_SHARED fails with EACCES) nor, its inode being mode 0, reopened
   * read-write by another uid without CAP_DAC_OVERRIDE.
   */
  fdFor(b: Backing, writable: boolean): number {
    if (writable && !b.writeSealed) return b.fd;
    b.roFd ??= reopenReadOnly(b.fd);
    return b.roFd;
  }

  /** Forgets and closes a backing; returns it. */
  release(b: Backing): Backing {
    this.byId.delete(b.id);
    native.close(b.fd);
    if (b.roFd !== undefined) native.close(b.roFd);
    return b;
  }

  info(b: Backing): BackingInfo {
    return { backing: b.id, size: b.size, name: b.name };
  }

  /** Closes every fd (broker shutdown). */
  closeAll(): void {
    for (const b of this.byId.values()) {
      native.close(b.fd);
      if (b.roFd !== undefined) native.close(b.roFd);
    }
    this.byId.clear();
  }
}
