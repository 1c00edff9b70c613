// native/src/vfio.c: the ioctl whitelist and the checks C makes before any VFIO / iommufd ioctl. This
// machine has no /dev/vfio and no /dev/iommu, so every call here must be refused before the kernel is
// asked, or reach the kernel's ENOENT: what is tested is that the addon cannot be made to issue anything else.
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { createSealedMemfd } from '../clients/memfd.js';
import { LAYOUTS, REQUEST, pack } from '../clients/vfio/structs.js';
import { native } from '../native/index.js';
import { vfio } from '../native/vfio.js';
import { thrown } from './helpers/throws.js';
import { IN_CI } from './helpers/ci.js';
import { ROOT } from './helpers/procs.js';

const memfd = createSealedMemfd('mmb-vfio-native', 4096);
afterAll(() => native.close(memfd));

describe('vfioOpen', () => {
  it('opens only VFIO and iommufd nodes', () => {
    expect(thrown(() => vfio.vfioOpen('/etc/passwd'))).toMatchObject({ code: 'EPERM', syscall: 'open' });
    expect(thrown(() => vfio.vfioOpen('/dev/vfio/../null'))).toMatchObject({ code: 'EPERM' });
    expect(thrown(() => vfio.vfioOpen('/dev/iommuX'))).toMatchObject({ code: 'EPERM' });
    expect(() => vfio.vfioOpen('' as string)).toThrow(TypeError);
  });

  it.skipIf(fs.existsSync('/dev/vfio/vfio'))('reports a missing node as ENOENT (this machine has no VFIO)', () => {
    expect(thrown(() => vfio.vfioOpen('/dev/vfio/vfio'))).toMatchObject({ code: 'ENOENT', syscall: 'open', errno: -2 });
    expect(thrown(() => vfio.vfioOpen('/dev/iommu'))).toMatchObject({ code: 'ENOENT' });
  });
});

describe('the ioctl whitelist', () => {
  it('refuses request numbers outside the whitelist with EPERM, whatever the entry point', async () => {
    const TIOCGWINSZ = 0x5413;
    // The gate's one error shape (native/src/ioctl_gate.h), the same as KVM's.
    expect(thrown(() => vfio.vfioIoctl(memfd, TIOCGWINSZ, new Uint8Array(64)))).toMatchObject({
      code: 'EPERM',
      errno: -1,
      syscall: 'ioctl',
      request: '0x5413 (not allowed)',
      message: 'ioctl 0x5413 (not allowed) failed: Operation not permitted (EPERM)',
    });
    expect(thrown(() => vfio.vfioIoctlInt(memfd, TIOCGWINSZ, 0))).toMatchObject({ code: 'EPERM' });
    await expect(vfio.vfioIoctlAsync(memfd, TIOCGWINSZ, new Uint8Array(64))).rejects.toMatchObject({ code: 'EPERM' });
    // VFIO_GROUP_GET_DEVICE_FD only through its own function (it takes a string).
    expect(thrown(() => vfio.vfioIoctl(memfd, REQUEST.VFIO_GROUP_GET_DEVICE_FD, new Uint8Array(64)))).toMatchObject({ code: 'EPERM' });
    // The VFIO numbers with another meaning on device fds are not in it either (PCI hot reset).
    expect(REQUEST.VFIO_IOMMU_MAP_DMA).toBe(0x3b00 + 100 + 13);
  });

  it('refuses a request through the wrong entry point with EINVAL', async () => {
    expect(thrown(() => vfio.vfioIoctlInt(memfd, REQUEST.VFIO_IOMMU_MAP_DMA, 0))).toMatchObject({
      code: 'EINVAL',
      syscall: 'ioctl',
      request: 'VFIO_IOMMU_MAP_DMA',
    });
    expect(thrown(() => vfio.vfioIoctl(memfd, REQUEST.VFIO_SET_IOMMU, new Uint8Array(8)))).toMatchObject({
      code: 'EINVAL',
      syscall: 'ioctl',
      request: 'VFIO_SET_IOMMU',
    });
    // Only the pinning calls may go to a worker thread.
    await expect(vfio.vfioIoctlAsync(memfd, REQUEST.VFIO_IOMMU_GET_INFO, pack('vfio_iommu_type1_info', {}))).rejects.toMatchObject({ code: 'EINVAL' });
  });

  it("checks the size word: at least the kernel's minimum, at most the buffer (the kernel writes up to it)", () => {
    const short = new Uint8Array(16);
    expect(thrown(() => vfio.vfioIoctl(memfd, REQUEST.VFIO_IOMMU_MAP_DMA, short))).toMatchObject({ code: 'EINVAL' });
    const lying = pack('vfio_iommu_type1_info', {});
    new DataView(lying.buffer).setUint32(0, 4096, true); // argsz beyond the buffer
    expect(thrown(() => vfio.vfioIoctl(memfd, REQUEST.VFIO_IOMMU_GET_INFO, lying))).toMatchObject({ code: 'EINVAL' });
    const tiny = pack('vfio_iommu_type1_info', {});
    new DataView(tiny.buffer).setUint32(0, 8, true); // argsz below minsz
    expect(thrown(() => vfio.vfioIoctl(memfd, REQUEST.VFIO_IOMMU_GET_INFO, tiny))).toMatchObject({ code: 'EINVAL' });
    expect(() => vfio.vfioIoctl(memfd, REQUEST.VFIO_IOMMU_GET_INFO, [] as unknown as Uint8Array)).toThrow(TypeError);
  });

  it('refuses flags that make the kernel follow an unchecked pointer', () => {
    const unmap = pack('vfio_iommu_type1_dma_unmap', { flags: 1 /* GET_DIRTY_BITMAP */, iova: 0, size: 4096 });
    expect(thrown(() => vfio.vfioIoctl(memfd, REQUEST.VFIO_IOMMU_UNMAP_DMA, unmap))).toMatchObject({ code: 'EINVAL' });
    const bind = pack('vfio_device_bind_iommufd', { flags: 1 /* BIND_FLAG_TOKEN */, iommufd: 3 });
    expect(thrown(() => vfio.vfioIoctl(memfd, REQUEST.VFIO_DEVICE_BIND_IOMMUFD, bind))).toMatchObject({ code: 'EINVAL' });
  });

  it('IOMMU_IOAS_IOVA_RANGES: the data buffer must hold num_iovas entries; no data for other requests', () => {
    const arg = pack('iommu_ioas_iova_ranges', { ioas_id: 1, num_iovas: 4 });
    expect(thrown(() => vfio.vfioIoctl(memfd, REQUEST.IOMMU_IOAS_IOVA_RANGES, arg, new Uint8Array(3 * 16)))).toMatchObject({ code: 'ERANGE' });
    expect(thrown(() => vfio.vfioIoctl(memfd, REQUEST.IOMMU_IOAS_IOVA_RANGES, arg))).toMatchObject({ code: 'ERANGE' });
    expect(thrown(() => vfio.vfioIoctl(memfd, REQUEST.IOMMU_IOAS_MAP, pack('iommu_ioas_map', {}), new Uint8Array(16)))).toMatchObject({ code: 'EINVAL' });
    // Big enough, but a memfd is not /dev/iommu: refused, and no pointer is left in the caller's buffer.
    expect(thrown(() => vfio.vfioIoctl(memfd, REQUEST.IOMMU_IOAS_IOVA_RANGES, arg, new Uint8Array(4 * 16)))).toMatchObject({ code: 'ENOTTY' });
    expect(new DataView(arg.buffer).getBigUint64(LAYOUTS.iommu_ioas_iova_ranges.fields.allowed_iovas.offset, true)).toBe(0n);
  });

  it("issues nothing on a descriptor that is not of the request's kind (ENOTTY)", async () => {
    const map = pack('vfio_iommu_type1_dma_map', { flags: 3, vaddr: 0x1000, iova: 0, size: 4096 });
    expect(thrown(() => vfio.vfioIoctl(memfd, REQUEST.VFIO_IOMMU_GET_INFO, pack('vfio_iommu_type1_info', {})))).toMatchObject({
      code: 'ENOTTY',
      syscall: 'ioctl',
      request: 'VFIO_IOMMU_GET_INFO',
    });
    expect(thrown(() => vfio.vfioIoctlInt(0, REQUEST.VFIO_GET_API_VERSION, 0))).toMatchObject({ code: 'ENOTTY' });
    expect(thrown(() => vfio.vfioGroupGetDeviceFd(memfd, '0000:00:01.0'))).toMatchObject({
      code: 'ENOTTY',
      syscall: 'ioctl',
      request: 'VFIO_GROUP_GET_DEVICE_FD',
    });
    // A name the kernel would refuse is its ENAMETOOLONG in the same shape; a non-string a TypeError.
    expect(thrown(() => vfio.vfioGroupGetDeviceFd(memfd, 'x'.repeat(300)))).toMatchObject({
      code: 'ENAMETOOLONG',
      syscall: 'ioctl',
      request: 'VFIO_GROUP_GET_DEVICE_FD',
    });
    expect(() => vfio.vfioGroupGetDeviceFd(memfd, 5 as unknown as string)).toThrow(TypeError);
    await expect(vfio.vfioIoctlAsync(memfd, REQUEST.VFIO_IOMMU_MAP_DMA, map)).rejects.toMatchObject({
      code: 'ENOTTY',
      syscall: 'ioctl',
      request: 'VFIO_IOMMU_MAP_DMA',
    });
    await expect(vfio.vfioIoctlAsync(memfd, REQUEST.IOMMU_IOAS_MAP, pack('iommu_ioas_map', {}))).rejects.toMatchObject({ code: 'ENOTTY' });
  });

  it('every whitelisted request is one structs.ts knows, and vice versa', () => {
    expect(Object.keys(vfio.vfioRequests).sort()).toEqual(Object.keys(REQUEST).sort());
    expect(Object.isFrozen(vfio.vfioRequests)).toBe(true);
  });
});

/** strace, if it can trace here. */
const strace = (() => {
  try {
    execFileSync('strace', ['-qq', '-e', 'trace=none', 'true'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
})();
const python3 = spawnSync('python3', ['-c', '1']).status === 0;
// Without strace (or python3, for the control) and outside CI these are skipped, and say why; under CI they run and fail.
const NO_STRACE = 'strace missing or unable to trace here (apt-get install strace; CI=true makes this a failure)';
const NO_PYTHON = 'python3 missing (apt-get install python3; CI=true makes this a failure)';
if (!strace && !IN_CI) console.warn(`strace tests skipped: ${NO_STRACE}`);
if (strace && !python3 && !IN_CI) console.warn(`strace control test skipped: ${NO_PYTHON}`);

/** Matches an ioctl of VFIO's / iommufd's type (';' = 0x3b), named or not, in strace's output. */
const VFIO_IOCTL = /ioctl\(\d+, (VFIO_|IOMMU_|_IOC\(_IOC_NONE, 0x3b)/;

describe('seen from the kernel (strace)', () => {
  it.skipIf(!strace && !IN_CI)('no refused call reaches ioctl(2)', () => {
    expect(strace, NO_STRACE).toBe(true);
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'mmb-vfio-strace-'));
    const script = path.join(dir, 'refused.mjs');
    fs.writeFileSync(
      script,
      `import { vfio } from ${JSON.stringify(path.join(ROOT, 'dist/native/vfio.js'))};
import { createSealedMemfd } from ${JSON.stringify(path.join(ROOT, 'dist/clients/memfd.js'))};
import { pack } from ${JSON.stringify(path.join(ROOT, 'dist/clients/vfio/structs.js'))};
const R = vfio.vfioRequests;
const fd = createSealedMemfd('strace', 4096);
const codes = [];
const tryIt = (f) => { try { f(); codes.push('ok'); } catch (e) { codes.push(e.code); } };
tryIt(() => vfio.vfioIoctl(fd, R.VFIO_IOMMU_MAP_DMA, pack('vfio_iommu_type1_dma_map', { flags: 3, vaddr: 4096, size: 4096 })));
tryIt(() => vfio.vfioIoctl(fd, R.VFIO_IOMMU_GET_INFO, pack('vfio_iommu_type1_info', {})));
tryIt(() => vfio.vfioIoctl(fd, 0x3b00 + 100 + 9, new Uint8Array(64)));
tryIt(() => vfio.vfioIoctl(fd, R.IOMMU_IOAS_IOVA_RANGES, pack('iommu_ioas_iova_ranges', { num_iovas: 1 }), new Uint8Array(16)));
tryIt(() => vfio.vfioIoctlInt(fd, R.VFIO_GET_API_VERSION, 0));
tryIt(() => vfio.vfioIoctlInt(1, R.VFIO_SET_IOMMU, 3));
tryIt(() => vfio.vfioGroupGetDeviceFd(fd, '0000:00:01.0'));
const pending = [vfio.vfioIoctlAsync(fd, R.VFIO_IOMMU_MAP_DMA, pack('vfio_iommu_type1_dma_map', {})), vfio.vfioIoctlAsync(fd, R.IOMMU_IOAS_MAP, pack('iommu_ioas_map', {}))];
for (const code of await Promise.all(pending.map((p) => p.then(() => 'ok', (e) => e.code)))) codes.push(code);
console.log(JSON.stringify(codes));
`,
    );
    const log = path.join(dir, 'strace.out');
    const run = spawnSync('strace', ['-f', '-qq', '-e', 'trace=ioctl', '-o', log, process.execPath, script], { encoding: 'utf8' });
    expect(run.status, `${run.stdout}\n${run.stderr}`).toBe(0);
    expect(JSON.parse(run.stdout), run.stderr).toEqual(['ENOTTY', 'ENOTTY', 'EPERM', 'ENOTTY', 'ENOTTY', 'ENOTTY', 'ENOTTY', 'ENOTTY', 'ENOTTY']);
    const traced = fs.readFileSync(log, 'utf8').split('\n');
    expect(
      traced.filter((l) => VFIO_IOCTL.test(l)),
      traced.join('\n'),
    ).toEqual([]);
    expect(traced.some((l) => l.includes('ioctl('))).toBe(true); // strace did see the process's other ioctls
    fs.rmSync(dir, { recursive: true });
  });

  it.skipIf((!strace || !python3) && !IN_CI)('(control: a raw VFIO ioctl on a memfd does show up in that trace)', () => {
    expect(strace, NO_STRACE).toBe(true);
    expect(python3, NO_PYTHON).toBe(true);
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'mmb-vfio-strace-'));
    const log = path.join(dir, 'strace.out');
    const py = "import fcntl, os\nfd = os.memfd_create('x')\ntry: fcntl.ioctl(fd, 0x3b71, bytes(32))\nexcept OSError: pass";
    spawnSync('strace', ['-f', '-qq', '-e', 'trace=ioctl', '-o', log, 'python3', '-c', py]);
    expect(
      fs
        .readFileSync(log, 'utf8')
        .split('\n')
        .filter((l) => VFIO_IOCTL.test(l)),
    ).toHaveLength(1);
    fs.rmSync(dir, { recursive: true });
  });
});
