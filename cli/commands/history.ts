import { fetchHistory, fetchStatus } from '../../clients/index.js';
import { InvalidArgError, type HistoryEntry } from '../../protocol/index.js';
import { parseCommand, parseCount, required, type Command } from '../args.js';
import { describeError, duration, entryChanges, outcomeWord, stamp } from '../describe.js';

const usage = `Usage: mmbroker history [--socket PATH] [--space NAME] [--limit N | --all] [--json]

The recent transactions of an address space, oldest first, as the broker ran them (it keeps as many as it
keeps for resume by delta, 1024 by default): sequence number, the generation it became (or would have),
when it started, the owner that sent it, the outcome (committed; rolled back: voted on, refused by a
subscriber and undone everywhere; refused: a check failed before anything was sent), how long it took,
the changes, and for one that did not commit the error code and the client that refused.

Options:
  --socket PATH   the broker's socket (default: $MMBROKER_SOCKET, else /run/memmap-broker/broker.sock)
  --space NAME    the address space (default: the broker's only one)
  --limit N       the last N transactions (default 20)
  --all           every transaction the broker still keeps
  --json          print {"space", "epoch", "generation", "entries": [...]} (docs/protocol.md, HISTORY)
  -h, --help      show this help`;

export const history: Command = {
  name: 'history',
  summary: 'the recent transactions of a space and their outcomes',
  usage,
  async run(argv) {
    const values = parseCommand(
      argv,
      { socket: { type: 'string' }, space: { type: 'string' }, limit: { type: 'string' }, all: { type: 'boolean' }, json: { type: 'boolean' } },
      usage,
    );
    if (!values) return 0;
    if (values.all && values.limit !== undefined) throw new InvalidArgError('give at most one of --limit and --all');
    const socket = required(values, 'socket');
    const limit = values.all ? undefined : values.limit !== undefined ? parseCount(values.limit, '--limit') : 20;
    let space = values.space;
    if (space === undefined) {
      const names = (await fetchStatus(socket)).spaces.map((s) => s.name);
      if (names.length !== 1) throw new InvalidArgError(`the broker serves ${names.length} spaces (${names.join(', ')}): give --space NAME`);
      space = names[0] as string;
    }
    const h = await fetchHistory(socket, space, limit !== undefined ? { limit } : {});
    if (values.json) {
      const { brokerVersion: _v, ...rest } = h;
      console.log(JSON.stringify(rest, null, 2));
      return 0;
    }
    console.log(
      `space ${h.space}: generation ${h.generation}, epoch ${h.epoch}; ${h.entries.length} transaction(s)${limit !== undefined ? ` (the last ${limit} at most)` : ''}`,
    );
    if (h.entries.length === 0) return 0;
    const rows = [['SEQ', 'GEN', 'STARTED', 'OWNER', 'OUTCOME', 'TOOK', 'CHANGES'], ...h.entries.map(row)];
    const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => (r[i] ?? '').length)));
    for (const [i, r] of rows.entries()) {
      console.log('  ' + r.map((c, j) => (j === r.length - 1 ? c : c.padEnd(widths[j] ?? 0))).join('  '));
      const e = i > 0 ? h.entries[i - 1] : undefined;
      if (e?.error) console.log(`  ${' '.repeat((widths[0] ?? 0) + 2)}${e.outcome === 'committed' ? 'but' : 'why'}: ${describeError(e.error)}`);
    }
    return 0;
  },
};

function row(e: HistoryEntry): string[] {
  return [
    String(e.seq),
    String(e.generation),
    stamp(e.time),
    `${e.owner.name} (#${e.owner.id})`,
    outcomeWord(e.outcome),
    duration(e.us),
    entryChanges(e) || '(nothing)',
  ];
}
