import { defineConfig } from 'vitest/config';

// Tests use real processes, sockets, mappings and pins: run files in separate forked processes
// (a native addon and its uv handles stay per process) and give them time on a 2-core machine.
export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    pool: 'forks',
    maxWorkers: 2,
    testTimeout: 60_000,
    hookTimeout: 60_000,
    reporters: ['default'],
  },
});
