// The socket's directory (transport/trusted-dir.ts, transport/listener.ts): which directories the broker
// accepts to listen in, which symlinks it follows, and that it binds, checks and removes its socket
// relative to the directory it checked. Attacks by another uid are in test/attackers.test.ts.
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { isMmbError } from '../protocol/index.js';
import { SocketListener, checkPassedSocket, openTrustedDir } from '../transport/index.js';
import { native } from '../native/index.js';
import { IN_CI } from './helpers/ci.js';
import { defer, runCleanups } from './helpers/embedded.js';
import { tempDir } from './helpers/procs.js';

afterEach(runCleanups);
const isRoot = process.getuid?.() === 0;

function scratch(): string {
  const dir = tempDir('mmb-trusted-');
  defer(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** The MMB_ERR_* code of what `fn` throws, or 'ok'. */
function outcome(fn: () => unknown): string {
  try {
    const r = fn();
    if (typeof r === 'number') fs.closeSync(r);
    if (r instanceof SocketListener) r.close();
    return 'ok';
  } catch (err) {
    if (isMmbError(err)) return err.code;
    throw err;
  }
}

describe('the socket directory', () => {
  it('missing directories are created, the last with exactly the mode asked for, whatever the umask', () => {
    const base = scratch();
    const old = process.umask(0o077);
    try {
      const fd = openTrustedDir(path.join(base, 'a/b'), { createMode: 0o750 });
      fs.closeSync(fd);
    } finally {
      process.umask(old);
    }
    expect(fs.statSync(path.join(base, 'a/b')).mode & 0o7777).toBe(0o750);
  });

  it('group- or other-writable directories are refused; a sticky one only as an ancestor', () => {
    const base = scratch();
    const dir = (name: string, mode: number): string => {
      const p = path.join(base, name);
      fs.mkdirSync(p);
      fs.chmodSync(p, mode);
      return p;
    };
    expect(outcome(() => openTrustedDir(dir('group', 0o775)))).toBe('MMB_ERR_UNSAFE_PATH');
    expect(outcome(() => openTrustedDir(dir('sticky', 0o1777)))).toBe('MMB_ERR_UNSAFE_PATH');
    expect(outcome(() => openTrustedDir(path.join(base, 'sticky'), { createMode: 0o700 }))).toBe('MMB_ERR_UNSAFE_PATH');
    expect(outcome(() => openTrustedDir(path.join(base, 'sticky/mine'), { createMode: 0o700 }))).toBe('ok');
    const open = dir('open', 0o777);
    expect(outcome(() => openTrustedDir(path.join(open, 'below'), { createMode: 0o700 }))).toBe('MMB_ERR_UNSAFE_PATH');
    expect(fs.existsSync(path.join(open, 'below'))).toBe(false); // refused before anything was made
  });

  it.skipIf(!isRoot && !IN_CI)(
    'a directory or symlink owned by another uid is refused, also on the way; a symlink of ours in a directory of ours is followed',
    () => {
      const base = scratch();
      fs.chmodSync(base, 0o755);
      const theirs = path.join(base, 'theirs');
      fs.mkdirSync(theirs, { mode: 0o755 });
      fs.chownSync(theirs, 65534, 65534);
      expect(outcome(() => openTrustedDir(theirs))).toBe('MMB_ERR_UNSAFE_PATH');
      const ours = path.join(base, 'ours');
      fs.mkdirSync(ours, { mode: 0o700 });
      fs.symlinkSync(ours, path.join(base, 'link'));
      const l = new SocketListener(path.join(base, 'link/b.sock'));
      expect(fs.lstatSync(path.join(ours, 'b.sock')).isSocket()).toBe(true);
      l.close();
      expect(fs.existsSync(path.join(ours, 'b.sock'))).toBe(false);
      fs.symlinkSync(ours, path.join(base, 'their-link'));
      fs.lchownSync(path.join(base, 'their-link'), 65534, 65534);
      expect(outcome(() => openTrustedDir(path.join(base, 'their-link')))).toBe('MMB_ERR_UNSAFE_PATH');
    },
  );

  it('close() removes the socket it bound and nothing that replaced it', () => {
    const dir = scratch();
    const file = path.join(dir, 'b.sock');
    const l = new SocketListener(file);
    fs.unlinkSync(file);
    const other = native.socketListen(file, 1, 0o600);
    defer(() => native.close(other));
    l.close();
    expect(fs.lstatSync(file).isSocket()).toBe(true);
  });

  it.skipIf(!isRoot && !IN_CI)('a socket handed over by a service manager is checked instead: listening, bound in a directory nobody else controls', () => {
    const dir = scratch();
    const good = native.socketListen(path.join(dir, 'ok.sock'), 1, 0o600);
    defer(() => native.close(good));
    expect(checkPassedSocket(good)).toBe(path.join(dir, 'ok.sock'));
    const [a, b] = native.socketPair();
    defer(() => (native.close(a), native.close(b)));
    expect(outcome(() => checkPassedSocket(a))).toBe('MMB_ERR_UNSAFE_PATH');
    const theirs = path.join(dir, 'theirs');
    fs.mkdirSync(theirs, { mode: 0o755 });
    const bad = native.socketListen(path.join(theirs, 'x.sock'), 1, 0o600);
    defer(() => native.close(bad));
    fs.chownSync(theirs, 65534, 65534);
    expect(outcome(() => checkPassedSocket(bad))).toBe('MMB_ERR_UNSAFE_PATH');
  });
});
