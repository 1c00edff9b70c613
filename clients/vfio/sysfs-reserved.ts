// A PCI device's reserved IOVA ranges as sysfs shows them, read without opening the device:
// /sys/bus/pci/devices/<bdf>/iommu_group/reserved_regions, one line per region of the device's IOMMU group,
// "0x<start> 0x<end> <type>" with an inclusive end (drivers/iommu/iommu.c, iommu_group_show_resv_regions).
// VFIO type1 and iommufd refuse DMA mappings over every type but `direct-relaxable` (vfio_iommu_resv_exclude,
// iopt_table_enforce_dev_resv_regions skip only that one), so those are the ranges the client reports:
// the broker then places no RAM there before the device is even opened (FIND_FREE, COMMIT).
import { isNativeError } from '../../native/index.js';
import { IommuError, type Iova, type Range, asIova } from '../../protocol/index.js';
import { GPA_LAST, mergeRanges } from './iommu-backend.js';
import type { VfioSys } from './sys.js';

/** The sysfs file listing the reserved regions of `bdf`'s IOMMU group. */
export const reservedRegionsPath = (bdf: string) => `/sys/bus/pci/devices/${bdf}/iommu_group/reserved_regions`;

/** Region types VFIO and iommufd still let a device map (RMRRs a device may give up: USB, graphics). */
const MAPPABLE = new Set(['direct-relaxable']);

/**
 * Parses a reserved_regions file: the ranges no DMA mapping may cover, clipped to the 52-bit
 * guest-physical space, sorted and merged. `source` names the file in errors (MMB_ERR_IOMMU).
 */
export function parseReservedRegions(text: string, source: string): Range<Iova>[] {
  const out: Range<Iova>[] = [];
  for (const [i, line] of text.split('\n').entries()) {
    if (line.trim() === '') continue;
    const m = /^0x([0-9a-f]{1,16}) 0x([0-9a-f]{1,16}) ([a-z-]+)$/i.exec(line.trim());
    if (!m) throw new IommuError(`${source}, line ${i + 1}: ${JSON.stringify(line)} is not "0x<start> 0x<end> <type>"`);
    const start = BigInt(`0x${m[1]}`);
    const end = BigInt(`0x${m[2]}`);
    if (end < start) throw new IommuError(`${source}, line ${i + 1}: the region ends before it starts`);
    if (MAPPABLE.has(m[3] as string) || start > BigInt(GPA_LAST)) continue;
    out.push({ start: asIova(Number(start)), size: (end > BigInt(GPA_LAST) ? GPA_LAST : Number(end)) - Number(start) + 1 });
  }
  return mergeRanges(out);
}

/**
 * The reserved ranges of `bdf`'s IOMMU group, or undefined when sysfs has none to say (no such device, no
 * IOMMU group: the device cannot be used through VFIO anyway, and attaching it says why).
 */
export function readReservedRegions(sys: VfioSys, bdf: string): Range<Iova>[] | undefined {
  const file = reservedRegionsPath(bdf);
  let text: string;
  try {
    text = sys.readFile(file);
  } catch (err) {
    if (isNativeError(err, 'ENOENT') || (err as { code?: unknown }).code === 'ENOENT') return undefined;
    throw new IommuError(`cannot read ${file}: ${(err as Error).message}`, { cause: err });
  }
  return parseReservedRegions(text, file);
}
