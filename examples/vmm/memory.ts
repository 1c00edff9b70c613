// Guest memory as the VMM owns it: one memfd for RAM and one per DIMM, each registered once with the
// broker as a backing, and every change of the map made as one transaction.
//
// Who closes what (docs/embedding.md, "Ownership of memfds"):
//   - The VMM creates each memfd (sealed against shrinking, inode mode 0) and keeps its own descriptor.
//     BACKING_ADD gives the broker a dup; every subscriber gets its own copy from the broker.
//   - A commit that removed a DIMM answers with `unreferenced`: backings no region uses and no unfenced
//     client can reach any more. Only then is the DIMM's memory free: the VMM drops the backing (the
//     broker closes its copy, subscribers are told to close theirs) and closes its own descriptor.
//   - A refused commit changed nothing: the memfds made for it are dropped and closed at once.
//   - MMB_ERR_COMMITTED_UNFENCED: the change happened (the generation advanced), but a client that failed
//     to finish it could not be fenced and may still reach the removed memory. The VMM updates its
//     books, closes its own descriptor (it never reuses a DIMM's memfd: each DIMM gets a fresh one) and
//     reports the error; the kernel frees the pages when the last holder lets go.
//   - Memory a migration brought in was registered by the migration's owner connection, not by this VMM:
//     it has no descriptor here (fd undefined); its broker holds it while regions use it.
import {
  InternalError,
  InvalidArgError,
  NoRegionError,
  RegionExistsError,
  isMmbError,
  native,
  type CommitOp,
  type CommitResult,
  type OwnerClient,
  type Region,
} from '../../index.js';
import { DIMM_ALIGN, HOTPLUG_MAX, HOTPLUG_MIN, MIN_DIMM, RAM_GPA, hex } from './layout.js';

/** A block of guest memory: RAM, or a DIMM. */
export interface Block {
  id: string;
  gpa: number;
  size: number;
  backing: number;
  /** The VMM's own descriptor of the memfd; undefined for memory a migration brought in. */
  fd: number | undefined;
}

export type Action = { type: 'dimm-add'; id: string; size: number; gpa?: number } | { type: 'dimm-del'; id: string };

/** What a list of actions does to the map, resolved: where new DIMMs go, which ones go away. */
export interface Plan {
  adds: { id: string; size: number; gpa: number }[];
  dels: Block[];
  /** Removed and added at the same gpa and size in this transaction: the guest never sees a hole there. */
  replaced: { from: Block; to: string }[];
}

/** A plan whose new memfds exist and are registered. */
export interface Prepared extends Plan {
  created: Block[];
}

export class MachineMemory {
  ram: Block | undefined;
  readonly dimms = new Map<string, Block>();

  constructor(
    private readonly owner: OwnerClient,
    /** Huge pages for every block: true for the default size, or a page size in bytes. */
    readonly hugetlb: true | number | undefined,
  ) {}

  /** Every block's gpa, size and offset must be a multiple of this (the broker refuses others). */
  get pageSize(): number {
    return this.hugetlb === undefined ? 4096 : this.hugetlb === true ? 2 ** 21 : this.hugetlb;
  }

  /** Creates RAM at gpa 0: one memfd, one backing, one transaction. */
  async addRam(size: number): Promise<void> {
    const [ram] = await this.createBlocks([{ id: 'ram', size, gpa: RAM_GPA }]);
    try {
      await this.owner.commit([addOp(ram as Block)]);
    } catch (err) {
      await this.release([ram as Block]);
      throw err;
    }
    this.ram = ram;
  }

  /** After a migration: the blocks the map already has, by name ('ram' and the DIMMs the source named). */
  adopt(regions: readonly Region[], dimmIds: readonly string[]): void {
    for (const r of regions) {
      const block = { id: r.name, gpa: r.gpa, size: r.size, backing: r.backing, fd: undefined };
      if (r.name === 'ram') this.ram = block;
      else if (dimmIds.includes(r.name)) this.dimms.set(r.name, block);
    }
  }

  /**
   * Resolves actions into a plan without changing anything: a removed DIMM must exist, a new one must have
   * a new name and a size of whole pages; a DIMM without a gpa is placed by FIND_FREE in the hotplug window
   * (the broker knows every region and every range a device reported as reserved), away from the others
   * this same transaction adds.
   */
  async plan(actions: readonly Action[]): Promise<Plan> {
    if (actions.length === 0) throw new InvalidArgError('a transaction needs at least one action');
    const plan: Plan = { adds: [], dels: [], replaced: [] };
    const ids = new Set<string>();
    for (const a of actions) {
      if (ids.has(a.id)) throw new InvalidArgError(`DIMM ${JSON.stringify(a.id)} appears twice in one transaction`);
      ids.add(a.id);
      if (a.type === 'dimm-del') {
        const d = this.dimms.get(a.id);
        if (!d) throw new NoRegionError(`no DIMM ${JSON.stringify(a.id)}`);
        plan.dels.push(d);
        continue;
      }
      if (a.id === 'ram' || this.dimms.has(a.id)) throw new RegionExistsError(`a block called ${JSON.stringify(a.id)} exists already`);
      if (!Number.isSafeInteger(a.size) || a.size < Math.max(MIN_DIMM, this.pageSize) || a.size % this.pageSize !== 0) {
        throw new InvalidArgError(`DIMM ${JSON.stringify(a.id)}: ${a.size} bytes is not a whole number of ${this.pageSize}-byte pages of at least ${MIN_DIMM}`);
      }
      plan.adds.push({ id: a.id, size: a.size, gpa: a.gpa ?? (await this.place(a.size, plan.adds)) });
    }
    for (const d of plan.dels) {
      const to = plan.adds.find((a) => a.gpa === d.gpa && a.size === d.size);
      if (to) plan.replaced.push({ from: d, to: to.id });
    }
    return plan;
  }

  /** The lowest free range of the window that none of `taken` (this transaction's other adds) overlaps. */
  private async place(size: number, taken: readonly { gpa: number; size: number }[]): Promise<number> {
    const align = Math.max(DIMM_ALIGN, this.pageSize);
    let min = HOTPLUG_MIN;
    for (;;) {
      const gpa = await this.owner.findFree(size, { align, min, max: HOTPLUG_MAX });
      const clash = taken.find((t) => gpa < t.gpa + t.size && t.gpa < gpa + size);
      if (!clash) return gpa;
      min = Math.ceil((clash.gpa + clash.size) / align) * align;
    }
  }

  /** Creates and registers a memfd for every DIMM the plan adds. */
  async prepare(plan: Plan): Promise<Prepared> {
    return { ...plan, created: await this.createBlocks(plan.adds) };
  }

  /**
   * Commits the prepared plan as one transaction: every removal and every addition, or nothing. Resolves
   * once every subscriber applied it (memslots, the back-end's memory table, the device's IOMMU mappings);
   * then the removed DIMMs' memory is released. On a refusal nothing changed: the new memfds are released
   * and the typed error (err.code, err.client: who refused) is thrown.
   */
  async commit(p: Prepared): Promise<CommitResult> {
    const ops: CommitOp[] = [...p.dels.map((d): CommitOp => ({ op: 'remove', region: d.id })), ...p.created.map(addOp)];
    let result: CommitResult;
    try {
      result = await this.owner.commit(ops);
    } catch (err) {
      if (!isMmbError(err, 'MMB_ERR_COMMITTED_UNFENCED')) {
        await this.release(p.created);
        throw err;
      }
      // Committed, but a client that failed to finish may still reach the removed memory: the books follow
      // the map, and the memfds are let go of without ever being reused.
      this.record(p);
      await this.release(p.dels);
      throw err;
    }
    this.record(p);
    // Success means every holder let go, so each removed DIMM is unreferenced; one that is not would be a
    // broken promise: its memfd is kept (never reused) and the commit reported as failed.
    const unreferenced = new Set(result.unreferenced);
    await this.release(p.dels.filter((d) => unreferenced.has(d.backing)));
    const held = p.dels.filter((d) => !unreferenced.has(d.backing));
    if (held.length > 0)
      throw new InternalError(`removed DIMMs ${held.map((d) => d.id).join(', ')} were not reported unreferenced by generation ${result.generation}`);
    return result;
  }

  /** A plan that will not be committed: releases what prepare() made. */
  discard(p: Prepared): Promise<void> {
    return this.release(p.created);
  }

  private record(p: Prepared): void {
    for (const d of p.dels) this.dimms.delete(d.id);
    for (const b of p.created) this.dimms.set(b.id, b);
  }

  private async createBlocks(specs: readonly { id: string; size: number; gpa: number }[]): Promise<Block[]> {
    const made: Block[] = [];
    try {
      for (const s of specs) {
        const b = await this.owner.createBacking(s.size, s.id, this.hugetlb === undefined ? {} : { hugetlb: this.hugetlb });
        made.push({ id: s.id, gpa: s.gpa, size: s.size, backing: b.backing, fd: b.fd });
      }
    } catch (err) {
      await this.release(made);
      throw err;
    }
    return made;
  }

  /** Drops the backings (the broker closes its copies once no region uses them) and closes the VMM's fds. */
  private async release(blocks: readonly Block[]): Promise<void> {
    for (const b of blocks) {
      if (b.fd === undefined) continue;
      await this.owner.dropBacking(b.backing).catch(() => undefined);
      native.close(b.fd);
      b.fd = undefined;
    }
  }

  /** Closes the VMM's own descriptors (the broker and the subscribers close theirs when they go). */
  close(): void {
    for (const b of [this.ram, ...this.dimms.values()]) {
      if (b?.fd !== undefined) native.close(b.fd);
      if (b) b.fd = undefined;
    }
  }

  describe(b: Block): { id: string; gpa: string; size: number; backing: number; ownFd: boolean } {
    return { id: b.id, gpa: hex(b.gpa), size: b.size, backing: b.backing, ownFd: b.fd !== undefined };
  }
}

function addOp(b: Block): CommitOp {
  return { op: 'add', name: b.id, gpa: b.gpa, size: b.size, backing: b.backing, offset: 0 };
}
