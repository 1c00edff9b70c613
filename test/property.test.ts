// Property-based tests (fast-check) of the codec and the validators: whatever bytes or values arrive,
// the result is a valid message or a typed error (MmbError), never an exception of another kind; and
// every descriptor that arrives is handed back, in a frame or by dispose().
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { FrameDecoder, HEADER_SIZE, MESSAGES, decodeBody, encodeBody, isMmbError, parseToBroker, parseToClient, type Frame } from '../protocol/index.js';
import { SAMPLES } from './fixtures/samples.js';

const limits = { maxFrameBytes: 1 << 16, maxFdsPerFrame: 8, maxPendingFds: 32 };

/** Runs fn; returns true if it returned or threw an MmbError, false (with the error) otherwise. */
function typedOrFine(fn: () => unknown): true {
  try {
    fn();
  } catch (err) {
    if (!isMmbError(err)) throw new Error(`untyped exception: ${(err as Error)?.stack ?? String(err)}`);
  }
  return true;
}

/** A frame header followed by a body, with a chance of lying about the length or the fds. */
const frameBytes = fc
  .record({
    body: fc.uint8Array({ maxLength: 256 }),
    lie: fc.integer({ min: -4, max: 4 }),
    nfds: fc.integer({ min: 0, max: 10 }),
    flags: fc.oneof(fc.constant(0), fc.integer({ min: 0, max: 0xffff })),
  })
  .map(({ body, lie, nfds, flags }) => {
    const h = Buffer.alloc(HEADER_SIZE);
    h.writeUInt32LE(Math.max(0, body.length + lie), 0);
    h.writeUInt16LE(nfds, 4);
    h.writeUInt16LE(flags, 6);
    return { bytes: Buffer.concat([h, body]), nfds };
  });

describe('properties', () => {
  it('the frame decoder: any bytes in any chunks with any fds give frames or a typed error, and every fd comes back', () => {
    fc.assert(
      fc.property(
        fc.array(fc.oneof(frameBytes, fc.record({ bytes: fc.uint8Array({ maxLength: 64 }), nfds: fc.integer({ min: 0, max: 3 }) })), { maxLength: 8 }),
        fc.integer({ min: 1, max: 97 }),
        (parts, chunk) => {
          const d = new FrameDecoder(limits);
          let nextFd = 1000;
          const given: number[] = [];
          const got: number[] = [];
          const all = Buffer.concat(parts.map((p) => p.bytes));
          const fdsAt = new Map<number, number[]>();
          let pos = 0;
          for (const p of parts) {
            if (p.nfds > 0 && p.bytes.length > 0)
              fdsAt.set(
                pos,
                Array.from({ length: p.nfds }, () => nextFd++),
              );
            pos += p.bytes.length;
          }
          let failed = false;
          for (let at = 0; at < all.length && !failed; at += chunk) {
            const piece = all.subarray(at, at + chunk);
            const fds: number[] = [];
            for (const [p, list] of fdsAt) if (p >= at && p < at + piece.length) fds.push(...list);
            given.push(...fds);
            try {
              d.push(piece, fds);
              for (let f = d.next(); f; f = d.next()) {
                got.push(...f.fds);
                typedOrFine(() => parseToBroker(f, 0xffff_ffff));
              }
            } catch (err) {
              if (!isMmbError(err)) throw err;
              failed = true;
            }
          }
          got.push(...d.dispose());
          expect(got.sort()).toEqual(given.sort());
        },
      ),
      { numRuns: 500 },
    );
  });

  it('any msgpack value as a message body: a valid message or a typed error, in both directions', () => {
    const value = fc.letrec((tie) => ({
      v: fc.oneof(
        { depthSize: 'small' },
        fc.integer(),
        fc.double(),
        fc.maxSafeNat(),
        fc.string({ maxLength: 70 }),
        fc.boolean(),
        fc.constant(null),
        fc.array(tie('v'), { maxLength: 4 }),
        fc.dictionary(fc.string({ maxLength: 10 }), tie('v'), { maxKeys: 5 }),
      ),
    })).v;
    const ids = [...MESSAGES.keys(), 0, 99, 1000];
    fc.assert(
      fc.property(
        fc.constantFrom(...ids),
        fc.dictionary(fc.constantFrom('id', 'seq', 'space', 'ops', 'generation', 'regions', 'backings', 'error', 'role', 'kind', 'paused', 'x'), value, {
          maxKeys: 6,
        }),
        fc.integer({ min: 0, max: 2 }),
        (t, fields, nfds) => {
          const bytes = encodeBody({ ...fields, t });
          const frame: Frame = {
            type: t,
            body: decodeBody(bytes) as Record<string, unknown>,
            fds: Array.from({ length: nfds }, (_, i) => 3 + i),
            size: bytes.length,
          };
          typedOrFine(() => parseToBroker(frame, 0xffff_ffff));
          typedOrFine(() => parseToClient(frame, 0xffff_ffff));
        },
      ),
      { numRuns: 2000 },
    );
  });

  it('valid messages with one field replaced by anything: still a message or a typed error', () => {
    const anything = fc.oneof(
      fc.integer({ min: -(2 ** 53), max: 2 ** 53 }),
      fc.double(),
      fc.string(),
      fc.boolean(),
      fc.constant(null),
      fc.array(fc.integer(), { maxLength: 3 }),
      fc.object({ maxDepth: 2 }),
    );
    fc.assert(
      fc.property(fc.constantFrom(...SAMPLES), fc.nat(), anything, (sample, which, v) => {
        const keys = Object.keys(sample.message);
        const key = keys[which % keys.length] as string;
        const mutated = { ...sample.message, [key]: v };
        const bytes = encodeBody(mutated);
        const frame: Frame = {
          type: sample.message.t as number,
          body: decodeBody(bytes) as Record<string, unknown>,
          fds: Array.from({ length: sample.fds }, (_, i) => 3 + i),
          size: bytes.length,
        };
        typedOrFine(() => parseToBroker(frame, 0xffff_ffff));
        typedOrFine(() => parseToClient(frame, 0xffff_ffff));
      }),
      { numRuns: 3000 },
    );
  });

  it('a body of random bytes decodes or fails with MMB_ERR_BAD_FRAME, never anything else', () => {
    fc.assert(
      fc.property(fc.uint8Array({ minLength: 1, maxLength: 128 }), (bytes) => {
        typedOrFine(() => decodeBody(bytes));
      }),
      { numRuns: 3000 },
    );
  });
});
