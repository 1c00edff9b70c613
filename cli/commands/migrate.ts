import { MappingSubscriber, OwnerClient } from '../../clients/index.js';
import { FileDestination, Migration, SpaceDestination, type Destination } from '../../clients/migration/index.js';
import { InvalidArgError } from '../../protocol/index.js';
import { formatBytes, formatSize, parseCommand, parseCount, parseSize, required, type Command } from '../args.js';
import { checkOutputFile } from '../paths.js';

const usage = `Usage: mmbroker migrate --socket PATH --space NAME (--to FILE | --to-space NAME) [options]

Pre-copy migration of an address space while its guest keeps writing: turns dirty logging on, copies
everything, then repeatedly copies what got dirty; once little is left it pauses every writer, copies the
rest, verifies the copy byte for byte, and resumes them. Acts as the space's owner, so no other owner may
be attached (a VMM that owns the space runs the same engine in-process: clients/migration).

Options:
  --socket PATH       the broker's socket
  --space NAME        the address space to migrate
  --to FILE           a sparse raw image: file offset X holds the guest byte at GPA X (holes stay holes)
  --to-space NAME     another (empty) address space of the same broker, which it fills
  --max-rounds N      most dirty rounds after the full copy (default 30)
  --stop-bytes SIZE   stop iterating once a round leaves at most this much dirty memory (default 1M)
  --keep-paused       leave the writers paused at the end (the source stops for good)
  --json              print the result as JSON
  -h, --help          show this help`;

export const migrate: Command = {
  name: 'migrate',
  summary: 'pre-copy migration of a space to a file or another space',
  usage,
  async run(argv) {
    const values = parseCommand(
      argv,
      {
        socket: { type: 'string' },
        space: { type: 'string' },
        to: { type: 'string' },
        'to-space': { type: 'string' },
        'max-rounds': { type: 'string' },
        'stop-bytes': { type: 'string' },
        'keep-paused': { type: 'boolean' },
        json: { type: 'boolean' }
      },
      usage,
    );
    if (!values) return 0;
    const socket = required(values, 'socket');
    const space = required(values, 'space');
    if ((values.to === undefined) === (values['to-space'] === undefined)) throw new InvalidArgError('give exactly one of --to FILE and --to-space NAME');
    if (values.to !== undefined) checkOutputFile(values.to, '--to');
    const dest: Destination = values.to !== undefined ? new FileDestination(values.to) : new SpaceDestination(socket, values['to-space'] as string);
    const owner = await OwnerClient.attach(socket, { space, name: 'mmbroker migrate' });
    let reader: MappingSubscriber | undefined;
    try {
      reader = await MappingSubscriber.attach(socket, { space, name: 'migration-reader', kind: 'migration', writes: false, reconnect: false });
      const json = values.json ?? false;
      if (!json) console.log(`migrating ${JSON.stringify(space)} to ${dest.description}`);
      const result = await new Migration(owner, reader, dest).run({
        ...(values['max-rounds'] ? { maxRounds: parseCount(values['max-rounds'], '--max-rounds') } : {}),
        ...(values['stop-bytes'] ? { stopBytes: parseSize(values['stop-bytes'], '--stop-bytes') } : {}),
        keepPaused: values['keep-paused'] ?? false,
        onProgress: (p) => {
          if (!json) console.log(`  round ${String(p.round).padStart(2)} ${p.phase.padEnd(5)} ${formatBytes(p.bytes).padStart(9)} sent, ${p.ms} ms${p.phase === 'full' ? '' : `, dirty rate ${formatBytes(p.dirtyRate)}/s`}`);
        },
      });
      if (json) console.log(JSON.stringify(result, null, 2));
      else {
        console.log(
          `done: ${formatSize(result.memoryBytes)} of guest memory in ${result.rounds.length} rounds, ${formatBytes(result.totalBytes)} sent, ` +
            `downtime ${result.downtimeMs} ms (paused ${result.pausedMs} ms with verification), ${result.converged ? 'converged' : result.stopReason === 'not-shrinking' ? 'stopped iterating: the dirty set no longer shrank' : 'did not converge (round limit)'}, ` +
            `${result.verified === undefined ? 'not verified' : result.verified ? 'verified identical' : 'VERIFICATION FAILED'}`,
        );
      }
      return result.verified === false ? 1 : 0;
    } finally {
      await reader?.close();
      owner.close();
    }
  },
};
