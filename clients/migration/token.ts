// The secret that lets a sender stream a migration into `mmbroker receive`: read from a file (so it never
// shows in /proc/PID/cmdline), which must be private to its owner, and never sent over the connection:
// the receiver sends a fresh random nonce, the sender answers HMAC-SHA256(token, nonce), and the receiver
// compares that with its own in constant time (docs/migration.md, "Authentication").
import crypto from 'node:crypto';
import fs from 'node:fs';
import { InvalidArgError } from '../../protocol/index.js';

/** At least this many characters (as serve's --token-file). */
export const MIN_TOKEN_LENGTH = 16;
/** Bytes of the receiver's nonce. */
export const NONCE_BYTES = 32;
const CONTEXT = 'mmb-migration-v1 auth\0';

/**
 * The token in `file` (its first line, trimmed). Refuses a file that is not a regular file, one that its
 * group or others may access (mode & 0o077: chmod 600 it), and a token shorter than 16 characters.
 */
export function readTokenFile(file: string, what = '--token-file'): string {
  let fd: number;
  try {
    fd = fs.openSync(file, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW);
  } catch (err) {
    throw new InvalidArgError(`${what} ${file}: ${(err as Error).message}`);
  }
  try {
    const st = fs.fstatSync(fd);
    if (!st.isFile()) throw new InvalidArgError(`${what} ${file}: not a regular file`);
    if ((st.mode & 0o077) !== 0) {
      throw new InvalidArgError(
        `${what} ${file}: its mode is ${(st.mode & 0o777).toString(8).padStart(3, '0')}; a secret must not be accessible to group or others (chmod 600 ${file})`,
      );
    }
    const token = fs.readFileSync(fd, 'utf8').split('\n')[0]?.trim() ?? '';
    if (token.length < MIN_TOKEN_LENGTH) throw new InvalidArgError(`${what} ${file}: the token must be at least ${MIN_TOKEN_LENGTH} characters`);
    return token;
  } finally {
    fs.closeSync(fd);
  }
}

/** A fresh nonce for one connection. */
export function newNonce(): Buffer {
  return crypto.randomBytes(NONCE_BYTES);
}

/** What the sender answers to `nonce`: HMAC-SHA256 keyed by the token. */
export function authMac(token: string, nonce: Uint8Array): Buffer {
  return crypto.createHmac('sha256', token).update(CONTEXT).update(nonce).digest();
}

/** Whether `mac` answers `nonce` for `token`; the comparison takes the same time whatever the bytes. */
export function checkMac(token: string, nonce: Uint8Array, mac: Uint8Array): boolean {
  const want = authMac(token, nonce);
  // timingSafeEqual needs equal lengths; compare against a same-length buffer either way.
  const got = Buffer.alloc(want.length);
  Buffer.from(mac.buffer, mac.byteOffset, Math.min(mac.length, want.length)).copy(got);
  return crypto.timingSafeEqual(want, got) && mac.length === want.length;
}
