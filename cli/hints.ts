// What to tell an operator after an error: the one line says what went wrong (code, errno, message with
// the path or value), the hint what to do about it. Usage mistakes (MMB_ERR_INVALID_ARG) point to --help.
import { isMmbError, type MmbError } from '../protocol/index.js';

/** The hint for an error a command ended with, or undefined when the message says it all. */
export function hintFor(err: MmbError, command: string, socket: string | undefined): string | undefined {
  const at = socket !== undefined ? ` at ${socket}` : '';
  switch (err.code) {
    case 'MMB_ERR_INVALID_ARG':
      return `Try 'mmbroker ${command} --help'.`;
    case 'MMB_ERR_CONNECT':
      if (err.errno === 'ENOENT' || err.errno === 'ECONNREFUSED') {
        return `is \`mmbroker serve\` running${at}? Give its socket with --socket PATH or MMBROKER_SOCKET.`;
      }
      if (err.errno === 'EACCES' || err.errno === 'EPERM')
        return `the socket${at} is not open to you: run as the broker's user, or see --socket-mode in \`mmbroker serve --help\`.`;
      return undefined;
    case 'MMB_ERR_ADDRESS_IN_USE':
      return 'stop the other broker first (or give this one another --socket); `mmbroker status` talks to the running one.';
    case 'MMB_ERR_PERMISSION':
      return "the broker decides by your uid and gid (SO_PEERCRED) and, when it has one, the space's token (--token-file): see docs/security.md.";
    case 'MMB_ERR_OWNER_EXISTS':
      return 'another owner (the VMM, or another mmbroker command) holds this space; it alone may change the map while attached.';
    case 'MMB_ERR_NO_SPACE':
      return '`mmbroker status` lists the spaces this broker serves.';
    case 'MMB_ERR_FEATURE':
    case 'MMB_ERR_UNSUPPORTED':
      return isMmbError(err, 'MMB_ERR_UNSUPPORTED') && /older/.test(err.message) ? 'upgrade the broker (`mmbroker --version` on both sides).' : undefined;
    case 'MMB_ERR_DISCONNECTED':
    case 'MMB_ERR_SHUTDOWN':
      return 'the broker went away: `mmbroker status` says whether it is back.';
    default:
      return undefined;
  }
}
