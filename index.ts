// memmap-broker: a guest-memory-map broker for virtual machine builders.
export * from './broker/index.js';
export * from './clients/index.js';
export * from './protocol/index.js';
export { native, constants, PAGE_SIZE, isNativeError, type Mapping, type NativeError } from './native/index.js';
export { SocketListener, InProcessTransport, connectSocket, type Transport } from './transport/index.js';
