export { DeviceSubscriber, type DeviceOptions } from './subscriber.js';
