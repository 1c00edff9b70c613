export { Migration, type MigrationOptions, type MigrationProgress, type MigrationResult } from './engine.js';
export {
  FileDestination,
  SpaceDestination,
  mapChanges,
  type Destination,
  type MigrationMap,
  type SourceInfo,
  type SpaceDestinationOptions,
} from './destination.js';
export { migrationBlockers, MigrationBlockedError, type MigrationBlocker, type MigrationDeclaration } from './blockers.js';
export { compareImages, compareDigests, imageDigests, mapDifference, VERIFY_BLOCK, type MemoryImage, type VerifyResult } from './verify.js';
export { readTokenFile, authMac, checkMac, MIN_TOKEN_LENGTH } from './token.js';
export * as stream from './stream.js';
export { TcpDestination, migrateTo, type TcpDestinationOptions, type MigrateToOptions, type MigrateToResult } from './tcp.js';
export { Receiver, receive, type ReceiveOptions, type ReceiveEvent, type ReceiveResult } from './receiver.js';
export { parseTcpUrl, parseListen, formatAddress, DEFAULT_LISTEN_HOST, type TcpAddress } from './address.js';
