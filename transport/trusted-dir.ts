// A directory nobody but us (or root) controls, for the broker's socket. Whoever may rename or unlink
// entries of the socket's directory, or of any directory above it, can put their own socket where
// clients will send their memory. So the path is walked from "/" one component at a time, each opened
// relative to the descriptor of its parent (through /proc/self/fd/N, which is openat without a libc
// binding) with O_NOFOLLOW | O_DIRECTORY, and each must be:
//   - owned by the broker's uid or by root, and
//   - not writable by group or others, except an ancestor with the sticky bit (/tmp: others may create
//     entries there but not remove or rename ours); the socket's own directory may not rely on that.
// A symlink is followed only where its directory passed those rules and the link itself belongs to the
// broker's uid or root (/var/run -> /run), never in a directory others may write, /tmp included.
// Anything else is MMB_ERR_UNSAFE_PATH and the broker does not start. The descriptor of the checked
// directory is what the socket is then bound, checked and unlinked relative to: a rename of a checked
// directory by its (trusted) owner cannot redirect us to a path we did not check.
//
// "The broker's uid" is the effective uid; every uid on the owner list is trusted anyway (see
// docs/security.md): nothing here protects against an attacker who has that uid or root.
import fs from 'node:fs';
import path from 'node:path';
import { UnsafePathError } from '../protocol/index.js';

const O_PATH = 0o10000000;
const O_DIRECTORY = fs.constants.O_DIRECTORY;
const O_NOFOLLOW = fs.constants.O_NOFOLLOW;
const S_ISVTX = 0o1000;
/** Symlinks followed in one walk before giving up (the kernel's own limit is 40). */
const MAX_LINKS = 40;

/** `name` inside the directory open as `dirFd`, as a path the kernel resolves through that descriptor. */
export const under = (dirFd: number, name: string): string => `/proc/self/fd/${dirFd}/${name}`;

const me = (): number => process.geteuid?.() ?? 0;

function trustedOwner(st: fs.Stats): boolean {
  return st.uid === 0 || st.uid === me();
}

/** Why `st` (a directory at `shown`) is not safe to hold the socket or lead to it, or undefined. */
function looseness(st: fs.Stats, shown: string, final: boolean): string | undefined {
  const mode = (st.mode & 0o7777).toString(8).padStart(4, '0');
  if (!trustedOwner(st)) return `${shown} belongs to uid ${st.uid}, not to root or the broker (uid ${me()})`;
  if ((st.mode & 0o022) === 0) return undefined;
  if (!final && (st.mode & S_ISVTX) !== 0) return undefined;
  return final && (st.mode & S_ISVTX) !== 0
    ? `${shown} is writable by others (mode ${mode}); sticky is not enough for the socket's own directory: others could take its name first`
    : `${shown} is writable by group or others (mode ${mode}): they could replace what lies below it`;
}

export interface TrustedDirOptions {
  /** Create the last missing components with this mode (the final directory gets exactly it). */
  createMode?: number;
}

/**
 * Opens `dir` (made absolute) after checking it and every ancestor as above; returns an O_PATH
 * descriptor of it, which the caller owns. Throws MMB_ERR_UNSAFE_PATH, or the errno of a failed open.
 */
export function openTrustedDir(dir: string, opts: TrustedDirOptions = {}): number {
  let todo = path.resolve(dir).split('/').filter(Boolean);
  let shown = '/';
  let fd = fs.openSync('/', O_PATH | O_DIRECTORY);
  let links = 0;
  try {
    check(fd, shown, todo.length === 0);
    while (todo.length > 0) {
      const name = todo.shift() as string;
      const final = todo.length === 0;
      const next = path.join(shown, name);
      let child: number;
      try {
        child = fs.openSync(under(fd, name), O_PATH | O_DIRECTORY | O_NOFOLLOW);
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        if (code === 'ENOENT' && opts.createMode !== undefined) {
          child = create(fd, name, next, opts.createMode, final);
        } else if (code === 'ELOOP' || code === 'ENOTDIR') {
          // A symlink we may follow: walk again from "/" along its target (normalized, so ".." is lexical
          // and every directory on the new way is checked like the first time).
          const target = symlinkTarget(fd, name, next, shown);
          if (++links > MAX_LINKS) throw new UnsafePathError(`${dir}: too many symlinks`);
          todo = [...path.resolve(shown, target).split('/').filter(Boolean), ...todo];
          fs.closeSync(fd);
          fd = fs.openSync('/', O_PATH | O_DIRECTORY);
          shown = '/';
          continue;
        } else {
          throw err;
        }
      }
      fs.closeSync(fd);
      fd = child;
      shown = next;
      check(fd, shown, final);
    }
    return fd;
  } catch (err) {
    fs.closeSync(fd);
    throw err;
  }
}

const HINT =
  "put the socket where only root or the broker's uid can change any directory on the way, e.g. /run/NAME/broker.sock (a missing directory is created 0700)";

function check(fd: number, shown: string, final: boolean): void {
  const why = looseness(fs.fstatSync(fd), shown, final);
  if (why) throw new UnsafePathError(`${why}; the broker will not listen there: ${HINT}`);
}

/** A symlink at `name` in the (checked) directory `dirFd`: its target, if it may be followed. */
function symlinkTarget(dirFd: number, name: string, shown: string, parent: string): string {
  const link = under(dirFd, name);
  const st = fs.lstatSync(link);
  if (!st.isSymbolicLink()) throw new UnsafePathError(`${shown} is not a directory`);
  const dir = fs.fstatSync(dirFd);
  if ((dir.mode & 0o022) !== 0) throw new UnsafePathError(`${shown} is a symlink in ${parent}, which others may write: it is not followed; ${HINT}`);
  if (!trustedOwner(st)) throw new UnsafePathError(`${shown} is a symlink owned by uid ${st.uid}: it is not followed; ${HINT}`);
  return fs.readlinkSync(link);
}

/** mkdir `name` in `dirFd` (never through a symlink: mkdir does not follow one) and open it. */
function create(dirFd: number, name: string, shown: string, mode: number, final: boolean): number {
  try {
    fs.mkdirSync(under(dirFd, name), { mode: final ? mode : mode | 0o700 });
  } catch (err) {
    // Someone made it meanwhile: take it as found (the caller checks it like any other).
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') return fs.openSync(under(dirFd, name), O_PATH | O_DIRECTORY | O_NOFOLLOW);
    throw err;
  }
  const rw = fs.openSync(under(dirFd, name), fs.constants.O_RDONLY | O_DIRECTORY | O_NOFOLLOW);
  try {
    if (final) fs.fchmodSync(rw, mode); // exactly `mode`, whatever the umask took away
  } catch (err) {
    fs.closeSync(rw);
    throw new UnsafePathError(`cannot set the mode of ${shown}: ${(err as Error).message}`, { cause: err });
  }
  return rw;
}

/**
 * Checks a listening socket handed over by a service manager (socket activation, LISTEN_FDS) instead of
 * the directory the broker would have made: it must be a listening Unix stream socket bound to a path
 * (an abstract socket has no permissions at all), whose directory passes openTrustedDir's rules and whose
 * file belongs to root or the broker. Returns the socket's path. Throws MMB_ERR_UNSAFE_PATH.
 */
export function checkPassedSocket(fd: number): string {
  const ino = fs.fstatSync(fd).ino;
  // /proc/net/unix: "Num RefCount Protocol Flags Type St Inode Path"; Flags 00010000 is __SO_ACCEPTCON.
  const line = fs
    .readFileSync('/proc/net/unix', 'utf8')
    .split('\n')
    .map((l) => l.trim().split(/\s+/))
    .find((f) => f[6] === String(ino));
  if (!line) throw new UnsafePathError(`descriptor ${fd} is not a Unix socket`);
  const [, , , flags, type, , , where] = line;
  if ((parseInt(flags as string, 16) & 0x10000) === 0 || type !== '0001') throw new UnsafePathError(`descriptor ${fd} is not a listening Unix stream socket`);
  if (!where || where.startsWith('@'))
    throw new UnsafePathError(`descriptor ${fd} is ${where ? 'an abstract' : 'an unbound'} socket: anyone in the network namespace may connect`);
  const dirFd = openTrustedDir(path.dirname(where));
  try {
    const st = fs.lstatSync(under(dirFd, path.basename(where)));
    if (!st.isSocket() || !trustedOwner(st)) throw new UnsafePathError(`${where} is not a socket owned by root or the broker`);
  } finally {
    fs.closeSync(dirFd);
  }
  return where;
}
