// What a client that maps each region's backing from offset 0 may be given (feature MAPS_FROM_ZERO).
//
// A vhost-user back-end is handed a region as (fd, mmap_offset, size). DPDK (lib/vhost's
// vhost_user_mmap_region; 22.11 here) and libvhost-user before QEMU 9.0 (qemu-storage-daemon 7.2, as
// Debian bookworm ships it) map the fd from offset 0 over mmap_offset + size, writable, and no front-end
// can narrow that mapping; libvhost-user since 9.0 and rust-vmm's vhost crate map only the region. So such
// a client reaches the backing's prefix [0, offset) of every region it is given, not only the region. The
// broker keeps that prefix inside what the map gives it writable: the writable regions of each backing
// (read-only regions are never given to such a client) must cover the backing from offset 0 without a
// gap. A read-only region in the prefix would be writable to the back-end;
// a gap may hold a removed region's memory, which the back-end would keep mapped after "done".
//
// The broker checks this before anything is sent (broker/policy.ts), the harness predicts it.

/** The fields of a region the rule looks at (a wire Region has them; offsets as plain numbers). */
export interface PrefixRegion {
  name: string;
  backing: number;
  offset: number;
  size: number;
  readonly: boolean;
}

/** A region whose backing prefix holds memory no writable region covers. */
export interface PrefixExposure {
  /** The writable region that would expose it. */
  region: string;
  backing: number;
  /** The first uncovered byte range of the backing before the region, [start, end). */
  start: number;
  end: number;
  /** A read-only region lying in that range, if one does (else that memory is in no region). */
  readonlyThere?: string;
}

/**
 * The first region (by backing id, then offset) of `regions` whose backing prefix a client mapping from
 * offset 0 would reach beyond the writable regions, or undefined when there is none. `only`: look at these
 * backings alone (those a transaction touches: the others did not change).
 */
export function exposedPrefix(regions: Iterable<PrefixRegion>, only?: ReadonlySet<number>): PrefixExposure | undefined {
  const writable = new Map<number, PrefixRegion[]>();
  const readonly = new Map<number, PrefixRegion[]>();
  for (const r of regions) {
    if (only && !only.has(r.backing)) continue;
    const by = r.readonly ? readonly : writable;
    const list = by.get(r.backing);
    if (list) list.push(r);
    else by.set(r.backing, [r]);
  }
  for (const backing of [...writable.keys()].sort((a, b) => a - b)) {
    const list = (writable.get(backing) as PrefixRegion[]).sort((a, b) => a.offset - b.offset);
    let covered = 0;
    for (const r of list) {
      if (r.offset > covered) {
        const start = covered;
        const end = r.offset;
        const there = readonly.get(backing)?.find((x) => x.offset < end && x.offset + x.size > start);
        return { region: r.name, backing, start, end, ...(there ? { readonlyThere: there.name } : {}) };
      }
      covered = Math.max(covered, r.offset + r.size);
    }
  }
  return undefined;
}
