import { OwnerClient } from '../../clients/index.js';
import { native } from '../../native/index.js';
import { InvalidArgError } from '../../protocol/index.js';
import { formatSize, hex, parseCommand, parseAddress, parseSize, required, type Command } from '../args.js';

const usage = `Usage:
  mmbroker map add --socket PATH --space NAME --gpa ADDR --size SIZE [--name NAME] [--readonly]
  mmbroker map remove --socket PATH --space NAME --name NAME

Acts as the owner of the address space for one transaction and waits until every subscriber applied it.
On an unpublished space (a broker that started or restarted and whose owner has not published yet) the
change is made to the map only; subscribers wait until it is published (--publish, or mmbroker publish).

map add      creates a memfd of SIZE bytes sealed against shrinking, registers it with the broker and adds a
             region at ADDR backed by it. The broker keeps the memory alive after this command exits.
             Prints the new generation.
map remove   removes the region; completes once every subscriber unmapped it. Prints the new generation.

On failure both exit 1 and print the error code and, when a subscriber refused, which one.

Options:
  --socket PATH   the broker's socket
  --space NAME    the address space
  --gpa ADDR      guest-physical address, page aligned (decimal or 0x hex)
  --size SIZE     bytes, page aligned (4096, 128M, 4G)
  --name NAME     region name (default: ram@<gpa>)
  --readonly      subscribers map the region read-only
  --publish       publish the space after the change (its map is then authoritative)
  -h, --help      show this help`;

export const map: Command = {
  name: 'map',
  summary: 'add or remove a region as the owner (map add | map remove)',
  usage,
  async run(argv) {
    const [sub, ...rest] = argv;
    if (sub === undefined || sub === '--help' || sub === '-h') {
      console.log(usage);
      return sub === undefined ? 2 : 0;
    }
    if (sub === 'add') return add(rest);
    if (sub === 'remove') return remove(rest);
    throw new InvalidArgError(`unknown map command ${JSON.stringify(sub)} (add or remove)`);
  },
};

async function add(argv: string[]): Promise<number> {
  const values = parseCommand(argv, { socket: { type: 'string' },
    space: { type: 'string' },
    gpa: { type: 'string' },
    size: { type: 'string' },
    name: { type: 'string' },
    readonly: { type: 'boolean' },
    publish: { type: 'boolean' } }, usage);
  if (!values) return 0;
  const gpa = parseAddress(required(values, 'gpa'), '--gpa');
  const size = parseSize(required(values, 'size'), '--size');
  const name = values.name ?? `ram@${hex(gpa)}`;
  const owner = await OwnerClient.attach(required(values, 'socket'), { space: required(values, 'space'), name: 'mmbroker map add' });
  try {
    const backing = await owner.createBacking(size, name);
    native.close(backing.fd);
    const r = await owner.addRegion({ name, gpa, size, backing: backing.backing, readonly: values.readonly ?? false });
    console.log(`generation ${r.generation}: added region ${JSON.stringify(name)} (id ${r.added[0]?.id}) at ${hex(gpa)}, ${formatSize(size)}${values.readonly ? ', read-only' : ''}`);
    await publishOrSay(owner, values.publish ?? false);
    return 0;
  } finally {
    owner.close();
  }
}

async function remove(argv: string[]): Promise<number> {
  const values = parseCommand(argv, { socket: { type: 'string' }, space: { type: 'string' }, name: { type: 'string' }, publish: { type: 'boolean' } }, usage);
  if (!values) return 0;
  const name = required(values, 'name');
  const owner = await OwnerClient.attach(required(values, 'socket'), { space: required(values, 'space'), name: 'mmbroker map remove' });
  try {
    const r = await owner.removeRegion(name);
    console.log(`generation ${r.generation}: removed region ${JSON.stringify(name)}`);
    await publishOrSay(owner, values.publish ?? false);
    return 0;
  } finally {
    owner.close();
  }
}

/** Publishes when asked; otherwise says so when the space is unpublished (subscribers are still waiting). */
async function publishOrSay(owner: OwnerClient, publish: boolean): Promise<void> {
  if (owner.published) return;
  if (publish) {
    const g = await owner.publish();
    console.log(`published ${JSON.stringify(owner.space)} at generation ${g}`);
  } else {
    console.log(`note: ${JSON.stringify(owner.space)} is unpublished: subscribers wait until its owner publishes it (mmbroker publish, or --publish)`);
  }
}
