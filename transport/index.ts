export * from './transport.js';
export * from './socket.js';
export * from './inproc.js';
export * from './listener.js';
export * from './connect.js';
export * from './fds.js';
export * from './trusted-dir.js';
