// Signals delivered at an exact moment of a process's life: the process stops itself there (SIGSTOP, by
// testkit/preload/stop-at.ts), the kernel shows it stopped, the test sends its signal and SIGCONT. The
// signal is then handled (or not) by the process as it was at that moment, whatever the machine's load.
import type { SpawnOptions } from './jsonproc.js';
import type { JsonProc } from './jsonproc.js';
import { testkitFile } from './paths.js';
import { processState } from './procfs.js';
import { waitFor } from './wait.js';

/** connect: after its first connect(); recv:N: after its Nth recvmsg() with bytes; line:N: after its Nth line on stdout. */
export type Moment = 'connect' | `recv:${number}` | `line:${number}`;

/** Spawn options (for JsonProc.spawn) that make a node process stop itself at `moment`. */
export function stopAt(moment: Moment, base: SpawnOptions = {}): SpawnOptions {
  return {
    ...base,
    nodeArgs: [...(base.nodeArgs ?? []), '--import', testkitFile('preload/stop-at.js')],
    env: { ...(base.env ?? process.env), MMB_TESTKIT_STOP_AT: moment },
  };
}

/**
 * Waits until the kernel shows `proc` stopped (state T), sends `signal`, lets it continue, and resolves
 * with how it ended: its exit code, or the signal that ended it.
 */
export async function signalWhenStopped(
  proc: JsonProc,
  signal: NodeJS.Signals,
  timeoutMs = 30_000,
): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
  await waitFor(
    `${proc.describe()} to stop at its moment`,
    () => {
      if (proc.gone) throw new Error(`${proc.describe()} exited (${proc.child.exitCode ?? proc.child.signalCode}) before its moment: ${proc.stderrTail(1000)}`);
      return processState(proc.pid) === 'T';
    },
    timeoutMs,
  );
  proc.child.kill(signal);
  proc.child.kill('SIGCONT');
  const timer = setTimeout(() => proc.signal('SIGKILL'), timeoutMs);
  await proc.exited;
  clearTimeout(timer);
  return { code: proc.child.exitCode, signal: proc.child.signalCode };
}
