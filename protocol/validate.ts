// The one place where a decoded frame becomes a typed message. Order of checks: known id, allowed in
// this direction, feature negotiated, shape (schema), then the descriptors the message must carry.
// On any failure the caller still owns frame.fds and must close them.
import { MSG_NAMES } from './constants.js';
import { BIN_PROBLEM } from './codec.js';
import { BadMessageError, FdMismatchError, FeatureError, UnknownMessageError } from './errors.js';
import type { Frame } from './frame.js';
import { MESSAGES, type MessageSpec, type ToBroker, type ToClient } from './messages.js';

export type Side = 'broker' | 'client';

function check(frame: Frame, side: Side, features: number): { spec: MessageSpec; message: Record<string, unknown> } {
  const spec = MESSAGES.get(frame.type);
  if (!spec) throw new UnknownMessageError(`message id ${frame.type} is not defined`);
  if (frame.invalid) throw frame.invalid;
  const inbound = side === 'broker' ? spec.direction !== 'to-client' : spec.direction === 'to-client';
  if (!inbound) throw new UnknownMessageError(`${spec.name} (${spec.id}) is not accepted by a ${side}`);
  if (spec.feature !== 0 && (features & spec.feature) === 0) {
    throw new FeatureError(`${spec.name} needs feature bit 0x${spec.feature.toString(16)}, which was not negotiated`);
  }
  if (frame.bin) {
    if (spec.binFeature === undefined) throw new BadMessageError(BIN_PROBLEM);
    if ((features & spec.binFeature) === 0) {
      throw new FeatureError(`a bin in ${spec.name} needs feature bit 0x${spec.binFeature.toString(16)}, which was not negotiated`);
    }
  }
  const message = spec.schema.parse(frame.body, spec.name) as Record<string, unknown>;
  const want = spec.fds.kind === 'none' ? 0 : spec.fds.kind === 'one' ? 1 : (message[spec.fds.field] as unknown[]).length;
  if (frame.fds.length !== want) {
    throw new FdMismatchError(`${spec.name} takes ${want} descriptor(s), ${frame.fds.length} arrived`);
  }
  return { spec, message };
}

/** Validates a frame received by the broker. */
export function parseToBroker(frame: Frame, features: number): ToBroker {
  return check(frame, 'broker', features).message as ToBroker;
}

/** Validates a frame received by a client. */
export function parseToClient(frame: Frame, features: number): ToClient {
  return check(frame, 'client', features).message as ToClient;
}

/** The request id of a frame that failed validation, if it has a usable one, so the error can be a REPLY. */
export function requestIdOf(frame: Frame): number | undefined {
  const spec = MESSAGES.get(frame.type);
  const id = frame.body.id;
  if (spec?.direction !== 'request') return undefined;
  return typeof id === 'number' && Number.isInteger(id) && id >= 0 && id <= 0xffff_ffff ? id : undefined;
}

export function messageName(type: number): string {
  return MSG_NAMES[type] ?? `message ${type}`;
}
