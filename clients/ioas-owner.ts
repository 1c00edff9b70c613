// The owner's side of the I/O address spaces (feature IOAS, docs/ioas.md): what a VMM's emulated IOMMU
// does with them. create() one per group of devices that share a guest IOMMU domain; a guest's map becomes
// map(), its IOTLB invalidation unmap(), which resolves only when every attached client's host IOMMU (or
// translation table) no longer maps the range; commit() batches many of both into one transaction.
import { Msg, type IoasOp, type IoasResult } from '../protocol/index.js';
import type { OwnerClient } from './owner.js';

export interface IovaMapSpec {
  iova: number;
  gpa: number;
  size: number;
  /** Devices may only read (the guest's IOMMU entry lacks write permission). */
  readonly?: boolean;
}

export class IoasOwner {
  constructor(
    private readonly owner: OwnerClient,
    readonly ioas: string,
  ) {}

  /** Creates the IOAS (empty, generation 0) and returns its handle. */
  static async create(owner: OwnerClient, ioas: string): Promise<IoasOwner> {
    await owner.connection.request({ t: Msg.IOAS, op: 'create', ioas });
    return new IoasOwner(owner, ioas);
  }

  /** Destroys it: refused (MMB_ERR_IOAS_BUSY) while a device is attached or a holder may reach it. */
  async destroy(): Promise<void> {
    await this.owner.connection.request({ t: Msg.IOAS, op: 'destroy', ioas: this.ioas });
  }

  /** One transaction: every unmap, then every map. Resolves once every attached client applied it. */
  commit(ops: readonly IoasOp[], opts: { expect?: number } = {}): Promise<IoasResult> {
    return this.owner.connection.request({
      t: Msg.IOAS,
      op: 'commit',
      ioas: this.ioas,
      ops: [...ops],
      ...(opts.expect !== undefined ? { expect: opts.expect } : {}),
    }) as Promise<IoasResult>;
  }

  map(spec: IovaMapSpec): Promise<IoasResult> {
    return this.commit([{ op: 'map', ...spec }]);
  }

  /** The guest's invalidation: done only when no attached client can reach [iova, iova + size) any more. */
  unmap(iova: number, size: number): Promise<IoasResult> {
    return this.commit([{ op: 'unmap', iova, size }]);
  }
}
