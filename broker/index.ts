export { Broker, type BrokerOptions, type InProcessConnector } from './broker.js';
export { AddressSpace } from './space.js';
export { MemoryMap, type Plan } from './map.js';
export { inspectBackingFd } from './backings.js';
export { Access, type AccessPolicy, type Allow } from './access.js';
export { DEFAULT_FENCE_OPTIONS, type FenceOptions, type FencePolicy, type HolderStatus } from './fence.js';
export { BrokerMetrics } from './metrics.js';
export { SpaceEvents, type SpaceEventMap } from './watch.js';
export { BROKER_VERSION } from './version.js';
