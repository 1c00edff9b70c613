// A watcher (feature WATCH): an observer of an address space that receives EV_WATCH, one event per thing
// that happens there (transactions and their outcomes, joins and leaves, evictions, fencing, dirty syncs,
// publishes, pinning progress). It maps nothing and acks nothing: the broker never waits for it, and cuts
// it off (MMB_ERR_SLOW_READER) if it stops reading. Also: fetchHistory, the space's recent transactions.
import { EventEmitter } from 'eventemitter3';
import { Feature, Msg, UnsupportedError, type EvWatch, type HistoryEntry, type HistoryResult, type MmbError } from '../protocol/index.js';
import { closeAll } from '../transport/index.js';
import { Connection, type BrokerTarget, type ConnectionOptions } from './connection.js';

export interface WatcherEvents {
  event: [event: EvWatch];
  /** The connection ended; `reason` is set when the broker said why (EV_GOODBYE: shutdown, slow reader). */
  close: [reason: MmbError | undefined];
}

export interface WatcherOptions extends ConnectionOptions {
  space: string;
  /** The space's token, when the broker requires one of subscribers and observers (feature AUTH). */
  token?: string;
}

async function open(target: BrokerTarget, opts: ConnectionOptions): Promise<Connection> {
  const conn = await Connection.open(target, opts);
  if ((conn.features & Feature.WATCH) === 0) {
    conn.close();
    throw new UnsupportedError('the broker does not offer watching (feature WATCH): it is older than this client');
  }
  return conn;
}

export class Watcher extends EventEmitter<WatcherEvents> {
  private constructor(
    private readonly conn: Connection,
    readonly space: string,
    /** The space's generation when the watch began. */
    readonly generation: number,
  ) {
    super();
    conn.on('event', (msg, fds) => {
      closeAll(fds);
      if (msg.t === Msg.EV_WATCH) this.emit('event', msg);
    });
    conn.on('close', (reason) => this.emit('close', reason));
  }

  static async attach(target: BrokerTarget, opts: WatcherOptions): Promise<Watcher> {
    const conn = await open(target, { name: 'watch', ...opts });
    try {
      const r = (await conn.request({
        t: Msg.ATTACH,
        space: opts.space,
        role: 'observer',
        kind: 'watch',
        watch: true,
        ...(opts.token !== undefined ? { token: opts.token } : {}),
      })) as { generation: number };
      return new Watcher(conn, opts.space, r.generation);
    } catch (err) {
      conn.close();
      throw err;
    }
  }

  /** The broker's software release (HELLO's brokerVersion). */
  get brokerVersion(): string | undefined {
    return this.conn.hello?.brokerVersion;
  }

  get closed(): boolean {
    return this.conn.closed;
  }

  close(): void {
    this.conn.close();
  }
}

/**
 * The newest `limit` transactions of `space` (default: all the broker keeps), oldest first, paging back
 * as the broker's frames allow. `brokerVersion` as HELLO gave it.
 */
export async function fetchHistory(
  target: BrokerTarget,
  space: string,
  opts: ConnectionOptions & { limit?: number } = {},
): Promise<Omit<HistoryResult, 'more'> & { brokerVersion: string | undefined }> {
  const conn = await open(target, { name: 'history', ...opts });
  try {
    const want = opts.limit ?? Number.POSITIVE_INFINITY;
    let entries: HistoryEntry[] = [];
    let before: number | undefined;
    for (;;) {
      const r = (await conn.request({
        t: Msg.HISTORY,
        space,
        ...(before !== undefined ? { before } : {}),
        ...(Number.isFinite(want) ? { limit: Math.min(0xffff_ffff, want - entries.length) } : {}),
      })) as HistoryResult;
      entries = [...r.entries, ...entries];
      if (!r.more || r.entries.length === 0 || entries.length >= want) {
        return { space: r.space, epoch: r.epoch, generation: r.generation, entries, brokerVersion: conn.hello?.brokerVersion };
      }
      before = (r.entries[0] as HistoryEntry).seq;
    }
  } finally {
    conn.close();
  }
}
