export { VhostUserSubscriber, type VhostUserOptions } from './subscriber.js';
export { VhostUserApplier, type MemTableStats } from './applier.js';
export { VhostUserFrontend, type FrontendOptions, type FrontendEvents, type FrontendStats, type Negotiated, type NegotiateOptions } from './frontend.js';
export { BackendChannel, type BackendRequestHandler, type BackendChannelStats } from './backend-channel.js';
export { IotlbApplier, type IotlbStats, type IotlbReport, type IotlbEvents } from './iotlb.js';
export {
  planMemTable,
  undoSteps,
  rebuild,
  entryOf,
  uaddrOf,
  UADDR_BASE,
  type TableEntry,
  type Step,
  type Plan,
  type PlanOptions,
  type MemMode,
  type GuestRange,
} from './memtable.js';
export { Rings, type RingQueue, type HoldReason } from './rings.js';
export { VhostLog, logBytesFor } from './log.js';
export { Virtqueue, ringLayout, type QueueMemory, type QueueBuffer, type VirtqueueOptions } from './virtqueue.js';
export { VirtioBlk, BLK_FEATURES, SECTOR_BYTES, type BlkOptions, type DeviceAccess } from './blk.js';
export { VirtioNet, NET_FEATURES, NET_HDR_BYTES, type NetOptions } from './net.js';
export {
  Req,
  BackendReq,
  IotlbType,
  IotlbPerm,
  IOTLB_MSG_BYTES,
  IOTLB_PROTOCOL_FEATURES,
  iotlbPayload,
  decodeIotlb,
  Flag,
  Feature,
  ProtocolFeature,
  MEM_TABLE_MAX_REGIONS,
  MAX_RAM_SLOTS,
  WANTED_PROTOCOL_FEATURES,
  VRING_F_LOG,
  LOG_PAGE_BYTES,
  bit,
  reqName,
  type MemRegion,
  type IotlbMsg,
} from './messages.js';
