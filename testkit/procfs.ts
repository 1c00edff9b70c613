// The kernel's own view of a process, read from /proc: the judge of what tests and the harness claim.
import fs from 'node:fs';

/** The process's state letter from /proc/PID/stat (R, S, D, T stopped, Z, ...), or undefined once it is gone. */
export function processState(pid: number): string | undefined {
  let stat: string;
  try {
    stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch {
    return undefined;
  }
  // The command name (in parentheses) may itself contain spaces or parentheses: the state follows the last ')'.
  return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[0];
}
