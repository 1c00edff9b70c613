// One host IOMMU domain shadowing one I/O address space of the broker (shadow mode, docs/ioas.md): the
// devices attached to that IOAS share it, and it maps exactly what the guest's IOMMU maps, IOVA -> the
// client's mapping of the guest-physical page, pinned by the kernel (type1 / iommufd) or with counted
// mlock (soft). Pinned bytes = mapped bytes, not RAM: pages no IOVA points at are never pinned.
//
// A change (clients/ioas-view.ts), all or nothing where it can be:
//   1. refusals that need no work: a reserved IOVA range, guest memory this client has not mapped;
//   2. unmapped mappings are unmapped from the host IOMMU (and unpinned), every one tried. After this the
//      device can no longer reach them: the ack the subscriber sends next promises exactly that. A failure
//      here cannot be undone and is thrown (the broker evicts a client that fails an unmap);
//   3. mapped mappings are claimed (IOVA table, DMA budget), then pinned and mapped, in one batch where the
//      backend can (soft: one mlock per run of pages); a failure undoes them, maps the unmapped ones again
//      (a re-sync that failed halfway), and is thrown, leaving the domain as it was.
import {
  NoRegionError,
  ReservedRangeError,
  type Iova,
  type IovaMapping,
  type Range,
  asHva,
  hex,
  inclusiveText,
  rangeContains,
  rangeEnd,
  rangeText,
} from '../../protocol/index.js';
import { CHUNK_BYTES, type GuestMemory } from '../memory.js';
import type { IoasChange } from '../ioas-view.js';
import { clash, mergeRanges, type DomainLimits, type IommuBackend, type Piece } from './iommu-backend.js';
import { pinPieces, unpinPieces } from './pinning.js';

interface Entry {
  m: IovaMapping;
  pieces: Piece[];
}

export interface IoasDomainOptions {
  /** Bytes per pinning call, at most. */
  chunkBytes: number;
  /** Reserved ranges to add to what the backend reports (hardware backends). */
  extraReserved?: readonly Range<Iova>[];
}

export class IoasDomain {
  private readonly table = new Map<number, Entry>();
  private bytes = 0;

  constructor(
    readonly ioas: string,
    readonly backend: IommuBackend,
    private readonly opts: IoasDomainOptions,
  ) {}

  get active(): boolean {
    return this.backend.active;
  }

  get devices(): readonly string[] {
    return this.backend.devices;
  }

  /** Bytes of IOVA mappings made (what a hardware IOMMU pins: the kernel counts each mapping). */
  get mappedBytes(): number {
    return this.bytes;
  }

  mappings(): IovaMapping[] {
    return [...this.table.values()].map((e) => e.m).sort((a, b) => a.iova - b.iova);
  }

  limits(): DomainLimits & { reserved: Range<Iova>[] } {
    const l = this.backend.limits();
    return { ...l, reserved: mergeRanges([...(l.reserved ?? []), ...(this.opts.extraReserved ?? [])]) };
  }

  async apply(change: IoasChange, memory: GuestMemory): Promise<void> {
    const reserved = change.mapped.length > 0 ? this.limits().reserved : [];
    const made = change.mapped.map((m): Entry => {
      const x = clash(reserved, m.iova, m.size);
      if (x)
        throw new ReservedRangeError(
          `IOAS ${JSON.stringify(this.ioas)}: IOVA ${rangeText(m.iova, m.size)} covers ${inclusiveText(x.start, x.size)}, reserved in the ${this.backend.name} IOMMU domain`,
        );
      return { m, pieces: this.pieces(m, memory) };
    });
    const gone = change.unmapped.map((m) => this.table.get(m.iova)).filter((e): e is Entry => e !== undefined);
    await this.unmapEntries(gone);
    try {
      await this.mapEntries(made);
    } catch (err) {
      await this.mapEntries(gone).catch(() => undefined);
      throw err;
    }
  }

  /** Unmaps everything (the IOAS's last device is leaving, or the client is closing). */
  async unmapAll(): Promise<void> {
    await this.unmapEntries([...this.table.values()]);
  }

  /**
   * The pieces of `m`: the client's host mapping of the guest memory it points at, cut at GuestMemory's
   * 1 GiB chunks and at `chunkBytes`. MMB_ERR_NO_REGION when this client has not mapped that memory.
   */
  private pieces(m: IovaMapping, memory: GuestMemory): Piece[] {
    const r = memory.regionAt(m.gpa);
    if (!r || !rangeContains(r.region.gpa, r.region.size, m.gpa, m.size)) {
      throw new NoRegionError(
        `IOAS ${JSON.stringify(this.ioas)}: IOVA ${hex(m.iova)} points at gpa ${rangeText(m.gpa, m.size)}, which this client has not mapped`,
      );
    }
    const out: Piece[] = [];
    let off = m.gpa - r.region.gpa;
    for (let done = 0; done < m.size;) {
      const k = Math.floor(off / CHUNK_BYTES);
      const at = off - k * CHUNK_BYTES;
      const chunk = r.chunks[k];
      if (!chunk) throw new NoRegionError(`IOAS ${JSON.stringify(this.ioas)}: gpa ${hex(m.gpa + done)} is not mapped here`);
      const n = Math.min(m.size - done, CHUNK_BYTES - at, this.opts.chunkBytes);
      out.push({ iova: rangeEnd(m.iova, done), size: n, vaddr: asHva(chunk.mapping.address + at), mapping: chunk.mapping, offset: at, readonly: m.readonly });
      done += n;
      off += n;
    }
    return out;
  }

  private async mapEntries(entries: readonly Entry[]): Promise<void> {
    if (entries.length === 0) return;
    const claimed: Entry[] = [];
    try {
      for (const e of entries) {
        this.backend.claim(e.m.iova, e.m.size, e.pieces.length);
        claimed.push(e);
      }
      const all = entries.flatMap((e) => e.pieces);
      if (this.backend.mapMany) await this.backend.mapMany(all);
      else await pinPieces(this.backend, all);
    } catch (err) {
      for (const e of claimed) this.backend.release(e.m.iova, e.m.size);
      throw err;
    }
    for (const e of entries) {
      this.table.set(e.m.iova, e);
      this.bytes += e.m.size;
    }
  }

  private async unmapEntries(entries: readonly Entry[]): Promise<void> {
    if (entries.length === 0) return;
    // Whatever happens, the entries go: a failed unmap leaves nothing we could retry meaningfully.
    for (const e of entries) {
      this.table.delete(e.m.iova);
      this.bytes -= e.m.size;
    }
    try {
      const all = entries.flatMap((e) => e.pieces);
      if (this.backend.unmapMany) await this.backend.unmapMany(all);
      else await unpinPieces(this.backend, all);
    } finally {
      for (const e of entries) this.backend.release(e.m.iova, e.m.size);
    }
  }
}
