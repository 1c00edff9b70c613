// File-backed guest memory (issue 17, point 4): QEMU's memory-backend-file puts guest RAM in a file on
// hugetlbfs or /dev/shm (tmpfs). Such a file cannot be sealed (only memfds can), so whoever can write it
// could truncate it under every mapping and SIGBUS the others: the broker accepts one only when the owner
// asks for it explicitly (BACKING_ADD.unsealed, feature TRUSTED_FILE; inspectBackingFd's allowUnsealed), only on
// tmpfs or hugetlbfs, and still read-write only. Its page size is known the same way as a memfd's.
//
// The hugetlbfs cases mount a private hugetlbfs (pagesize=2M) as root and reserve 2 MiB pages; without
// root they are skipped, except under CI=true, where that is a failure.
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { Broker } from '../broker/index.js';
import { BackingTable, inspectBackingFd } from '../broker/backings.js';
import { MemoryMap } from '../broker/map.js';
import { MappingSubscriber, OwnerClient, createSealedMemfd } from '../clients/index.js';
import { GuestMemory } from '../clients/memory.js';
import type { LocalBacking, ViewRegion } from '../clients/view.js';
import { constants, native, PAGE_SIZE } from '../native/index.js';
import { isMmbError } from '../protocol/index.js';
import { IN_CI } from './helpers/ci.js';
import { MiB, reserveHugePages, smapsAt } from './helpers/hugepages.js';
import { tempDir } from './helpers/procs.js';

const fds: number[] = [];
const dirs: string[] = [];
afterEach(() => {
  for (const fd of fds.splice(0)) native.close(fd);
});

/** Opens (creating) `file` with `flags` and sizes it; closed after the test. */
function openFile(file: string, bytes: number, flags = fs.constants.O_RDWR | fs.constants.O_CREAT): number {
  const fd = fs.openSync(file, flags, 0o600);
  fds.push(fd);
  if (flags & fs.constants.O_RDWR) fs.ftruncateSync(fd, bytes);
  return fd;
}

function errorOf(fn: () => unknown): { code: string; message: string } | undefined {
  try {
    fn();
  } catch (err) {
    if (isMmbError(err)) return err;
    throw err;
  }
  return undefined;
}

// A private hugetlbfs mount with 2 MiB pages, and the pages for it.
let hugetlbfs: string | undefined;
let hugetlbfsMissing: string | undefined;
const pages = reserveHugePages(2 * MiB, 4);
try {
  const dir = tempDir('mmb-hugetlbfs-');
  dirs.push(dir);
  execFileSync('mount', ['-t', 'hugetlbfs', '-o', 'pagesize=2M,mode=0700', 'none', dir], { stdio: 'pipe' });
  hugetlbfs = dir;
} catch (err) {
  hugetlbfsMissing = `cannot mount hugetlbfs: ${(err as Error).message.split('\n')[0]} (root is needed)`;
}
const missing = pages.missing ?? hugetlbfsMissing;
if (missing && !IN_CI) console.warn(`hugetlbfs file tests skipped: ${missing} (CI=true makes this a failure)`);
afterAll(() => {
  if (hugetlbfs) execFileSync('umount', [hugetlbfs]);
  for (const d of dirs) fs.rmSync(d, { recursive: true, force: true });
  pages.release();
});
const withHugetlbfs = describe.skipIf(!!missing && !IN_CI);

describe('a file on /dev/shm (tmpfs)', () => {
  const shm = () => path.join('/dev/shm', `mmb-test-${process.pid}-${Math.random().toString(36).slice(2)}`);

  it('cannot be sealed; refused by default, accepted with allowUnsealed (4 KiB pages, not sealed)', () => {
    const file = shm();
    const fd = openFile(file, 4 * MiB);
    fs.unlinkSync(file);
    // Why it is dangerous: the kernel lets nobody seal it, so nothing stops a truncate.
    expect(() => native.addSeals(fd, constants.F_SEAL_SHRINK)).toThrow(/EPERM/);
    expect(errorOf(() => inspectBackingFd(fd))?.code).toBe('MMB_ERR_BACKING_UNSEALED');
    expect(inspectBackingFd(fd, true)).toMatchObject({ size: 4 * MiB, pageSize: PAGE_SIZE, sealed: false });
  });

  it('over the wire: BACKING_ADD refuses it, BACKING_ADD.unsealed (TRUSTED_FILE) accepts it, and a subscriber maps it', async () => {
    const file = shm();
    const fd = openFile(file, 4 * MiB);
    fs.unlinkSync(file);
    const broker = new Broker({ spaces: ['vm0'] });
    const owner = await OwnerClient.attach(broker, { space: 'vm0' });
    const sub = await MappingSubscriber.attach(broker, { space: 'vm0' });
    try {
      const refused = await owner.addBacking(fd, 'shm').then(
        () => undefined,
        (e: unknown) => e,
      );
      expect(isMmbError(refused) && refused.code).toBe('MMB_ERR_BACKING_UNSEALED');
      const b = await owner.addBacking(fd, 'shm', { unsealed: true });
      expect(b).toMatchObject({ size: 4 * MiB, pageSize: PAGE_SIZE, sealed: false });
      expect(broker.status('vm0').spaces[0]?.backings[0]).toMatchObject({ name: 'shm', sealed: false, pageSize: PAGE_SIZE });
      await owner.addRegion({ name: 'file-ram', gpa: 0, size: 4 * MiB, backing: b.backing });
      fs.writeSync(fd, Buffer.from('written through the file'), 0, undefined, 0x1000);
      expect(Buffer.from(sub.memory.read(0x1000, 24)).toString()).toBe('written through the file');
    } finally {
      await sub.close();
      owner.close();
      await broker.close();
    }
  });

  it('even with allowUnsealed: read-write only', () => {
    const file = shm();
    openFile(file, 4 * MiB);
    const ro = openFile(file, 0, fs.constants.O_RDONLY);
    fs.unlinkSync(file);
    expect(errorOf(() => inspectBackingFd(ro, true))).toMatchObject({ code: 'MMB_ERR_BACKING_INVALID', message: expect.stringMatching(/read-write/) });
  });

  it('a sealed memfd is what it was: accepted either way, and says it is sealed', () => {
    const fd = createSealedMemfd('sealed', 2 * MiB);
    fds.push(fd);
    expect(inspectBackingFd(fd)).toMatchObject({ sealed: true, pageSize: PAGE_SIZE });
    expect(inspectBackingFd(fd, true)).toMatchObject({ sealed: true, pageSize: PAGE_SIZE });
  });
});

describe('a file anywhere else', () => {
  it('is refused even with allowUnsealed, naming its filesystem', () => {
    const dir = tempDir();
    dirs.push(dir);
    const fd = openFile(path.join(dir, 'ram'), 4 * MiB);
    const type = native.fstatfs(fd).type.toString(16);
    expect(errorOf(() => inspectBackingFd(fd))?.code).toBe('MMB_ERR_BACKING_INVALID');
    expect(errorOf(() => inspectBackingFd(fd, true))).toMatchObject({
      code: 'MMB_ERR_BACKING_INVALID',
      message: expect.stringContaining(`tmpfs (/dev/shm) or hugetlbfs; this one is on a filesystem of type 0x${type}`),
    });
  });
});

withHugetlbfs('a file on hugetlbfs (QEMU memory-backend-file,mem-path=/dev/hugepages)', () => {
  it('cannot be sealed; with allowUnsealed its 2 MiB page size is known, regions are planned against it, and a client maps it on a 2 MiB boundary', () => {
    const fd = openFile(path.join(hugetlbfs!, 'guest-ram'), 8 * MiB);
    expect(() => native.addSeals(fd, constants.F_SEAL_SHRINK)).toThrow(/EPERM/);
    expect(errorOf(() => inspectBackingFd(fd))?.code).toBe('MMB_ERR_BACKING_UNSEALED');

    const table = new BackingTable(8);
    const dup = native.dup(fd);
    const b = table.add(dup, 'mem-path', true);
    try {
      expect(b).toMatchObject({ size: 8 * MiB, pageSize: 2 * MiB, sealed: false });
      const map = new MemoryMap();
      const cut = errorOf(() => map.plan([{ op: 'add', name: 'ram', gpa: 0, size: 2 * MiB, backing: b.id, offset: 4096 }], table, 16));
      expect(cut).toMatchObject({ code: 'MMB_ERR_UNALIGNED', message: expect.stringMatching(/2 MiB pages/) });
      const plan = map.plan([{ op: 'add', name: 'ram', gpa: 0x4000_0000, size: 4 * MiB, backing: b.id, offset: 2 * MiB }], table, 16);

      // A subscriber maps it like a memfd: on a huge page boundary, huge pages in the page tables.
      const st = native.fstat(fd);
      const local: LocalBacking = { id: b.id, name: b.name, size: b.size, fd, dev: st.dev, ino: st.ino };
      const r = plan.adds[0]!;
      const view: ViewRegion = { ...r, file: `${st.dev}:${st.ino}`, key: 'ram' };
      const mem = new GuestMemory();
      mem.apply({ generation: 1, cause: 'txn', removed: [], updated: [], added: [view] }, new Map([[b.id, local]]));
      try {
        const m = mem.regions()[0]!;
        expect(m.address % (2 * MiB)).toBe(0);
        mem.write(0x4000_0000 + 3 * MiB, Buffer.from('file'));
        expect(smapsAt(m.address)).toMatchObject({ KernelPageSize: 2048 });
        expect(
          fs
            .readFileSync(`/proc/self/fd/${fd}`)
            .subarray(5 * MiB, 5 * MiB + 4)
            .toString(),
        ).toBe('file');
      } finally {
        mem.close();
      }
    } finally {
      table.closeAll();
    }
  });
});
