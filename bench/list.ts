// The benchmarks `npm run bench` runs, in that order (bench/all.ts), and the report's sections follow
// (bench/report.ts); test/bench.test.ts runs a short version of each one of them.
export const BENCHES = [
  'fanout',
  'throughput',
  'translate',
  'scale',
  'pinning',
  'dirty-sync',
  'ioas',
  'ioas-vhost-user',
  'migration',
  'vhost-user',
  'qemu-hotplug',
] as const;
export type BenchName = (typeof BENCHES)[number];
