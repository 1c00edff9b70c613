// Helpers for tests that run a broker embedded in the test process. Each test file gets its own copy of
// this module (vitest isolates modules per file), so the cleanup stack is per file; call runCleanups()
// from afterEach.
import { Broker, type BrokerOptions } from '../../broker/index.js';
import { MappingSubscriber, OwnerClient, type SubscriberOptions } from '../../clients/index.js';
import { constants, native } from '../../native/index.js';
import { isMmbError, type ErrorCode } from '../../protocol/index.js';

const cleanups: (() => unknown)[] = [];

/** Runs `fn` after the current test (last registered, first run). */
export function defer(fn: () => unknown): void {
  cleanups.push(fn);
}

export async function runCleanups(): Promise<void> {
  for (const c of cleanups.splice(0).reverse()) await c();
}

/** A broker with space "vm0" and a 5 s ack deadline unless overridden; closed after the test. */
export function embeddedBroker(opts: BrokerOptions = {}): Broker {
  const b = new Broker({ spaces: ['vm0'], limits: { ackTimeoutMs: 5000 }, ...opts });
  defer(() => b.close());
  return b;
}

export async function ownerOf(target: Broker | string, space = 'vm0'): Promise<OwnerClient> {
  const o = await OwnerClient.attach(target, { space });
  defer(() => o.close());
  return o;
}

export async function subscriberOf(target: Broker | string, opts: Partial<SubscriberOptions> = {}): Promise<MappingSubscriber> {
  const s = await MappingSubscriber.attach(target, { space: 'vm0', ...opts });
  defer(() => s.close());
  return s;
}

/**
 * A backing of `size` bytes created by `owner` and mapped by the test too (read-write unless `prot` says
 * otherwise); unmapped and its fd closed after the test.
 */
export async function mappedBacking(owner: OwnerClient, size: number, name: string, prot = constants.PROT_READ | constants.PROT_WRITE) {
  const b = await owner.createBacking(size, name);
  defer(() => native.close(b.fd));
  const view = native.mmap(b.fd, 0, size, prot, constants.MAP_SHARED);
  defer(() => native.munmap(view));
  return { ...b, view, bytes: new Uint8Array(view.buffer) };
}

/** The MMB_ERR_* code a promise rejects with, or undefined if it resolves; anything else is rethrown. */
export async function codeOf(p: Promise<unknown>): Promise<ErrorCode | undefined> {
  try {
    await p;
    return undefined;
  } catch (err) {
    if (isMmbError(err)) return err.code;
    throw err;
  }
}
