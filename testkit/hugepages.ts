// Hugetlb pages for tests and the hotplug harness (--hugetlb), reserved as root through the kernel's
// pools: /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages (the same as /proc/sys/vm/nr_hugepages) and hugepages-1048576kB for 1 GiB
// pages. A reservation raises a pool by what the test needs and gives back exactly what it added: other
// processes (test files running in parallel, other users) may use the pools at the same time, so counts
// are relative, never absolute, and each read-modify-write of a pool runs under flock(1) on one lock file,
// so two test files never compute their share from the same old count. A 1 GiB page needs 1 GiB of
// contiguous free memory, which a fragmented machine may not have: the kernel is asked to compact memory
// once and the shortfall is reported, never hidden.
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { filePageSize, native, constants } from '../native/index.js';

export const MiB = 2 ** 20;
export const GiB = 2 ** 30;

export interface HugeReservation {
  /** Page size in bytes. */
  readonly size: number;
  /** Pages this reservation added to the pool. */
  readonly added: number;
  /** Why fewer pages than asked could be added, or undefined when all were. */
  readonly missing: string | undefined;
  /** Gives the added pages back (idempotent). */
  release(): void;
}

const pool = (size: number) => `/sys/kernel/mm/hugepages/hugepages-${size / 1024}kB`;
const LOCK = '/run/lock/mmb-test-hugepages.lock';

/** Adds `delta` (may be negative) to the pool count in `nr` under the lock; the count before and after. */
function adjustPool(nr: string, delta: number): { before: number; after: number } {
  // A write the kernel refuses (not root) fails the command; one it only partly honours (too little free
  // contiguous memory) succeeds with a smaller count, read back after it.
  const script = 'b=$(cat "$1"); n=$((b + $2)); if [ "$n" -lt 0 ]; then n=0; fi; echo "$n" > "$1" || exit 3; echo "$b $(cat "$1")"';
  const out = execFileSync('flock', [LOCK, 'sh', '-c', script, 'sh', nr, String(delta)], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  const [before, after] = out.trim().split(' ').map(Number) as [number, number];
  return { before, after };
}

/** Adds up to `pages` pages of `size` bytes to the kernel's pool. */
export function reserveHugePages(size: number, pages: number): HugeReservation {
  const dir = pool(size);
  const nr = path.join(dir, 'nr_hugepages');
  let added = 0;
  let missing: string | undefined;
  const release = () => {
    if (added === 0) return;
    try {
      adjustPool(nr, -added);
    } finally {
      added = 0;
    }
  };
  if (!fs.existsSync(nr)) return { size, added, missing: `this kernel has no pool of ${size / MiB} MiB pages (${dir})`, release };
  try {
    for (let attempt = 0; attempt < 2 && added < pages; attempt++) {
      if (attempt > 0) fs.writeFileSync('/proc/sys/vm/compact_memory', '1');
      const { before, after } = adjustPool(nr, pages - added);
      added += Math.max(0, after - before);
    }
    if (added < pages)
      missing = `the kernel could add only ${added} of ${pages} pages of ${size / MiB} MiB to ${nr} (fragmented memory: even after compact_memory)`;
  } catch (err) {
    missing = `cannot reserve ${size / MiB} MiB pages in ${nr}: ${(err as Error).message} (root is needed)`;
  }
  return {
    size,
    get added() {
      return added;
    },
    missing,
    release,
  };
}

/** An MFD_HUGETLB memfd of `size`-byte pages (MFD_HUGE_2MB / MFD_HUGE_1GB), `bytes` long, sealed against shrinking. */
export function hugeMemfd(name: string, pageSize: number, bytes: number): number {
  // memfd_create's huge page size: log2(size) << MFD_HUGE_SHIFT (26).
  const log2 = Math.log2(pageSize);
  const fd = native.memfdCreate(name, constants.MFD_CLOEXEC | constants.MFD_ALLOW_SEALING | constants.MFD_HUGETLB | (log2 << 26));
  try {
    native.ftruncate(fd, bytes);
    native.addSeals(fd, constants.F_SEAL_SHRINK | constants.F_SEAL_GROW | constants.F_SEAL_SEAL);
    if (filePageSize(fd) !== pageSize) throw new Error(`memfd ${name} has ${filePageSize(fd)}-byte pages, not ${pageSize}`);
    return fd;
  } catch (err) {
    native.close(fd);
    throw err;
  }
}

/** The /proc/PID/smaps fields of the mapping holding `address` (sizes in kB), or undefined. */
export function smapsAt(address: number, pid: number | 'self' = 'self'): Record<string, number> | undefined {
  const lines = fs.readFileSync(`/proc/${pid}/smaps`, 'utf8').split('\n');
  for (let i = 0; i < lines.length; i++) {
    const m = /^([0-9a-f]+)-([0-9a-f]+) /.exec(lines[i] as string);
    if (!m || parseInt(m[1] as string, 16) > address || address >= parseInt(m[2] as string, 16)) continue;
    const out: Record<string, number> = { start: parseInt(m[1] as string, 16), end: parseInt(m[2] as string, 16) };
    for (let j = i + 1; j < lines.length && !/^[0-9a-f]+-/.test(lines[j] as string); j++) {
      const f = /^(\w+):\s+(\d+) kB$/.exec(lines[j] as string);
      if (f) out[f[1] as string] = Number(f[2]);
    }
    return out;
  }
  return undefined;
}
