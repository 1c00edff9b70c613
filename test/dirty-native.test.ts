// The atomic dirty-bitmap primitives, including get-and-clear racing with writers in other processes:
// no bit set concurrently may be lost.
import { spawn } from 'node:child_process';
import { describe, expect, it } from 'vitest';
import { createSealedMemfd } from '../clients/index.js';
import { constants, native } from '../native/index.js';

const map = (fd: number, bytes: number) => native.mmap(fd, 0, bytes, constants.PROT_READ | constants.PROT_WRITE, constants.MAP_SHARED);
const bitsOf = (b: Uint8Array) => {
  const out: number[] = [];
  b.forEach((v, i) => {
    for (let j = 0; j < 8; j++) if (v & (1 << j)) out.push(i * 8 + j);
  });
  return out;
};

describe('dirty bitmaps', () => {
  it('bitmapSet sets exactly the bits of the range, across word boundaries', () => {
    const fd = createSealedMemfd('bm', 4096);
    const m = map(fd, 4096);
    native.bitmapSet(m, 60, 10);
    native.bitmapSet(m, 200, 1);
    native.bitmapSet(m, 256, 64);
    const out = new Uint8Array(64);
    expect(native.bitmapFetchClear(m, 0, 64, out)).toBe(10 + 1 + 64);
    expect(bitsOf(out)).toEqual([...Array.from({ length: 10 }, (_, i) => 60 + i), 200, ...Array.from({ length: 64 }, (_, i) => 256 + i)]);
    // Cleared: a second fetch finds nothing.
    expect(native.bitmapFetchClear(m, 0, 64, new Uint8Array(64))).toBe(0);
    native.munmap(m);
    native.close(fd);
  });

  it('bitmapOr merges words, fetch-clear ORs into what the destination already holds', () => {
    const fd = createSealedMemfd('bm2', 4096);
    const m = map(fd, 4096);
    const src = new Uint8Array(16);
    src[0] = 0b1010;
    src[15] = 0x80;
    native.bitmapOr(m, 8, src);
    const out = new Uint8Array(24);
    out[0] = 1;
    expect(native.bitmapFetchClear(m, 0, 24, out)).toBe(3);
    expect(bitsOf(out)).toEqual([0, 65, 67, 191]);
    expect(() => native.bitmapOr(m, 4, src)).toThrow(/EINVAL/);
    expect(() => native.bitmapFetchClear(m, 4096, 8, out)).toThrow(/ERANGE/);
    native.munmap(m);
    native.close(fd);
  });

  it('bitmapTake ORs a retired half into the destination, zeroes it, and counts the bits', () => {
    const fd = createSealedMemfd('take', 8192);
    const m = map(fd, 8192);
    native.bitmapSet(m, 4096 * 8 + 3, 2); // half at 4096: bits 3, 4
    native.bitmapSet(m, 4096 * 8 + 64 * 9 + 1, 1); // word 9 (second cache line): bit 1
    const out = new Uint8Array(128);
    out[0] = 0x80;
    expect(native.bitmapTake(m, 4096, 128, out)).toBe(3);
    expect(bitsOf(out)).toEqual([3, 4, 7, 64 * 9 + 1]);
    expect(native.bitmapTake(m, 4096, 128, new Uint8Array(128))).toBe(0); // zeroed
    // Refused before any word moves: an unaligned range, a destination shorter than it, a range past the end.
    native.bitmapSet(m, 0, 1);
    for (const collect of [native.bitmapTake, native.bitmapFetchClear]) {
      expect(() => collect(m, 4, 8, new Uint8Array(8))).toThrow(/EINVAL/);
      expect(() => collect(m, 0, 12, new Uint8Array(16))).toThrow(/EINVAL/);
      expect(() => collect(m, 0, 16, new Uint8Array(8))).toThrow(/EINVAL/);
      expect(() => collect(m, 8192, 8, new Uint8Array(8))).toThrow(/ERANGE/);
    }
    const first = new Uint8Array(8);
    expect(native.bitmapTake(m, 0, 8, first)).toBe(1); // still there after every refusal
    expect(first[0]).toBe(1);
    native.munmap(m);
    native.close(fd);
  });

  it('get-and-clear racing with four writer processes loses no bit', async () => {
    // Each bit is set exactly once, so a bit a racing clear lost would never come back.
    const bits = 1 << 21;
    const bytes = bits / 8;
    const fd = createSealedMemfd('race', bytes);
    const m = map(fd, bytes);
    // Writer k sets bits k, k+4, k+8, ...: all four hit every 64-bit word, over and over.
    const writers = [0, 1, 2, 3].map((k) =>
      spawn(process.execPath, [new URL('./fixtures/bitmap-writer.mjs', import.meta.url).pathname, String(k), '4', String(bits), '1'], {
        stdio: ['ignore', 'pipe', 'inherit', fd],
      }),
    );
    const done = Promise.all(writers.map((w) => new Promise((r) => w.on('exit', r))));
    const union = new Uint8Array(bytes);
    let finished = false;
    void done.then(() => (finished = true));
    let rounds = 0;
    while (!finished) {
      native.bitmapFetchClear(m, 0, bytes, union);
      rounds++;
      await new Promise((r) => setImmediate(r));
    }
    native.bitmapFetchClear(m, 0, bytes, union);
    expect(rounds).toBeGreaterThan(1);
    expect(union.every((b) => b === 0xff)).toBe(true);
    native.munmap(m);
    native.close(fd);
  });
});
