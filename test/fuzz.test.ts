// Invariant 6 under volume: the socket fuzzer (fuzz/run.ts) against a broker in its own process. A bounded
// run here; `npm run fuzz -- --frames 100000` is the long one (figures in docs/security.md).
import { describe, expect, it } from 'vitest';
import { runFuzz } from '../fuzz/run.js';

describe('socket fuzzer', () => {
  it('4000 hostile frames: the broker stays up, logs no exception, leaks no fd or mapping, and keeps serving hotplugs', async () => {
    const seed = Number(process.env.FUZZ_SEED ?? 7);
    const r = await runFuzz({ frames: 4000, seed, batch: 100 });
    expect(r.brokerAlive).toBe(true);
    expect(r.exceptionSamples).toEqual([]);
    expect(r.unexpectedExceptions).toBe(0);
    expect(r.fdLeak).toBe(0);
    expect(r.mappingLeak).toBe(0);
    expect(r.legitFailures).toEqual([]);
    expect(r.legitChecks).toBeGreaterThanOrEqual(5);
    // The frames reached the broker's handlers, not only its frame decoder: refusals of many kinds came back.
    expect(r.answers).toBeGreaterThan(r.frames / 4);
    expect(Object.keys(r.errorCodes).length).toBeGreaterThanOrEqual(10);
    expect(r.errorCodes.MMB_ERR_NOT_OWNER ?? 0).toBeGreaterThan(0);
    expect(r.descriptorsSent).toBeGreaterThan(0);
  }, 120_000);
});
