// The peer of every map-update benchmark (vhost-user.ts, fanout.ts), in one place: a minimal C vhost-user
// front-end (bench/c/vhu-front.c, built here with the system cc) doing ADD_MEM_REG / REM_MEM_REG round
// trips, each waiting for its reply-ack, against real qemu-storage-daemon back-ends:
//   - 'rt': one back-end, one round trip per update;
//   - 'serial': N back-ends served one after the other, as QEMU's memory listener does (the update is
//     done when the last back-end acked).
// Each of those back-ends mmaps the region on ADD_MEM_REG and munmaps it on REM_MEM_REG, as a mapping
// subscriber does.
import { spawnSync } from 'node:child_process';
import path from 'node:path';
import { buildC, have } from './lib.js';
import { makeImage, startQsd, QSD, type Backend } from './vhost-user-backends.js';

/** Per-iteration nanoseconds of each kind of update. */
export interface RoundTrips {
  add: number[];
  rem: number[];
}
export const noTrips = (): RoundTrips => ({ add: [], rem: [] });
export function addTrips(into: RoundTrips, s: RoundTrips): void {
  into.add.push(...s.add);
  into.rem.push(...s.rem);
}

export interface PeerRun {
  iterations: number;
  warmup: number;
  /** Run under `taskset -c CPUS`. */
  cpus?: string;
}

export class CFrontEnd {
  private constructor(readonly bin: string) {}

  /** Builds the C front-end into `dir`; throws with the install command when a part is missing. */
  static build(dir: string): CFrontEnd {
    if (!have(QSD)) throw new Error(`${QSD} is not installed (apt-get install qemu-system-common)`);
    if (!have('taskset')) throw new Error('taskset is needed (apt-get install util-linux)');
    return new CFrontEnd(buildC('vhu-front', dir));
  }

  /** `rt` needs one socket; `serial` sends each update to every socket in turn. */
  run(mode: 'rt' | 'serial', sockets: readonly string[], o: PeerRun): RoundTrips {
    const args = [mode, ...sockets.flatMap((s) => ['--socket', s]), '--iterations', String(o.iterations), '--warmup', String(o.warmup)];
    const argv = o.cpus !== undefined ? ['taskset', '-c', o.cpus, this.bin, ...args] : [this.bin, ...args];
    const r = spawnSync(argv[0] as string, argv.slice(1), { encoding: 'utf8', maxBuffer: 64 << 20 });
    if (r.status !== 0) throw new Error(`vhu-front ${mode} failed: ${r.stderr}`);
    const j = JSON.parse(r.stdout) as { add_ns: number[]; rem_ns: number[] };
    return { add: j.add_ns, rem: j.rem_ns };
  }
}

/** The image every back-end exports (2048 sectors). */
export function backendImage(dir: string): string {
  const image = path.join(dir, 'disk.img');
  makeImage(image, 2048);
  return image;
}

/** `n` qemu-storage-daemons exporting `image`, sockets DIR/PREFIX-i.sock. */
export async function startBackends(dir: string, image: string, n: number, prefix: string, cpus?: string): Promise<Backend[]> {
  const out: Backend[] = [];
  try {
    for (let i = 0; i < n; i++) out.push(await startQsd(dir, image, { name: `${prefix}-${i}`, ...(cpus !== undefined ? { cpus } : {}) }));
  } catch (err) {
    await stopBackends(out);
    throw err;
  }
  return out;
}

/** Stops them and throws if any of them complained on stderr. */
export async function stopBackends(backends: readonly Backend[]): Promise<void> {
  await Promise.all(backends.map((b) => b.stop()));
  const errors = backends.flatMap((b) => b.errors());
  if (errors.length > 0) throw new Error(`qemu-storage-daemon: ${errors.join('\n')}`);
}

export function qsdVersion(): string {
  return spawnSync(QSD, ['--version'], { encoding: 'utf8' }).stdout.split('\n')[0] ?? 'unknown';
}
