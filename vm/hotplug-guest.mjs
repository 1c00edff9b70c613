// The guest of the QEMU memory-hotplug peer (bench/qemu-hotplug.ts): the VM test's Debian kernel (its
// vmlinuz, from kernel.mjs's kit) and a small initramfs of its own: static busybox, the kernel's virtio-blk
// driver with its dependencies (virtio_pci, virtio_pci_modern_dev, virtio_pci_legacy_dev, virtio,
// virtio_ring: all modules in Debian's 6.1 config, CONFIG_VIRTIO_BLK=m, CONFIG_VIRTIO_PCI=m), and
// guest/hotplug-init as /init. No Node in the guest: it only has to start the vhost-user-blk devices
// (virtio-blk's probe sets DRIVER_OK, which makes QEMU send each back-end the memory table) and grant
// QEMU's ACPI unplug of a DIMM (CONFIG_ACPI_HOTPLUG_MEMORY=y). Cached in <cache>/initramfs/ by its inputs.
import { createHash } from 'node:crypto';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Cpio, findBusybox } from './initramfs.mjs';
import { cacheDir, debianKernel, kitModules } from './kernel.mjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const RECIPE = 1; // bump when the archive's layout changes

/** {kernel, initrd, modules, release}: the paths QEMU boots, and what the initramfs loads. */
export function hotplugGuest({ log = () => {} } = {}) {
  const kit = debianKernel({ log });
  const modules = kitModules(kit, ['virtio_blk', 'virtio_pci'], { log });
  const busybox = findBusybox();
  if (!busybox) throw new Error('no static busybox (/bin/busybox): apt-get install --no-install-recommends busybox-static');
  const init = path.join(HERE, 'guest', 'hotplug-init');
  const inputs = [busybox, init, ...modules.map((m) => path.join(kit.dir, m))].map((p) => {
    const st = fs.statSync(p);
    return `${p} ${st.size} ${st.mtimeMs}`;
  });
  const key = createHash('sha256')
    .update(`recipe ${RECIPE}\n${inputs.join('\n')}`)
    .digest('hex')
    .slice(0, 16);
  const dir = path.join(cacheDir(), 'initramfs');
  const initrd = path.join(dir, `hotplug-${key}.cpio.gz`);
  if (!fs.existsSync(initrd)) {
    const c = new Cpio();
    for (const d of ['bin', 'dev', 'proc', 'sys', 'tmp', 'lib/modules/mmb']) c.dir(d);
    c.copy(busybox, 'bin/busybox');
    const applets = execFileSync(busybox, ['--list'], { encoding: 'utf8' })
      .split('\n')
      .filter((a) => a && a !== 'busybox');
    for (const a of applets) c.symlink(`bin/${a}`, 'busybox');
    for (const m of modules) c.copy(path.join(kit.dir, m), `lib/modules/mmb/${m}`);
    c.file('lib/modules/mmb/order', Buffer.from(modules.join('\n') + '\n'));
    c.file('init', fs.readFileSync(init), 0o755);
    fs.mkdirSync(dir, { recursive: true });
    fs.writeFileSync(`${initrd}.${process.pid}.tmp`, c.gzip(6));
    fs.renameSync(`${initrd}.${process.pid}.tmp`, initrd);
    log(`hotplug guest initramfs: ${initrd}`);
  }
  return { kernel: path.join(kit.dir, kit.kernel), initrd, modules, release: kit.release };
}
