// Running a program as another uid, wherever the checkout is. A checkout under a 0700 directory (a root
// home, a `mktemp -d`) is unreadable to any other uid, so what that uid runs is copied first into a
// directory it can read: the compiled tree (dist/), the addon, package.json, the runtime dependencies
// (package-lock.json's non-dev packages) and the program's own files, at the same relative paths (a
// fixture's `../../dist/index.js` still resolves). One copy per process, removed when it exits (or, if
// it was killed, by the next process that makes one).
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { JsonProc, type SpawnOptions } from './jsonproc.js';
import { ROOT } from './paths.js';

let copy: { dir: string; files: Set<string> } | undefined;
const PREFIX = 'mmb-readable-';

/**
 * Removes the copies of processes that are gone: a process ended by a signal (a test worker stopped by
 * its runner) never runs its 'exit' handler.
 */
function removeOrphans(): void {
  for (const name of fs.readdirSync(os.tmpdir())) {
    const pid = Number(/^mmb-readable-(\d+)-/.exec(name)?.[1]);
    if (!pid) continue;
    try {
      process.kill(pid, 0);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ESRCH') fs.rmSync(path.join(os.tmpdir(), name), { recursive: true, force: true });
    }
  }
}

/** True where this process may run programs as another uid: root with setpriv. */
export function canSwitchUid(): boolean {
  return process.getuid?.() === 0 && spawnSync('setpriv', ['--version'], { stdio: 'ignore' }).status === 0;
}

function copyTree(from: string, to: string): void {
  fs.cpSync(from, to, { recursive: true, dereference: false, mode: fs.constants.COPYFILE_FICLONE });
}

/** Makes every directory under `dir` 0755 and every file readable by all (a checkout made under umask 077 is 0600). */
function openUp(dir: string): void {
  fs.chmodSync(dir, 0o755);
  for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) openUp(p);
    else if (e.isFile()) {
      const mode = fs.statSync(p).mode & 0o777;
      fs.chmodSync(p, mode | 0o444 | (mode & 0o100 ? 0o111 : 0));
    }
  }
}

/** The runtime packages (package-lock.json's non-dev entries that are on disk), as paths under ROOT. */
function runtimePackages(): string[] {
  const lock = JSON.parse(fs.readFileSync(path.join(ROOT, 'package-lock.json'), 'utf8')) as { packages: Record<string, { dev?: boolean }> };
  return Object.entries(lock.packages)
    .filter(([p, meta]) => p.startsWith('node_modules/') && !p.includes('/node_modules/', 'node_modules/'.length) && !meta.dev)
    .map(([p]) => p)
    .filter((p) => fs.existsSync(path.join(ROOT, p)));
}

/**
 * A directory readable by every uid holding the compiled tree, the addon, the runtime dependencies and
 * `files` (paths relative to the checkout, e.g. `test/fixtures/connect-as.mjs`); its path mirrors the
 * checkout's layout. Files asked for later are added to the same copy.
 */
export function readableCopy(files: readonly string[] = []): string {
  // A caller may have removed the copy (a test file's afterAll): then it is made again.
  if (copy && !fs.existsSync(copy.dir)) copy = undefined;
  if (!copy) {
    removeOrphans();
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), `${PREFIX}${process.pid}-`));
    process.once('exit', () => fs.rmSync(dir, { recursive: true, force: true }));
    for (const p of ['package.json', 'dist', 'build/Release', ...runtimePackages()]) {
      const from = path.join(ROOT, p);
      if (fs.existsSync(from)) copyTree(from, path.join(dir, p));
    }
    copy = { dir, files: new Set() };
  }
  for (const f of files) {
    if (copy.files.has(f)) continue;
    copyTree(path.join(ROOT, f), path.join(copy.dir, f));
    copy.files.add(f);
  }
  openUp(copy.dir);
  return copy.dir;
}

export interface AsUidOptions extends SpawnOptions {
  /** The group (default: the same number as the uid). */
  gid?: number;
  /** setpriv's identity options instead of `--reuid UID --regid GID --clear-groups` (capabilities, ...). */
  setpriv?: readonly string[];
}

/**
 * Starts `node SCRIPT ARGS...` as `uid` (setpriv: real and effective uid and gid, no supplementary
 * groups) from the readable copy: SCRIPT is a path relative to the checkout (`dist/...`, or a file that
 * is copied, such as a test fixture). Its cwd is the copy. Needs canSwitchUid().
 */
export function spawnAsUid(uid: number, script: string, args: readonly string[], opts: AsUidOptions = {}): JsonProc {
  const dir = readableCopy(script.startsWith('dist/') ? [] : [script]);
  const gid = opts.gid ?? uid;
  return JsonProc.spawn(path.join(dir, script), args, {
    name: `${script} as uid ${uid}`,
    ...opts,
    cwd: opts.cwd ?? dir,
    prefix: ['setpriv', ...(opts.setpriv ?? ['--reuid', String(uid), '--regid', String(gid), '--clear-groups']), '--', ...(opts.prefix ?? [])],
  });
}
