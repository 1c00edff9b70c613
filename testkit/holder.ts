// A process a subscriber handed guest memory to (a stand-in for a vhost-user back-end or a helper child),
// started by the scripted client's `hand-on` command: it maps the memfd it inherited as fd 3 (`size`
// bytes, argv[2]) read-only and then only waits, printing {"event":"mapped","pid":N} once the mapping exists.
import { constants, native } from '../native/index.js';
import { out } from './control.js';

const size = Number(process.argv[2]);
native.mmap(3, 0, size, constants.PROT_READ, constants.MAP_SHARED);
out({ event: 'mapped', pid: process.pid });
setInterval(() => undefined, 1 << 30);
