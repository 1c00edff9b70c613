export { Migration, type MigrationOptions, type MigrationProgress, type MigrationResult } from './engine.js';
export { FileDestination, SpaceDestination, type Destination } from './destination.js';
