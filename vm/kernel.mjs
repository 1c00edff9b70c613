// Guest kernels for the VM test, both cached under the user's cache directory (cacheDir()):
//   debian  the kernel of Debian's linux-image-amd64 (bookworm: 6.1), its vmlinuz and the VFIO modules
//           with their dependencies (vfio-pci, vfio_iommu_type1, ...). The .deb (70 MB) is downloaded
//           once with `apt-get download` and never installed; the kit (vmlinuz + ~6 modules, 10 MB) is
//           kept in <cache>/debian-kernel/<package>_<version>/.
//   custom  a small kernel with CONFIG_IOMMUFD built from linux-source-6.12 by vm/build-kernel.sh (no
//           Debian kernel enables IOMMUFD), cached as <cache>/kernel/bzImage-<version>-<config hash>.
import { execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));

export function cacheDir() {
  if (process.env.MMB_VM_CACHE) return process.env.MMB_VM_CACHE;
  const base = process.env.XDG_CACHE_HOME || path.join(os.homedir(), '.cache');
  return path.join(base, 'memmap-broker');
}

/** The modules the type1 run needs from a Debian kernel; their dependencies are found in the .ko files. */
const WANTED_MODULES = ['vfio_iommu_type1', 'vfio_pci'];

const norm = (name) => name.replace(/-/g, '_');

function apt(args) {
  try {
    return execFileSync('apt-cache', args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] });
  } catch {
    return '';
  }
}

/** The package linux-image-amd64 depends on now (linux-image-6.1.0-NN-amd64) and its candidate version. */
function debianPackage() {
  const dep = /Depends:\s*(linux-image-[0-9][^\s]*-amd64)/.exec(apt(['depends', 'linux-image-amd64']))?.[1];
  if (!dep) return undefined;
  const version = /Candidate:\s*(\S+)/.exec(apt(['policy', dep]))?.[1];
  return version && version !== '(none)' ? { name: dep, version } : undefined;
}

/** The `depends=` of a kernel module, read from its .modinfo strings. */
function moduleDepends(file) {
  const data = fs.readFileSync(file);
  const at = data.indexOf('\0depends=');
  if (at < 0) return [];
  const end = data.indexOf(0, at + 1);
  return data
    .subarray(at + 9, end)
    .toString('latin1')
    .split(',')
    .filter(Boolean)
    .map(norm);
}

/**
 * The Debian kernel kit: {kernel, modulesDir, modules (load order), release, package}. Downloads and
 * extracts once; later calls only look in the cache (and work without apt once cached).
 */
export function debianKernel({ log = () => {} } = {}) {
  const root = path.join(cacheDir(), 'debian-kernel');
  fs.mkdirSync(root, { recursive: true });
  const pkg = debianPackage();
  let kitDir;
  if (pkg) kitDir = path.join(root, `${pkg.name}_${pkg.version.replace(/[^A-Za-z0-9.+~-]/g, '_')}`);
  else {
    // apt does not know the package (no lists): use the newest cached kit.
    const kits = fs
      .readdirSync(root)
      .filter((d) => fs.existsSync(path.join(root, d, 'kit.json')))
      .sort();
    if (kits.length === 0) throw new Error('apt knows no linux-image-amd64 and no Debian kernel is cached: run apt-get update');
    kitDir = path.join(root, kits[kits.length - 1]);
  }
  const manifest = path.join(kitDir, 'kit.json');
  if (fs.existsSync(manifest)) return { ...JSON.parse(fs.readFileSync(manifest, 'utf8')), dir: kitDir };

  const t0 = Date.now();
  const debDir = path.join(root, 'debs');
  fs.mkdirSync(debDir, { recursive: true });
  let deb = fs.readdirSync(debDir).find((f) => f.startsWith(`${pkg.name}_`) && f.includes(pkg.version.replace(/:/g, '%3a')));
  if (!deb) {
    log(`downloading ${pkg.name} ${pkg.version}`);
    const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'mmb-deb-'));
    fs.chmodSync(tmp, 0o755); // apt's sandbox user writes into it
    execFileSync('apt-get', ['download', `${pkg.name}=${pkg.version}`], { cwd: tmp, stdio: ['ignore', 'ignore', 'inherit'] });
    deb = fs.readdirSync(tmp).find((f) => f.endsWith('.deb'));
    if (!deb) throw new Error(`apt-get download ${pkg.name} produced no .deb`);
    fs.copyFileSync(path.join(tmp, deb), path.join(debDir, deb));
    fs.rmSync(tmp, { recursive: true, force: true });
  }

  log(`extracting ${deb}`);
  const tree = fs.mkdtempSync(path.join(os.tmpdir(), 'mmb-kernel-'));
  try {
    execFileSync(
      'sh',
      ['-c', `dpkg-deb --fsys-tarfile "$1" | tar -x -C "$2" --wildcards './boot/vmlinuz-*' './lib/modules/*/kernel/*'`, 'sh', path.join(debDir, deb), tree],
      {
        stdio: ['ignore', 'ignore', 'inherit'],
      },
    );
    const vmlinuz = fs.readdirSync(path.join(tree, 'boot')).find((f) => f.startsWith('vmlinuz-'));
    const release = vmlinuz.slice('vmlinuz-'.length);
    // Every module by name, then the wanted ones with their dependencies, dependencies first.
    const index = new Map();
    const walk = (dir) => {
      for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
        const p = path.join(dir, e.name);
        if (e.isDirectory()) walk(p);
        else if (/\.ko(\.xz|\.zst)?$/.test(e.name)) index.set(norm(e.name.replace(/\.ko(\.xz|\.zst)?$/, '')), p);
      }
    };
    walk(path.join(tree, 'lib/modules', release, 'kernel'));
    const order = [];
    const visit = (name, trail) => {
      if (order.includes(name)) return;
      if (trail.includes(name)) throw new Error(`module dependency loop: ${[...trail, name].join(' -> ')}`);
      const file = index.get(name);
      if (!file) throw new Error(`module ${name} is not in ${deb} (CONFIG_VFIO* changed?)`);
      const plain = plainModule(file);
      for (const d of moduleDepends(plain)) visit(d, [...trail, name]);
      order.push(name);
    };
    const staging = fs.mkdtempSync(path.join(root, '.kit-'));
    const plainModule = (file) => {
      const out = path.join(staging, `${norm(path.basename(file).replace(/\.ko(\.xz|\.zst)?$/, ''))}.ko`);
      if (!fs.existsSync(out)) {
        if (file.endsWith('.xz')) fs.writeFileSync(out, execFileSync('xz', ['-dc', file], { maxBuffer: 1 << 28 }));
        else if (file.endsWith('.zst')) fs.writeFileSync(out, execFileSync('zstd', ['-dc', file], { maxBuffer: 1 << 28 }));
        else fs.copyFileSync(file, out);
      }
      return out;
    };
    for (const m of WANTED_MODULES) visit(m, []);
    fs.copyFileSync(path.join(tree, 'boot', vmlinuz), path.join(staging, 'vmlinuz'));
    const kit = { package: pkg.name, version: pkg.version, release, kernel: 'vmlinuz', modules: order.map((m) => `${m}.ko`) };
    fs.writeFileSync(path.join(staging, 'kit.json'), JSON.stringify(kit, null, 2) + '\n');
    fs.rmSync(kitDir, { recursive: true, force: true });
    fs.chmodSync(staging, 0o755);
    fs.renameSync(staging, kitDir);
    log(`Debian kernel ${release} ready in ${((Date.now() - t0) / 1000).toFixed(1)} s: modules ${order.join(' ')}`);
    return { ...kit, dir: kitDir };
  } finally {
    fs.rmSync(tree, { recursive: true, force: true });
  }
}

/**
 * The load order (dependencies first) of the Debian kernel's modules `wanted` and their dependencies, as
 * .ko files in the kit's directory: those the kit lacks (it was made for the VM test, with the VFIO
 * modules) are extracted from the cached .deb, one file at a time (written aside and renamed, so another
 * process reading the kit never sees half a module). The kit's own list (kit.json) is left as it is.
 */
export function kitModules(kit, wanted, { log = () => {} } = {}) {
  const have = (name) => fs.existsSync(path.join(kit.dir, `${name}.ko`));
  const order = [];
  let tree;
  let index;
  const debDir = path.join(cacheDir(), 'debian-kernel', 'debs');
  try {
    const ensure = (name) => {
      if (have(name)) return path.join(kit.dir, `${name}.ko`);
      if (!tree) {
        const deb = fs.existsSync(debDir)
          ? fs.readdirSync(debDir).find((f) => f.startsWith(`${kit.package}_`) && f.includes(String(kit.version).replace(/:/g, '%3a')))
          : undefined;
        if (!deb) throw new Error(`module ${name} is not in the kit and ${kit.package} ${kit.version} is not cached in ${debDir}`);
        log(`extracting modules from ${deb}`);
        tree = fs.mkdtempSync(path.join(os.tmpdir(), 'mmb-kmod-'));
        execFileSync('sh', ['-c', `dpkg-deb --fsys-tarfile "$1" | tar -x -C "$2" --wildcards './lib/modules/*/kernel/*'`, 'sh', path.join(debDir, deb), tree], {
          stdio: ['ignore', 'ignore', 'inherit'],
        });
        index = new Map();
        const walk = (dir) => {
          for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
            const p = path.join(dir, e.name);
            if (e.isDirectory()) walk(p);
            else if (/\.ko(\.xz|\.zst)?$/.test(e.name)) index.set(norm(e.name.replace(/\.ko(\.xz|\.zst)?$/, '')), p);
          }
        };
        walk(path.join(tree, 'lib/modules', kit.release, 'kernel'));
      }
      const file = index.get(name);
      if (!file) throw new Error(`module ${name} is not in ${kit.package} ${kit.version}`);
      const data = file.endsWith('.xz')
        ? execFileSync('xz', ['-dc', file], { maxBuffer: 1 << 28 })
        : file.endsWith('.zst')
          ? execFileSync('zstd', ['-dc', file], { maxBuffer: 1 << 28 })
          : fs.readFileSync(file);
      const out = path.join(kit.dir, `${name}.ko`);
      fs.writeFileSync(`${out}.${process.pid}.tmp`, data);
      fs.renameSync(`${out}.${process.pid}.tmp`, out);
      return out;
    };
    const visit = (name, trail) => {
      if (order.includes(name)) return;
      if (trail.includes(name)) throw new Error(`module dependency loop: ${[...trail, name].join(' -> ')}`);
      for (const d of moduleDepends(ensure(name))) visit(d, [...trail, name]);
      order.push(name);
    };
    for (const m of wanted) visit(norm(m), []);
  } finally {
    if (tree) fs.rmSync(tree, { recursive: true, force: true });
  }
  return order.map((m) => `${m}.ko`);
}

/**
 * The custom iommufd kernel's bzImage path. `build`: build it when not cached (about 8 minutes on 2
 * cores); otherwise resolves undefined when not cached. Build output goes to `log`.
 */
export function customKernel({ build = false, log = () => {} } = {}) {
  const script = path.join(HERE, 'build-kernel.sh');
  return new Promise((resolve, reject) => {
    const child = spawn(script, build ? [] : ['--check-only'], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d) => {
      stderr += d;
      for (const line of d.split('\n')) if (line.startsWith('[build-kernel]')) log(line.slice(15));
    });
    child.on('error', reject);
    child.on('exit', (code) => {
      if (code === 0) return resolve(stdout.trim().split('\n').pop());
      if (code === 3 && !build) return resolve(undefined);
      reject(new Error(`vm/build-kernel.sh failed (exit ${code}):\n${stderr.slice(-4000)}`));
    });
  });
}

/** What the custom kernel's cache key would be (version-confighash), or undefined if unknown. */
export function customKernelKey() {
  try {
    return execFileSync(path.join(HERE, 'build-kernel.sh'), ['--print-key'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim();
  } catch {
    return undefined;
  }
}
