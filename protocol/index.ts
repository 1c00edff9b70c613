export * from './constants.js';
export * from './limits.js';
export * from './errors.js';
export * from './schema.js';
export * from './messages.js';
export * from './codec.js';
export * from './frame.js';
export * from './validate.js';
