// The vfio-like client: VfioSubscriber and its parts (see README.md).
export {
  VfioSubscriber,
  openIommuBackend,
  reportedDirtyTracking,
  type VfioSubscriberOptions,
  type VfioDomainInfo,
  type VfioSubscriberEvents,
  type VfioLogger,
  type VfioMigrationSupport,
} from './subscriber.js';
export { VfioApplier, pieceCount, type VfioApplierOptions } from './applier.js';
export { Domain, type DomainOptions, type DomainMapping, type PinProgress } from './domain.js';
export { pieces, pinPieces, unpinPieces, DEFAULT_PIN_CHUNK_BYTES, type PinControl } from './pinning.js';
export {
  GPA_LAST,
  DIRTY_TRACKER_NAMES,
  mergeRanges,
  reservedFromUsable,
  type IommuBackendName,
  type Detached,
  type DeviceInfo,
  type DeviceMigration,
  type DirtyTracking,
  type DirtyTrackingMode,
  type DomainLimits,
  type IommuBackend,
  type Piece,
  type VfioDevice,
} from './iommu-backend.js';
export { SoftBackend, X86_MSI_WINDOW, DEFAULT_DMA_ENTRY_LIMIT, type SoftOptions } from './soft.js';
export { Type1Backend, VFIO_CONTAINER } from './type1.js';
export { IommufdBackend, IOMMUFD_NODE } from './iommufd.js';
export { HwDevice } from './device.js';
export { realSys, type VfioSys } from './sys.js';
export * as structs from './structs.js';
