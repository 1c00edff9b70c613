// What the tests share about CI and the real tools they drive: whether this is a CI run (where a missing
// tool is a failure, never a skip), and the real back-end processes a test started.
import { afterEach, expect } from 'vitest';
import type { Backend } from '../../bench/vhost-user-backends.js';
import { runCleanups } from './embedded.js';

/** CI=true (or any value but '', 'false', '0'): missing tools fail instead of skipping. */
export const IN_CI = process.env.CI !== undefined && process.env.CI !== '' && process.env.CI !== 'false' && process.env.CI !== '0';

/**
 * The real back-ends (qemu-storage-daemon, dpdk-testpmd) a test file starts: push each one; after every
 * test the cleanups run, every back-end is stopped by PID, and any line it printed on stderr fails the test.
 */
export function trackBackends(): Backend[] {
  const backends: Backend[] = [];
  afterEach(async () => {
    const errors = backends.flatMap((b) => b.errors().map((l) => `${b.name} ${b.pid}: ${l}`));
    await runCleanups();
    await Promise.all(backends.splice(0).map((b) => b.stop()));
    expect(errors, 'the back-end printed errors on stderr').toEqual([]);
  });
  return backends;
}
