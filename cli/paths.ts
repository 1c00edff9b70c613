// Checks of paths an operator gives, before anything is started: a missing directory, a directory given
// for a file, a file in /proc or /sys (which root can open for writing, and which are not storage) are
// typed errors naming the path, not a system error halfway through.
import fs from 'node:fs';
import path from 'node:path';
import { InvalidArgError } from '../protocol/index.js';

/** statfs f_type of filesystems that are views of the kernel, not storage. */
const KERNEL_FILESYSTEMS: Readonly<Record<number, string>> = {
  0x9fa0: 'procfs',
  0x62656572: 'sysfs',
  0x1cd1: 'devpts',
  0x64626720: 'debugfs',
  0x74726163: 'tracefs',
  0x27e0eb: 'cgroupfs',
  0x63677270: 'cgroup2',
};

/** A file the command will create or overwrite with data (a migration image): checked, or throws. */
export function checkOutputFile(file: string, what: string): void {
  const full = path.resolve(file);
  const dir = path.dirname(full);
  let st: fs.Stats;
  try {
    st = fs.statSync(dir);
  } catch {
    throw new InvalidArgError(`${what} ${file}: the directory ${dir} does not exist (create it, or give a path in an existing directory)`);
  }
  if (!st.isDirectory()) throw new InvalidArgError(`${what} ${file}: ${dir} is not a directory`);
  const kind = KERNEL_FILESYSTEMS[fs.statfsSync(dir).type];
  if (kind) throw new InvalidArgError(`${what} ${file} is on ${kind}, a view of the kernel, not storage: give a file on a disk or tmpfs`);
  let target: fs.Stats | undefined;
  try {
    target = fs.statSync(full);
  } catch {
    // It does not exist yet: it will be created.
  }
  if (target && !target.isFile())
    throw new InvalidArgError(`${what} ${file} exists and is not a regular file (a ${target.isDirectory() ? 'directory' : 'device, socket or pipe'})`);
  try {
    fs.accessSync(target ? full : dir, fs.constants.W_OK);
  } catch {
    throw new InvalidArgError(`${what} ${file}: ${target ? 'the file' : `its directory ${dir}`} is not writable by this user`);
  }
}
