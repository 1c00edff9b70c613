// Every failure memmap-broker reports, in one table. Each entry has a stable code (match on it), the
// errno-style class it belongs to, and a one-line meaning. docs/errors.md documents exactly these codes;
// test/errors-docs.test.ts fails when the two drift apart.
//
// One class per code (undici style): `err instanceof OverlapError` or `err.code === 'MMB_ERR_OVERLAP'`.
// Errors cross the wire as {code, errno, message, client?, generation?, cause?} and are rebuilt into the
// same class on the other side.

export type Errno =
  | 'EINVAL'
  | 'ENOENT'
  | 'EEXIST'
  | 'ENOSPC'
  | 'EPERM'
  | 'EOPNOTSUPP'
  | 'E2BIG'
  | 'ETIMEDOUT'
  | 'EBUSY'
  | 'ESTALE'
  | 'EPROTO'
  | 'EMSGSIZE'
  | 'ENOBUFS'
  | 'ECONNRESET'
  | 'ESHUTDOWN'
  | 'ENOMEM'
  | 'ECANCELED'
  | 'EAGAIN'
  | 'EADDRINUSE'
  | 'EIO';

interface ErrorSpec {
  readonly errno: Errno;
  readonly summary: string;
}

// One line per code, read as a table (docs/errors.md lists the same rows): not reflowed by Prettier.
// prettier-ignore
export const ERROR_TABLE = {
  // --- framing and message shape ---
  MMB_ERR_FRAME_TOO_LARGE: { errno: 'E2BIG', summary: 'A frame body is longer than the negotiated maximum frame size.' },
  MMB_ERR_BAD_FRAME: { errno: 'EINVAL', summary: 'A frame is malformed: reserved header bits set, or a body that is not exactly one msgpack map.' },
  MMB_ERR_BAD_MESSAGE: { errno: 'EINVAL', summary: 'A message has a missing, unknown or ill-typed field, or a value out of its range.' },
  MMB_ERR_UNKNOWN_MESSAGE: { errno: 'EOPNOTSUPP', summary: 'The message id is not defined by the negotiated protocol, or is not valid in this direction.' },
  MMB_ERR_TOO_MANY_FDS: { errno: 'E2BIG', summary: 'A frame carries more descriptors than allowed, or too many are pending unclaimed.' },
  MMB_ERR_FD_MISMATCH: { errno: 'EINVAL', summary: 'The descriptors that arrived do not match what the frame header or the message says.' },
  MMB_ERR_FDS_TRUNCATED: { errno: 'EMSGSIZE', summary: 'The kernel dropped descriptors from a message (MSG_CTRUNC); the stream cannot be trusted.' },
  MMB_ERR_VERSION: { errno: 'EOPNOTSUPP', summary: 'The peer speaks a protocol version this side does not support.' },
  MMB_ERR_FEATURE: { errno: 'EOPNOTSUPP', summary: 'A field or message was used without negotiating the feature that gates it.' },
  MMB_ERR_STATE: { errno: 'EPROTO', summary: 'The message is not allowed in the connection\'s current state (before HELLO, a second ATTACH, an ack nobody asked for).' },

  // --- access ---
  MMB_ERR_NO_SPACE: { errno: 'ENOENT', summary: 'No address space has that name.' },
  MMB_ERR_OWNER_EXISTS: { errno: 'EBUSY', summary: 'The address space already has an owner attached.' },
  MMB_ERR_NOT_OWNER: { errno: 'EPERM', summary: 'Only the owner of an address space may change it.' },
  MMB_ERR_PERMISSION: { errno: 'EPERM', summary: 'The peer\'s credentials (SO_PEERCRED) or token do not allow this role on this address space.' },
  MMB_ERR_CONNECTION_LIMIT: { errno: 'EAGAIN', summary: 'The broker already serves as many connections as it allows; try again later.' },
  MMB_ERR_RATE_LIMIT: { errno: 'EAGAIN', summary: 'The connection sent requests faster than the broker allows; the request was not run.' },
  MMB_ERR_UNSAFE_PATH: { errno: 'EPERM', summary: 'A path the broker must trust (its socket\'s directory or an ancestor, its token file) can be changed or read by other users, or is a symlink it will not follow.' },
  MMB_ERR_HANDSHAKE_TIMEOUT: { errno: 'ETIMEDOUT', summary: 'A connection did not complete HELLO and ATTACH within the broker\'s deadline, or sat idle before attaching; it was closed.' },

  // --- the map ---
  MMB_ERR_BACKING_INVALID: { errno: 'EINVAL', summary: 'A backing descriptor is not a memfd or hugetlbfs file.' },
  MMB_ERR_BACKING_UNSEALED: { errno: 'EINVAL', summary: 'A backing memfd is not sealed against shrinking (F_SEAL_SHRINK).' },
  MMB_ERR_BACKING_TOO_SMALL: { errno: 'EINVAL', summary: 'A region reaches past the end of its backing.' },
  MMB_ERR_NO_BACKING: { errno: 'ENOENT', summary: 'No backing has that id in this address space.' },
  MMB_ERR_UNALIGNED: { errno: 'EINVAL', summary: 'A GPA, IOVA, size or backing offset is not page aligned.' },
  MMB_ERR_OUT_OF_RANGE: { errno: 'EINVAL', summary: 'A region is empty, or reaches beyond the 52-bit guest-physical limit.' },
  MMB_ERR_OVERLAP: { errno: 'EEXIST', summary: 'A region would overlap another region of the same address space.' },
  MMB_ERR_NO_REGION: { errno: 'ENOENT', summary: 'No region has that id or name in this address space.' },
  MMB_ERR_REGION_EXISTS: { errno: 'EEXIST', summary: 'A region with that name already exists in this address space.' },
  MMB_ERR_SPACE_LIMIT: { errno: 'ENOSPC', summary: 'The address space would exceed its region or backing limit.' },
  MMB_ERR_CLIENT_LIMIT: { errno: 'ENOSPC', summary: 'A subscriber\'s declared limit (max regions) would be exceeded; nothing was changed.' },
  MMB_ERR_BACKING_PREFIX: {
    errno: 'EPERM',
    summary:
      'A subscriber that maps each backing from offset 0 (a vhost-user back-end) would reach memory of that backing the map does not give it writable (a read-only region, or memory in no region); nothing was changed.',
  },
  MMB_ERR_RESERVED_RANGE: { errno: 'EINVAL', summary: 'A region (or an IOVA mapping) would cover an IOVA range a subscriber reported as reserved (MSI window, PCI hole); nothing was changed.' },
  MMB_ERR_PIN_BUDGET: { errno: 'ENOSPC', summary: 'Pinning the memory would exceed a subscriber\'s pin limit or the address space\'s pin budget; nothing was changed.' },
  MMB_ERR_NO_FREE_RANGE: { errno: 'ENOSPC', summary: 'No free GPA range of that size and alignment avoids every region and reserved range.' },
  MMB_ERR_NOT_LOGGING: { errno: 'ENOENT', summary: 'A dirty sync names a region whose dirty logging is off.' },
  MMB_ERR_BUFFER_TOO_SMALL: { errno: 'E2BIG', summary: 'The buffer given for a dirty sync is too small; the message says how many bytes it needs.' },
  MMB_ERR_BUFFER_INVALID: { errno: 'EINVAL', summary: 'The buffer given for a dirty sync is not a read-write memfd sealed against shrinking.' },
  MMB_ERR_STALE_GENERATION: { errno: 'ESTALE', summary: 'The generation named is not the current one (COMMIT.expect), or an ack names an event that is not pending.' },
  MMB_ERR_TOO_BUSY: { errno: 'EBUSY', summary: 'Too many transactions are queued on the address space.' },

  // --- fan-out and acks ---
  MMB_ERR_CLIENT_REFUSED: { errno: 'EIO', summary: 'A subscriber refused a transaction for a reason outside this table; the transaction was rolled back.' },
  MMB_ERR_MAP_FAILED: { errno: 'EIO', summary: 'A subscriber could not map or unmap memory (the errno of the failing syscall is carried).' },
  MMB_ERR_PIN_FAILED: { errno: 'ENOMEM', summary: 'A subscriber could not pin memory (mlock or the IOMMU map failed; the syscall\'s errno is carried).' },
  MMB_ERR_IOMMU: { errno: 'EIO', summary: 'A VFIO or iommufd operation failed (the ioctl\'s errno is carried).' },
  MMB_ERR_KVM: { errno: 'EIO', summary: 'A KVM operation failed (the ioctl\'s errno is carried).' },
  MMB_ERR_CANCELLED: { errno: 'ECANCELED', summary: 'Work in progress (pinning a large region) was cancelled, e.g. because the region was removed.' },
  MMB_ERR_NO_DEVICE: { errno: 'ENOENT', summary: 'No such device, or it is not bound to vfio-pci, or its IOMMU group is not viable.' },
  MMB_ERR_PAUSED: { errno: 'EBUSY', summary: 'Guest memory may not be written while the address space is paused for migration.' },
  MMB_ERR_MIGRATION_BLOCKED: { errno: 'EOPNOTSUPP', summary: 'A migration was refused: a client has devices that cannot be quiesced or whose state cannot be migrated (it names them); accept the risk explicitly to migrate anyway.' },
  MMB_ERR_UNSUPPORTED: { errno: 'EOPNOTSUPP', summary: 'This machine lacks what the operation needs (no /dev/kvm, no /dev/vfio, no iommufd); the message says which.' },
  MMB_ERR_CLIENT_TIMEOUT: { errno: 'ETIMEDOUT', summary: 'A subscriber did not ack within the deadline and was evicted.' },
  MMB_ERR_SLOW_READER: { errno: 'ENOBUFS', summary: 'A peer let too many bytes queue up unread and was disconnected.' },
  MMB_ERR_NOT_FENCED: { errno: 'EBUSY', summary: 'A client that may still reach memory this change removes or write-protects could not be fenced in time (it neither exited nor reconciled, or could not be signalled); nothing was changed.' },
  MMB_ERR_COMMITTED_UNFENCED: { errno: 'EBUSY', summary: 'The change was committed (the generation advanced), but a client failed to finish it and could not be fenced: the memory it removed stays held until that client is fenced.' },

  // --- I/O address spaces (feature IOAS, docs/ioas.md) ---
  MMB_ERR_NO_IOAS: { errno: 'ENOENT', summary: 'No I/O address space has that name in this address space.' },
  MMB_ERR_IOAS_EXISTS: { errno: 'EEXIST', summary: 'An I/O address space with that name already exists in this address space.' },
  MMB_ERR_IOAS_BUSY: { errno: 'EBUSY', summary: 'The I/O address space still has devices attached or a client that may reach its mappings, or the device is already attached to another one.' },
  MMB_ERR_IOVA_OVERLAP: { errno: 'EEXIST', summary: 'An IOVA mapping would overlap another mapping of the same I/O address space; nothing was changed.' },
  MMB_ERR_IOVA_PARTIAL: { errno: 'EINVAL', summary: 'An unmap covers only part of an IOVA mapping; unmaps remove whole mappings (as VFIO and iommufd do); nothing was changed.' },
  MMB_ERR_NOT_RAM: { errno: 'EINVAL', summary: 'An IOVA mapping would point at guest-physical addresses that are not RAM of the map (no region, across two regions, or writable into a read-only one); nothing was changed.' },
  MMB_ERR_RAM_MAPPED: { errno: 'EBUSY', summary: 'A transaction would remove RAM, or change its access, while an IOVA mapping points at it: unmap it first; nothing was changed.' },

  // --- lifecycle (mostly raised on the client side) ---
  MMB_ERR_CONNECT: { errno: 'ECONNRESET', summary: 'The broker socket could not be reached (the errno of connect(2) is carried).' },
  MMB_ERR_DISCONNECTED: { errno: 'ECONNRESET', summary: 'The connection closed while a request or transaction was outstanding.' },
  MMB_ERR_TIMEOUT: { errno: 'ETIMEDOUT', summary: 'A request got no reply within its deadline.' },
  MMB_ERR_SHUTDOWN: { errno: 'ESHUTDOWN', summary: 'The broker is shutting down.' },
  MMB_ERR_PROTOCOL: { errno: 'EPROTO', summary: 'The broker sent a message this client cannot accept; the connection was closed.' },
  MMB_ERR_INVALID_ARG: { errno: 'EINVAL', summary: 'A library or command-line argument is invalid.' },
  MMB_ERR_ADDRESS_IN_USE: { errno: 'EADDRINUSE', summary: 'Another broker already listens on that socket path (or another server on the metrics address); nothing was started.' },
  MMB_ERR_INTERNAL: { errno: 'EIO', summary: 'An unexpected internal failure; the message names it. Please report it.' },
} as const satisfies Record<string, ErrorSpec>;

export type ErrorCode = keyof typeof ERROR_TABLE;

/** Which client a fan-out error is about. */
export interface ClientRef {
  id: number;
  kind: string;
  name: string;
  pid: number;
}

/** The wire form of an error. `cause` is one level deep. */
export interface ErrorBody {
  code: string;
  errno: string;
  message: string;
  client?: ClientRef;
  generation?: number;
  cause?: ErrorBody;
}

export interface MmbErrorOptions {
  cause?: unknown;
  client?: ClientRef;
  generation?: number;
  /** Overrides the table's errno, for codes that carry a syscall's errno (MAP_FAILED, CONNECT). */
  errno?: string;
}

const BRAND = Symbol.for('memmap-broker.error');

export function isErrorCode(code: unknown): code is ErrorCode {
  return typeof code === 'string' && Object.hasOwn(ERROR_TABLE, code);
}

/** Base class of every memmap-broker error. */
export class MmbError extends Error {
  readonly code: ErrorCode;
  readonly errno: string;
  /** The client a fan-out error is about (which subscriber refused, timed out, ...). */
  readonly client: ClientRef | undefined;
  /** The generation the error is about, when there is one. */
  readonly generation: number | undefined;

  constructor(code: ErrorCode, message: string, options: MmbErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.code = code;
    this.errno = options.errno ?? ERROR_TABLE[code].errno;
    this.client = options.client;
    this.generation = options.generation;
  }

  get [BRAND](): true {
    return true;
  }

  /** Encodes the error for the wire (one level of cause). */
  toWire(): ErrorBody {
    const body: ErrorBody = { code: this.code, errno: this.errno, message: this.message };
    if (this.client) body.client = { ...this.client };
    if (this.generation !== undefined) body.generation = this.generation;
    const cause = this.cause;
    if (cause instanceof MmbError) {
      const { cause: _drop, ...inner } = cause.toWire();
      body.cause = inner;
    } else if (cause instanceof Error) {
      const c = cause as Error & { code?: unknown };
      body.cause = {
        code: typeof c.code === 'string' ? c.code : 'Error',
        errno: typeof c.code === 'string' && /^E[A-Z0-9]+$/.test(c.code) ? c.code : 'EIO',
        message: c.message,
      };
    }
    return body;
  }

  /** Rebuilds an error received from the wire. Unknown codes become MMB_ERR_INTERNAL, keeping the text. */
  static fromWire(body: ErrorBody): MmbError {
    const code: ErrorCode = isErrorCode(body.code) ? body.code : 'MMB_ERR_INTERNAL';
    const message = code === body.code ? body.message : `${body.code}: ${body.message}`;
    const options: MmbErrorOptions = { errno: body.errno };
    if (body.client) options.client = body.client;
    if (body.generation !== undefined) options.generation = body.generation;
    if (body.cause) options.cause = MmbError.fromWire(body.cause);
    return createError(code, message, options);
  }
}

export function isMmbError(err: unknown, code?: ErrorCode): err is MmbError {
  return typeof err === 'object' && err !== null && (err as Record<symbol, unknown>)[BRAND] === true && (code === undefined || (err as MmbError).code === code);
}

type MmbErrorClass = new (message: string, options?: MmbErrorOptions) => MmbError;
const classes = new Map<ErrorCode, MmbErrorClass>();

/** 'MMB_ERR_BACKING_TOO_SMALL' -> 'BackingTooSmallError' */
export function className(code: ErrorCode): string {
  return (
    code
      .slice('MMB_ERR_'.length)
      .toLowerCase()
      .split('_')
      .map((w) => w.charAt(0).toUpperCase() + w.slice(1))
      .join('') + 'Error'
  );
}

function define<C extends ErrorCode>(code: C) {
  const cls = class extends MmbError {
    static readonly code: C = code;
    constructor(message: string, options?: MmbErrorOptions) {
      super(code, message, options);
    }
  };
  const name = className(code);
  Object.defineProperty(cls, 'name', { value: name });
  Object.defineProperty(cls.prototype, 'name', { value: name, enumerable: false, configurable: true, writable: true });
  classes.set(code, cls);
  return cls;
}

/** Creates an instance of the class registered for `code`. */
export function createError(code: ErrorCode, message: string, options?: MmbErrorOptions): MmbError {
  const cls = classes.get(code);
  return cls ? new cls(message, options) : new MmbError(code, message, options);
}

export const FrameTooLargeError = define('MMB_ERR_FRAME_TOO_LARGE');
export const BadFrameError = define('MMB_ERR_BAD_FRAME');
export const BadMessageError = define('MMB_ERR_BAD_MESSAGE');
export const UnknownMessageError = define('MMB_ERR_UNKNOWN_MESSAGE');
export const TooManyFdsError = define('MMB_ERR_TOO_MANY_FDS');
export const FdMismatchError = define('MMB_ERR_FD_MISMATCH');
export const FdsTruncatedError = define('MMB_ERR_FDS_TRUNCATED');
export const VersionError = define('MMB_ERR_VERSION');
export const FeatureError = define('MMB_ERR_FEATURE');
export const StateError = define('MMB_ERR_STATE');
export const NoSpaceError = define('MMB_ERR_NO_SPACE');
export const OwnerExistsError = define('MMB_ERR_OWNER_EXISTS');
export const NotOwnerError = define('MMB_ERR_NOT_OWNER');
export const PermissionError = define('MMB_ERR_PERMISSION');
export const ConnectionLimitError = define('MMB_ERR_CONNECTION_LIMIT');
export const RateLimitError = define('MMB_ERR_RATE_LIMIT');
export const UnsafePathError = define('MMB_ERR_UNSAFE_PATH');
export const HandshakeTimeoutError = define('MMB_ERR_HANDSHAKE_TIMEOUT');
export const BackingInvalidError = define('MMB_ERR_BACKING_INVALID');
export const BackingUnsealedError = define('MMB_ERR_BACKING_UNSEALED');
export const BackingTooSmallError = define('MMB_ERR_BACKING_TOO_SMALL');
export const NoBackingError = define('MMB_ERR_NO_BACKING');
export const UnalignedError = define('MMB_ERR_UNALIGNED');
export const OutOfRangeError = define('MMB_ERR_OUT_OF_RANGE');
export const OverlapError = define('MMB_ERR_OVERLAP');
export const NoRegionError = define('MMB_ERR_NO_REGION');
export const RegionExistsError = define('MMB_ERR_REGION_EXISTS');
export const SpaceLimitError = define('MMB_ERR_SPACE_LIMIT');
export const ClientLimitError = define('MMB_ERR_CLIENT_LIMIT');
export const ReservedRangeError = define('MMB_ERR_RESERVED_RANGE');
export const BackingPrefixError = define('MMB_ERR_BACKING_PREFIX');
export const PinBudgetError = define('MMB_ERR_PIN_BUDGET');
export const NoFreeRangeError = define('MMB_ERR_NO_FREE_RANGE');
export const NotLoggingError = define('MMB_ERR_NOT_LOGGING');
export const BufferTooSmallError = define('MMB_ERR_BUFFER_TOO_SMALL');
export const BufferInvalidError = define('MMB_ERR_BUFFER_INVALID');
export const StaleGenerationError = define('MMB_ERR_STALE_GENERATION');
export const TooBusyError = define('MMB_ERR_TOO_BUSY');
export const ClientRefusedError = define('MMB_ERR_CLIENT_REFUSED');
export const MapFailedError = define('MMB_ERR_MAP_FAILED');
export const PinFailedError = define('MMB_ERR_PIN_FAILED');
export const IommuError = define('MMB_ERR_IOMMU');
export const KvmError = define('MMB_ERR_KVM');
export const CancelledError = define('MMB_ERR_CANCELLED');
export const NoDeviceError = define('MMB_ERR_NO_DEVICE');
export const PausedError = define('MMB_ERR_PAUSED');
export const UnsupportedError = define('MMB_ERR_UNSUPPORTED');
export const MigrationBlockedError = define('MMB_ERR_MIGRATION_BLOCKED');
export const ClientTimeoutError = define('MMB_ERR_CLIENT_TIMEOUT');
export const SlowReaderError = define('MMB_ERR_SLOW_READER');
export const NotFencedError = define('MMB_ERR_NOT_FENCED');
export const CommittedUnfencedError = define('MMB_ERR_COMMITTED_UNFENCED');
export const NoIoasError = define('MMB_ERR_NO_IOAS');
export const IoasExistsError = define('MMB_ERR_IOAS_EXISTS');
export const IoasBusyError = define('MMB_ERR_IOAS_BUSY');
export const IovaOverlapError = define('MMB_ERR_IOVA_OVERLAP');
export const IovaPartialError = define('MMB_ERR_IOVA_PARTIAL');
export const NotRamError = define('MMB_ERR_NOT_RAM');
export const RamMappedError = define('MMB_ERR_RAM_MAPPED');
export const ConnectError = define('MMB_ERR_CONNECT');
export const DisconnectedError = define('MMB_ERR_DISCONNECTED');
export const TimeoutError = define('MMB_ERR_TIMEOUT');
export const ShutdownError = define('MMB_ERR_SHUTDOWN');
export const ProtocolError = define('MMB_ERR_PROTOCOL');
export const InvalidArgError = define('MMB_ERR_INVALID_ARG');
export const AddressInUseError = define('MMB_ERR_ADDRESS_IN_USE');
export const InternalError = define('MMB_ERR_INTERNAL');

/** Wraps anything thrown into an MmbError, keeping MmbErrors as they are. */
export function toMmbError(err: unknown, fallback: ErrorCode = 'MMB_ERR_INTERNAL'): MmbError {
  if (isMmbError(err)) return err;
  const message = err instanceof Error ? err.message : String(err);
  return createError(fallback, message, { cause: err });
}
