// Pinning a region in pieces: one mlock / MAP_DMA / IOAS_MAP call per piece, each on a libuv worker
// thread, so a region of many gigabytes never blocks the event loop, reports progress as it goes, and
// can stop between two pieces:
//   - `signal` aborted (the broker rolled the change back, or the subscriber is closing): undo the pieces
//     done, throw MMB_ERR_CANCELLED;
//   - `cancelled()` true (a queued transaction removes this region): undo the pieces done, report
//     'cancelled' and let the caller carry on with the rest of the change;
//   - a piece fails: undo the pieces done, throw that failure.
// "Undo" unmaps the pieces in reverse order; nothing of the region stays pinned.
import { CancelledError, asHva, iovaOfGpa, rangeEnd, toMmbError } from '../../protocol/index.js';
import { PAGE_SIZE } from '../../native/index.js';
import type { MappedRegion } from '../memory.js';
import type { IommuBackend, Piece } from './iommu-backend.js';

/** Default bytes per piece: 128 MiB (a pinning call of ~30-60 ms on 4 KiB pages). */
export const DEFAULT_PIN_CHUNK_BYTES = 128 * 2 ** 20;

/**
 * Cuts a mapped region into pieces of at most `chunkBytes` that never cross one of GuestMemory's chunk
 * mappings (mlock works on one Mapping). IOVA = GPA.
 */
export function pieces(m: MappedRegion, chunkBytes: number): Piece[] {
  if (!Number.isSafeInteger(chunkBytes) || chunkBytes < PAGE_SIZE || chunkBytes % PAGE_SIZE !== 0) {
    throw new RangeError(`pin chunk of ${chunkBytes} bytes is not a positive multiple of the page size`);
  }
  const out: Piece[] = [];
  let regionOffset = 0;
  for (const c of m.chunks) {
    const length = c.mapping.length;
    for (let off = 0; off < length; off += chunkBytes) {
      const size = Math.min(chunkBytes, length - off);
      out.push({
        iova: iovaOfGpa(rangeEnd(m.region.gpa, regionOffset + off)),
        size,
        vaddr: asHva(c.mapping.address + off),
        mapping: c.mapping,
        offset: off,
        readonly: m.region.readonly,
      });
    }
    regionOffset += length;
  }
  return out;
}

export interface PinControl {
  signal?: AbortSignal;
  /** Checked before each piece: true stops this region (undone), without failing the caller. */
  cancelled?: () => boolean;
  /** After each piece: bytes done of total. */
  onProgress?: (done: number, total: number) => void;
}

/**
 * Maps `list` piece by piece through `backend`. Resolves 'done', or 'cancelled' (nothing left mapped);
 * rejects with MMB_ERR_CANCELLED on abort or with the failure (nothing left mapped either way).
 */
export async function pinPieces(backend: IommuBackend, list: readonly Piece[], ctl: PinControl = {}): Promise<'done' | 'cancelled'> {
  const total = list.reduce((n, p) => n + p.size, 0);
  let done = 0;
  let count = 0;
  try {
    for (const p of list) {
      if (ctl.signal?.aborted) throw ctl.signal.reason ?? new CancelledError('pinning was cancelled');
      if (ctl.cancelled?.()) {
        await unpinPieces(backend, list.slice(0, count));
        return 'cancelled';
      }
      await backend.map(p);
      count++;
      done += p.size;
      ctl.onProgress?.(done, total);
    }
    return 'done';
  } catch (err) {
    await unpinPieces(backend, list.slice(0, count)).catch(() => undefined);
    throw ctl.signal?.aborted ? toMmbError(ctl.signal.reason ?? err, 'MMB_ERR_CANCELLED') : err;
  }
}

/** Unmaps pieces in reverse order; tries every one and throws the first failure afterwards. */
export async function unpinPieces(backend: IommuBackend, list: readonly Piece[]): Promise<void> {
  let first: unknown;
  for (let i = list.length - 1; i >= 0; i--) {
    try {
      await backend.unmap(list[i] as Piece);
    } catch (err) {
      first ??= err;
    }
  }
  if (first !== undefined) throw first;
}
