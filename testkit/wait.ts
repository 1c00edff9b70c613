// Waiting on a condition that a real signal makes true (a line printed, /proc showing a state, a status
// reply). The condition is polled; the timeout is a bound on a hang, never a measurement.

/** Resolves with the first value of `check` that is neither undefined nor false; throws after `timeoutMs`. */
export async function waitFor<T>(what: string, check: () => T | undefined | false | Promise<T | undefined | false>, timeoutMs = 10_000): Promise<T> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = await check();
    if (v !== undefined && v !== false) return v;
    if (Date.now() > end) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}
