import { MappingSubscriber, OwnerClient } from '../../clients/index.js';
import {
  FileDestination,
  Migration,
  SpaceDestination,
  TcpDestination,
  MigrationBlockedError,
  readTokenFile,
  type Destination,
  type MigrationProgress,
  type MigrationResult,
} from '../../clients/migration/index.js';
import { InvalidArgError, isMmbError } from '../../protocol/index.js';
import { formatBytes, formatSize, parseCommand, parseCount, parseSize, required, type Command } from '../args.js';
import { checkOutputFile } from '../paths.js';

const usage = `Usage: mmbroker migrate --socket PATH --space NAME --to DEST [options]

Pre-copy migration of an address space while its guest keeps writing and its map keeps changing: turns
dirty logging on, copies everything, then repeatedly copies what got dirty (regions hotplugged meanwhile
are copied whole, unplugged ones dropped at the destination, read-only toggles carried); once little is
left it pauses every writer, copies the rest, has the destination confirm every byte, verifies the copy,
and resumes the writers. Acts as the space's owner, so no other owner may be attached (a VMM that owns the
space runs the same engine in-process: clients/migration, migrateTo()). Memory and the map are migrated;
vCPU and device state are the VMM's.

Destinations (--to):
  FILE                a sparse raw image: file offset X holds the guest byte at GPA X (holes stay holes);
                      FILE.map.json records the map of every round
  tcp://HOST:PORT     \`mmbroker receive\` on another host, which publishes the copy into a space of its
                      broker; needs --token-file with the receiver's token
  --to-space NAME     another (empty) address space of the same broker, which it fills

A vfio-like client with a device attached blocks the migration (its DMA does not stop at the pause, and
its device state stays behind): the command refuses, naming it, unless --accept-device-risk.

Output: on a terminal, a progress line; otherwise (or with --json) one JSON object per line: "start",
"round" per round, "sending" while bytes flow, then "result" (or "error").

Options:
  --socket PATH          the broker's socket
  --space NAME           the address space to migrate
  --to DEST              a FILE, or tcp://HOST:PORT
  --to-space NAME        another (empty) address space of the same broker
  --token-file PATH      (tcp) the receiver's token, first line of a file only its owner can read (mode 600)
  --checksum             (tcp) a CRC over the bytes of every record too (costs a pass on each side)
  --accept-device-risk   migrate although device clients block it
  --max-rounds N         most dirty rounds after the full copy (default 30)
  --stop-bytes SIZE      stop iterating once a round leaves at most this much dirty memory (default 1M)
  --keep-paused          leave the writers paused at the end (the source stops for good)
  --no-verify            do not compare the copy with the paused source
  --json                 JSON lines even on a terminal
  -h, --help             show this help`;

/** Progress output: a line rewritten in place on a terminal, JSON lines otherwise. */
export class ProgressOutput {
  private lastLine = Number.NEGATIVE_INFINITY; // the first status is always shown (performance.now() starts near 0)
  private pending = '';
  constructor(readonly json: boolean) {}

  static for(jsonFlag: boolean | undefined): ProgressOutput {
    return new ProgressOutput(jsonFlag === true || !process.stdout.isTTY);
  }

  /** One event: a JSON line, or (on a terminal) `text` as a line of its own. */
  event(obj: Record<string, unknown>, text?: string): void {
    if (this.json) process.stdout.write(`${JSON.stringify(obj)}\n`);
    else if (text !== undefined) {
      this.clear();
      process.stdout.write(`${text}\n`);
    }
  }

  /** A live status (terminal: rewritten at most 10 times a second; JSON: at most twice a second). */
  status(obj: Record<string, unknown>, text: string): void {
    const now = performance.now();
    if (now - this.lastLine < (this.json ? 500 : 100)) return;
    this.lastLine = now;
    if (this.json) process.stdout.write(`${JSON.stringify(obj)}\n`);
    else {
      this.pending = text;
      process.stdout.write(`\r\x1b[K${text}`);
    }
  }

  clear(): void {
    if (!this.json && this.pending) {
      process.stdout.write('\r\x1b[K');
      this.pending = '';
    }
  }
}

/** A destination that reports the bytes that flow through it. */
function counting(dest: Destination, onBytes: (n: number) => void): Destination {
  return new Proxy(dest, {
    get(target, prop, receiver) {
      if (prop === 'write') {
        return (gpa: number, bytes: Uint8Array) => {
          onBytes(bytes.length);
          return target.write(gpa, bytes);
        };
      }
      if (prop === 'writeFrom' && target.writeFrom) {
        const writeFrom = target.writeFrom.bind(target);
        return (gpa: number, length: number, fill: (into: Uint8Array) => void) => {
          onBytes(length);
          return writeFrom(gpa, length, fill);
        };
      }
      const v = Reflect.get(target, prop, receiver) as unknown;
      return typeof v === 'function' ? (v as (...a: unknown[]) => unknown).bind(target) : v;
    },
  });
}

export const migrate: Command = {
  name: 'migrate',
  summary: 'pre-copy migration of a space to a file, another space, or another host (tcp://)',
  usage,
  async run(argv) {
    const values = parseCommand(
      argv,
      {
        socket: { type: 'string' },
        space: { type: 'string' },
        to: { type: 'string' },
        'to-space': { type: 'string' },
        'token-file': { type: 'string' },
        checksum: { type: 'boolean' },
        'accept-device-risk': { type: 'boolean' },
        'max-rounds': { type: 'string' },
        'stop-bytes': { type: 'string' },
        'keep-paused': { type: 'boolean' },
        'no-verify': { type: 'boolean' },
        json: { type: 'boolean' },
      },
      usage,
    );
    if (!values) return 0;
    const socket = required(values, 'socket');
    const space = required(values, 'space');
    if ((values.to === undefined) === (values['to-space'] === undefined))
      throw new InvalidArgError('give exactly one of --to FILE, --to tcp://HOST:PORT and --to-space NAME');
    const tcp = values.to?.startsWith('tcp://') ?? false;
    if (tcp && values['token-file'] === undefined) throw new InvalidArgError("--to tcp://... needs --token-file (the receiver's token)");
    if (!tcp && (values['token-file'] !== undefined || values.checksum)) throw new InvalidArgError('--token-file and --checksum are for --to tcp://HOST:PORT');
    if (values.to !== undefined && !tcp) checkOutputFile(values.to, '--to');
    const opts = {
      ...(values['max-rounds'] ? { maxRounds: parseCount(values['max-rounds'], '--max-rounds') } : {}),
      ...(values['stop-bytes'] ? { stopBytes: parseSize(values['stop-bytes'], '--stop-bytes') } : {}),
    };
    const dest: Destination = tcp
      ? new TcpDestination(values.to as string, { token: readTokenFile(values['token-file'] as string), dataCrc: values.checksum ?? false })
      : values.to !== undefined
        ? new FileDestination(values.to)
        : new SpaceDestination(socket, values['to-space'] as string);
    const out = ProgressOutput.for(values.json);
    const owner = await OwnerClient.attach(socket, { space, name: 'mmbroker migrate' });
    let reader: MappingSubscriber | undefined;
    try {
      reader = await MappingSubscriber.attach(socket, { space, name: 'migration-reader', kind: 'migration', writes: false, reconnect: false });
      let sent = 0;
      let round: MigrationProgress | undefined;
      out.event({ event: 'start', space, destination: dest.description }, `migrating ${JSON.stringify(space)} to ${dest.description}`);
      let result: MigrationResult;
      try {
        result = await new Migration(
          owner,
          reader,
          counting(dest, (n) => {
            sent += n;
            const r = (round?.round ?? -1) + 1;
            out.status({ event: 'sending', round: r, bytes: sent }, `  round ${String(r).padStart(2)}: ${formatBytes(sent)} sent`);
          }),
        ).run({
          ...opts,
          keepPaused: values['keep-paused'] ?? false,
          verify: !(values['no-verify'] ?? false),
          acceptDeviceRisk: values['accept-device-risk'] ?? false,
          onProgress: (p) => {
            round = p;
            const changes = [...p.added.map((n) => `+${n}`), ...p.removed.map((n) => `-${n}`), ...p.changed.map((n) => `~${n}`)];
            out.event(
              { event: 'round', ...p },
              `  round ${String(p.round).padStart(2)} ${p.phase.padEnd(5)} ${formatBytes(p.bytes).padStart(9)} sent, ${p.ms} ms` +
                `${p.phase === 'full' ? '' : `, dirty rate ${formatBytes(p.dirtyRate)}/s`}${changes.length > 0 && p.round > 0 ? `, map: ${changes.join(' ')}` : ''}`,
            );
          },
        });
      } catch (err) {
        out.clear();
        if (out.json && isMmbError(err)) {
          out.event({
            event: 'error',
            code: err.code,
            message: err.message,
            ...(err.client ? { client: err.client } : {}),
            ...(err instanceof MigrationBlockedError ? { blockers: err.blockers } : {}),
          });
        }
        throw err;
      }
      const destination = dest instanceof TcpDestination ? dest.result : undefined;
      out.event(
        { event: 'result', ...result, ...(destination ? { destination } : {}) },
        `done: ${formatSize(result.memoryBytes)} of guest memory in ${result.rounds.length} rounds, ${formatBytes(result.totalBytes)} sent, ` +
          `downtime ${result.downtimeMs} ms (paused ${result.pausedMs} ms with verification), ${result.converged ? 'converged' : result.stopReason === 'not-shrinking' ? 'stopped iterating: the dirty set no longer shrank' : 'did not converge (round limit)'}, ` +
          `${result.verified === undefined ? 'not verified' : result.verified ? 'verified identical' : `VERIFICATION FAILED (${result.verification?.difference ?? ''}): nothing was published`}` +
          `${destination ? `; published as ${JSON.stringify(destination.space)} generation ${destination.generation}` : ''}` +
          `${result.acceptedRisks.length > 0 ? `; accepted device risk: ${result.acceptedRisks.map((b) => b.client.name).join(', ')}` : ''}`,
      );
      return result.verified === false ? 1 : 0;
    } finally {
      await reader?.close();
      owner.close();
    }
  },
};
