// The broker's metrics in Prometheus' text format (prom-client). Counters and histograms follow each
// space's events (broker/watch.ts) as they happen; gauges (generations, per-client acked generation and
// lag, pinned bytes, queue depth, holders) are read from the spaces when scraped, so a scrape always
// shows the state of that moment. Served over HTTP by `mmbroker serve --metrics` (cli/metrics-http.ts);
// an embedding VMM can serve `text()` itself.
//
// Labels stay bounded: spaces and outcomes are few; per-client gauges carry the client's id, kind and
// name and disappear with the client (they are rebuilt at every scrape).
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import type { Broker } from './broker.js';
import type { AddressSpace } from './space.js';
import { BROKER_VERSION } from './version.js';

/** Commit and dirty-sync durations: 100 us to 30 s. */
const SECONDS = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30];

export class BrokerMetrics {
  readonly registry = new Registry();

  constructor(
    private readonly broker: Broker,
    opts: { processMetrics?: boolean } = {},
  ) {
    const r = [this.registry];
    if (opts.processMetrics ?? true) collectDefaultMetrics({ register: this.registry, prefix: 'mmb_' });
    new Gauge({ name: 'mmb_build_info', help: 'The broker release (label version); always 1.', labelNames: ['version'], registers: r }).set(
      { version: BROKER_VERSION },
      1,
    );

    const transactions = new Counter({
      name: 'mmb_transactions_total',
      help: 'Transactions that ran, by outcome: committed, rolled-back (voted on, refused, undone everywhere), refused (failed a check before anything was sent).',
      labelNames: ['space', 'outcome'],
      registers: r,
    });
    const commitSeconds = new Histogram({
      name: 'mmb_commit_duration_seconds',
      help: "From the start of a transaction's run to its outcome, by outcome.",
      labelNames: ['space', 'outcome'],
      buckets: SECONDS,
      registers: r,
    });
    const evictions = new Counter({
      name: 'mmb_evictions_total',
      help: 'Subscribers evicted for breaking their contract (a missed deadline, a failed apply or undo).',
      labelNames: ['space'],
      registers: r,
    });
    const holders = new Counter({
      name: 'mmb_holders_total',
      help: 'Clients whose connection ended while they may still reach memory: created (became holders), fenced (provably let go), failed (could not be fenced in time: a change failed or committed unfenced).',
      labelNames: ['space', 'event'],
      registers: r,
    });
    const dirtySeconds = new Histogram({
      name: 'mmb_dirty_sync_duration_seconds',
      help: 'Duration of dirty syncs (flush every writer, collect the bitmaps).',
      labelNames: ['space'],
      buckets: SECONDS,
      registers: r,
    });
    const dirtyPages = new Counter({ name: 'mmb_dirty_pages_total', help: 'Dirty 4 KiB pages reported by dirty syncs.', labelNames: ['space'], registers: r });
    const joins = new Counter({ name: 'mmb_client_joins_total', help: 'Clients that attached, by role.', labelNames: ['space', 'role'], registers: r });

    for (const name of broker.status().spaces.map((s) => s.name)) {
      const events = (broker.space(name) as AddressSpace).events;
      events.on('outcome', (e) => {
        transactions.inc({ space: name, outcome: e.outcome });
        commitSeconds.observe({ space: name, outcome: e.outcome }, e.us / 1e6);
        const code = e.error?.code;
        if (code === 'MMB_ERR_NOT_FENCED' || code === 'MMB_ERR_COMMITTED_UNFENCED') holders.inc({ space: name, event: 'failed' });
      });
      events.on('evicted', () => evictions.inc({ space: name }));
      events.on('holder', () => holders.inc({ space: name, event: 'created' }));
      events.on('fenced', () => holders.inc({ space: name, event: 'fenced' }));
      events.on('dirty-sync', (res, us) => {
        dirtySeconds.observe({ space: name }, us / 1e6);
        dirtyPages.inc(
          { space: name },
          res.regions.reduce((n, x) => n + x.dirty, 0),
        );
      });
      events.on('joined', (_c, role) => joins.inc({ space: name, role }));
      // Zero series exist from the start, so rates and alerts work before the first event.
      for (const outcome of ['committed', 'rolled-back', 'refused']) transactions.inc({ space: name, outcome }, 0);
      for (const event of ['created', 'fenced', 'failed']) holders.inc({ space: name, event }, 0);
      evictions.inc({ space: name }, 0);
    }

    this.gauges(r);
  }

  /** Gauges read from the spaces at scrape time. */
  private gauges(r: Registry[]): void {
    const broker = this.broker;
    const spaces = () => broker.status().spaces;
    const each = <T>(fn: (space: ReturnType<typeof spaces>[number], live: AddressSpace) => T) =>
      spaces().map((s) => fn(s, broker.space(s.name) as AddressSpace));
    new Gauge({
      name: 'mmb_generation',
      help: 'The generation of each address space (committed transactions).',
      labelNames: ['space'],
      registers: r,
      collect() {
        this.reset();
        each((s) => this.set({ space: s.name }, s.generation));
      },
    });
    new Gauge({
      name: 'mmb_guest_memory_bytes',
      help: 'Bytes of guest memory in the map.',
      labelNames: ['space'],
      registers: r,
      collect() {
        this.reset();
        each((s) =>
          this.set(
            { space: s.name },
            s.regions.reduce((n, x) => n + x.size, 0),
          ),
        );
      },
    });
    new Gauge({
      name: 'mmb_regions',
      help: 'Regions in the map.',
      labelNames: ['space'],
      registers: r,
      collect() {
        this.reset();
        each((s) => this.set({ space: s.name }, s.regions.length));
      },
    });
    new Gauge({
      name: 'mmb_pinned_bytes',
      help: 'Bytes all pinning subscribers pin: predicted by the broker (the map once per pinning client) and actual (what they reported).',
      labelNames: ['space', 'kind'],
      registers: r,
      collect() {
        this.reset();
        each((s) => {
          this.set({ space: s.name, kind: 'predicted' }, s.pinBudget?.predicted ?? 0);
          this.set({ space: s.name, kind: 'actual' }, s.pinBudget?.actual ?? 0);
        });
      },
    });
    new Gauge({
      name: 'mmb_pin_budget_bytes',
      help: "The space's pin budget (absent: none).",
      labelNames: ['space'],
      registers: r,
      collect() {
        this.reset();
        each((s) => {
          if (s.pinBudget?.limit !== undefined) this.set({ space: s.name }, s.pinBudget.limit);
        });
      },
    });
    const clientLabels = ['space', 'client', 'kind', 'name'];
    new Gauge({
      name: 'mmb_client_acked_generation',
      help: 'The generation each subscriber last acknowledged (its sync or a transaction).',
      labelNames: clientLabels,
      registers: r,
      collect() {
        this.reset();
        each((s) =>
          s.clients
            .filter((c) => c.role === 'subscriber')
            .forEach((c) => this.set({ space: s.name, client: String(c.id), kind: c.kind, name: c.name }, c.ackedGeneration)),
        );
      },
    });
    new Gauge({
      name: 'mmb_client_lag_generations',
      help: 'How many generations each subscriber is behind its space.',
      labelNames: clientLabels,
      registers: r,
      collect() {
        this.reset();
        each((s) =>
          s.clients
            .filter((c) => c.role === 'subscriber')
            .forEach((c) => this.set({ space: s.name, client: String(c.id), kind: c.kind, name: c.name }, Math.max(0, s.generation - c.ackedGeneration))),
        );
      },
    });
    new Gauge({
      name: 'mmb_client_pinned_bytes',
      help: 'Bytes each pinning subscriber pins: predicted by the broker, and actual as it reported.',
      labelNames: [...clientLabels, 'what'],
      registers: r,
      collect() {
        this.reset();
        each((s) =>
          s.clients.forEach((c) => {
            if (!c.pin) return;
            const l = { space: s.name, client: String(c.id), kind: c.kind, name: c.name };
            this.set({ ...l, what: 'predicted' }, c.pin.predicted);
            if (c.pin.actual !== undefined) this.set({ ...l, what: 'actual' }, c.pin.actual);
          }),
        );
      },
    });
    new Gauge({
      name: 'mmb_clients',
      help: 'Attached clients, by role.',
      labelNames: ['space', 'role'],
      registers: r,
      collect() {
        this.reset();
        each((s) => {
          for (const role of ['owner', 'subscriber', 'observer']) this.set({ space: s.name, role }, s.clients.filter((c) => c.role === role).length);
        });
      },
    });
    new Gauge({
      name: 'mmb_holders',
      help: 'Clients whose connection ended and that may still reach memory, not yet fenced.',
      labelNames: ['space'],
      registers: r,
      collect() {
        this.reset();
        each((s) => this.set({ space: s.name }, (s.holders ?? []).length));
      },
    });
    new Gauge({
      name: 'mmb_queue_depth',
      help: "Work queued or running on each space's serial queue: commits, and all items (commits, attaches, publishes, dirty syncs).",
      labelNames: ['space', 'what'],
      registers: r,
      collect() {
        this.reset();
        each((s, live) => {
          this.set({ space: s.name, what: 'commits' }, live.queue.commits);
          this.set({ space: s.name, what: 'all' }, live.queue.work);
        });
      },
    });
    new Gauge({
      name: 'mmb_published',
      help: 'Whether each space is published (1) or waits for its owner to republish (0).',
      labelNames: ['space'],
      registers: r,
      collect() {
        this.reset();
        each((s) => this.set({ space: s.name }, s.published === false ? 0 : 1));
      },
    });
  }

  get contentType(): string {
    return this.registry.contentType;
  }

  /** The exposition, as scraped. */
  text(): Promise<string> {
    return this.registry.metrics();
  }
}
