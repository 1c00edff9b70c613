// What a harness run is given. Everything here is part of the replay: the same options and seed give the
// same operations and faults.
import { InvalidArgError } from '../protocol/index.js';

/**
 * `bridge`: the vhost-user bridge (testkit's scripted `vhost-user` client) driving a real
 * qemu-storage-daemon of its own (--bridge N); `shadow`: a vfio client (soft) in shadow mode, its devices in
 * the harness's I/O address spaces, pinning only what they map (--ioas).
 */
export const CLIENT_KINDS = ['kvm', 'vhost', 'vfio', 'plain', 'bridge', 'shadow'] as const;
export type ClientKind = (typeof CLIENT_KINDS)[number];

export const MIB = 2 ** 20;
/** Hugetlb page sizes --hugetlb takes. */
export const HUGETLB_SIZES = [2 * MIB, 2 ** 30] as const;

export interface HarnessOptions {
  seed: number;
  steps: number;
  /** Client processes to start with, by kind; joins and leaves keep the population near these counts. */
  clients: Partial<Record<ClientKind, number>>;
  /** Probability that a step is a fault rather than a plain operation, in [0, 1]. */
  faultRate: number;
  /** Probability that an added region is 1 GiB (sparse; pinned in full by every vfio-like client). */
  gigRate: number;
  /** Most bytes of guest memory the map may hold at once (adds beyond it become removals). */
  maxMapBytes: number;
  /** The broker's ack deadline (`serve --ack-timeout`): how long a stalled client holds up a change. */
  ackTimeoutMs: number;
  /**
   * Hugetlb page size (2 MiB or 1 GiB; 0: none). Regions of that alignment class are backed by
   * MFD_HUGETLB memfds of it (the others stay ordinary memfds); the pages are reserved in the kernel's
   * pool for the run and given back after it.
   */
  hugetlb: number;
  /** I/O address spaces: IOAS operations and faults, and the `shadow` clients attached to them. */
  ioas: boolean;
  /** The broker's pipeline window (`serve --pipeline`, feature PIPELINE); absent: one transaction at a time. */
  pipeline?: number;
  /** Plant deliberately broken clients (one skips its unmap, one pins twice): the checks must fail. */
  selfTest: boolean;
  /** Called after every step with its one-line description, and with a line for each violation it found (replay logs, --trace). */
  onStep?: (line: string) => void;
}

export const DEFAULT_OPTIONS: Readonly<Omit<HarnessOptions, 'onStep'>> = Object.freeze({
  seed: 1,
  steps: 300,
  clients: Object.freeze({ kvm: 1, vhost: 2, vfio: 2 }),
  faultRate: 0.1,
  gigRate: 0.005,
  maxMapBytes: 3 * 2 ** 30,
  ackTimeoutMs: 3000,
  hugetlb: 0,
  ioas: false,
  selfTest: false,
});

/** "kvm:1,vhost:2,vfio:2" -> { kvm: 1, vhost: 2, vfio: 2 }. */
export function parseClients(text: string): Partial<Record<ClientKind, number>> {
  const out: Partial<Record<ClientKind, number>> = {};
  for (const part of text
    .split(',')
    .map((p) => p.trim())
    .filter(Boolean)) {
    const m = /^([a-z]+):(\d+)$/.exec(part);
    if (!m) throw new InvalidArgError(`--clients ${JSON.stringify(text)}: expected KIND:COUNT[,KIND:COUNT...] (kinds: ${CLIENT_KINDS.join(', ')})`);
    const kind = m[1] as ClientKind;
    if (!CLIENT_KINDS.includes(kind)) throw new InvalidArgError(`--clients: unknown kind ${JSON.stringify(m[1])} (kinds: ${CLIENT_KINDS.join(', ')})`);
    const n = Number(m[2]);
    if (n > 16) throw new InvalidArgError(`--clients: at most 16 clients of one kind, got ${n} ${kind}`);
    out[kind] = n;
  }
  const total = Object.values(out).reduce((a, b) => a + b, 0);
  if (total < 2) throw new InvalidArgError('--clients: at least two client processes (one writes, another reads back)');
  return out;
}

export function checkOptions(o: HarnessOptions): void {
  const int = (v: number, what: string, lo: number, hi: number) => {
    if (!Number.isSafeInteger(v) || v < lo || v > hi) throw new InvalidArgError(`${what} must be an integer in [${lo}, ${hi}], got ${v}`);
  };
  int(o.seed, 'seed', 0, 0xffff_ffff);
  int(o.steps, 'steps', 0, 10_000_000);
  int(o.ackTimeoutMs, 'ackTimeoutMs', 200, 600_000);
  int(o.maxMapBytes, 'maxMapBytes', 2 ** 20, 2 ** 40);
  for (const [v, what] of [
    [o.faultRate, 'faultRate'],
    [o.gigRate, 'gigRate'],
  ] as const) {
    if (!(v >= 0 && v <= 1)) throw new InvalidArgError(`${what} must be in [0, 1], got ${v}`);
  }
  for (const [kind, n] of Object.entries(o.clients)) int(n, `clients of kind ${kind}`, 0, 16);
  if (o.hugetlb !== 0 && !(HUGETLB_SIZES as readonly number[]).includes(o.hugetlb))
    throw new InvalidArgError(`hugetlb must be 2M or 1G (the kernel's hugetlb page sizes here), got ${o.hugetlb}`);
  if ((o.clients.shadow ?? 0) > 0 && !o.ioas)
    throw new InvalidArgError('--clients shadow:N needs --ioas (shadow-mode vfio clients attach their devices to I/O address spaces)');
}
