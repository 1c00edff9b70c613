// Hugetlb memory (issue 17, point 2): a backing's page size is known at registration (fstatfs of the fd:
// hugetlbfs reports its huge page size), regions are aligned to it or refused at planning before anything
// is sent, every mapping starts on a huge page boundary, KVM slots keep gpa and host address congruent
// modulo the page size, and the soft vfio-like backend pins hugetlb memory. With real 2 MiB and 1 GiB
// pages, reserved here as root and given back afterwards.
//
// The two failures of the issue, which 18ae722 shows: a region at offset 4 KiB of a 2 MiB-page memfd was
// accepted by the broker and then refused by the subscribers (EINVAL from mmap), and a fully aligned 1 GiB
// region of a 1 GiB-page memfd failed in every subscriber (EINVAL from the reserve-then-MAP_FIXED path).
//
// A 1 GiB page needs 1 GiB of contiguous free memory: where the kernel cannot find one (fragmentation) the
// 1 GiB tests are skipped with the reason, except under CI=true, where that is a failure.
import fs from 'node:fs';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { MappingSubscriber, VfioSubscriber, type OwnerClient } from '../clients/index.js';
import { KvmSubscriber } from '../clients/kvm/index.js';
import { GuestMemory } from '../clients/memory.js';
import type { LocalBacking, ViewRegion } from '../clients/view.js';
import { constants, filePageSize, native, PAGE_SIZE } from '../native/index.js';
import { asGpa, asOffset, isMmbError } from '../protocol/index.js';
import { IN_CI } from './helpers/ci.js';
import { defer, embeddedBroker, ownerOf, runCleanups } from './helpers/embedded.js';
import { GiB, MiB, hugeMemfd, reserveHugePages, smapsAt } from './helpers/hugepages.js';
import { vmLckKiB } from './helpers/procs.js';

const HAVE_KVM = fs.existsSync('/dev/kvm');

// Reserved first, before anything else fragments memory further.
const gib = reserveHugePages(GiB, 1);
const mib2 = reserveHugePages(2 * MiB, 16);
afterAll(() => {
  gib.release();
  mib2.release();
});
afterEach(runCleanups);
for (const r of [mib2, gib]) if (r.missing && !IN_CI) console.warn(`hugetlb tests skipped: ${r.missing} (CI=true makes this a failure)`);

if (IN_CI) {
  describe('environment', () => {
    it('CI machines can reserve 2 MiB and 1 GiB pages', () => {
      expect(mib2.missing).toBeUndefined();
      expect(gib.missing).toBeUndefined();
      expect(HAVE_KVM, '/dev/kvm').toBe(true);
    });
  });
}

const with2M = describe.skipIf(!!mib2.missing && !IN_CI);
const with1G = describe.skipIf(!!gib.missing && !IN_CI);
const itKvm = it.skipIf(!HAVE_KVM && !IN_CI);

/** Registers a hugetlb memfd as a backing; the test's copy of the fd is closed afterwards. */
async function hugeBacking(owner: OwnerClient, pageSize: number, bytes: number, name: string): Promise<number> {
  const fd = hugeMemfd(name, pageSize, bytes);
  defer(() => native.close(fd));
  return (await owner.addBacking(fd, name)).backing;
}

const errorOf = (p: Promise<unknown>) =>
  p.then(
    () => undefined,
    (e: unknown) => {
      if (isMmbError(e)) return e;
      throw e;
    },
  );

describe('what the kernel reports for a memfd', () => {
  it.skipIf(!!mib2.missing && !IN_CI)('fstatfs: hugetlbfs with the huge page size as f_bsize; fstat st_blksize says the same; shmem: 4 KiB', () => {
    const shm = native.memfdCreate('shm', constants.MFD_CLOEXEC);
    const huge = hugeMemfd('huge2m', 2 * MiB, 2 * MiB);
    try {
      expect(native.fstatfs(huge)).toEqual({ type: 0x958458f6, bsize: 2 * MiB });
      expect(fs.fstatSync(huge).blksize).toBe(2 * MiB);
      expect(filePageSize(huge)).toBe(2 * MiB);
      expect(native.fstatfs(shm).type).toBe(0x01021994);
      expect(filePageSize(shm)).toBe(PAGE_SIZE);
      // And the kernel refuses a size that is not whole huge pages.
      expect(() => native.ftruncate(huge, 2 * MiB + 4096)).toThrow(/EINVAL/);
    } finally {
      native.close(shm);
      native.close(huge);
    }
  });
});

describe('mmapChunked starts the range on a huge page boundary', () => {
  it('on request (align) for ordinary memory', () => {
    const fd = native.memfdCreate('thp', constants.MFD_CLOEXEC);
    defer(() => native.close(fd));
    native.ftruncate(fd, 8 * MiB);
    for (let i = 0; i < 8; i++) {
      const chunks = native.mmapChunked(fd, 0, 6 * MiB, constants.PROT_READ, constants.MAP_SHARED, 2 * MiB, 2 * MiB);
      expect(chunks.map((c) => c.address - chunks[0]!.address)).toEqual([0, 2 * MiB, 4 * MiB]);
      expect(chunks[0]!.address % (2 * MiB)).toBe(0);
      for (const c of chunks) native.munmap(c);
    }
    for (const bad of [3 * MiB, 1000, 0]) {
      expect(() => native.mmapChunked(fd, 0, 2 * MiB, constants.PROT_READ, constants.MAP_SHARED, 2 * MiB, bad)).toThrow(/EINVAL/);
    }
  });

  it.skipIf(!!mib2.missing && !IN_CI)(
    'always for hugetlbfs, whose offset, length and chunk must be whole huge pages (the kernel would round a MAP_FIXED length past the reservation)',
    () => {
      const fd = hugeMemfd('chunks', 2 * MiB, 4 * MiB);
      defer(() => native.close(fd));
      const chunks = native.mmapChunked(fd, 0, 4 * MiB, constants.PROT_READ | constants.PROT_WRITE, constants.MAP_SHARED, 2 * MiB);
      expect(chunks[0]!.address % (2 * MiB)).toBe(0);
      expect(chunks[1]!.address).toBe(chunks[0]!.address + 2 * MiB);
      for (const c of chunks) native.munmap(c);
      for (const [offset, length, chunk] of [
        [4096, 2 * MiB, 2 * MiB],
        [0, 3 * MiB, 2 * MiB],
        [0, 4 * MiB, MiB],
      ] as const) {
        expect(() => native.mmapChunked(fd, offset, length, constants.PROT_READ, constants.MAP_SHARED, chunk), `${offset} ${length} ${chunk}`).toThrow(
          /EINVAL/,
        );
      }
    },
  );
});

with2M('2 MiB pages', () => {
  it('a region that cuts a huge page is refused at planning, naming the page size, before any subscriber sees it', async () => {
    const broker = embeddedBroker();
    const owner = await ownerOf(broker);
    const sub = await MappingSubscriber.attach(broker, { space: 'vm0', name: 'plain' });
    defer(() => sub.close());
    const b = await hugeBacking(owner, 2 * MiB, 8 * MiB, 'ram2m');
    const generation = sub.generation;
    const changes: unknown[] = [];
    sub.on('change', (c) => changes.push(c));
    for (const bad of [
      { gpa: 0x4000_0000, size: 2 * MiB, offset: 4096 }, // the case
      { gpa: 0x4000_1000, size: 2 * MiB, offset: 0 },
      { gpa: 0x4000_0000, size: 3 * MiB, offset: 0 },
    ]) {
      const e = await errorOf(owner.commit([{ op: 'add', name: 'cut', backing: b, ...bad }]));
      expect(e?.code).toBe('MMB_ERR_UNALIGNED');
      expect(e?.message).toMatch(/hugetlb memory with 2 MiB pages.*must be multiples of 2 MiB/);
      expect(e?.client).toBeUndefined(); // the broker's own refusal, not a subscriber's
    }
    expect(sub.generation).toBe(generation);
    expect(changes).toEqual([]);
    // Aligned, it goes through, and the subscriber maps it on a 2 MiB boundary.
    await owner.commit([{ op: 'add', name: 'ok', gpa: 0x4000_0000, size: 2 * MiB, backing: b, offset: 2 * MiB }]);
    const m = sub.memory.regions()[0]!;
    expect(m.address % (2 * MiB)).toBe(0);
    expect(smapsAt(m.address)).toMatchObject({ start: m.address, KernelPageSize: 2048 });
  });

  it('a subscriber whose broker does not check (an old one) refuses with MMB_ERR_UNALIGNED, not an EINVAL from mmap', () => {
    const fd = hugeMemfd('old-broker', 2 * MiB, 4 * MiB);
    defer(() => native.close(fd));
    const st = native.fstat(fd);
    const backing: LocalBacking = { id: 1, name: 'ram2m', size: 4 * MiB, fd, dev: st.dev, ino: st.ino };
    const region: ViewRegion = {
      id: 1,
      name: 'cut',
      gpa: asGpa(0),
      size: 2 * MiB,
      backing: 1,
      offset: asOffset(4096),
      readonly: false,
      logDirty: false,
      file: `${st.dev}:${st.ino}`,
      key: 'k',
    };
    const mem = new GuestMemory();
    let err: unknown;
    try {
      mem.apply({ generation: 1, cause: 'txn', removed: [], updated: [], added: [region] }, new Map([[1, backing]]));
    } catch (e) {
      err = e;
    }
    expect(isMmbError(err, 'MMB_ERR_UNALIGNED')).toBe(true);
    expect((err as Error).message).toMatch(/"cut": backing ram2m has 2 MiB pages/);
    expect(mem.regions()).toEqual([]);
  });

  itKvm('kvm, plain and soft vfio subscribers map it; KVM slots keep gpa = hva modulo 2 MiB; a vCPU writes it and another mapping reads it', async () => {
    const broker = embeddedBroker();
    const owner = await ownerOf(broker);
    const b = await hugeBacking(owner, 2 * MiB, 8 * MiB, 'ram2m');
    await owner.commit([
      { op: 'add', name: 'low', gpa: 0x20_0000, size: 2 * MiB, backing: b, offset: 0 },
      { op: 'add', name: 'high', gpa: 0x4000_0000, size: 4 * MiB, backing: b, offset: 4 * MiB },
    ]);
    const kvm = await KvmSubscriber.attach(broker, { space: 'vm0', name: 'kvm', software: false });
    defer(() => kvm.close());
    const plain = await MappingSubscriber.attach(broker, { space: 'vm0', name: 'plain' });
    defer(() => plain.close());
    for (const s of kvm.slots()) {
      expect(s.hva % (2 * MiB), s.name).toBe(s.gpa % (2 * MiB));
      expect(smapsAt(s.hva)).toMatchObject({ start: s.hva, KernelPageSize: 2048 });
    }
    await kvm.runProgram({ codeGpa: 0x20_0000, writes: [{ gpa: 0x4000_0000 + 3 * MiB + 5, bytes: Buffer.from('huge') }] });
    expect(Buffer.from(plain.memory.read(0x4000_0000 + 3 * MiB + 5, 4)).toString()).toBe('huge');
    // A region moved to a gpa that is not 2 MiB aligned is refused; the slots stay.
    const e = await errorOf(
      owner.commit([
        { op: 'remove', region: 'high' },
        { op: 'add', name: 'high2', gpa: 0x4010_0000, size: 4 * MiB, backing: b, offset: 4 * MiB },
      ]),
    );
    expect(e?.code).toBe('MMB_ERR_UNALIGNED');
    expect(kvm.slots().map((s) => s.name)).toEqual(['low', 'high']);
  });

  it('the soft vfio backend pins hugetlb memory: every huge page faulted in (smaps Private_Hugetlb + Shared_Hugetlb), none of it in VmLck', async () => {
    const broker = embeddedBroker();
    const owner = await ownerOf(broker);
    const b = await hugeBacking(owner, 2 * MiB, 8 * MiB, 'ram2m');
    await owner.commit([{ op: 'add', name: 'dma', gpa: 0x4000_0000, size: 6 * MiB, backing: b, offset: 2 * MiB }]);
    const vmLck = vmLckKiB();
    // No device yet: mapped, not pinned. The first device pins (in 2 MiB pieces, one per huge page).
    const vfio = await VfioSubscriber.attach(broker, { space: 'vm0', name: 'vfio', backend: 'soft', devices: [], pinChunkBytes: 2 * MiB });
    defer(() => vfio.close());
    const m = vfio.memory.regions()[0]!;
    expect(m.address % (2 * MiB)).toBe(0);
    expect(smapsAt(m.address)).toMatchObject({ start: m.address, KernelPageSize: 2048, Shared_Hugetlb: 0, Private_Hugetlb: 0 });
    await vfio.attachDevice('dev0');
    expect(vfio.domain.pinnedBytes).toBe(6 * MiB);
    // The kernel's view: all three huge pages are in this mapping's page tables. mlock(2) faulted them in
    // but does not count hugetlb pages as locked (they can never be swapped), so VmLck stays where it was.
    const after = smapsAt(m.address)!;
    expect(after.Shared_Hugetlb! + after.Private_Hugetlb!).toBe(6 * 1024);
    expect(vmLckKiB()).toBe(vmLck);
    await vfio.detachDevice('dev0');
    expect(vfio.domain.pinnedBytes).toBe(0);
  });
});

with1G('1 GiB pages', () => {
  it('a fully aligned 1 GiB region of a 1 GiB-page memfd works in plain, kvm and soft vfio subscribers; the vCPU writes it through a 1 GiB slot', async () => {
    const broker = embeddedBroker();
    const owner = await ownerOf(broker);
    const code = await owner.createBacking(2 * MiB, 'code');
    defer(() => native.close(code.fd));
    const b = await hugeBacking(owner, GiB, GiB, 'ram1g');
    await owner.commit([
      { op: 'add', name: 'code', gpa: 0x10_0000, size: 2 * MiB, backing: code.backing, offset: 0 },
      { op: 'add', name: 'giant', gpa: GiB, size: GiB, backing: b, offset: 0 },
    ]);
    const plain = await MappingSubscriber.attach(broker, { space: 'vm0', name: 'plain' });
    defer(() => plain.close());
    const vfio = await VfioSubscriber.attach(broker, { space: 'vm0', name: 'vfio', backend: 'soft', devices: ['dev0'] });
    defer(() => vfio.close());
    expect(vfio.domain.pinnedBytes).toBe(GiB + 2 * MiB);
    for (const mem of [plain.memory, vfio.memory]) {
      const giant = mem.regions().find((m) => m.region.name === 'giant')!;
      expect(giant.address % GiB).toBe(0);
      expect(smapsAt(giant.address)).toMatchObject({ start: giant.address, end: giant.address + GiB, KernelPageSize: 1024 * 1024 });
    }
    if (HAVE_KVM || IN_CI) {
      const kvm = await KvmSubscriber.attach(broker, { space: 'vm0', name: 'kvm', software: false });
      defer(() => kvm.close());
      const slot = kvm.slots().find((s) => s.name === 'giant')!;
      expect(slot).toMatchObject({ gpa: GiB, size: GiB });
      expect(slot.hva % GiB).toBe(0);
      await kvm.runProgram({
        codeGpa: 0x10_0000,
        writes: [
          { gpa: GiB + GiB - 4, bytes: Buffer.from('1GiB') },
          { gpa: GiB + 12345, bytes: Buffer.from('x') },
        ],
      });
      expect(Buffer.from(plain.memory.read(2 * GiB - 4, 4)).toString()).toBe('1GiB');
      expect(Buffer.from(vfio.memory.read(GiB + 12345, 1)).toString()).toBe('x');
    }
  });

  it('a 1 GiB-page region at a 2 MiB-aligned gpa is refused at planning, naming 1 GiB', async () => {
    const broker = embeddedBroker();
    const owner = await ownerOf(broker);
    const b = await hugeBacking(owner, GiB, GiB, 'ram1g');
    const e = await errorOf(owner.commit([{ op: 'add', name: 'giant', gpa: GiB + 2 * MiB, size: GiB, backing: b, offset: 0 }]));
    expect(e?.code).toBe('MMB_ERR_UNALIGNED');
    expect(e?.message).toMatch(/1 GiB pages.*multiples of 1 GiB/);
  });
});
