export { VhostSubscriber, type VhostOptions } from './subscriber.js';
