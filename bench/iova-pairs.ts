// The workload of the guest-IOMMU benchmarks (ioas.ts, ioas-vhost-user.ts): IOVA map + unmap pairs of
// 4 KiB pages through an IOAS, batched or one transaction each, over a window of pages that wraps.
import { execFileSync } from 'node:child_process';
import type { IoasOwner } from '../clients/ioas-owner.js';
import type { IoasOp } from '../protocol/index.js';

export const PAGE = 4096;
/** Pages the pairs cycle through: 8 MiB. */
export const WINDOW = 2048;
/** Where the IOVAs start (the C peer's too: vhu-front.c IOVA_BASE). */
export const IOVA_BASE = 0x1_0000_0000;

export const map = (p: number): IoasOp => ({ op: 'map', iova: IOVA_BASE + p * PAGE, gpa: p * PAGE, size: PAGE });
export const unmap = (p: number): IoasOp => ({ op: 'unmap', iova: IOVA_BASE + p * PAGE, size: PAGE });

/** Pins every thread of process `pid` to `cpus`. */
export const pin = (pid: number, cpus: string): void => void execFileSync('taskset', ['-a', '-cp', cpus, String(pid)], { stdio: 'ignore' });

/**
 * The three steps the benchmarks time: `batchStep` (one transaction: the previous step's `batch` pages
 * out, the next ones in), `drain` (the last batch out, so the next round starts empty) and `pair` (a map
 * transaction, then an unmap transaction, of one page).
 */
export function iovaPairs(io: IoasOwner, batch: number) {
  let step = 0;
  let page = 0;
  return {
    batchStep: async (): Promise<void> => {
      const first = (step * batch) % WINDOW;
      const prev = ((step - 1) * batch + WINDOW) % WINDOW;
      const ops: IoasOp[] = [];
      if (step > 0) for (let i = 0; i < batch; i++) ops.push(unmap((prev + i) % WINDOW));
      for (let i = 0; i < batch; i++) ops.push(map((first + i) % WINDOW));
      step++;
      await io.commit(ops);
    },
    drain: async (): Promise<void> => {
      if (step === 0) return;
      const prev = ((step - 1) * batch) % WINDOW;
      await io.commit(Array.from({ length: batch }, (_, i) => unmap((prev + i) % WINDOW)));
      step = 0;
    },
    pair: async (): Promise<void> => {
      const p = page;
      page = (page + 1) % WINDOW;
      await io.commit([map(p)]);
      await io.commit([unmap(p)]);
    },
  };
}
