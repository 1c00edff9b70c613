export { Connection, type BrokerTarget, type ConnectionOptions } from './connection.js';
export { Subscriber, type SubscriberOptions, type SubscriberEvents, type ChangeEvent, type ClientReport, type PauseEvent } from './subscriber.js';
export { MappingSubscriber } from './plain.js';
export { GuestMemory, CHUNK_BYTES, type MappedRegion, type Chunk, type GuestPointer } from './memory.js';
export { OwnerClient, fetchStatus, bitmapBytes, type OwnerOptions, type RegionSpec, type CreatedBacking, type DirtySnapshot } from './owner.js';
export { IoasOwner, type IovaMapSpec } from './ioas-owner.js';
export { IovaTables, IovaTranslation } from './ioas-table.js';
export type { IoasApplier, IoasChange } from './ioas-view.js';
export { DirtyLog } from './dirty.js';
export { DirtyObserver, type DirtyEvent } from './observer.js';
export { createSealedMemfd, type SealedMemfdOptions } from './memfd.js';
export { diff, inverse, applyOps, toView, type Applier, type ApplyContext, type Change, type LocalBacking, type ViewRegion } from './view.js';
export { DeviceSubscriber, type DeviceOptions } from './device/index.js';
/** @deprecated the device client's old name (it never was Linux vhost): use DeviceSubscriber. */
export { DeviceSubscriber as VhostSubscriber, type DeviceOptions as VhostOptions } from './device/index.js';
export {
  KvmSubscriber,
  KvmApplier,
  KvmVm,
  SoftwareMemslots,
  KvmVcpu,
  planSlots,
  assembleProgram,
  type KvmSubscriberOptions,
  type SlotInfo,
  type ProgramOptions,
  type Slot,
  type SlotOp,
  type MemslotBackend,
  type BackendName,
} from './kvm/index.js';
export { VfioSubscriber, X86_MSI_WINDOW, type VfioSubscriberOptions, type VfioDomainInfo, type PinProgress } from './vfio/index.js';
export {
  Migration,
  FileDestination,
  SpaceDestination,
  TcpDestination,
  // MigrationBlockedError (with its `blockers`) is protocol's MigrationBlockedError: that one is exported.
  migrateTo,
  receive,
  Receiver,
  type MigrationOptions,
  type MigrationProgress,
  type MigrationResult,
  type Destination,
  type ReceiveOptions,
  type ReceiveResult,
} from './migration/index.js';
export {
  VhostUserSubscriber,
  VhostUserFrontend,
  Virtqueue,
  VirtioBlk,
  VirtioNet,
  BLK_FEATURES,
  NET_FEATURES,
  NET_HDR_BYTES,
  type VhostUserOptions,
  type Negotiated,
  type BlkOptions,
  type NetOptions,
  type TableEntry,
} from './vhost-user/index.js';
export { Watcher, fetchHistory, type WatcherEvents, type WatcherOptions } from './watcher.js';
