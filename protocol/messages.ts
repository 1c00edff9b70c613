// Every message of protocol version 1: its schema (which is also its TypeScript type), its direction
// and how many descriptors ride with it. docs/protocol.md describes the same table in prose;
// test/protocol-docs.test.ts checks that every message here is documented there.
import { Feature, Msg } from './constants.js';
import { PROTOCOL_MAXIMA as L } from './limits.js';
import { decodeRegionColumns } from './columns.js';
import { array, bin, bool, either, literal, object, optional, str, tagged, u32, uint, unknownValue, type Infer, type Schema } from './schema.js';
import type { Gpa, Iova, Offset } from './address.js';

const name = () => str(L.maxNameBytes, { minBytes: 1, printable: true });
/** GPAs, sizes and backing offsets: exact integers; the broker checks the 52-bit limit with its own code. */
const addr = () => uint();
/** The same integers, typed by what they address (protocol/address.ts): what the broker publishes carries them. */
const gpa = addr as () => Schema<Gpa>;
const iova = addr as () => Schema<Iova>;
const offset = addr as () => Schema<Offset>;
const t = <N extends number>(id: N) => literal(id);

// --- shared pieces ------------------------------------------------------------------------------

const clientRef = object({ id: u32(), kind: name(), name: name(), pid: u32() });

const errorFields = {
  code: str(64, { minBytes: 1, printable: true }),
  errno: str(32, { minBytes: 1, printable: true }),
  message: str(4096),
  client: optional(clientRef),
  generation: optional(uint()),
};
export const errorBody = object({ ...errorFields, cause: optional(object(errorFields)) });
export type ErrorBodyWire = Infer<typeof errorBody>;

/** A region as the broker publishes it. `size` and `offset` are in bytes; `gpa` is guest-physical. */
export const region = object({
  id: u32(),
  name: name(),
  gpa: gpa(),
  size: addr(),
  backing: u32(),
  offset: offset(),
  readonly: bool(),
  logDirty: bool(),
});
export type Region = Infer<typeof region>;

export const backingInfo = object({ backing: u32(), size: addr(), name: name() });
export type BackingInfo = Infer<typeof backingInfo>;

/** Region reference in owner requests: the broker-assigned id or the region's name. */
const regionRef = either(u32(), name());

// --- client -> broker requests -------------------------------------------------------------------

export const hello = object({
  t: t(Msg.HELLO),
  id: u32(),
  version: u32(),
  features: u32(),
  name: optional(name()),
});

export const status = object({ t: t(Msg.STATUS), id: u32(), space: optional(name()) });

export const attach = object({
  t: t(Msg.ATTACH),
  id: u32(),
  space: name(),
  /** observer (feature DIRTY): receives EV_DIRTY, maps nothing, acks nothing. */
  role: literal('owner', 'subscriber', 'observer'),
  /** What the client is ("plain", "kvm", "vhost", "vfio", "owner", ...): for status and logs. */
  kind: name(),
  /** maxRegions: the most regions (slots) the client can follow. coalesce (feature COALESCE): send this
   *  client a view in which adjacent regions contiguous in one backing are merged. mapsFromZero (feature
   *  MAPS_FROM_ZERO): the client maps each region's backing from offset 0 (protocol/backing-prefix.ts). */
  limits: optional(object({ maxRegions: optional(u32()), coalesce: optional(bool()), mapsFromZero: optional(bool()) })),
  /** Feature PIN: the client pins every region it maps; `limit` is the most bytes it may pin. */
  pin: optional(object({ limit: optional(addr()) })),
  /** Feature AUTH: the address space's subscriber token, when it has one. */
  token: optional(str(256)),
  /** Feature DIRTY: false declares that this subscriber never writes guest memory (default true). */
  writes: optional(bool()),
  /** Feature WATCH (observers): also receive EV_WATCH, the space's live event stream. */
  watch: optional(bool()),
  /** Feature RESUME: what the client already holds from an earlier connection. */
  resume: optional(
    object({
      epoch: str(64, { minBytes: 1, printable: true }),
      generation: uint(),
      backings: array(u32(), 65_536),
      /** Feature FENCE: the broker's id of the connection this one resumes (its ATTACH reply's `client`). */
      client: optional(u32()),
    }),
  ),
});

export const backingAdd = object({
  t: t(Msg.BACKING_ADD),
  id: u32(),
  name: optional(name()),
  /** Feature TRUSTED_FILE: accept a file that is not sealed against shrinking (tmpfs or hugetlbfs only). */
  unsealed: optional(bool()),
});
export const backingDrop = object({ t: t(Msg.BACKING_DROP), id: u32(), backing: u32() });

export const commitOp = tagged('op', {
  add: object({
    op: literal('add'),
    name: name(),
    gpa: addr(),
    size: addr(),
    backing: u32(),
    offset: addr(),
    readonly: optional(bool()),
    logDirty: optional(bool()),
  }),
  remove: object({ op: literal('remove'), region: regionRef }),
  set: object({ op: literal('set'), region: regionRef, readonly: optional(bool()), logDirty: optional(bool()) }),
});
export type CommitOp = Infer<typeof commitOp>;

export const commit = object({
  t: t(Msg.COMMIT),
  id: u32(),
  ops: array(commitOp, L.maxOpsPerCommit),
  /** If given, the commit is refused with MMB_ERR_STALE_GENERATION unless this is the current generation. */
  expect: optional(uint()),
});

/** An inclusive range of I/O virtual addresses, as the kernel's VFIO and iommufd uAPIs report them. */
export const iovaRange = object({ start: addr(), last: addr() });
export type IovaRange = Infer<typeof iovaRange>;

/** What a client with devices says about migrating them (feature MIGRATION). */
export const migrationDeclaration = object({ quiesce: bool(), deviceState: bool() });

/**
 * Feature DMA_RULES: how a client cuts a region into DMA mappings, from the region's start: chunks of
 * `chunkBytes` (the last one shorter; absent: the whole region), each cut into mappings of `pieceBytes`
 * (the last one shorter; absent: one per chunk); no field: one mapping per region. `align`: every
 * mapping's IOVA and size must be a multiple of it (a power of two; chunk and piece sizes are multiples).
 * protocol/dma-rules.ts computes both.
 */
export const dmaRules = object({ chunkBytes: optional(addr()), pieceBytes: optional(addr()), align: optional(addr()) });
export type DmaRules = Infer<typeof dmaRules>;

export const report = object({
  t: t(Msg.REPORT),
  id: u32(),
  /** IOVA ranges the client cannot map (the complement of its usable ranges): RAM must not go there. */
  reserved: optional(array(iovaRange, 1024)),
  /** How many more DMA mappings the client's IOMMU accepts. */
  dmaAvailable: optional(u32()),
  /** Bytes the client has actually pinned now. */
  pinned: optional(addr()),
  /** Whether DMA of the client's domain is cache-coherent (false: the guest needs wbinvd emulation). */
  coherent: optional(bool()),
  /** What does the work ("soft", "type1", "iommufd", "kvm", "software"): shown in status and logs. */
  backend: optional(name()),
  /** Devices behind the client (PCI addresses). */
  devices: optional(array(name(), 256)),
  /** Feature MIGRATION: how this client's writes reach the dirty log ("VFIO_IOMMU_DIRTY_PAGES", "all", ...). */
  dirtyTracking: optional(name()),
  /** Feature MIGRATION: whether it stops its devices' DMA before it acks a pause, and their state migrates. */
  migration: optional(migrationDeclaration),
  /** Feature DMA_RULES: how this client cuts regions into DMA mappings, and their IOVA alignment. */
  dma: optional(dmaRules),
});

export const findFree = object({
  t: t(Msg.FIND_FREE),
  id: u32(),
  size: addr(),
  /** Alignment of the returned GPA, a power of two >= the page size. Default: the page size. */
  align: optional(addr()),
  /** Search [min, max): defaults 0 and 2^52. */
  min: optional(addr()),
  max: optional(addr()),
});

export const dirtySync = object({
  t: t(Msg.DIRTY_SYNC),
  id: u32(),
  /** Regions to sync (ids or names); default: every region whose logging is on. */
  regions: optional(array(regionRef, 65_536)),
});

export const pause = object({ t: t(Msg.PAUSE), id: u32(), paused: bool() });

/** Feature PUBLISH (owner): the map as it stands is authoritative; waiting subscribers are synced to it. */
export const publish = object({ t: t(Msg.PUBLISH), id: u32() });

/** Feature FENCE (subscriber): it leaves and will hold nothing once its connection closes. */
export const detach = object({ t: t(Msg.DETACH), id: u32() });

/** Feature FENCE (subscriber): pidfds of processes it handed memory to (one fd per entry of `names`). */
export const delegate = object({ t: t(Msg.DELEGATE), id: u32(), names: array(name(), 16) });

/** Feature WATCH: the recent transactions of a space, newest last; `before` pages back (an entry's seq). */
export const history = object({ t: t(Msg.HISTORY), id: u32(), space: name(), before: optional(uint()), limit: optional(u32()) });
/** Feature IOAS: one request for everything about an I/O address space, told apart by `op` (docs/ioas.md). */
export const ioasOp = tagged('op', {
  map: object({ op: literal('map'), iova: addr(), gpa: addr(), size: addr(), readonly: optional(bool()) }),
  unmap: object({ op: literal('unmap'), iova: addr(), size: addr() }),
});
export type IoasOp = Infer<typeof ioasOp>;

const ioasDevices = () => array(name(), 256);
export const ioas = tagged('op', {
  /** Owner: a new, empty IOAS. */
  create: object({ t: t(Msg.IOAS), id: u32(), op: literal('create'), ioas: name() }),
  /** Owner: an IOAS no device is attached to (and no holder may reach) goes away with its mappings. */
  destroy: object({ t: t(Msg.IOAS), id: u32(), op: literal('destroy'), ioas: name() }),
  /** Owner: one transaction of IOVA maps and unmaps (every unmap, then every map). */
  commit: object({ t: t(Msg.IOAS), id: u32(), op: literal('commit'), ioas: name(), ops: array(ioasOp, L.maxOpsPerCommit), expect: optional(uint()) }),
  /** Subscriber (feature TWO_PHASE too): devices join the IOAS; the first one brings an EV_IOAS_SYNC. */
  attach: object({ t: t(Msg.IOAS), id: u32(), op: literal('attach'), ioas: name(), devices: ioasDevices() }),
  /** Subscriber: devices leave the IOAS; with the last one the client unmaps everything (EV_IOAS_SYNC, empty). */
  detach: object({ t: t(Msg.IOAS), id: u32(), op: literal('detach'), ioas: name(), devices: ioasDevices() }),
});

// --- client -> broker, no reply ------------------------------------------------------------------

export const ack = object({ t: t(Msg.ACK), seq: uint() });
export const nack = object({ t: t(Msg.NACK), seq: uint(), error: errorBody });

// --- broker -> client ----------------------------------------------------------------------------

export const reply = object({ t: t(Msg.REPLY), id: u32(), result: optional(unknownValue()), error: optional(errorBody) });

export const evBackings = object({ t: t(Msg.EV_BACKINGS), backings: array(backingInfo, L.maxFdsPerFrame) });
export const evBackingsGone = object({ t: t(Msg.EV_BACKINGS_GONE), backings: array(u32(), 65_536) });

export const evSync = object({
  t: t(Msg.EV_SYNC),
  seq: uint(),
  epoch: str(64, { minBytes: 1, printable: true }),
  generation: uint(),
  mode: literal('snapshot', 'delta'),
  part: u32(),
  last: bool(),
  regions: array(region, 1 << 20),
  /** Delta mode: ids of regions the client holds that no longer exist (or changed and are re-listed). */
  removed: array(u32(), 1 << 20),
  /** Feature COMPACT_SYNC: more of this part's regions (after `regions`, which is then empty) as columns in
   *  one bin (protocol/columns.ts); decoded and checked here, so the parsed message holds the regions. */
  columns: optional(bin('regions as columns', decodeRegionColumns)),
});

export const txnOp = tagged('op', {
  add: object({ op: literal('add'), region }),
  remove: object({ op: literal('remove'), region: u32() }),
  set: object({ op: literal('set'), region: u32(), readonly: bool(), logDirty: bool() }),
});
export type TxnOp = Infer<typeof txnOp>;

export const evTxn = object({ t: t(Msg.EV_TXN), seq: uint(), generation: uint(), ops: array(txnOp, L.maxOpsPerCommit) });
export const evRollback = object({ t: t(Msg.EV_ROLLBACK), seq: uint(), generation: uint() });
/** `seq` (feature TWO_PHASE only): ack it once the transaction's removals and reshapes are applied. */
export const evCommitted = object({ t: t(Msg.EV_COMMITTED), generation: uint(), seq: optional(uint()) });
export const bitmapInfo = object({ bitmap: u32(), region: u32(), gpa: gpa(), pages: addr() });
export type BitmapInfo = Infer<typeof bitmapInfo>;
export const evBitmaps = object({ t: t(Msg.EV_BITMAPS), bitmaps: array(bitmapInfo, L.maxFdsPerFrame) });
export const evBitmapsGone = object({ t: t(Msg.EV_BITMAPS_GONE), bitmaps: array(u32(), 65_536) });
export const evDirtyFlush = object({ t: t(Msg.EV_DIRTY_FLUSH), seq: uint() });
export const evPause = object({ t: t(Msg.EV_PAUSE), seq: uint(), paused: bool() });
export const dirtyRange = object({ gpa: gpa(), size: addr() });
export const evDirty = object({
  t: t(Msg.EV_DIRTY),
  /** Which sync this is (a counter per address space), shared by its parts. */
  sync: uint(),
  part: u32(),
  last: bool(),
  ranges: array(dirtyRange, 1 << 20),
});
/** An IOVA range mapped to guest-physical memory (feature IOAS): [iova, iova + size) -> [gpa, gpa + size). */
export const iovaMapping = object({ iova: iova(), gpa: gpa(), size: addr(), readonly: bool() });
export type IovaMapping = Infer<typeof iovaMapping>;
export const ioasTxnOp = tagged('op', {
  map: object({ op: literal('map'), iova: iova(), gpa: gpa(), size: addr(), readonly: bool() }),
  unmap: object({ op: literal('unmap'), iova: iova(), size: addr() }),
});
export type IoasTxnOp = Infer<typeof ioasTxnOp>;
/** The IOAS as it is, in parts that fit frames (parts share `seq`); an empty one (a detach) unmaps everything. */
export const evIoasSync = object({
  t: t(Msg.EV_IOAS_SYNC),
  seq: uint(),
  ioas: name(),
  generation: uint(),
  part: u32(),
  last: bool(),
  mappings: array(iovaMapping, 1 << 20),
});
/** A vote (maps only), or with `final` a committed transaction that only unmaps: apply it all, then ack. */
export const evIoasTxn = object({
  t: t(Msg.EV_IOAS_TXN),
  seq: uint(),
  ioas: name(),
  generation: uint(),
  ops: array(ioasTxnOp, L.maxOpsPerCommit),
  final: optional(bool()),
});
/** `seq` when the transaction unmaps something: ack it once the host IOMMU no longer maps it. */
export const evIoasCommitted = object({ t: t(Msg.EV_IOAS_COMMITTED), ioas: name(), generation: uint(), seq: optional(uint()) });
export const evIoasRollback = object({ t: t(Msg.EV_IOAS_ROLLBACK), seq: uint(), ioas: name(), generation: uint() });
export const evGoodbye = object({ t: t(Msg.EV_GOODBYE), error: errorBody });

// --- feature WATCH: what operators see -------------------------------------------------------------

/** Most ops of one transaction a watch event or history entry lists (`opsTotal` says how many it had). */
export const WATCH_MAX_OPS = 64;

/** One change of a transaction, with the whole region (as it was for a remove, as it becomes otherwise). */
export const changeOp = tagged('op', {
  add: object({ op: literal('add'), region }),
  remove: object({ op: literal('remove'), region }),
  set: object({ op: literal('set'), region }),
});
export type ChangeOp = Infer<typeof changeOp>;

/**
 * One transaction as the operator sees it. `generation` is the one it became, or would have become.
 * `outcome`: committed; rolled-back (sent to subscribers, refused by one, undone everywhere); refused
 * (nothing was sent to anyone: a check before the vote failed). `us`: from the start of its run to its
 * outcome, in microseconds. `error`: why it did not commit (for a committed one: a client that could not
 * be fenced, MMB_ERR_COMMITTED_UNFENCED). `request`: for a refused one, the ops as the owner sent them.
 */
export const historyEntry = object({
  seq: uint(),
  generation: uint(),
  /** Milliseconds since the Unix epoch, when it started to run. */
  time: uint(),
  owner: clientRef,
  outcome: literal('committed', 'rolled-back', 'refused'),
  us: uint(),
  ops: array(changeOp, WATCH_MAX_OPS),
  opsTotal: u32(),
  request: optional(array(commitOp, WATCH_MAX_OPS)),
  error: optional(errorBody),
});
export type HistoryEntry = Infer<typeof historyEntry>;

const clientRole = literal('owner', 'subscriber', 'observer');

/** What a watcher is told, one event per EV_WATCH. */
export const watchEvent = tagged('kind', {
  /** A transaction is sent to the subscribers for their vote (again, with a higher attempt, after a retry). */
  txn: object({ kind: literal('txn'), generation: uint(), owner: clientRef, ops: array(changeOp, WATCH_MAX_OPS), opsTotal: u32(), attempt: u32() }),
  /** A transaction's outcome, as HISTORY lists it. */
  outcome: object({ kind: literal('outcome'), entry: historyEntry }),
  joined: object({ kind: literal('joined'), client: clientRef, role: clientRole }),
  left: object({ kind: literal('left'), client: clientRef, role: clientRole, reason: literal('evicted', 'disconnected', 'leaving') }),
  /** A subscriber broke its contract (missed a deadline, failed to apply or undo) and was removed. */
  evicted: object({ kind: literal('evicted'), client: clientRef, error: errorBody }),
  /** A client whose connection ended may still reach memory: a holder until it is fenced. */
  holder: object({
    kind: literal('holder'),
    client: clientRef,
    reason: literal('evicted', 'disconnected', 'leaving'),
    state: literal('holding', 'signalled', 'fenced'),
    backings: array(u32(), 1 << 16),
    alive: array(str(256), 32),
  }),
  /** A holder let go: every process behind it exited, it reconciled, or it detached cleanly. */
  fenced: object({ kind: literal('fenced'), client: clientRef, how: literal('exited', 'reconciled', 'detached'), ms: uint() }),
  /** A dirty sync completed: regions collected, dirty pages, bytes of bitmap, duration. */
  'dirty-sync': object({ kind: literal('dirty-sync'), regions: u32(), dirty: uint(), bytes: uint(), us: uint() }),
  published: object({ kind: literal('published'), generation: uint() }),
  /** A pinning client reported its pinned bytes (REPORT.pinned), during a long pin too. */
  pinned: object({ kind: literal('pinned'), client: clientRef, pinned: uint(), predicted: uint() }),
});
export type WatchEvent = Infer<typeof watchEvent>;

/** Feature WATCH, to observers that attached with `watch`: `seq` counts this space's events, `time` is ms since the epoch. */
export const evWatch = object({ t: t(Msg.EV_WATCH), space: name(), seq: uint(), time: uint(), event: watchEvent });
export const evError = object({ t: t(Msg.EV_ERROR), error: errorBody });

// --- reply results (validated by the client that made the request) -------------------------------

export const helloResult = object({
  version: u32(),
  features: u32(),
  broker: name(),
  limits: object({ maxFrameBytes: u32(), maxFdsPerFrame: u32(), maxOpsPerCommit: u32(), maxNameBytes: u32() }),
  /** Feature WATCH: the broker's software release ("0.1.0"). */
  brokerVersion: optional(str(64, { minBytes: 1, printable: true })),
});

export const attachResult = object({
  client: u32(),
  epoch: str(64, { minBytes: 1, printable: true }),
  generation: uint(),
  /** "wait" (feature PUBLISH, subscribers): the space is unpublished; keep what you hold, an EV_SYNC follows
   *  once the owner publishes. */
  sync: literal('snapshot', 'delta', 'none', 'wait'),
  /** Feature PUBLISH: whether the space is published (owners). */
  published: optional(bool()),
});

export const backingAddResult = object({
  backing: u32(),
  size: addr(),
  /** Feature TRUSTED_FILE: the backing's page size (4 KiB, or a huge page size) and whether it is sealed. */
  pageSize: optional(addr()),
  sealed: optional(bool()),
});
export const reportResult = object({});
export const dirtySyncResult = object({
  /** Where each region's cleared bits were ORed into the buffer sent with the request. */
  regions: array(object({ region: u32(), name: name(), gpa: addr(), pages: addr(), offset: addr(), dirty: addr() }), 65_536),
  /** Bytes of the buffer used. */
  bytes: addr(),
});
export const pauseResult = object({});
export const findFreeResult = object({ gpa: addr() });
export const publishResult = object({ generation: uint() });
export const detachResult = object({});
export const delegateResult = object({});
export const backingDropResult = object({ released: bool() });
/** `entries`: oldest first; `more`: older entries exist (ask again with `before` = the first entry's seq). */
export const historyResult = object({
  space: name(),
  epoch: str(64, { minBytes: 1, printable: true }),
  generation: uint(),
  entries: array(historyEntry, 1 << 16),
  more: bool(),
});
/** Feature IOAS: the IOAS's generation after the request; a commit also says how many bytes it mapped and unmapped. */
export const ioasResult = object({ generation: uint(), mapped: optional(addr()), unmapped: optional(addr()) });
export const commitResult = object({
  generation: uint(),
  added: array(object({ id: u32(), name: name() }), L.maxOpsPerCommit),
  /** Backings no region references any more once this commit completed; the owner may drop them. */
  unreferenced: array(u32(), 65_536),
});

const statusClient = object(
  {
    id: u32(),
    role: literal('owner', 'subscriber', 'observer'),
    kind: name(),
    name: name(),
    pid: u32(),
    uid: u32(),
    transport: literal('socket', 'inproc'),
    ackedGeneration: uint(),
    /** waiting: attached to an unpublished space (feature PUBLISH); leaving: sent DETACH (feature FENCE). */
    state: literal('syncing', 'ready', 'applying', 'waiting', 'leaving'),
    // Subscribers only:
    /** Regions in this client's view (coalesced, if it coalesces). */
    regions: optional(u32()),
    maxRegions: optional(u32()),
    coalesce: optional(bool()),
    /** Feature MAPS_FROM_ZERO: it maps each region's backing from offset 0. */
    mapsFromZero: optional(bool()),
    writes: optional(bool()),
    /** Pinning clients: their limit (nil: none), the bytes the broker predicts they pin, and what they reported. */
    pin: optional(object({ limit: optional(addr()), predicted: addr(), actual: optional(addr()) }, { open: true })),
    reserved: optional(array(iovaRange, 1024)),
    dmaAvailable: optional(u32()),
    coherent: optional(bool()),
    backend: optional(name()),
    devices: optional(array(name(), 256)),
    dirtyTracking: optional(name()),
    migration: optional(migrationDeclaration),
    /** Feature DMA_RULES: how it cuts regions into DMA mappings, as it reported them. */
    dma: optional(dmaRules),
  },
  { open: true },
);
const statusBacking = object({ backing: u32(), name: name(), size: addr(), regions: u32(), held: bool() }, { open: true });
export const statusSpace = object(
  {
    name: name(),
    epoch: str(64, { minBytes: 1 }),
    generation: uint(),
    /** Bytes of guest memory in the map. */
    bytes: optional(addr()),
    /** Whether the writers are paused (PAUSE), and how many regions log dirty pages. */
    paused: optional(bool()),
    logging: optional(u32()),
    /** The space's pin budget (limit nil: none), the predicted and the reported pinned bytes of all clients. */
    pinBudget: optional(object({ limit: optional(addr()), predicted: addr(), actual: addr() }, { open: true })),
    regions: array(region, 1 << 20),
    backings: array(statusBacking, 1 << 20),
    clients: array(statusClient, 1 << 20),
    /** Feature PUBLISH: whether the owner published the map (a restarted broker's spaces start unpublished). */
    published: optional(bool()),
    /** Feature IOAS: the space's I/O address spaces, who is attached to each, and who may still reach them. */
    ioas: optional(
      array(
        object(
          {
            name: name(),
            generation: uint(),
            /** How many IOVA mappings it has, and their bytes (what a shadowing vfio client pins). */
            mappings: u32(),
            bytes: addr(),
            /** `pinned`: what the client last reported pinned (REPORT), across its IOASes. */
            attached: array(object({ client: clientRef, devices: array(name(), 256), pinned: optional(addr()) }, { open: true }), 1 << 16),
            /** Clients whose connection ended while attached: they may still reach its mappings until fenced. */
            holders: array(u32(), 1 << 16),
          },
          { open: true },
        ),
        1 << 16,
      ),
    ),
    /** Clients whose connection ended while they may still reach memory, until they are fenced. */
    holders: optional(
      array(
        object(
          {
            client: clientRef,
            reason: literal('evicted', 'disconnected', 'leaving'),
            state: literal('holding', 'signalled', 'fenced'),
            /** Milliseconds since its connection ended. */
            ms: uint(),
            backings: array(u32(), 1 << 20),
            /** Processes (the client, its delegates) not known to have exited. */
            alive: array(str(256), 32),
          },
          { open: true },
        ),
        1 << 16,
      ),
    ),
  },
  { open: true },
);
export const statusResult = object({ spaces: array(statusSpace, 1 << 16) }, { open: true });

// --- the table --------------------------------------------------------------------------------------

export type Direction = 'request' | 'to-broker' | 'to-client';
/** How many fds ride with a message: none, exactly one, or one per entry of a list field. */
export type FdRule = { kind: 'none' } | { kind: 'one' } | { kind: 'per-item'; field: string };

export interface MessageSpec {
  id: number;
  name: string;
  direction: Direction;
  schema: Schema<unknown>;
  fds: FdRule;
  /** Feature bit that must be negotiated to use the message (0: base protocol). */
  feature: number;
  /** For requests: the schema of the REPLY's result. */
  result?: Schema<unknown>;
  /**
   * The feature under which this message may hold msgpack bin values (in the fields whose schema takes
   * one). Without it, or when it was not negotiated, a body holding a bin is refused, as the base protocol
   * refuses every bin.
   */
  binFeature?: number;
}

const none: FdRule = { kind: 'none' };
const spec = (id: number, name: string, direction: Direction, schema: Schema<unknown>, extra: Partial<MessageSpec> = {}): MessageSpec => ({
  id,
  name,
  direction,
  schema,
  fds: none,
  feature: 0,
  ...extra,
});

export const MESSAGES: ReadonlyMap<number, MessageSpec> = new Map(
  [
    spec(Msg.HELLO, 'HELLO', 'request', hello, { result: helloResult }),
    spec(Msg.STATUS, 'STATUS', 'request', status, { result: statusResult }),
    spec(Msg.ATTACH, 'ATTACH', 'request', attach, { result: attachResult }),
    spec(Msg.BACKING_ADD, 'BACKING_ADD', 'request', backingAdd, { fds: { kind: 'one' }, result: backingAddResult }),
    spec(Msg.BACKING_DROP, 'BACKING_DROP', 'request', backingDrop, { result: backingDropResult }),
    spec(Msg.COMMIT, 'COMMIT', 'request', commit, { result: commitResult }),
    spec(Msg.REPORT, 'REPORT', 'request', report, { result: reportResult, feature: Feature.REPORT }),
    spec(Msg.FIND_FREE, 'FIND_FREE', 'request', findFree, { result: findFreeResult, feature: Feature.PLACE }),
    spec(Msg.DIRTY_SYNC, 'DIRTY_SYNC', 'request', dirtySync, { fds: { kind: 'one' }, result: dirtySyncResult, feature: Feature.DIRTY }),
    spec(Msg.PAUSE, 'PAUSE', 'request', pause, { result: pauseResult, feature: Feature.DIRTY }),
    spec(Msg.PUBLISH, 'PUBLISH', 'request', publish, { result: publishResult, feature: Feature.PUBLISH }),
    spec(Msg.DETACH, 'DETACH', 'request', detach, { result: detachResult, feature: Feature.FENCE }),
    spec(Msg.DELEGATE, 'DELEGATE', 'request', delegate, { fds: { kind: 'per-item', field: 'names' }, result: delegateResult, feature: Feature.FENCE }),
    spec(Msg.HISTORY, 'HISTORY', 'request', history, { result: historyResult, feature: Feature.WATCH }),
    spec(Msg.IOAS, 'IOAS', 'request', ioas, { result: ioasResult, feature: Feature.IOAS }),
    spec(Msg.ACK, 'ACK', 'to-broker', ack),
    spec(Msg.NACK, 'NACK', 'to-broker', nack),
    spec(Msg.REPLY, 'REPLY', 'to-client', reply),
    spec(Msg.EV_BACKINGS, 'EV_BACKINGS', 'to-client', evBackings, { fds: { kind: 'per-item', field: 'backings' } }),
    spec(Msg.EV_BACKINGS_GONE, 'EV_BACKINGS_GONE', 'to-client', evBackingsGone),
    spec(Msg.EV_SYNC, 'EV_SYNC', 'to-client', evSync, { binFeature: Feature.COMPACT_SYNC }),
    spec(Msg.EV_TXN, 'EV_TXN', 'to-client', evTxn),
    spec(Msg.EV_ROLLBACK, 'EV_ROLLBACK', 'to-client', evRollback),
    spec(Msg.EV_COMMITTED, 'EV_COMMITTED', 'to-client', evCommitted),
    spec(Msg.EV_GOODBYE, 'EV_GOODBYE', 'to-client', evGoodbye),
    spec(Msg.EV_ERROR, 'EV_ERROR', 'to-client', evError),
    spec(Msg.EV_BITMAPS, 'EV_BITMAPS', 'to-client', evBitmaps, { fds: { kind: 'per-item', field: 'bitmaps' }, feature: Feature.DIRTY }),
    spec(Msg.EV_BITMAPS_GONE, 'EV_BITMAPS_GONE', 'to-client', evBitmapsGone, { feature: Feature.DIRTY }),
    spec(Msg.EV_DIRTY_FLUSH, 'EV_DIRTY_FLUSH', 'to-client', evDirtyFlush, { feature: Feature.DIRTY }),
    spec(Msg.EV_PAUSE, 'EV_PAUSE', 'to-client', evPause, { feature: Feature.DIRTY }),
    spec(Msg.EV_DIRTY, 'EV_DIRTY', 'to-client', evDirty, { feature: Feature.DIRTY }),
    spec(Msg.EV_WATCH, 'EV_WATCH', 'to-client', evWatch, { feature: Feature.WATCH }),
    spec(Msg.EV_IOAS_SYNC, 'EV_IOAS_SYNC', 'to-client', evIoasSync, { feature: Feature.IOAS }),
    spec(Msg.EV_IOAS_TXN, 'EV_IOAS_TXN', 'to-client', evIoasTxn, { feature: Feature.IOAS }),
    spec(Msg.EV_IOAS_COMMITTED, 'EV_IOAS_COMMITTED', 'to-client', evIoasCommitted, { feature: Feature.IOAS }),
    spec(Msg.EV_IOAS_ROLLBACK, 'EV_IOAS_ROLLBACK', 'to-client', evIoasRollback, { feature: Feature.IOAS }),
  ].map((s) => [s.id, s]),
);

export type Hello = Infer<typeof hello>;
export type Status = Infer<typeof status>;
export type Attach = Infer<typeof attach>;
export type BackingAdd = Infer<typeof backingAdd>;
export type BackingDrop = Infer<typeof backingDrop>;
export type Commit = Infer<typeof commit>;
export type Report = Infer<typeof report>;
export type DirtySync = Infer<typeof dirtySync>;
export type Pause = Infer<typeof pause>;
export type FindFree = Infer<typeof findFree>;
export type Publish = Infer<typeof publish>;
export type Detach = Infer<typeof detach>;
export type Delegate = Infer<typeof delegate>;
export type HistoryRequest = Infer<typeof history>;
export type Ioas = Infer<typeof ioas>;
export type Ack = Infer<typeof ack>;
export type Nack = Infer<typeof nack>;
export type Reply = Infer<typeof reply>;
export type EvBackings = Infer<typeof evBackings>;
export type EvBackingsGone = Infer<typeof evBackingsGone>;
export type EvSync = Infer<typeof evSync>;
export type EvTxn = Infer<typeof evTxn>;
export type EvRollback = Infer<typeof evRollback>;
export type EvCommitted = Infer<typeof evCommitted>;
export type EvGoodbye = Infer<typeof evGoodbye>;
export type EvError = Infer<typeof evError>;
export type EvBitmaps = Infer<typeof evBitmaps>;
export type EvBitmapsGone = Infer<typeof evBitmapsGone>;
export type EvDirtyFlush = Infer<typeof evDirtyFlush>;
export type EvPause = Infer<typeof evPause>;
export type EvDirty = Infer<typeof evDirty>;
export type EvWatch = Infer<typeof evWatch>;
export type EvIoasSync = Infer<typeof evIoasSync>;
export type EvIoasTxn = Infer<typeof evIoasTxn>;
export type EvIoasCommitted = Infer<typeof evIoasCommitted>;
export type EvIoasRollback = Infer<typeof evIoasRollback>;

export type HelloResult = Infer<typeof helloResult>;
export type AttachResult = Infer<typeof attachResult>;
export type BackingAddResult = Infer<typeof backingAddResult>;
export type BackingDropResult = Infer<typeof backingDropResult>;
export type CommitResult = Infer<typeof commitResult>;
export type FindFreeResult = Infer<typeof findFreeResult>;
export type ReportResult = Infer<typeof reportResult>;
export type DirtySyncResult = Infer<typeof dirtySyncResult>;
export type PauseResult = Infer<typeof pauseResult>;
export type PublishResult = Infer<typeof publishResult>;
export type IoasResult = Infer<typeof ioasResult>;
export type StatusResult = Infer<typeof statusResult>;
export type HistoryResult = Infer<typeof historyResult>;
export type StatusSpace = Infer<typeof statusSpace>;

/** Messages a broker accepts. */
export type ToBroker =
  | Hello
  | Status
  | Attach
  | BackingAdd
  | BackingDrop
  | Commit
  | Report
  | FindFree
  | DirtySync
  | Pause
  | Publish
  | Detach
  | Delegate
  | HistoryRequest
  | Ioas
  | Ack
  | Nack;
/** Messages a client accepts. */
export type ToClient =
  | Reply
  | EvBackings
  | EvBackingsGone
  | EvSync
  | EvTxn
  | EvRollback
  | EvCommitted
  | EvGoodbye
  | EvError
  | EvBitmaps
  | EvBitmapsGone
  | EvDirtyFlush
  | EvPause
  | EvDirty
  | EvWatch
  | EvIoasSync
  | EvIoasTxn
  | EvIoasCommitted
  | EvIoasRollback;
