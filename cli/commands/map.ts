import { OwnerClient, Watcher } from '../../clients/index.js';
import { native } from '../../native/index.js';
import { InvalidArgError, toMmbError, type ClientRef, type CommitOp, type CommitResult } from '../../protocol/index.js';
import { formatSize, hex, parseCommand, parseAddress, parseSize, required, type Command } from '../args.js';
import { who } from '../describe.js';

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

Both say which clients were evicted or fenced meanwhile (a subscriber that missed its deadline, say). On
a terminal, a long add shows the pinning progress pinning clients report. Ctrl-C before the transaction
is sent aborts it (nothing changes); once it is sent, the broker commits or rolls it back whatever
happens to this command, and Ctrl-C says so and waits for the outcome (twice: stop waiting).

On failure both exit 1 and print the error code and, when a subscriber refused, which one.

Options:
  --socket PATH   the broker's socket (default: $MMBROKER_SOCKET, else /run/memmap-broker/broker.sock)
  --space NAME    the address space
  --gpa ADDR      guest-physical address, page aligned (0x100000000, 4294967296 or 4G)
  --size SIZE     bytes, page aligned, QEMU's syntax (4096, 128m, 1.5G, 2MiB)
  --name NAME     region name (default: ram@<gpa>)
  --readonly      subscribers map the region read-only
  --publish       publish the space after the change (its map is then authoritative)
  --json          print the outcome as JSON: {"outcome", "generation", "added", "unreferenced" or
                  "error", "evicted", "holders", "fenced"} (clients evicted, left holding memory, and
                  fenced during the transaction, as the broker's watch events said)
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
  const values = parseCommand(
    argv,
    {
      socket: { type: 'string' },
      space: { type: 'string' },
      gpa: { type: 'string' },
      size: { type: 'string' },
      name: { type: 'string' },
      readonly: { type: 'boolean' },
      publish: { type: 'boolean' },
      json: { type: 'boolean' },
    },
    usage,
  );
  if (!values) return 0;
  const gpa = parseAddress(required(values, 'gpa'), '--gpa');
  const size = parseSize(required(values, 'size'), '--size');
  const name = values.name ?? `ram@${hex(gpa)}`;
  const readonly = values.readonly ?? false;
  return transaction(
    'map add',
    values,
    async (owner) => {
      const backing = await owner.createBacking(size, name);
      native.close(backing.fd);
      return { ops: [{ op: 'add', name, gpa, size, backing: backing.backing, offset: 0, readonly }], size };
    },
    (r) =>
      `generation ${r.generation}: added region ${JSON.stringify(name)} (id ${r.added[0]?.id}) at ${hex(gpa)}, ${formatSize(size)}${readonly ? ', read-only' : ''}`,
  );
}

async function remove(argv: string[]): Promise<number> {
  const values = parseCommand(
    argv,
    { socket: { type: 'string' }, space: { type: 'string' }, name: { type: 'string' }, publish: { type: 'boolean' }, json: { type: 'boolean' } },
    usage,
  );
  if (!values) return 0;
  const name = required(values, 'name');
  return transaction(
    'map remove',
    values,
    async () => ({ ops: [{ op: 'remove', region: name }], size: 0 }),
    (r) => `generation ${r.generation}: removed region ${JSON.stringify(name)}`,
  );
}

/**
 * One transaction as the owner, with what an operator needs around it: a watcher on the space (best
 * effort) that reports evictions and fencing during the commit and relays pinning progress to a
 * terminal; Ctrl-C that aborts while nothing was sent, and says plainly that a sent transaction will still
 * commit or roll back; `--json`.
 */
async function transaction(
  what: string,
  values: { socket?: string; space?: string; publish?: boolean; json?: boolean },
  prepare: (owner: OwnerClient) => Promise<{ ops: CommitOp[]; size: number }>,
  done: (r: CommitResult) => string,
): Promise<number> {
  const socket = required(values, 'socket');
  const space = required(values, 'space');
  const json = values.json ?? false;
  const owner = await OwnerClient.attach(socket, { space, name: `mmbroker ${what}` });
  const watch = await Watcher.attach(socket, { space }).catch(() => undefined);
  const seen = { evicted: [] as unknown[], holders: [] as unknown[], fenced: [] as unknown[] };
  const progress = new Progress(!json && process.stderr.isTTY === true);
  let phase: 'preparing' | 'sent' | 'interrupted' = 'preparing';
  let pending = { ops: [] as CommitOp[], size: 0 };
  let generation = owner.generation + 1;
  const outcome = new Promise<void>((resolve) => {
    watch?.on('event', (m) => {
      const e = m.event;
      if (phase === 'preparing') return;
      if (e.kind === 'evicted') seen.evicted.push({ client: e.client, error: e.error });
      else if (e.kind === 'holder') seen.holders.push({ client: e.client, reason: e.reason, state: e.state, backings: e.backings });
      else if (e.kind === 'fenced') seen.fenced.push({ client: e.client, how: e.how, ms: e.ms });
      else if (e.kind === 'pinned') progress.pinned(e.client.name, e.pinned, e.predicted + pending.size);
      else if (e.kind === 'txn') generation = e.generation;
      else if (e.kind === 'outcome' && e.entry.owner.id === owner.clientId) resolve();
    });
    watch?.on('close', () => resolve());
  });
  const interrupt = () => {
    if (phase === 'preparing') {
      progress.clear();
      console.error(`mmbroker ${what}: interrupted before the transaction was sent: nothing changed`);
      owner.close();
      watch?.close();
      process.exit(130);
    }
    if (phase === 'sent') {
      phase = 'interrupted';
      progress.clear();
      console.error(
        `mmbroker ${what}: interrupted, but the transaction (generation ${generation}) was already sent: the broker will still commit it ` +
          `or roll it back, whatever happens to this command. Waiting for its outcome; Ctrl-C again to stop waiting (\`mmbroker history\` shows it).`,
      );
      return;
    }
    console.error(`mmbroker ${what}: stopped waiting; generation ${generation} will still commit or roll back (see \`mmbroker history\`)`);
    process.exit(130);
  };
  process.on('SIGINT', interrupt);
  const report = (extra: Record<string, unknown>) => {
    if (json)
      console.log(
        JSON.stringify({ ...extra, space, evicted: seen.evicted, holders: seen.holders, fenced: seen.fenced, watched: watch !== undefined }, null, 2),
      );
  };
  try {
    pending = await prepare(owner);
    phase = 'sent';
    let r: CommitResult;
    try {
      r = await owner.commit(pending.ops);
    } catch (err) {
      // Evictions and fencing during the transaction arrive before its outcome.
      if (watch) await within(2000, outcome);
      progress.clear();
      const e = toMmbError(err);
      report({ outcome: e.code === 'MMB_ERR_COMMITTED_UNFENCED' ? 'committed' : 'failed', generation: e.generation ?? generation, error: e.toWire() });
      notes(seen, json);
      throw err;
    }
    if (watch) await within(2000, outcome);
    progress.clear();
    if (json) report({ outcome: 'committed', generation: r.generation, added: r.added, unreferenced: r.unreferenced });
    else console.log(done(r));
    notes(seen, json);
    await publishOrSay(owner, values.publish ?? false, json);
    return 0;
  } finally {
    process.off('SIGINT', interrupt);
    watch?.close();
    owner.close();
  }
}

/** Resolves when `p` does, or after `ms`. */
async function within(ms: number, p: Promise<void>): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  await Promise.race([p, new Promise<void>((r) => (timer = setTimeout(r, ms)))]);
  clearTimeout(timer);
}

/** Says who was evicted or fenced during the transaction (on stderr: stdout keeps the result). */
function notes(seen: { evicted: unknown[]; holders: unknown[]; fenced: unknown[] }, json: boolean): void {
  if (json) return;
  for (const x of seen.evicted as { client: ClientRef; error: { code: string; message: string } }[]) {
    console.error(`note: ${who(x.client)} was evicted: ${x.error.code}: ${x.error.message}`);
  }
  for (const x of seen.fenced as { client: ClientRef; how: string; ms: number }[]) {
    console.error(`note: ${who(x.client)} was fenced (${x.how}) ${x.ms} ms after its connection ended`);
  }
}

/** Pinning progress on a terminal: one line, rewritten in place. */
class Progress {
  private shown = false;
  constructor(private readonly tty: boolean) {}
  pinned(client: string, pinned: number, total: number): void {
    if (!this.tty) return;
    const pct = total > 0 ? ` (${Math.min(100, Math.floor((pinned / total) * 100))}%)` : '';
    process.stderr.write(`\r\x1b[2Kpinning: ${client} has pinned ${formatSize(pinned)} of ${formatSize(total)}${pct}`);
    this.shown = true;
  }
  clear(): void {
    if (this.shown) process.stderr.write('\r\x1b[2K');
    this.shown = false;
  }
}

/** Publishes when asked; otherwise says so when the space is unpublished (subscribers are still waiting). */
async function publishOrSay(owner: OwnerClient, publish: boolean, json: boolean): Promise<void> {
  if (owner.published) return;
  if (publish) {
    const g = await owner.publish();
    if (!json) console.log(`published ${JSON.stringify(owner.space)} at generation ${g}`);
  } else if (!json) {
    console.log(`note: ${JSON.stringify(owner.space)} is unpublished: subscribers wait until its owner publishes it (mmbroker publish, or --publish)`);
  }
}
