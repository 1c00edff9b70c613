// The native addon against the real kernel: every claim is checked through a syscall result or the
// kernel's own view (/proc/self/maps, /proc/self/status, /proc/self/fd, /proc/self/fdinfo).
import { afterEach, describe, expect, it } from 'vitest';
import { AsyncLocalStorage, executionAsyncId } from 'node:async_hooks';
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import v8 from 'node:v8';
import vm from 'node:vm';
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';
import { constants as C, isNativeError, native, PAGE_SIZE, pidOfPidfd, type Mapping, type NativeError } from '../native/index.js';
import { fdCount as procFdCount, fdFlags as procFdFlags, mapsLines, vmLckKiB as procVmLckKiB } from '../testkit/procfs.js';

const ADDON = fileURLToPath(new URL('../build/Release/mmb_native.node', import.meta.url));
const O_NONBLOCK = 0o4000;
const O_CLOEXEC = 0o2000000;

v8.setFlagsFromString('--expose-gc');
const gc = vm.runInNewContext('gc') as () => void;

// ---- helpers ------------------------------------------------------------------------------------

/** fds and mappings a test opened; closed afterwards so one failure does not leak into the next. */
const openFds = new Set<number>();
const liveMappings = new Set<Mapping>();
function track(fd: number): number {
  openFds.add(fd);
  return fd;
}
function closeFd(fd: number): void {
  openFds.delete(fd);
  native.close(fd);
}
function map(fd: number, offset: number, length: number, prot: number, flags = C.MAP_SHARED): Mapping {
  const m = native.mmap(fd, offset, length, prot, flags);
  liveMappings.add(m);
  return m;
}
function unmap(m: Mapping): void {
  liveMappings.delete(m);
  native.munmap(m);
}
afterEach(() => {
  for (const m of liveMappings) {
    try {
      native.munmap(m);
    } catch {
      // already unmapped by the test
    }
  }
  liveMappings.clear();
  for (const fd of openFds) {
    try {
      native.close(fd);
    } catch {
      // already closed by the test
    }
  }
  openFds.clear();
});

const fdCount = (): number => procFdCount('self');
const fdFlags = (fd: number): number => procFdFlags('self', fd);
/** The /proc/self/maps line of the mapping that starts at `address`. */
const mapsLine = (address: number): string | undefined => mapsLines('self').find((l) => l.startsWith(`${address.toString(16)}-`));
const vmLckKiB = (): number => procVmLckKiB('self');
function catchError(fn: () => unknown): NativeError {
  try {
    fn();
  } catch (err) {
    return err as NativeError;
  }
  throw new Error('expected a throw');
}
function expectNative(err: unknown, code: string, syscall: string): void {
  expect(isNativeError(err, code)).toBe(true);
  expect((err as NativeError).syscall).toBe(syscall);
  expect((err as NativeError).errno).toBeLessThan(0);
}
function memfd(name: string, size: number, flags = C.MFD_ALLOW_SEALING): number {
  const fd = track(native.memfdCreate(name, flags));
  native.ftruncate(fd, size);
  return fd;
}
function tmpDir(): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), 'mmb-native-'));
}
const tick = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));
const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));
function pair(): [number, number] {
  const [a, b] = native.socketPair();
  return [track(a), track(b)];
}
/** Runs `body` as a CommonJS script in a fresh node with `n` = the addon; returns the result. */
function runChild(body: string, timeoutMs: number): ReturnType<typeof spawnSync> {
  const script = `const n = require(${JSON.stringify(ADDON)}); const C = n.constants;\n${body}`;
  return spawnSync(process.execPath, ['-e', script], { timeout: timeoutMs, encoding: 'utf8' });
}

// ---- errors & constants -------------------------------------------------------------------------

describe('error shape', () => {
  it('carries code, negative errno, syscall and a descriptive message', () => {
    const err = catchError(() => native.socketConnect('/nonexistent-dir-mmb/sock'));
    expect(err).toBeInstanceOf(Error);
    expect(err.code).toBe('ENOENT');
    expect(err.errno).toBe(-os.constants.errno.ENOENT);
    expect(err.syscall).toBe('connect');
    expect(err.message).toBe('connect failed: No such file or directory (ENOENT)');
    expect(isNativeError(err)).toBe(true);
    expect(isNativeError(err, 'EINVAL')).toBe(false);
  });

  it('errno matches the kernel number for the code', () => {
    const err = catchError(() => native.fstat(2 ** 30));
    expect(err.code).toBe('EBADF');
    expect(err.errno).toBe(-os.constants.errno.EBADF);
    expect(err.syscall).toBe('fstat');
  });

  it('rejects non-integers with TypeError and negatives with RangeError, before any syscall', () => {
    const fd = memfd('args', PAGE_SIZE);
    expect(() => native.ftruncate(fd, 1.5)).toThrow(TypeError);
    expect(() => native.ftruncate(fd, '4096' as unknown as number)).toThrow(TypeError);
    expect(() => native.ftruncate(fd, Number.NaN)).toThrow(TypeError);
    expect(() => native.ftruncate(fd, -1)).toThrow(RangeError);
    expect(() => native.ftruncate(fd, 2 ** 53)).toThrow(RangeError);
    expect(() => native.fstat(-1)).toThrow(RangeError);
    expect(native.fstat(fd).size).toBe(PAGE_SIZE);
  });

  it('one ioctl gate and one async-work helper: no other source calls ioctl(2) or queues napi work itself', () => {
    const src = fileURLToPath(new URL('../native/src/', import.meta.url));
    const calling = (pattern: RegExp) =>
      fs.readdirSync(src).filter((f) => f.endsWith('.c') && pattern.test(fs.readFileSync(path.join(src, f), 'utf8').replace(/\/\*[\s\S]*?\*\//g, '')));
    expect(calling(/\bioctl\s*\(/)).toEqual(['ioctl_gate.c']);
    expect(calling(/\bnapi_(create|queue)_async_work\b/)).toEqual(['async_work.c']);
  });
});

describe('constants', () => {
  it('has every NativeConstants name as an integer, with the known Linux values', () => {
    const names = [
      'MFD_CLOEXEC',
      'MFD_ALLOW_SEALING',
      'MFD_HUGETLB',
      'F_SEAL_SEAL',
      'F_SEAL_SHRINK',
      'F_SEAL_GROW',
      'F_SEAL_WRITE',
      'F_SEAL_FUTURE_WRITE',
      'PROT_NONE',
      'PROT_READ',
      'PROT_WRITE',
      'MAP_SHARED',
      'MAP_PRIVATE',
      'MAP_NORESERVE',
      'MAP_POPULATE',
      'EFD_CLOEXEC',
      'EFD_NONBLOCK',
      'EFD_SEMAPHORE',
      'POLL_READABLE',
      'POLL_WRITABLE',
      'POLL_DISCONNECT',
      'SHUT_RD',
      'SHUT_WR',
      'SHUT_RDWR',
      'pageSize',
      'SCM_MAX_FD',
    ];
    expect(Object.keys(C).sort()).toEqual([...names].sort());
    for (const name of names) expect(Number.isInteger((C as unknown as Record<string, number>)[name])).toBe(true);
    expect(C.F_SEAL_SHRINK).toBe(2);
    expect(C.MAP_SHARED).toBe(1);
    expect(C.EFD_CLOEXEC).toBe(O_CLOEXEC);
    expect(C.SCM_MAX_FD).toBe(253);
    expect(PAGE_SIZE).toBe(C.pageSize);
    expect(PAGE_SIZE & (PAGE_SIZE - 1)).toBe(0);
  });
});

// ---- memfd --------------------------------------------------------------------------------------

describe('memfd', () => {
  it('creates a close-on-exec memfd of the requested size', () => {
    const fd = memfd('mmb-create', 3 * PAGE_SIZE, 0); // no MFD_CLOEXEC asked: it is added anyway
    const st = native.fstat(fd);
    expect(st.size).toBe(3 * PAGE_SIZE);
    expect(st.mode & 0o170000).toBe(0o100000); // S_IFREG
    expect(st.ino).toBeGreaterThan(0);
    expect(fdFlags(fd) & O_CLOEXEC).toBe(O_CLOEXEC);
    expect(fs.readlinkSync(`/proc/self/fd/${fd}`)).toBe('/memfd:mmb-create (deleted)');
    native.ftruncate(fd, PAGE_SIZE);
    expect(native.fstat(fd).size).toBe(PAGE_SIZE);
  });

  it('adds seals and reads them back; F_SEAL_SHRINK makes shrinking fail with EPERM', () => {
    const fd = memfd('mmb-seals', 4 * PAGE_SIZE);
    expect(native.getSeals(fd)).toBe(0);
    native.addSeals(fd, C.F_SEAL_SHRINK);
    expect(native.getSeals(fd)).toBe(C.F_SEAL_SHRINK);
    expectNative(
      catchError(() => native.ftruncate(fd, PAGE_SIZE)),
      'EPERM',
      'ftruncate',
    );
    expect(native.fstat(fd).size).toBe(4 * PAGE_SIZE);
    native.ftruncate(fd, 8 * PAGE_SIZE); // growing is still allowed
    native.addSeals(fd, C.F_SEAL_GROW | C.F_SEAL_SEAL);
    expect(native.getSeals(fd)).toBe(C.F_SEAL_SHRINK | C.F_SEAL_GROW | C.F_SEAL_SEAL);
    expectNative(
      catchError(() => native.ftruncate(fd, 9 * PAGE_SIZE)),
      'EPERM',
      'ftruncate',
    );
    expectNative(
      catchError(() => native.addSeals(fd, C.F_SEAL_WRITE)),
      'EPERM',
      'fcntl',
    );
  });

  it('a memfd created without MFD_ALLOW_SEALING is born sealed with F_SEAL_SEAL', () => {
    const fd = memfd('mmb-nosealing', PAGE_SIZE, 0);
    expect(native.getSeals(fd)).toBe(C.F_SEAL_SEAL);
    expectNative(
      catchError(() => native.addSeals(fd, C.F_SEAL_SHRINK)),
      'EPERM',
      'fcntl',
    );
  });

  it('getSeals fails with EINVAL on files that cannot be sealed', () => {
    const dir = tmpDir();
    const file = path.join(dir, 'plain');
    fs.writeFileSync(file, 'x');
    const fileFd = fs.openSync(file, 'r');
    try {
      expectNative(
        catchError(() => native.getSeals(fileFd)),
        'EINVAL',
        'fcntl',
      );
    } finally {
      fs.closeSync(fileFd);
      fs.rmSync(dir, { recursive: true });
    }
    const [a] = pair();
    expectNative(
      catchError(() => native.getSeals(a)),
      'EINVAL',
      'fcntl',
    );
  });

  it('dup gives a close-on-exec copy of the same file; close releases it', () => {
    const fd = memfd('mmb-dup', PAGE_SIZE);
    const copy = native.dup(fd);
    expect(copy).not.toBe(fd);
    expect(native.fstat(copy).ino).toBe(native.fstat(fd).ino);
    expect(fdFlags(copy) & O_CLOEXEC).toBe(O_CLOEXEC);
    native.close(copy);
    expect(fs.existsSync(`/proc/self/fd/${copy}`)).toBe(false);
    expectNative(
      catchError(() => native.close(copy)),
      'EBADF',
      'close',
    );
  });

  it('refuses names the kernel refuses', () => {
    expectNative(
      catchError(() => native.memfdCreate('x'.repeat(250), 0)),
      'EINVAL',
      'memfd_create',
    );
    expect(() => native.memfdCreate('a\0b', 0)).toThrow(TypeError);
  });
});

// ---- mmap ---------------------------------------------------------------------------------------

describe('mmap', () => {
  const RW = (): number => C.PROT_READ | C.PROT_WRITE;

  it('two mappings of one memfd share memory, and the kernel lists both', () => {
    const fd = memfd('mmb-share', 2 * PAGE_SIZE);
    const a = map(fd, 0, 2 * PAGE_SIZE, RW());
    const b = map(fd, 0, 2 * PAGE_SIZE, RW());
    expect(a.address).not.toBe(b.address);
    expect(a.length).toBe(2 * PAGE_SIZE);
    expect(a.buffer.byteLength).toBe(2 * PAGE_SIZE);
    new Uint8Array(a.buffer).set([1, 2, 3], PAGE_SIZE + 5);
    expect([...new Uint8Array(b.buffer, PAGE_SIZE + 5, 3)]).toEqual([1, 2, 3]);

    for (const m of [a, b]) {
      const line = mapsLine(m.address);
      expect(line).toBeDefined();
      expect(line).toContain('rw-s');
      expect(line).toContain('/memfd:mmb-share');
      expect(line?.split(/\s+/)[0]).toBe(`${m.address.toString(16)}-${(m.address + m.length).toString(16)}`);
    }
  });

  it('maps at an offset', () => {
    const fd = memfd('mmb-offset', 2 * PAGE_SIZE);
    const whole = map(fd, 0, 2 * PAGE_SIZE, RW());
    new Uint8Array(whole.buffer)[PAGE_SIZE] = 0x5a;
    const second = map(fd, PAGE_SIZE, PAGE_SIZE, C.PROT_READ);
    expect(new Uint8Array(second.buffer)[0]).toBe(0x5a);
    expect(mapsLine(second.address)).toMatch(/ r--s 00001000 /);
  });

  it('a PROT_READ mapping is read-only in the kernel and sees writes made elsewhere', () => {
    const fd = memfd('mmb-ro', PAGE_SIZE);
    const rw = map(fd, 0, PAGE_SIZE, RW());
    const ro = map(fd, 0, PAGE_SIZE, C.PROT_READ);
    expect(mapsLine(ro.address)).toContain('r--s');
    new Uint8Array(rw.buffer)[7] = 99;
    expect(new Uint8Array(ro.buffer)[7]).toBe(99); // reading only: a write here would be SIGSEGV
  });

  it('munmap detaches the buffer and the kernel forgets the mapping; twice is EINVAL', () => {
    const fd = memfd('mmb-unmap', PAGE_SIZE);
    const m = map(fd, 0, PAGE_SIZE, RW());
    const view = new Uint8Array(m.buffer);
    view[0] = 1;
    expect(mapsLine(m.address)).toBeDefined();
    unmap(m);
    expect(m.buffer.byteLength).toBe(0);
    expect(view.length).toBe(0);
    expect(view[0]).toBeUndefined();
    expect(mapsLine(m.address)).toBeUndefined();
    expectNative(
      catchError(() => native.munmap(m)),
      'EINVAL',
      'munmap',
    );
  });

  it('the Mapping object cannot be tampered with', () => {
    const fd = memfd('mmb-frozen', PAGE_SIZE);
    const m = map(fd, 0, PAGE_SIZE, RW());
    const buffer = m.buffer;
    expect(() => {
      (m as { buffer: ArrayBuffer }).buffer = new ArrayBuffer(8);
    }).toThrow(TypeError);
    expect(m.buffer).toBe(buffer);
    expect(() => native.munmap({ buffer, address: m.address, length: m.length })).toThrow(TypeError);
  });

  it('reports mmap failures from the kernel', () => {
    const fd = memfd('mmb-mmapfail', PAGE_SIZE);
    expectNative(
      catchError(() => native.mmap(fd, 0, 0, C.PROT_READ, C.MAP_SHARED)),
      'EINVAL',
      'mmap',
    );
    expectNative(
      catchError(() => native.mmap(fd, 1, PAGE_SIZE, C.PROT_READ, C.MAP_SHARED)),
      'EINVAL',
      'mmap',
    );
    expectNative(
      catchError(() => native.mmap(2 ** 30, 0, PAGE_SIZE, C.PROT_READ, C.MAP_SHARED)),
      'EBADF',
      'mmap',
    );
  });

  it('a mapping longer than the largest ArrayBuffer fails cleanly and leaves nothing mapped', () => {
    const size = 2 ** 32 + PAGE_SIZE; // above Node 20's 4 GiB ArrayBuffer limit; sparse, costs nothing
    const fd = memfd('mmb-huge', size);
    let err: unknown;
    try {
      map(fd, 0, size, C.PROT_READ, C.MAP_SHARED | C.MAP_NORESERVE);
    } catch (e) {
      err = e;
    }
    if (err === undefined) return; // a runtime with larger ArrayBuffers: nothing to check
    expect((err as NativeError).code).toBe('ERR_BUFFER_TOO_LARGE');
    expect(fs.readFileSync('/proc/self/maps', 'utf8')).not.toContain('/memfd:mmb-huge');
  });

  it('a Mapping collected while still mapped is unmapped by its finalizer', async () => {
    const fd = memfd('mmb-gc', PAGE_SIZE);
    let address = 0;
    (() => {
      const m = native.mmap(fd, 0, PAGE_SIZE, RW(), C.MAP_SHARED);
      address = m.address;
      new Uint8Array(m.buffer)[0] = 1;
    })();
    expect(mapsLine(address)).toBeDefined();
    for (let i = 0; i < 20 && mapsLine(address) !== undefined; i++) {
      gc();
      await tick();
      await sleep(5);
    }
    expect(mapsLine(address)).toBeUndefined();
  });

  it('keeps the memory mapped while only its buffer is still referenced', async () => {
    const fd = memfd('mmb-gc-buffer', PAGE_SIZE);
    let buffer: ArrayBuffer | undefined;
    let address = 0;
    (() => {
      const m = native.mmap(fd, 0, PAGE_SIZE, RW(), C.MAP_SHARED);
      address = m.address;
      buffer = m.buffer;
    })();
    for (let i = 0; i < 5; i++) {
      gc();
      await tick();
    }
    expect(mapsLine(address)).toBeDefined();
    new Uint8Array(buffer as ArrayBuffer)[1] = 2; // still valid memory
    buffer = undefined;
    for (let i = 0; i < 20 && mapsLine(address) !== undefined; i++) {
      gc();
      await tick();
      await sleep(5);
    }
    expect(mapsLine(address)).toBeUndefined();
  });
});

// ---- mlock --------------------------------------------------------------------------------------

describe('mlock', () => {
  it('VmLck rises by the locked size after mlock and falls after munlock', async () => {
    const size = 16 * 1024 * 1024;
    const fd = memfd('mmb-mlock', size);
    const m = map(fd, 0, size, C.PROT_READ | C.PROT_WRITE);
    const before = vmLckKiB();
    await native.mlock(m, 0, size);
    const locked = vmLckKiB();
    expect(locked - before).toBeGreaterThanOrEqual(size / 1024);
    await native.munlock(m, 0, size);
    expect(vmLckKiB()).toBeLessThanOrEqual(before);
    unmap(m);
  });

  it('munmap while an mlock is in flight throws EBUSY, and works once it settled', async () => {
    const size = 64 * 1024 * 1024;
    const fd = memfd('mmb-busy', size);
    const m = map(fd, 0, size, C.PROT_READ | C.PROT_WRITE);
    const pending = native.mlock(m, 0, size);
    expectNative(
      catchError(() => native.munmap(m)),
      'EBUSY',
      'munmap',
    );
    expect(m.buffer.byteLength).toBe(size);
    await pending;
    const unlocking = native.munlock(m, 0, size);
    expectNative(
      catchError(() => native.munmap(m)),
      'EBUSY',
      'munmap',
    );
    await unlocking;
    unmap(m);
    expect(mapsLine(m.address)).toBeUndefined();
  });

  it('rejects ranges outside the mapping (ERANGE), unmapped mappings (EINVAL) and non-Mappings', async () => {
    const fd = memfd('mmb-lockrange', 2 * PAGE_SIZE);
    const m = map(fd, 0, 2 * PAGE_SIZE, C.PROT_READ);
    const outside = await native.mlock(m, PAGE_SIZE, 2 * PAGE_SIZE).catch((e: unknown) => e);
    expectNative(outside, 'ERANGE', 'mlock');
    const overflow = await native.munlock(m, 2 ** 53 - 1, 2 * PAGE_SIZE).catch((e: unknown) => e);
    expectNative(overflow, 'ERANGE', 'munlock');
    await native.mlock(m, PAGE_SIZE, PAGE_SIZE); // the last page exactly is fine
    await native.munlock(m, PAGE_SIZE, PAGE_SIZE);
    unmap(m);
    expectNative(await native.mlock(m, 0, PAGE_SIZE).catch((e: unknown) => e), 'EINVAL', 'mlock');
    const notMapping = await native.mlock({} as Mapping, 0, 1).catch((e: unknown) => e);
    expect(notMapping).toBeInstanceOf(TypeError);
  });
});

// ---- eventfd ------------------------------------------------------------------------------------

describe('eventfd', () => {
  it('counts writes, reads the sum, then reports would-block as null', () => {
    const fd = track(native.eventfd(0, C.EFD_NONBLOCK));
    expect(fdFlags(fd) & (O_CLOEXEC | O_NONBLOCK)).toBe(O_CLOEXEC | O_NONBLOCK);
    native.eventfdWrite(fd, 3);
    expect(native.eventfdRead(fd)).toBe(3);
    expect(native.eventfdRead(fd)).toBeNull();
    native.eventfdWrite(fd, 1);
    native.eventfdWrite(fd, 2);
    expect(native.eventfdRead(fd)).toBe(3);
  });

  it('semaphore mode reads one at a time, from an initial value', () => {
    const fd = track(native.eventfd(2, C.EFD_NONBLOCK | C.EFD_SEMAPHORE));
    expect(native.eventfdRead(fd)).toBe(1);
    expect(native.eventfdRead(fd)).toBe(1);
    expect(native.eventfdRead(fd)).toBeNull();
  });
});

// ---- sockets ------------------------------------------------------------------------------------

describe('sockets', () => {
  it('socketPair ends are non-blocking and close-on-exec, and carry data both ways', () => {
    const [a, b] = pair();
    for (const fd of [a, b]) expect(fdFlags(fd) & (O_CLOEXEC | O_NONBLOCK)).toBe(O_CLOEXEC | O_NONBLOCK);
    expect(native.sendmsg(a, Buffer.from('ping'), [])).toBe(4);
    const buf = new Uint8Array(16);
    expect(native.recvmsg(b, buf, 0)).toEqual({ bytes: 4, fds: [], ctrunc: false });
    expect(Buffer.from(buf.subarray(0, 4)).toString()).toBe('ping');
    expect(native.recvmsg(b, buf, 0)).toBeNull();
  });

  it('peerCred reports this process', () => {
    const [a] = pair();
    expect(native.peerCred(a)).toEqual({ pid: process.pid, uid: process.getuid?.(), gid: process.getgid?.() });
  });

  it('passes 64 memfds with one byte; they arrive in order, close-on-exec', () => {
    const [a, b] = pair();
    const sent = Array.from({ length: 64 }, (_, i) => memfd(`mmb-pass-${i}`, PAGE_SIZE));
    expect(native.sendmsg(a, Uint8Array.of(0x42), sent)).toBe(1);
    const buf = new Uint8Array(8);
    const got = native.recvmsg(b, buf, C.SCM_MAX_FD);
    expect(got).not.toBeNull();
    if (got === null) return;
    got.fds.forEach(track);
    expect(got.bytes).toBe(1);
    expect(buf[0]).toBe(0x42);
    expect(got.ctrunc).toBe(false);
    expect(got.fds).toHaveLength(64);
    expect(got.fds.map((fd) => native.fstat(fd).ino)).toEqual(sent.map((fd) => native.fstat(fd).ino));
    for (const fd of got.fds) {
      expect(sent).not.toContain(fd);
      expect(fdFlags(fd) & O_CLOEXEC).toBe(O_CLOEXEC);
      expect(fs.readlinkSync(`/proc/self/fd/${fd}`)).toMatch(/^\/memfd:mmb-pass-\d+ \(deleted\)$/);
    }
    // the sender still owns its copies
    expect(native.fstat(sent[0] as number).size).toBe(PAGE_SIZE);
  });

  it('too small maxFds: ctrunc, no fds returned, and none leaked', () => {
    const [a, b] = pair();
    const sent = Array.from({ length: 64 }, (_, i) => memfd(`mmb-trunc-${i}`, PAGE_SIZE));
    native.sendmsg(a, Uint8Array.of(1), sent);
    const before = fdCount();
    const got = native.recvmsg(b, new Uint8Array(8), 8);
    expect(got).toEqual({ bytes: 1, fds: [], ctrunc: true });
    expect(fdCount()).toBe(before);

    native.sendmsg(a, Uint8Array.of(2), sent.slice(0, 3));
    expect(native.recvmsg(b, new Uint8Array(8), 0)).toEqual({ bytes: 1, fds: [], ctrunc: true });
    expect(fdCount()).toBe(before);
  });

  it('maxFds is an exact bound', () => {
    const [a, b] = pair();
    const fd = memfd('mmb-bound', PAGE_SIZE);
    // 2 fds into maxFds 1: CMSG_SPACE padding would have room for 2; the bound must still hold
    native.sendmsg(a, Uint8Array.of(1), [fd, fd]);
    const before = fdCount();
    expect(native.recvmsg(b, new Uint8Array(1), 1)).toEqual({ bytes: 1, fds: [], ctrunc: true });
    expect(fdCount()).toBe(before);
    native.sendmsg(a, Uint8Array.of(1), [fd, fd, fd]);
    const got = native.recvmsg(b, new Uint8Array(1), 3);
    got?.fds.forEach(track);
    expect(got?.fds).toHaveLength(3);
    expect(got?.ctrunc).toBe(false);
  });

  it('refuses more than SCM_MAX_FD fds (E2BIG) and fds without data (EINVAL); nothing is sent', () => {
    const [a, b] = pair();
    const fd = memfd('mmb-e2big', PAGE_SIZE);
    const tooMany = new Array<number>(C.SCM_MAX_FD + 1).fill(fd);
    expectNative(
      catchError(() => native.sendmsg(a, Uint8Array.of(1), tooMany)),
      'E2BIG',
      'sendmsg',
    );
    expectNative(
      catchError(() => native.sendmsg(a, new Uint8Array(0), [fd])),
      'EINVAL',
      'sendmsg',
    );
    expect(native.recvmsg(b, new Uint8Array(8), C.SCM_MAX_FD)).toBeNull();
    // exactly SCM_MAX_FD is fine
    expect(native.sendmsg(a, Uint8Array.of(1), tooMany.slice(1))).toBe(1);
    const got = native.recvmsg(b, new Uint8Array(8), C.SCM_MAX_FD);
    got?.fds.forEach(track);
    expect(got?.fds).toHaveLength(C.SCM_MAX_FD);
  });

  it('sending a bad fd fails with EBADF and sends nothing', () => {
    const [a, b] = pair();
    expectNative(
      catchError(() => native.sendmsg(a, Uint8Array.of(1), [2 ** 30])),
      'EBADF',
      'sendmsg',
    );
    expect(native.recvmsg(b, new Uint8Array(8), 4)).toBeNull();
  });

  it('sendmsg returns null once the socket buffer is full, and works again after draining', () => {
    const [a, b] = pair();
    const chunk = new Uint8Array(64 * 1024);
    let total = 0;
    let result: number | null = 0;
    for (let i = 0; i < 10_000; i++) {
      result = native.sendmsg(a, chunk, []);
      if (result === null) break;
      total += result;
    }
    expect(result).toBeNull();
    expect(total).toBeGreaterThan(0);
    const sink = new Uint8Array(256 * 1024);
    let drained = 0;
    for (;;) {
      const got = native.recvmsg(b, sink, 0);
      if (got === null) break;
      drained += got.bytes;
    }
    expect(drained).toBe(total);
    expect(native.sendmsg(a, chunk.subarray(0, 10), [])).toBe(10);
  });

  it('recvmsg reports EOF as 0 bytes, and shutdown(SHUT_WR) produces it', () => {
    const [a, b] = pair();
    native.shutdown(a, C.SHUT_WR);
    expect(native.recvmsg(b, new Uint8Array(4), 4)).toEqual({ bytes: 0, fds: [], ctrunc: false });
    closeFd(a);
    expect(native.recvmsg(b, new Uint8Array(4), 4)).toEqual({ bytes: 0, fds: [], ctrunc: false });
    expectNative(
      catchError(() => native.sendmsg(b, Uint8Array.of(1), [])),
      'EPIPE',
      'sendmsg',
    );
    expect(() => native.recvmsg(b, new Uint8Array(0), 0)).toThrow(RangeError);
  });

  it('listen / connect / accept on a path: socket file mode, peer credentials, data', () => {
    const dir = tmpDir();
    try {
      const file = path.join(dir, 'broker.sock');
      const listener = track(native.socketListen(file, 8, 0o600));
      const st = fs.statSync(file);
      expect(st.isSocket()).toBe(true);
      expect(st.mode & 0o7777).toBe(0o600);
      expect(fdFlags(listener) & (O_CLOEXEC | O_NONBLOCK)).toBe(O_CLOEXEC | O_NONBLOCK);
      expect(native.socketAccept(listener)).toBeNull();

      const client = track(native.socketConnect(file));
      const accepted = native.socketAccept(listener);
      expect(accepted).not.toBeNull();
      if (accepted === null) return;
      track(accepted.fd);
      if (accepted.pidfd >= 0) track(accepted.pidfd);
      expect(accepted).toEqual({ fd: accepted.fd, pid: process.pid, uid: process.getuid?.(), gid: process.getgid?.(), pidfd: accepted.pidfd });
      expect(fdFlags(accepted.fd) & (O_CLOEXEC | O_NONBLOCK)).toBe(O_CLOEXEC | O_NONBLOCK);
      expect(native.peerCred(client).pid).toBe(process.pid);

      expect(native.sendmsg(client, Buffer.from('hello'), [])).toBe(5);
      const buf = new Uint8Array(8);
      expect(native.recvmsg(accepted.fd, buf, 0)?.bytes).toBe(5);
      expect(Buffer.from(buf.subarray(0, 5)).toString()).toBe('hello');

      expectNative(
        catchError(() => native.socketListen(file, 8, 0o600)),
        'EADDRINUSE',
        'bind',
      );
    } finally {
      fs.rmSync(dir, { recursive: true });
    }
  });

  it('applies modes looser than the umask allows, exactly', () => {
    const dir = tmpDir();
    const old = process.umask(0o077);
    try {
      const file = path.join(dir, 'open.sock');
      track(native.socketListen(file, 1, 0o666));
      expect(fs.statSync(file).mode & 0o7777).toBe(0o666);
    } finally {
      process.umask(old);
      fs.rmSync(dir, { recursive: true });
    }
  });

  it('socketListenAt binds inside a directory descriptor, wherever that directory has moved, with its exact mode', () => {
    const dir = tmpDir();
    const moved = `${dir}-moved`;
    const old = process.umask(0o077);
    const dirFd = fs.openSync(dir, fs.constants.O_RDONLY | fs.constants.O_DIRECTORY);
    try {
      // Renamed after it was opened: the socket lands in the directory we hold, not at the path we named.
      fs.renameSync(dir, moved);
      const before = fdCount();
      track(native.socketListenAt(dirFd, 'at.sock', 1, 0o660));
      expect(fdCount()).toBe(before + 1);
      const st = fs.lstatSync(path.join(moved, 'at.sock'));
      expect(st.isSocket()).toBe(true);
      expect(st.mode & 0o7777).toBe(0o660); // the umask (077) took nothing away
      expect(fs.existsSync(path.join(dir, 'at.sock'))).toBe(false);
      expectNative(
        catchError(() => native.socketListenAt(dirFd, 'at.sock', 1, 0o600)),
        'EADDRINUSE',
        'bind',
      );
      for (const bad of ['a/b', '.', '..'])
        expectNative(
          catchError(() => native.socketListenAt(dirFd, bad, 1, 0o600)),
          'EINVAL',
          'bind',
        );
      expectNative(
        catchError(() => native.socketListenAt(dirFd, 'x'.repeat(100), 1, 0o600)),
        'ENAMETOOLONG',
        'bind',
      );
      expect(fdCount()).toBe(before + 1); // failures closed their sockets
    } finally {
      fs.closeSync(dirFd);
      process.umask(old);
      fs.rmSync(moved, { recursive: true, force: true });
    }
  });

  it('connect errors: ENOENT for a missing path, ECONNREFUSED for a dead socket file', () => {
    const dir = tmpDir();
    try {
      const file = path.join(dir, 'dead.sock');
      expectNative(
        catchError(() => native.socketConnect(file)),
        'ENOENT',
        'connect',
      );
      native.close(native.socketListen(file, 1, 0o600)); // the file stays, nobody listens
      expectNative(
        catchError(() => native.socketConnect(file)),
        'ECONNREFUSED',
        'connect',
      );
      const before = fdCount();
      catchError(() => native.socketConnect(file));
      expect(fdCount()).toBe(before); // the failed socket was closed
      expectNative(
        catchError(() => native.socketConnect(path.join(dir, 'x'.repeat(120)))),
        'ENAMETOOLONG',
        'connect',
      );
    } finally {
      fs.rmSync(dir, { recursive: true });
    }
  });
});

// ---- pidfds -------------------------------------------------------------------------------------

/** SO_PEERPIDFD is Linux 6.5+; on an older kernel the calls must say "none" (-1), not fail. */
const hasPeerPidfd = (() => {
  const [a, b] = native.socketPair();
  try {
    const fd = native.peerPidfd(a);
    if (fd >= 0) native.close(fd);
    return fd >= 0;
  } finally {
    native.close(a);
    native.close(b);
  }
})();
const kernelAtLeast = (major: number, minor: number): boolean => {
  const [ma = 0, mi = 0] = os
    .release()
    .split('.')
    .map((x) => parseInt(x, 10));
  return ma > major || (ma === major && mi >= minor);
};

describe('pidfds', () => {
  it('SO_PEERPIDFD is there on Linux 6.5 and later, and -1 (not an error) before', () => {
    expect(hasPeerPidfd).toBe(kernelAtLeast(6, 5));
  });

  it.runIf(hasPeerPidfd)('a socketpair end gives a close-on-exec pidfd naming the process that made it', () => {
    const [a] = pair();
    const pidfd = track(native.peerPidfd(a));
    expect(pidOfPidfd(pidfd)).toBe(process.pid);
    expect(fdFlags(pidfd) & O_CLOEXEC).toBe(O_CLOEXEC);
    native.pidfdSendSignal(pidfd, 0); // alive, and we may signal ourselves
    const [r, w] = native.socketPair();
    native.close(w);
    // A socket whose peer closed still names the process that connected: the pid is remembered.
    const stale = native.peerPidfd(r);
    native.close(r);
    expect(stale).toBeGreaterThanOrEqual(0);
    expect(pidOfPidfd(track(stale))).toBe(process.pid);
  });

  it.runIf(hasPeerPidfd)("accept gives the connecting process's pidfd: it signals that process, polls readable when it exits, then ESRCH", async () => {
    const dir = tmpDir();
    try {
      const file = path.join(dir, 'p.sock');
      const listener = track(native.socketListen(file, 8, 0o600));
      // A child that connects with Node's own net module, says so, and waits to be killed.
      const child = spawn(
        process.execPath,
        ['-e', `require('net').connect(${JSON.stringify(file)}, () => process.stdout.write('connected\\n')); setInterval(() => {}, 1000);`],
        { stdio: ['ignore', 'pipe', 'inherit'] },
      );
      await new Promise<void>((resolve, reject) => {
        child.stdout.once('data', () => resolve());
        child.once('exit', (code) => reject(new Error(`child exited ${code}`)));
      });
      const accepted = native.socketAccept(listener);
      expect(accepted).not.toBeNull();
      track(accepted!.fd);
      const pidfd = track(accepted!.pidfd);
      expect(accepted!.pid).toBe(child.pid);
      expect(pidOfPidfd(pidfd)).toBe(child.pid);
      expect(fdFlags(pidfd) & O_CLOEXEC).toBe(O_CLOEXEC);
      const exited = new Promise<number>((resolve) => {
        const handle = native.pollStart(pidfd, C.POLL_READABLE, (status, events) => {
          native.pollClose(handle);
          resolve(status < 0 ? status : events);
        });
      });
      const exit = new Promise<NodeJS.Signals | null>((resolve) => child.once('exit', (_code, signal) => resolve(signal)));
      native.pidfdSendSignal(pidfd, os.constants.signals.SIGKILL);
      expect(await exited).toBe(C.POLL_READABLE);
      expect(await exit).toBe('SIGKILL');
      expect(pidOfPidfd(pidfd)).toBe(-1);
      expectNative(
        catchError(() => native.pidfdSendSignal(pidfd, os.constants.signals.SIGKILL)),
        'ESRCH',
        'pidfd_send_signal',
      );
    } finally {
      fs.rmSync(dir, { recursive: true });
    }
  });

  it('pidfdOpen opens a child that has not been reaped; errors carry errno and syscall', async () => {
    const child = spawn(process.execPath, ['-e', 'setInterval(() => {}, 1000)'], { stdio: 'ignore' });
    const exit = new Promise<NodeJS.Signals | null>((resolve) => child.once('exit', (_code, signal) => resolve(signal)));
    const pidfd = track(native.pidfdOpen(child.pid!));
    expect(pidOfPidfd(pidfd)).toBe(child.pid);
    expect(fdFlags(pidfd) & O_CLOEXEC).toBe(O_CLOEXEC);
    native.pidfdSendSignal(pidfd, os.constants.signals.SIGTERM);
    expect(await exit).toBe('SIGTERM');
    expectNative(
      catchError(() => native.pidfdSendSignal(pidfd, 0)),
      'ESRCH',
      'pidfd_send_signal',
    );
    expectNative(
      catchError(() => native.pidfdSendSignal(0, 0)),
      'EBADF',
      'pidfd_send_signal',
    );
    expect(() => native.pidfdSendSignal(pidfd, 65)).toThrow(RangeError);
    expect(() => native.pidfdOpen(0)).toThrow(RangeError);
    const efd = track(native.eventfd(0, C.EFD_CLOEXEC));
    expectNative(
      catchError(() => native.peerPidfd(efd)),
      'ENOTSOCK',
      'getsockopt',
    );
  });
});

// ---- poll ---------------------------------------------------------------------------------------

describe('poll', () => {
  it('calls back READABLE after the peer writes, with the handle as this', async () => {
    const [a, b] = pair();
    const calls: Array<[number, number]> = [];
    let self: unknown;
    let signal = (): void => {};
    const readable = new Promise<void>((resolve) => {
      signal = resolve;
    });
    const handle = native.pollStart(a, C.POLL_READABLE, function (this: unknown, status, events) {
      // eslint-disable-next-line @typescript-eslint/no-this-alias -- the test records the callback's this
      self = this;
      calls.push([status, events]);
      native.recvmsg(a, new Uint8Array(8), 0); // drain, or it stays readable
      signal();
    });
    expect(handle.fd).toBe(a);
    await sleep(20);
    expect(calls).toHaveLength(0);
    native.sendmsg(b, Uint8Array.of(1), []);
    await readable;
    expect(calls[0]).toEqual([0, C.POLL_READABLE]);
    expect(self).toBe(handle);
    native.pollClose(handle);
    native.pollClose(handle); // idempotent
    expect(() => native.pollUpdate(handle, C.POLL_READABLE)).toThrow(expect.objectContaining({ code: 'EBADF' }));
    native.pollRef(handle, true); // a no-op once closed
    native.sendmsg(b, Uint8Array.of(2), []);
    await sleep(30);
    expect(calls).toHaveLength(1); // closed: no more callbacks
  });

  it('ticks and promise jobs queued by the callback run before the next macrotask', async () => {
    const [a, b] = pair();
    const order: string[] = [];
    await new Promise<void>((resolve) => {
      const handle = native.pollStart(a, C.POLL_READABLE, () => {
        native.pollClose(handle);
        setImmediate(() => {
          order.push('immediate');
          resolve();
        });
        queueMicrotask(() => order.push('microtask'));
        process.nextTick(() => order.push('tick'));
        order.push('callback');
      });
      native.sendmsg(b, Uint8Array.of(1), []);
    });
    expect(order).toEqual(['callback', 'tick', 'microtask', 'immediate']);
  });

  it('calls back in the async context of pollStart (napi_make_callback with an async context)', async () => {
    const [a, b] = pair();
    const als = new AsyncLocalStorage<string>();
    const seen = await new Promise<{ store: string | undefined; id: number }>((resolve) => {
      als.run('started-here', () => {
        const handle = native.pollStart(a, C.POLL_READABLE, () => {
          native.pollClose(handle);
          resolve({ store: als.getStore(), id: executionAsyncId() });
        });
      });
      native.sendmsg(b, Uint8Array.of(1), []);
    });
    expect(seen.store).toBe('started-here');
    expect(seen.id).toBeGreaterThan(1);
  });

  it('pollUpdate(0) pauses the watch and pollUpdate(READABLE) resumes it', async () => {
    const [a, b] = pair();
    let count = 0;
    const handle = native.pollStart(a, C.POLL_READABLE, () => {
      count++;
    });
    try {
      native.pollUpdate(handle, 0);
      native.sendmsg(b, Uint8Array.of(1), []);
      await sleep(50);
      expect(count).toBe(0);
      native.pollUpdate(handle, C.POLL_READABLE);
      for (let i = 0; i < 100 && count === 0; i++) await sleep(5);
      expect(count).toBeGreaterThan(0);
    } finally {
      native.pollClose(handle);
    }
  });

  it('reports WRITABLE and DISCONNECT', async () => {
    const [a, b] = pair();
    const writable = await new Promise<number>((resolve) => {
      const h = native.pollStart(a, C.POLL_WRITABLE, (_status, events) => {
        native.pollClose(h);
        resolve(events);
      });
    });
    expect(writable & C.POLL_WRITABLE).toBe(C.POLL_WRITABLE);
    const disconnect = await new Promise<number>((resolve) => {
      const h = native.pollStart(a, C.POLL_DISCONNECT, (_status, events) => {
        native.pollClose(h);
        resolve(events);
      });
      closeFd(b);
    });
    expect(disconnect & C.POLL_DISCONNECT).toBe(C.POLL_DISCONNECT);
  });

  it('refuses bad event bits, a second handle on one fd, and non-handles', () => {
    const [a] = pair();
    expect(() => native.pollStart(a, 0x100, () => {})).toThrow(RangeError);
    expect(() => native.pollStart(a, C.POLL_READABLE, 'x' as unknown as () => void)).toThrow(TypeError);
    const h = native.pollStart(a, C.POLL_READABLE, () => {});
    try {
      const err = catchError(() => native.pollStart(a, C.POLL_READABLE, () => {}));
      expect(err.code).toBe('EEXIST');
      expect(err.syscall).toBe('uv_poll_init');
      expect(() => native.pollUpdate(h, 0x100)).toThrow(RangeError);
      expect(() => native.pollClose({ fd: a })).toThrow(TypeError);
      const fd = memfd('mmb-notpoll', PAGE_SIZE);
      const m = map(fd, 0, PAGE_SIZE, C.PROT_READ);
      expect(() => native.pollClose(m as unknown as { fd: number })).toThrow(TypeError);
      expect(() => native.munmap(h as unknown as Mapping)).toThrow(TypeError);
    } finally {
      native.pollClose(h);
    }
  });

  it("does not keep the loop alive after pollRef(false) or pollClose; does while ref'd", () => {
    const setup = 'const [a, b] = n.socketPair(); const h = n.pollStart(a, C.POLL_READABLE, () => {});';
    const unref = runChild(`${setup} n.pollRef(h, false);`, 10_000);
    expect(unref.error).toBeUndefined();
    expect(unref.status).toBe(0);
    const closed = runChild(`${setup} n.pollClose(h);`, 10_000);
    expect(closed.status).toBe(0);
    const paused = runChild(`${setup} n.pollUpdate(h, 0);`, 10_000);
    expect(paused.status).toBe(0);
    const refd = runChild(`${setup} n.pollRef(h, false); n.pollRef(h, true);`, 1_500);
    expect(refd.signal).toBe('SIGTERM'); // still running when the timeout killed it
  });

  it('an exception thrown by the callback is an uncaught exception', () => {
    const child = runChild(
      `process.on('uncaughtException', (e) => { console.log('caught:' + e.message); process.exit(0); });
       const [a, b] = n.socketPair();
       n.pollStart(a, C.POLL_READABLE, () => { throw new Error('boom'); });
       n.sendmsg(b, Uint8Array.of(1), []);`,
      10_000,
    );
    expect(child.stdout).toContain('caught:boom');
    expect(child.status).toBe(0);
  });

  it('a Worker exiting with open handles, mappings and an mlock in flight tears down cleanly', async () => {
    const code = `
      const n = require(${JSON.stringify(ADDON)}); const C = n.constants;
      const [a, b] = n.socketPair();
      n.pollRef(n.pollStart(a, C.POLL_READABLE, () => {}), false);
      const fd = n.memfdCreate('mmb-worker', 0); n.ftruncate(fd, 1 << 20);
      globalThis.keep = n.mmap(fd, 0, 1 << 20, C.PROT_READ | C.PROT_WRITE, C.MAP_SHARED);
      n.mlock(globalThis.keep, 0, 1 << 20);
    `;
    for (let i = 0; i < 3; i++) {
      const worker = new Worker(code, { eval: true });
      const exitCode = await new Promise<number>((resolve, reject) => {
        worker.on('error', reject);
        worker.on('exit', resolve);
      });
      expect(exitCode).toBe(0);
    }
    // the same with an abrupt terminate() while a ref'd handle keeps the worker busy
    const busy = new Worker(`${code}; n.pollStart(b, C.POLL_READABLE, () => {}); require('node:worker_threads').parentPort.postMessage('ready');`, {
      eval: true,
    });
    await new Promise((resolve) => busy.once('message', resolve));
    expect(await busy.terminate()).toBe(1);
  });
});

describe('mmapChunked', () => {
  const mapsOf = (name: string) =>
    fs
      .readFileSync('/proc/self/maps', 'utf8')
      .split('\n')
      .filter((l) => l.includes(`/memfd:${name}`));

  it('maps one contiguous range as consecutive Mappings, each unmapped on its own', () => {
    const fd = memfd('chunked', 10 * PAGE_SIZE);
    const p = new Uint8Array(map(fd, 0, 10 * PAGE_SIZE, C.PROT_READ | C.PROT_WRITE).buffer);
    p[PAGE_SIZE * 7 + 5] = 0x5a;
    const chunks = native.mmapChunked(fd, PAGE_SIZE, 9 * PAGE_SIZE, C.PROT_READ | C.PROT_WRITE, C.MAP_SHARED, 4 * PAGE_SIZE);
    for (const m of chunks) liveMappings.add(m);
    expect(chunks.map((m) => m.length)).toEqual([4, 4, 1].map((n) => n * PAGE_SIZE));
    const base = chunks[0]!.address;
    expect(chunks.map((m) => m.address)).toEqual([base, base + 4 * PAGE_SIZE, base + 8 * PAGE_SIZE]);
    // Offsets follow the chunks: byte 7*PAGE+5 of the file is chunk 1, byte 2*PAGE+5.
    expect(new Uint8Array(chunks[1]!.buffer)[2 * PAGE_SIZE + 5]).toBe(0x5a);
    // The kernel sees the whole range mapped from the memfd, with no reservation left in between.
    const ours = mapsOf('chunked').map(
      (l) =>
        l
          .split(' ')[0]!
          .split('-')
          .map((h) => parseInt(h, 16)) as [number, number],
    );
    const inRange = ours.filter(([lo]) => lo >= base && lo < base + 9 * PAGE_SIZE);
    expect(inRange.reduce((n, [lo, hi]) => n + hi - lo, 0)).toBe(9 * PAGE_SIZE);
    for (const m of chunks) unmap(m);
    expect(mapsOf('chunked').some((l) => parseInt(l.split('-')[0]!, 16) === base)).toBe(false);
    expect(mapsLine(base)).toBeUndefined();
  });

  it('leaves nothing mapped when a chunk cannot be mapped', () => {
    const before = fs.readFileSync('/proc/self/maps', 'utf8').split('\n').length;
    const [r, w] = pair();
    expectNative(
      catchError(() => native.mmapChunked(r, 0, 8 * PAGE_SIZE, C.PROT_READ, C.MAP_SHARED, 4 * PAGE_SIZE)),
      'ENODEV',
      'mmap',
    );
    void w;
    expect(fs.readFileSync('/proc/self/maps', 'utf8').split('\n').length).toBe(before);
  });

  it('refuses a chunk size that is not a page multiple and MAP_FIXED', () => {
    const fd = memfd('chunked-bad', 4 * PAGE_SIZE);
    expectNative(
      catchError(() => native.mmapChunked(fd, 0, 4 * PAGE_SIZE, C.PROT_READ, C.MAP_SHARED, 100)),
      'EINVAL',
      'mmap',
    );
  });
});
