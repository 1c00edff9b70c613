// Running code as another uid (65534, "nobody", through setpriv) from a checkout that uid may not be able
// to read: the suite must pass from a clone under a 0700 directory. The testkit does it
// (testkit/uid.ts: a copy that uid can read, testkit/jsonproc.ts: the process); this is the tests' face
// for the attack probes of test/fixtures.
import { readableCopy, canSwitchUid, spawnAsUid } from '../../testkit/uid.js';

export const NOBODY = 65534;

/** setpriv is there and we are root (only root may become another uid). */
export const canRunAsNobody = canSwitchUid();

/**
 * The readable copy with test/fixtures in it (testkit/uid.ts readableCopy); scripts are then
 * `${dir}/test/fixtures/NAME.mjs`, importing `../../dist/...` exactly as from the checkout. The caller may
 * remove it when done.
 */
export function stageForOtherUid(): string {
  return readableCopy(['test/fixtures']);
}

export interface Probe {
  /** Lines of JSON the probe printed, as they arrive. */
  lines: unknown[];
  /** Resolves with the first line (parsed) for which `pred` is true, seen already or to come. */
  line<T = Record<string, unknown>>(pred: (l: Record<string, unknown>) => boolean): Promise<T>;
  /** Closes its stdin (the probes hold their connections until then) and resolves with its exit code. */
  finish(): Promise<number | null>;
  pid: number;
}

/**
 * Runs `script` (a file of test/fixtures) with node as uid/gid 65534 and no groups (or with other
 * `setprivArgs`), in the background: the broker under test may run in this very process and must keep
 * answering. `staged` is stageForOtherUid()'s copy (the same one the testkit runs from).
 */
export function runAsNobody(staged: string, script: string, args: string[], env: Record<string, string> = {}, setprivArgs: string[] = []): Probe {
  void staged;
  const p = spawnAsUid(NOBODY, `test/fixtures/${script}`, args, {
    name: `probe ${script}`,
    env: { ...process.env, ...env },
    ...(setprivArgs.length > 0 ? { setpriv: setprivArgs } : {}),
  });
  return {
    lines: p.lines,
    pid: p.pid,
    line<T>(pred: (l: Record<string, unknown>) => boolean): Promise<T> {
      const found = p.lines.find(pred);
      return found ? Promise.resolve(found as T) : p.next<T>(undefined, pred, 600_000);
    },
    async finish() {
      const code = await p.stop('end-stdin', 60_000);
      if (code !== 0) throw new Error(`probe ${script} exited ${code ?? p.child.signalCode}: ${p.stderrTail()}`);
      return code;
    },
  };
}
