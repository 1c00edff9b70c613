// The package as a user gets it. `npm pack` runs prepack, which builds the prebuilt addons from these
// sources. The tarball is installed into a fresh project (a temp dir, `npm init -y`) whose PATH holds node,
// npm and sh and no C compiler, make or python3. Dependencies come from the registry or npm's cache.
// There the README's set-up block and its Ten-lines program run exactly as printed: the program
// type-checks, prints, and exits 0 with nothing compiled. The tarball ships the product only.
// Without a usable addon, the import error says `npm rebuild memmap-broker`, and that rebuild says what
// compiling needs when no compiler is there, and compiles from the shipped sources when one is.
import { spawnSync, type SpawnSyncReturns } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ROOT } from './helpers/procs.js';

const README = fs.readFileSync(path.join(ROOT, 'README.md'), 'utf8');
const version = (pkg: string) => (JSON.parse(fs.readFileSync(path.join(ROOT, 'node_modules', pkg, 'package.json'), 'utf8')) as { version: string }).version;
const EXPECTED_OUTPUT = 'dimm0 added and removed: the map is at generation 2';
const NO_COMPILER = ['gcc', 'cc', 'make', 'python3', 'python'];

/** The fenced block between `<!-- NAME:start -->` and `<!-- NAME:end -->` in the README, as printed. */
function readmeBlock(name: string, lang: string): string {
  const m = new RegExp(`<!-- ${name}:start -->\\n\`\`\`${lang}\\n([\\s\\S]*?)\`\`\`\\n<!-- ${name}:end -->`).exec(README);
  if (!m) throw new Error(`README.md has no \`\`\`${lang} block between <!-- ${name}:start --> and <!-- ${name}:end -->`);
  return m[1] as string;
}

/** `text` with each `from` (which must occur exactly once) replaced by `to`. */
function substitute(text: string, pairs: [from: string, to: string][]): string {
  for (const [from, to] of pairs) {
    expect(text.split(from).length - 1, `the README set-up says "${from}" once`).toBe(1);
    text = text.replace(from, to);
  }
  return text;
}

describe('the package, packed and installed into a new project without a compiler', () => {
  let tmp: string;
  let project: string;
  let tarball: string;
  let files: string[];
  /** The environment of the user's shell: PATH holds node, npm, npx and sh only. */
  let userEnv: NodeJS.ProcessEnv;
  const installed = () => path.join(project, 'node_modules/memmap-broker');

  const run = (cmd: string, env: NodeJS.ProcessEnv = userEnv, timeout = 240_000): SpawnSyncReturns<string> => {
    const r = spawnSync('/bin/sh', ['-ec', cmd], { cwd: project, env, encoding: 'utf8', timeout, killSignal: 'SIGKILL' });
    if (r.error) throw new Error(`${cmd}: ${r.error.message} (it did not exit within ${timeout / 1000} s)\n${r.stdout}${r.stderr}`);
    return r;
  };

  beforeAll(() => {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'mmb-package-'));
    project = path.join(tmp, 'project');
    fs.mkdirSync(project);
    // Lifecycle scripts included: prepack builds prebuilds/ (in a scratch copy, build/ is not touched).
    const pack = spawnSync('npm', ['pack', '--pack-destination', tmp], { cwd: ROOT, encoding: 'utf8', timeout: 240_000 });
    expect(pack.status, `npm pack failed:\n${pack.stdout}${pack.stderr}`).toBe(0);
    const tgz = fs.readdirSync(tmp).filter((f) => f.endsWith('.tgz'));
    expect(tgz).toHaveLength(1);
    tarball = path.join(tmp, tgz[0] as string);
    files = spawnSync('tar', ['tzf', tarball], { encoding: 'utf8' })
      .stdout.trim()
      .split('\n')
      .map((f) => f.replace(/^package\//, ''));

    const bin = path.join(tmp, 'bin');
    fs.mkdirSync(bin);
    const npmCli = fs.realpathSync(spawnSync('/bin/sh', ['-c', 'command -v npm'], { encoding: 'utf8' }).stdout.trim());
    fs.symlinkSync(process.execPath, path.join(bin, 'node'));
    fs.symlinkSync(npmCli, path.join(bin, 'npm'));
    fs.symlinkSync(path.join(path.dirname(npmCli), 'npx-cli.js'), path.join(bin, 'npx'));
    fs.symlinkSync('/bin/sh', path.join(bin, 'sh'));
    // Nothing of the outer `npm test` (npm_config_*, npm_package_*) may steer the user's npm.
    userEnv = Object.fromEntries(Object.entries(process.env).filter(([k]) => !/^npm_/i.test(k) && k !== 'INIT_CWD' && k !== 'NODE_OPTIONS'));
    Object.assign(userEnv, {
      PATH: bin,
      TMPDIR: tmp,
      npm_config_prefer_offline: 'true',
      npm_config_audit: 'false',
      npm_config_fund: 'false',
      npm_config_update_notifier: 'false',
    });
  }, 300_000);

  afterAll(() => {
    if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
  });

  it('ships the product only: library, CLI, harness (and the testkit it runs on), prebuilt addons, the addon sources, docs', () => {
    const forbidden = files.filter(
      (f) => /^(test|bench|fuzz|vm|\.ci|examples|dist\/(test|bench|fuzz|examples))\//.test(f) || /tsconfig|\.tsbuildinfo|\.map$|\.test\.|(^|\/)\.git/.test(f),
    );
    expect(forbidden).toEqual([]);
    for (const f of [
      'package.json',
      'README.md',
      'LICENSE',
      'CHANGELOG.md',
      'dist/index.js',
      'dist/index.d.ts',
      'dist/cli/mmbroker.js',
      'dist/cli/commands/demo.js',
      'dist/harness/index.js',
      'dist/testkit/client.js',
      'dist/native/index.js',
      'binding.gyp',
      'native/src/addon.c',
      'docs/protocol.md',
      'prebuilds/linux-x64/memmap-broker.glibc.node',
    ]) {
      expect(files, f).toContain(f);
    }
    // Every source binding.gyp compiles is shipped, so the fallback build has what it needs.
    const gyp = fs.readFileSync(path.join(ROOT, 'binding.gyp'), 'utf8');
    for (const src of gyp.match(/native\/src\/[\w.]+\.c/g) ?? []) expect(files, src).toContain(src);
    // linux-arm64 is cross-compiled when the packing machine has the cross compiler (a release must: prepublishOnly).
    const cross = spawnSync('/bin/sh', ['-c', 'command -v aarch64-linux-gnu-gcc']).status === 0;
    expect(files.includes('prebuilds/linux-arm64/memmap-broker.glibc.node')).toBe(cross);
    expect(fs.readFileSync(path.join(ROOT, 'LICENSE'), 'utf8')).toMatch(/^MIT License\n\nCopyright \(c\) \d{4} the memmap-broker authors\n/);
    const pkg = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as Record<string, unknown>;
    expect(pkg).toMatchObject({
      type: 'module',
      license: 'MIT',
      os: ['linux'],
      engines: { node: '>=20' },
      exports: { '.': { types: './dist/index.d.ts', default: './dist/index.js' } },
    });
  });

  it('runs the README set-up and Ten-lines program as printed: it type-checks, prints and exits 0, compiling nothing', () => {
    const found = run(`for t in ${NO_COMPILER.join(' ')}; do command -v $t || true; done`);
    expect(found.stdout.trim(), 'a compiler, make or python is on the user PATH').toBe('');

    // The program exactly as printed; the set-up as printed, with the package taken from the tarball and
    // the TypeScript tools at the versions this checkout has (so npm's cache serves them).
    fs.writeFileSync(path.join(project, 'example.ts'), readmeBlock('readme-example', 'ts'));
    const setup = substitute(readmeBlock('readme-setup', 'sh'), [
      ['npm install memmap-broker', `npm install ${tarball}`],
      ['typescript @types/node', `typescript@${version('typescript')} @types/node@${version('@types/node')}`],
    ]);
    const r = run(setup);
    expect(r.status, `the README set-up failed:\n${r.stdout}\n${r.stderr}`).toBe(0);
    expect(r.stdout.trim().split('\n').at(-1)).toBe(EXPECTED_OUTPUT);
    expect(fs.existsSync(path.join(project, 'example.js')), 'tsc emitted the program').toBe(true);
    // The prebuilt addon served: nothing was compiled, and the install script (node-gyp-build) accepted it.
    expect(fs.existsSync(path.join(installed(), 'build'))).toBe(false);
    expect(r.stdout + r.stderr).not.toMatch(/gyp (info|ERR!)|CC\(target\)/);
    // The socket, its directory and every fd went with the program: nothing is left in its TMPDIR.
    expect(fs.readdirSync(tmp).filter((f) => f.startsWith('vm0-'))).toEqual([]);

    const help = run('npx --no-install mmbroker --help');
    expect(help.status, help.stderr).toBe(0);
    expect(help.stdout).toMatch(/serve/);
  }, 300_000);

  it('without an addon for this machine, the import error names the platform and says `npm rebuild memmap-broker`', () => {
    fs.renameSync(path.join(installed(), 'prebuilds'), path.join(tmp, 'prebuilds-away'));
    const r = run('node example.js');
    expect(r.status).toBe(1);
    expect(r.stderr).toContain(`memmap-broker: no native addon for linux-${process.arch}: the package has no prebuilt one`);
    expect(r.stderr).toContain('`npm rebuild memmap-broker`');
    expect(r.stderr).toContain('python3, make and a C compiler');
  }, 60_000);

  it('`npm rebuild memmap-broker` says what compiling needs when there is no compiler, and compiles the shipped sources when there is', () => {
    const failed = run('npm rebuild memmap-broker');
    expect(failed.status).not.toBe(0);
    expect(failed.stderr).toContain('memmap-broker: compiling the addon needs python3, make and a C compiler');
    expect(fs.existsSync(path.join(installed(), 'build/Release/mmb_native.node'))).toBe(false);

    // The developer's own PATH has them (CI installs gcc, make and python3).
    const rebuilt = run('npm rebuild memmap-broker', { ...userEnv, PATH: `${userEnv.PATH}:${process.env.PATH ?? ''}` });
    expect(rebuilt.status, `${rebuilt.stdout}${rebuilt.stderr}`).toBe(0);
    expect(fs.existsSync(path.join(installed(), 'build/Release/mmb_native.node'))).toBe(true);
    const r = run('node example.js');
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout.trim()).toBe(EXPECTED_OUTPUT);
  }, 300_000);
});
