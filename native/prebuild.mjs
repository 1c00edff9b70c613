#!/usr/bin/env node
// Builds the prebuilt addons the package ships: prebuilds/linux-x64/ and prebuilds/linux-arm64/, named the
// way node-gyp-build finds them at run time (memmap-broker.glibc.node: N-API, so one binary serves every
// Node >= 20; tagged glibc, so a musl system compiles from source instead of loading a binary it cannot run).
// Run by `npm run prebuilds` and by `prepack`, so a tarball always carries binaries of the sources it ships.
//
// Each target is compiled by prebuildify in a scratch copy of binding.gyp and native/src, never in build/:
// the checkout's own build/Release (what the tests load) is not touched, even while tests run beside a pack.
// linux-x64 needs the host's gcc; linux-arm64 needs a cross compiler (Debian: gcc-aarch64-linux-gnu) and is
// skipped with a note when there is none. `--check-all` (`prepublishOnly`, which npm runs before `prepack`)
// builds nothing and fails unless every target's compiler is here: a release ships both.
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import { createRequire } from 'node:module';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const require = createRequire(import.meta.url);
const prebuildify = require('prebuildify');
const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const NODE_GYP = require.resolve('node-gyp/bin/node-gyp.js');
const NAME = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')).name;

/** Each target's compiler and binutils: the host's own for the host's architecture, else a cross toolchain. */
const cross = (triplet, pkg) => ({
  cc: `${triplet}-gcc`,
  apt: `apt-get install ${pkg}`,
  strip: `${triplet}-strip`,
  // gyp's Makefile links with $(CXX) unless LINK is set: the addon is plain C, so gcc links it.
  env: { CC: `${triplet}-gcc`, CXX: `${triplet}-gcc`, LINK: `${triplet}-gcc`, AR: `${triplet}-ar` },
});
const native = { cc: 'gcc', apt: 'apt-get install gcc', strip: 'strip', env: {} };
const TARGETS = {
  x64: os.arch() === 'x64' ? native : cross('x86_64-linux-gnu', 'gcc-x86-64-linux-gnu'),
  arm64: os.arch() === 'arm64' ? native : cross('aarch64-linux-gnu', 'gcc-aarch64-linux-gnu'),
};

/**
 * Where node-gyp takes the Node headers from: npm's nodedir if set, else the running Node's own prefix when
 * it ships include/node (distribution packages and the official tarballs do), so nothing is downloaded.
 * N-API headers are the same for every target, so the host's headers serve the cross build too.
 */
function nodedir() {
  if (process.env.npm_config_nodedir) return process.env.npm_config_nodedir;
  const prefix = path.resolve(path.dirname(process.execPath), '..');
  if (fs.existsSync(path.join(prefix, 'include/node/node_api.h'))) return prefix;
  return undefined;
}

const has = (cmd) => {
  try {
    execFileSync(cmd, ['--version'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
};

async function build(arch, target) {
  const stage = fs.mkdtempSync(path.join(os.tmpdir(), 'mmb-prebuild-'));
  // prebuildify hands node-gyp its own copy of process.env: the cross compiler goes there for this build.
  const saved = { ...process.env };
  const headers = nodedir();
  Object.assign(process.env, target.env, headers ? { npm_config_nodedir: headers } : {});
  try {
    fs.cpSync(path.join(ROOT, 'binding.gyp'), path.join(stage, 'binding.gyp'));
    fs.cpSync(path.join(ROOT, 'native/src'), path.join(stage, 'native/src'), { recursive: true });
    await new Promise((resolve, reject) =>
      prebuildify(
        {
          cwd: stage,
          out: ROOT,
          name: NAME,
          napi: true,
          targets: [{ runtime: 'node', target: process.versions.node }],
          strip: true,
          stripBin: target.strip,
          tagLibc: true,
          arch,
          platform: 'linux',
          nodeGyp: NODE_GYP,
        },
        (err) => (err ? reject(err) : resolve()),
      ),
    );
  } finally {
    for (const key of [...Object.keys(target.env), 'npm_config_nodedir']) {
      if (key in saved) process.env[key] = saved[key];
      else delete process.env[key];
    }
    fs.rmSync(stage, { recursive: true, force: true });
  }
}

async function main() {
  if (os.platform() !== 'linux') throw new Error('prebuilds are made on Linux (the package is Linux-only)');
  const missing = Object.entries(TARGETS)
    .filter(([, t]) => !has(t.cc))
    .map(([arch, t]) => `linux-${arch} needs ${t.cc} (Debian: ${t.apt})`);
  if (process.argv.includes('--check-all')) {
    if (missing.length > 0) throw new Error(`a release ships every prebuild: ${missing.join('; ')}`);
    return;
  }
  // Start from nothing: a binary left from an earlier run must never be packed beside newer sources.
  fs.rmSync(path.join(ROOT, 'prebuilds'), { recursive: true, force: true });
  const built = [];
  for (const [arch, target] of Object.entries(TARGETS)) {
    if (!has(target.cc)) {
      console.warn(`prebuild: linux-${arch} skipped: no ${target.cc} on PATH (Debian: ${target.apt})`);
      continue;
    }
    await build(arch, target);
    built.push(`linux-${arch}`);
  }
  if (built.length === 0) throw new Error('no prebuild could be built (no C compiler)');
  for (const dir of built) {
    for (const f of fs.readdirSync(path.join(ROOT, 'prebuilds', dir))) {
      console.log(`prebuild: prebuilds/${dir}/${f} (${fs.statSync(path.join(ROOT, 'prebuilds', dir, f)).size} bytes)`);
    }
  }
}

main().catch((err) => {
  console.error(`prebuild: ${err.message}`);
  process.exit(1);
});
