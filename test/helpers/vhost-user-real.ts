// What the tests against real vhost-user back-ends (testkit/backends.ts: qemu-storage-daemon, dpdk-testpmd)
// share: whether each tool is installed (without it the tests are skipped and a warning says so; under
// CI=true that is a failure), a back-end started per test in a temporary directory of its own and stopped
// by PID after it (its stderr checked, helpers/ci.ts trackBackends), the bridge attached to it and closed
// after the test, and the bytes the tests put through it (patterned sectors, Ethernet frames).
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { VhostUserSubscriber, BLK_FEATURES, NET_FEATURES, type VhostUserOptions } from '../../clients/vhost-user/index.js';
import { have, makeImage, patternSector, startQsd, startTestpmd, QSD, TESTPMD, type Backend } from '../../testkit/backends.js';
import { IN_CI, trackBackends } from './ci.js';
import { defer } from './embedded.js';
import { tempDir, waitFor } from './procs.js';

const PACKAGE: Record<string, string> = { [QSD]: 'qemu-system-common', [TESTPMD]: 'dpdk-dev' };

export interface Tool {
  readonly have: boolean;
  /** Why the tests cannot run here (names the package). */
  readonly why: string;
  /** `describe`, skipped without the tool unless CI=true. */
  readonly describe: ReturnType<typeof describe.skipIf>;
}

/** Back-end `cmd` as the file's tests need it; without it, `skipped` (e.g. "vhost-user DPDK tests") is warned as skipped. */
export function tool(cmd: typeof QSD | typeof TESTPMD, skipped: string): Tool {
  const present = have(cmd);
  const why = `${cmd} is not installed (package ${PACKAGE[cmd]}; CI=true makes this a failure)`;
  if (!present && !IN_CI) console.warn(`${skipped} skipped: ${why}`);
  return { have: present, why, describe: describe.skipIf(!present && !IN_CI) };
}

/** Under CI=true, a test named `name` that fails unless every one of `tools` is installed. */
export function ciRequires(name: string, ...tools: Tool[]): void {
  if (!IN_CI) return;
  it(name, () => {
    for (const t of tools) expect(t.have, t.why).toBe(true);
  });
}

/** A temporary directory removed after the test. */
function scratchDir(prefix: string): string {
  const dir = tempDir(prefix);
  defer(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/**
 * Call once at a test file's top level: the back-ends started through what it returns are stopped after
 * each test, and a line on their stderr fails it (trackBackends).
 */
export function realBackends() {
  const tracked = trackBackends();
  return {
    /** qemu-storage-daemon serving DIR/disk.img, a fresh makeImage() image of `sectors` sectors. */
    async qsd(prefix: string, sectors: number): Promise<{ dir: string; image: string; qsd: Backend }> {
      const dir = scratchDir(prefix);
      const image = path.join(dir, 'disk.img');
      makeImage(image, sectors);
      const qsd = await startQsd(dir, image);
      tracked.push(qsd);
      return { dir, image, qsd };
    },
    /**
     * dpdk-testpmd (net_vhost, io forwarding) with its socket in a directory of its own. `linkUp(restarts)`
     * resolves once the device is up after that many ring restarts: net_vhost raises a link-state event
     * when the device is created (the first time, and again after the rings were stopped around a
     * reshape: one when it is destroyed, one when it is created), and raises the "up" one only after it
     * allowed both queues. It allows them one after the other, so a frame sent before that can be taken
     * from TX and dropped for want of an allowed RX queue: that is testpmd's behaviour, not a lost frame.
     */
    async testpmd(
      prefix: string,
      opts: Parameters<typeof startTestpmd>[1] = {},
    ): Promise<{ dir: string; pmd: Backend; linkUp: (restarts: number) => Promise<void> }> {
      const dir = scratchDir(prefix);
      const pmd = await startTestpmd(dir, opts);
      tracked.push(pmd);
      let out = '';
      pmd.proc.stdout?.on('data', (d: string | Buffer) => (out += String(d)));
      const events = () => out.match(/Port 0: link state change event/g)?.length ?? 0;
      const linkUp = async (restarts: number): Promise<void> =>
        void (await waitFor(`dpdk-testpmd's port up after ${restarts} ring restarts`, () => events() >= 1 + 2 * restarts, 20_000));
      return { dir, pmd, linkUp };
    },
  };
}

/** The bridge's options for a virtio-net device on dpdk-testpmd (slower to answer its first connection). */
export const NET_BRIDGE = { name: 'vhost-user-net0', virtioFeatures: NET_FEATURES, connectTimeoutMs: 10_000 } as const;

/**
 * The vhost-user bridge between `broker`'s space vm0 and `backend`: a virtio-blk device named vhost-user-blk0
 * with a 5 s back-end deadline and no reconnect unless `opts` says otherwise. Closed after the test.
 */
export async function bridgeTo(broker: Parameters<typeof VhostUserSubscriber.attach>[0], backend: Backend, opts: Partial<VhostUserOptions> = {}) {
  const sub = await VhostUserSubscriber.attach(broker, {
    space: 'vm0',
    name: 'vhost-user-blk0',
    backendSocket: backend.socket,
    virtioFeatures: BLK_FEATURES,
    reconnect: false,
    backendTimeoutMs: 5000,
    ...opts,
  });
  defer(() => sub.close());
  return sub;
}

/** Sectors `first`.. `first + count - 1` of a makeImage() image, as they are on disk. */
export function patternSectors(first: number, count: number): Buffer {
  return Buffer.concat(Array.from({ length: count }, (_, i) => patternSector(first + i)));
}

/** A 60-byte broadcast Ethernet frame carrying `marker`. */
export function ethFrame(marker: string): Buffer {
  const f = Buffer.alloc(60);
  f.fill(0xff, 0, 6); // destination: broadcast
  Buffer.from([0x02, 0x00, 0x00, 0x00, 0x00, 0x01]).copy(f, 6);
  f.writeUInt16BE(0x88b5, 12); // IEEE local experimental EtherType
  Buffer.from(marker).copy(f, 14);
  return f;
}
