// The guest's initramfs: three gzip-compressed newc cpio archives, concatenated (the kernel unpacks them
// in order into one rootfs):
//   base     busybox (static) with its applets as links, the host's node binary and the libraries ldd
//            lists, /etc/passwd. ~35 MB compressed; cached in <cache>/initramfs/ by the identity of its
//            inputs (paths, sizes, mtimes), so it is built once per node / busybox.
//   modules  the Debian kernel's VFIO modules and their load order (none for the custom kernel).
//   project  /init (vm/guest/init), and under /mmb: package.json, dist/ (JavaScript only), the built addon
//            build/Release/mmb_native.node, the production dependencies from node_modules (npm ls
//            --omit=dev), vm/guest/. Built on every run (~1 MB).
// The cpio writer is here (no cpio(1) needed): directories, regular files, symlinks, owned by root.
import { createHash } from 'node:crypto';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import zlib from 'node:zlib';
import { cacheDir } from './kernel.mjs';

const RECIPE = 1; // bump when the base archive's layout changes

export class Cpio {
  constructor() {
    this.chunks = [];
    this.ino = 1;
    this.dirs = new Set(['.', '']);
  }

  entry(name, mode, data = Buffer.alloc(0), mtime = 0) {
    const nameBuf = Buffer.from(`${name}\0`);
    const fields = [this.ino++, mode, 0, 0, 1, mtime, data.length, 0, 0, 0, 0, nameBuf.length, 0];
    const header = Buffer.from(`070701${fields.map((f) => (f >>> 0).toString(16).padStart(8, '0')).join('')}`, 'latin1');
    const pad = (n) => Buffer.alloc((4 - (n % 4)) % 4);
    this.chunks.push(header, nameBuf, pad(header.length + nameBuf.length), data, pad(data.length));
  }

  /** Creates `dir` and its parents (mode 0755) unless already there. */
  dir(dir, mode = 0o755) {
    dir = dir.replace(/^\/+|\/+$/g, '');
    if (this.dirs.has(dir)) return;
    this.dir(path.posix.dirname(dir));
    this.dirs.add(dir);
    this.entry(dir, 0o040000 | mode);
  }

  file(name, data, mode = 0o644) {
    name = name.replace(/^\/+/, '');
    this.dir(path.posix.dirname(name));
    this.entry(name, 0o100000 | mode, data);
  }

  /** Copies a host file (following symlinks) to `name`, keeping its permission bits. */
  copy(host, name) {
    const st = fs.statSync(host);
    this.file(name, fs.readFileSync(host), st.mode & 0o7777);
  }

  /** Copies a host directory tree to `name`; `filter(relativePath, dirent)` may skip entries. */
  copyTree(host, name, filter = () => true) {
    for (const e of fs.readdirSync(host, { withFileTypes: true })) {
      const h = path.join(host, e.name);
      const n = path.posix.join(name, e.name);
      if (!filter(n, e)) continue;
      if (e.isDirectory()) this.copyTree(h, n, filter);
      else if (e.isSymbolicLink()) {
        const target = fs.readlinkSync(h);
        this.dir(path.posix.dirname(n));
        this.entry(n.replace(/^\/+/, ''), 0o120777, Buffer.from(target));
      } else if (e.isFile()) this.copy(h, n);
    }
  }

  symlink(name, target) {
    name = name.replace(/^\/+/, '');
    this.dir(path.posix.dirname(name));
    this.entry(name, 0o120777, Buffer.from(target));
  }

  /** The archive (with its trailer), gzip-compressed. */
  gzip(level) {
    this.entry('TRAILER!!!', 0);
    return zlib.gzipSync(Buffer.concat(this.chunks), { level });
  }
}

/** The shared libraries `ldd` lists for `binary`, with the dynamic loader: [[path, ...]]. */
function libraries(binary) {
  const out = execFileSync('ldd', [binary], { encoding: 'utf8' });
  const libs = new Set();
  for (const line of out.split('\n')) {
    const m = /=>\s*(\/\S+)/.exec(line) ?? /^\s*(\/\S+)\s*\(/.exec(line);
    if (m) libs.add(m[1]);
  }
  return [...libs];
}

/** Where busybox-static's binary is (the dynamic busybox package would need its libraries). */
export function findBusybox() {
  for (const p of ['/bin/busybox', '/usr/bin/busybox']) {
    if (!fs.existsSync(p)) continue;
    const ldd = (() => {
      try {
        return execFileSync('ldd', [p], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
      } catch (err) {
        return String(err.stdout ?? '') + String(err.stderr ?? '');
      }
    })();
    if (/not a dynamic executable|statically linked/.test(ldd)) return p;
  }
  return undefined;
}

/** The base archive: busybox, node and its libraries. Cached; returns its path. */
export function baseArchive({ node = process.execPath, log = () => {} } = {}) {
  const busybox = findBusybox();
  if (!busybox) throw new Error('no static busybox (/bin/busybox): apt-get install --no-install-recommends busybox-static');
  const nodeReal = fs.realpathSync(node);
  const libs = libraries(nodeReal);
  const inputs = [busybox, nodeReal, ...libs].map((p) => {
    const real = fs.realpathSync(p);
    const st = fs.statSync(real);
    return `${p} ${real} ${st.size} ${st.mtimeMs}`;
  });
  const key = createHash('sha256')
    .update(`recipe ${RECIPE}\n${inputs.join('\n')}`)
    .digest('hex')
    .slice(0, 16);
  const dir = path.join(cacheDir(), 'initramfs');
  const file = path.join(dir, `base-${key}.cpio.gz`);
  if (fs.existsSync(file)) return file;

  const t0 = Date.now();
  const c = new Cpio();
  for (const d of ['bin', 'dev', 'proc', 'sys', 'tmp', 'run', 'root', 'etc', 'usr/local/bin', 'lib/modules']) c.dir(d);
  c.copy(busybox, 'bin/busybox');
  const applets = execFileSync(busybox, ['--list'], { encoding: 'utf8' })
    .split('\n')
    .filter((a) => a && a !== 'busybox');
  for (const a of applets) c.symlink(`bin/${a}`, 'busybox');
  c.copy(nodeReal, 'usr/local/bin/node');
  for (const lib of libs) c.copy(lib, lib); // same path in the guest (the loader's path is built into node)
  c.file('etc/passwd', Buffer.from('root:x:0:0:root:/root:/bin/sh\nmmb:x:1000:1000:unprivileged vfio client:/tmp:/bin/sh\n'));
  c.file('etc/group', Buffer.from('root:x:0:\nmmb:x:1000:\n'));
  fs.mkdirSync(dir, { recursive: true });
  const data = c.gzip(1);
  fs.writeFileSync(`${file}.tmp`, data);
  fs.renameSync(`${file}.tmp`, file);
  log(
    `base initramfs (busybox, node ${process.version}, ${libs.length} libraries): ${(data.length / 2 ** 20).toFixed(1)} MiB in ${((Date.now() - t0) / 1000).toFixed(1)} s`,
  );
  return file;
}

/** The modules archive of a Debian kernel kit (see kernel.mjs), or undefined when it has none. */
export function modulesArchive(kit) {
  if (!kit?.modules?.length) return undefined;
  const file = path.join(kit.dir, 'modules.cpio.gz');
  if (fs.existsSync(file)) return file;
  const c = new Cpio();
  for (const m of kit.modules) c.copy(path.join(kit.dir, m), `lib/modules/mmb/${m}`);
  c.file('lib/modules/mmb/order', Buffer.from(kit.modules.join('\n') + '\n'));
  fs.writeFileSync(file, c.gzip(6));
  return file;
}

/** Production dependencies of the project (paths relative to `root`), as npm resolved them. */
function productionModules(root) {
  const out = execFileSync('npm', ['ls', '--omit=dev', '--all', '--parseable'], {
    cwd: root,
    encoding: 'utf8',
    stdio: ['ignore', 'pipe', 'ignore'],
    maxBuffer: 1 << 24,
  });
  return out
    .split('\n')
    .map((p) => path.relative(root, p.trim()))
    .filter((p) => p.startsWith('node_modules'));
}

/** The project archive: /init and /mmb. Returns the gzip data. */
export function projectArchive(root) {
  const addon = path.join(root, 'build/Release/mmb_native.node');
  if (!fs.existsSync(addon)) throw new Error(`${addon} is missing: run npm ci (node-gyp builds it)`);
  if (!fs.existsSync(path.join(root, 'dist/index.js'))) throw new Error(`${root}/dist is missing: run npm run build`);
  const c = new Cpio();
  c.file('init', fs.readFileSync(path.join(root, 'vm/guest/init')), 0o755);
  c.copy(path.join(root, 'package.json'), 'mmb/package.json');
  c.copy(addon, 'mmb/build/Release/mmb_native.node');
  c.copyTree(path.join(root, 'dist'), 'mmb/dist', (n, e) => e.isDirectory() || n.endsWith('.js') || n.endsWith('.json'));
  c.copyTree(path.join(root, 'vm/guest'), 'mmb/vm/guest');
  for (const m of productionModules(root)) {
    c.copyTree(
      path.join(root, m),
      `mmb/${m}`,
      (n, e) => !(e.isDirectory() && e.name === 'node_modules') && !n.endsWith('.md') && !n.endsWith('.d.ts') && !/\/test\/|\/benchmarks?\//.test(`${n}/`),
    );
  }
  return c.gzip(6);
}

/** Writes the whole initramfs (base + modules + project) to `out`. */
export function buildInitramfs({ root, kit, out, log = () => {} }) {
  const parts = [fs.readFileSync(baseArchive({ log }))];
  const mods = modulesArchive(kit);
  if (mods) parts.push(fs.readFileSync(mods));
  parts.push(projectArchive(root));
  fs.writeFileSync(out, Buffer.concat(parts));
  return out;
}
