import { OwnerClient } from '../../clients/index.js';
import { parseCommand, required, type Command } from '../args.js';

const usage = `Usage: mmbroker publish --socket PATH --space NAME

Publishes an address space as its map stands: subscribers that attached while it was unpublished (a
broker that started or restarted, whose owner has not republished) are synced to it and reconcile by key,
keeping every mapping, pin and memslot that did not change, and dropping what the map no longer has.

For an operator: use it when the space's owner will not come back (its VMM is gone) or has no PUBLISH
support, or after rebuilding a map by hand with \`mmbroker map add\`. Fails with MMB_ERR_OWNER_EXISTS while
an owner is attached (that owner publishes itself).

Options:
  --socket PATH   the broker's socket
  --space NAME    the address space
  -h, --help      show this help`;

export const publish: Command = {
  name: 'publish',
  summary: 'publish an address space as it stands (after a broker restart)',
  usage,
  async run(argv) {
    const values = parseCommand(argv, { socket: { type: 'string' }, space: { type: 'string' } }, usage);
    if (!values) return 0;
    const space = required(values, 'space');
    const owner = await OwnerClient.attach(required(values, 'socket'), { space, name: 'mmbroker publish' });
    try {
      const was = owner.published;
      const g = await owner.publish();
      console.log(was ? `${JSON.stringify(space)} was already published (generation ${g})` : `published ${JSON.stringify(space)} at generation ${g}`);
      return 0;
    } finally {
      owner.close();
    }
  },
};
