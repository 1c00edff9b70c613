// Running code as another uid (65534, "nobody", through setpriv) from a checkout that uid may not be able
// to read: the suite must pass from a clone under a 0700 directory. So what that uid runs is copied into a
// fresh world-readable directory: the compiled tree (dist/), the native addon, the runtime dependencies
// (package.json's dependencies and theirs, found in node_modules) and the probe scripts of
// test/fixtures. About 8 MB, copied once per test file.
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ROOT } from './procs.js';

export const NOBODY = 65534;

/** setpriv is there and we are root (only root may become another uid). */
export const canRunAsNobody = process.getuid?.() === 0 && spawnSync('setpriv', ['--version']).status === 0;

/** The packages `pkg` needs at run time, recursively (npm's flat node_modules; nested ones come along). */
function runtimePackages(): string[] {
  const seen = new Set<string>();
  const visit = (name: string): void => {
    if (seen.has(name)) return;
    const dir = path.join(ROOT, 'node_modules', name);
    if (!fs.existsSync(path.join(dir, 'package.json'))) return; // an optional dependency not installed here
    seen.add(name);
    const pkg = JSON.parse(fs.readFileSync(path.join(dir, 'package.json'), 'utf8')) as { dependencies?: object; optionalDependencies?: object };
    for (const dep of [...Object.keys(pkg.dependencies ?? {}), ...Object.keys(pkg.optionalDependencies ?? {})]) visit(dep);
  };
  const root = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { dependencies?: object };
  for (const dep of Object.keys(root.dependencies ?? {})) visit(dep);
  return [...seen];
}

/**
 * Copies what a process of another uid needs into a new directory (mode 0755, every file readable by
 * all) and returns it; the caller removes it. Scripts are then `${dir}/test/fixtures/NAME.mjs`, importing
 * `../../dist/...` exactly as from the checkout.
 */
export function stageForOtherUid(): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'mmb-other-uid-'));
  const copy = (rel: string) => fs.cpSync(path.join(ROOT, rel), path.join(dir, rel), { recursive: true, filter: (src) => !src.endsWith('.map') });
  copy('package.json');
  copy('dist');
  copy('build/Release/mmb_native.node');
  copy('test/fixtures');
  for (const name of runtimePackages()) copy(path.join('node_modules', name));
  const open = (p: string): void => {
    const st = fs.lstatSync(p);
    if (st.isSymbolicLink()) return;
    fs.chmodSync(p, st.isDirectory() ? 0o755 : (st.mode & 0o111) !== 0 ? 0o755 : 0o644);
    if (st.isDirectory()) for (const e of fs.readdirSync(p)) open(path.join(p, e));
  };
  open(dir);
  return dir;
}

export interface Probe {
  /** Lines of JSON the probe printed, as they arrive. */
  lines: unknown[];
  /** Resolves with the first line (parsed) for which `pred` is true. */
  line<T = Record<string, unknown>>(pred: (l: Record<string, unknown>) => boolean): Promise<T>;
  /** Closes its stdin (the probes hold their connections until then) and resolves with its exit code. */
  finish(): Promise<number | null>;
  pid: number;
}

/**
 * Runs `script` (a file of the staged test/fixtures) with node as uid/gid 65534 and no groups (or with
 * other `setprivArgs`), in the background: the broker under test may run in this very process and must
 * keep answering.
 */
export function runAsNobody(staged: string, script: string, args: string[], env: Record<string, string> = {}, setprivArgs: string[] = []): Probe {
  const as = setprivArgs.length > 0 ? setprivArgs : ['--reuid', String(NOBODY), '--regid', String(NOBODY), '--clear-groups'];
  const child = spawn('setpriv', [...as, '--', process.execPath, path.join(staged, 'test/fixtures', script), ...args], {
    stdio: ['pipe', 'pipe', 'pipe'],
    cwd: staged,
    env: { ...process.env, ...env },
  });
  const lines: Record<string, unknown>[] = [];
  const waiters: { pred: (l: Record<string, unknown>) => boolean; resolve: (l: unknown) => void; reject: (e: Error) => void }[] = [];
  let err = '';
  let buf = '';
  let exited = false;
  const failAll = (): void => {
    for (const w of waiters.splice(0)) w.reject(new Error(`probe ${script} exited: ${err}`));
  };
  child.stderr.setEncoding('utf8').on('data', (d: string) => (err += d));
  child.stdout.setEncoding('utf8').on('data', (d: string) => {
    buf += d;
    for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
      const text = buf.slice(0, nl);
      buf = buf.slice(nl + 1);
      if (!text.trim()) continue;
      const l = JSON.parse(text) as Record<string, unknown>;
      lines.push(l);
      for (const w of [...waiters]) {
        if (w.pred(l)) {
          waiters.splice(waiters.indexOf(w), 1);
          w.resolve(l);
        }
      }
    }
  });
  const exit = new Promise<number | null>((resolve) =>
    child.once('exit', (code) => {
      exited = true;
      failAll();
      resolve(code);
    }),
  );
  return {
    lines,
    pid: child.pid as number,
    line<T>(pred: (l: Record<string, unknown>) => boolean): Promise<T> {
      const found = lines.find(pred);
      if (found) return Promise.resolve(found as T);
      if (exited) return Promise.reject(new Error(`probe ${script} exited: ${err}`));
      return new Promise<T>((resolve, reject) => waiters.push({ pred, resolve: resolve as (l: unknown) => void, reject }));
    },
    async finish() {
      child.stdin.end();
      const code = await exit;
      if (code !== 0) throw new Error(`probe ${script} exited ${code}: ${err}`);
      return code;
    },
  };
}
