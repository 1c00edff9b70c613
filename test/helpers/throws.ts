// What a call throws or a promise rejects with, for tests that check the error rather than catch it.
import { isMmbError, type ErrorCode, type MmbError } from '../../protocol/index.js';

/** The error `fn` throws, as the addon throws it (errno code, syscall, the request named); a failure if it returns. */
export function thrown(fn: () => unknown): NodeJS.ErrnoException & { syscall?: string; request?: string } {
  try {
    fn();
  } catch (err) {
    return err as NodeJS.ErrnoException;
  }
  throw new Error('expected a throw');
}

/** The MMB_ERR_* code `fn` throws, or undefined if it returns; anything else is rethrown. */
export function thrownCode(fn: () => unknown): ErrorCode | undefined {
  try {
    fn();
  } catch (err) {
    if (isMmbError(err)) return err.code;
    throw err;
  }
  return undefined;
}

/** The MmbError `p` rejects with; a failure if it resolves or rejects with anything else. */
export async function rejection(p: Promise<unknown>): Promise<MmbError> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  if (!isMmbError(err)) throw new Error(`expected an MmbError, got ${String(err)}`);
  return err;
}
