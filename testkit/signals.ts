// How a long-running command (serve, attach) learns that it should stop: SIGTERM or SIGINT. The handlers
// are installed by the first call, before the command does anything another process could react to
// (listening, connecting, printing a ready line): a process with no handler is ended by the default
// action, which would skip the clean shutdown. They stay installed until the process exits, so a second
// signal during the shutdown does not cut it short either.

/** Installs the handlers now; resolves with the first SIGTERM or SIGINT. */
export function stopRequested(): Promise<NodeJS.Signals> {
  return new Promise((resolve) => {
    for (const signal of ['SIGTERM', 'SIGINT'] as const) process.on(signal, () => resolve(signal));
  });
}
