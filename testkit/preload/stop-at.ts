// A probe for tests, loaded only with `node --import` (testkit/moments.ts), never by the product: the
// process stops itself (SIGSTOP) at one named moment of its life, so that a test can deliver a signal at
// exactly that moment (SIGTERM, then SIGCONT) instead of hoping to hit it. MMB_TESTKIT_STOP_AT names it:
//   connect   right after its first connect() to a Unix socket succeeded
//   recv:N    right after its Nth recvmsg() that returned bytes (recv:1 is the broker's HELLO reply)
//   line:N    right after it wrote its Nth line on stdout
import { native } from '../../native/index.js';

const at = process.env.MMB_TESTKIT_STOP_AT ?? '';
const [what, nth] = at.split(':');
const n = Number(nth ?? 1);
let count = 0;

const stop = (): void => {
  process.kill(process.pid, 'SIGSTOP');
};

if (what === 'connect') {
  const connect = native.socketConnect.bind(native);
  native.socketConnect = (path: string): number => {
    const fd = connect(path);
    if (++count === 1) stop();
    return fd;
  };
} else if (what === 'recv') {
  const recvmsg = native.recvmsg.bind(native);
  native.recvmsg = (...args: Parameters<typeof native.recvmsg>) => {
    const r = recvmsg(...args);
    if (r !== null && r.bytes > 0 && ++count === n) stop();
    return r;
  };
} else if (what === 'line') {
  const write = process.stdout.write.bind(process.stdout) as (chunk: unknown, ...rest: unknown[]) => boolean;
  process.stdout.write = ((chunk: unknown, ...rest: unknown[]): boolean => {
    const ok = write(chunk, ...rest);
    const text = typeof chunk === 'string' ? chunk : Buffer.from(chunk as Uint8Array).toString('utf8');
    const before = count;
    count += text.split('\n').length - 1;
    if (before < n && count >= n) stop();
    return ok;
  }) as typeof process.stdout.write;
} else if (at !== '') {
  throw new Error(`MMB_TESTKIT_STOP_AT=${at}: expected connect, recv:N or line:N`);
}
