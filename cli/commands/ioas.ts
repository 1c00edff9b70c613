import { OwnerClient } from '../../clients/index.js';
import { IoasOwner } from '../../clients/ioas-owner.js';
import { InvalidArgError, type StatusSpace } from '../../protocol/index.js';
import { formatBytes, formatSize, hex, parseAddress, parseCommand, parseSize, required, type Command } from '../args.js';

const usage = `Usage:
  mmbroker ioas create  --socket PATH --space NAME --ioas ID
  mmbroker ioas destroy --socket PATH --space NAME --ioas ID
  mmbroker ioas map     --socket PATH --space NAME --ioas ID --iova ADDR --gpa ADDR --size SIZE [--readonly]
  mmbroker ioas unmap   --socket PATH --space NAME --ioas ID --iova ADDR --size SIZE

Drives an I/O address space (IOAS) of an address space by hand, as the owner, as a VMM's emulated IOMMU
does: the IOVA mappings a guest's IOMMU gives the devices attached to it (docs/ioas.md). Each command is
one transaction; it fails with MMB_ERR_OWNER_EXISTS while another owner (the VMM) is attached.

ioas create    a new, empty IOAS; devices join it with \`mmbroker attach vfio --ioas ID\`
ioas destroy   removes it; refused (MMB_ERR_IOAS_BUSY) while a device is attached to it
ioas map       maps [IOVA, IOVA + SIZE) to guest-physical [GPA, GPA + SIZE), which must be RAM of one
               region; returns once every attached client mapped (and pinned) it
ioas unmap     removes the mappings inside [IOVA, IOVA + SIZE) (whole mappings only); returns only when
               every attached client has let go: its host IOMMU no longer maps them

Options:
  --socket PATH   the broker's socket (default: $MMBROKER_SOCKET, else /run/memmap-broker/broker.sock)
  --space NAME    the address space
  --ioas ID       the IOAS's name
  --iova ADDR     I/O virtual address, page aligned (decimal or 0x hex)
  --gpa ADDR      guest-physical address, page aligned
  --size SIZE     bytes, page aligned (4096, 2M)
  --readonly      devices may only read
  -h, --help      show this help`;

const base = { socket: { type: 'string' }, space: { type: 'string' }, ioas: { type: 'string' } } as const;

export const ioas: Command = {
  name: 'ioas',
  summary: 'create, map, unmap or destroy an I/O address space as the owner (ioas create | map | unmap | destroy)',
  usage,
  async run(argv) {
    const [sub, ...rest] = argv;
    if (sub === undefined || sub === '--help' || sub === '-h') {
      console.log(usage);
      return sub === undefined ? 2 : 0;
    }
    if (!['create', 'destroy', 'map', 'unmap'].includes(sub))
      throw new InvalidArgError(`unknown ioas command ${JSON.stringify(sub)} (create, destroy, map or unmap)`);
    const values = parseCommand(
      rest,
      { ...base, iova: { type: 'string' }, gpa: { type: 'string' }, size: { type: 'string' }, readonly: { type: 'boolean' } },
      usage,
    );
    if (!values) return 0;
    const name = required(values, 'ioas');
    const space = required(values, 'space');
    const owner = await OwnerClient.attach(required(values, 'socket'), { space, name: `mmbroker ioas ${sub}` });
    try {
      const io = new IoasOwner(owner, name);
      if (sub === 'create') {
        await IoasOwner.create(owner, name);
        console.log(`created IOAS ${JSON.stringify(name)} in ${JSON.stringify(space)}`);
      } else if (sub === 'destroy') {
        await io.destroy();
        console.log(`destroyed IOAS ${JSON.stringify(name)}`);
      } else if (sub === 'map') {
        const iova = parseAddress(required(values, 'iova'), '--iova');
        const gpa = parseAddress(required(values, 'gpa'), '--gpa');
        const size = parseSize(required(values, 'size'), '--size');
        const r = await io.map({ iova, gpa, size, readonly: values.readonly ?? false });
        console.log(
          `IOAS ${JSON.stringify(name)} generation ${r.generation}: mapped IOVA ${hex(iova)} -> gpa ${hex(gpa)}, ${formatSize(size)}${values.readonly ? ', read-only' : ''}`,
        );
      } else {
        const iova = parseAddress(required(values, 'iova'), '--iova');
        const size = parseSize(required(values, 'size'), '--size');
        const r = await io.unmap(iova, size);
        console.log(
          `IOAS ${JSON.stringify(name)} generation ${r.generation}: unmapped ${formatBytes(r.unmapped ?? 0)} in [${hex(iova)}, ${hex(iova + size)}); no attached client maps it any more`,
        );
      }
      return 0;
    } finally {
      owner.close();
    }
  },
};

/**
 * The IOAS part of `mmbroker status`: each I/O address space of a space, its mappings, who is attached
 * with which devices (and what it reports pinned), and who may still reach it. Empty for a space without.
 */
export function renderIoas(space: StatusSpace): string[] {
  const out: string[] = [];
  for (const io of space.ioas ?? []) {
    out.push(`  ioas ${io.name}  generation ${io.generation}  ${io.mappings} mapping(s), ${formatBytes(io.bytes)}`);
    if (io.attached.length === 0) out.push('    (no device attached)');
    for (const a of io.attached) {
      const c = space.clients.find((x) => x.id === a.client.id);
      const pinned = a.pinned;
      out.push(
        `    ${a.client.kind} client ${JSON.stringify(a.client.name)} (#${a.client.id}, pid ${a.client.pid}): ${a.devices.join(', ')}${c?.backend ? `; ${c.backend}` : ''}${pinned !== undefined ? `; pinned ${formatBytes(pinned)}` : ''}`,
      );
    }
    if (io.holders.length > 0) out.push(`    may still reach it until fenced: client(s) ${io.holders.map((h) => `#${h}`).join(', ')}`);
  }
  return out;
}
