// Deprecated: the device client moved to clients/device/ (it never was Linux vhost). This re-export stays
// only until testkit/client.ts (owned by another change in flight) imports clients/device/ instead.
export { DeviceSubscriber as VhostSubscriber, type DeviceOptions as VhostOptions } from '../device/index.js';
