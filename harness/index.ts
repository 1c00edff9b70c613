export { runHarness } from './runner.js';
export { DEFAULT_OPTIONS, parseClients, CLIENT_KINDS, type HarnessOptions, type ClientKind } from './options.js';
export { formatReport, jsonReport, missedPlanted, planted, type Report } from './report.js';
export { INVARIANTS, type InvariantName, type Violation } from './invariants.js';
export { FAULTS, type FaultName } from './faults.js';
export { OPERATIONS, type OperationName } from './operations.js';
