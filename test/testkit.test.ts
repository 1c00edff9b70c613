// The testkit's own promises (testkit/README.md): JsonProc hands each line to one waiter in order and
// keeps what it is told to keep; the broker launcher waits for "listening" and refuses a log level that
// would hide it; a readable copy is readable by everyone whatever the checkout's location.
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { BrokerProc } from '../testkit/broker.js';
import { JsonProc } from '../testkit/jsonproc.js';
import { canSwitchUid, readableCopy, spawnAsUid } from '../testkit/uid.js';
import { IN_CI } from './helpers/ci.js';
import { tempDir } from './helpers/procs.js';

const dir = tempDir('mmb-kit-');
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));
let scripts = 0;

/** A node process running `code` (an ES module), with `out(obj)` printing one JSON line. */
function script(code: string, opts: Parameters<typeof JsonProc.spawn>[2] = {}): JsonProc {
  const file = path.join(dir, `script${scripts++}.mjs`);
  fs.writeFileSync(file, `const out = (o) => process.stdout.write(JSON.stringify(o) + '\\n');\n${code}\n`);
  return JsonProc.spawn(file, [], opts);
}

describe('JsonProc', () => {
  it('next() returns matching lines in order, once each; a request gets its own reply or its failed line', async () => {
    const q = script(`
      out({ event: 'a', n: 1 }); out({ event: 'b', n: 2 }); out({ event: 'a', n: 3 }); console.log('not json');
      const { serveCommands } = await import(${JSON.stringify(new URL('../dist/testkit/control.js', import.meta.url).pathname)});
      serveCommands({ echo: (c) => ({ event: 'echo', v: c.v }), boom: () => { throw Object.assign(new Error('no'), { code: 'MMB_ERR_X' }); } });`);
    expect((await q.next('a')).n).toBe(1);
    expect((await q.next('a')).n).toBe(3);
    expect(await q.next('text')).toEqual({ event: 'text', text: 'not json' });
    const [e1, e2, f] = await Promise.all([
      q.request({ cmd: 'echo', v: 1 }, 'echo'),
      q.request({ cmd: 'echo', v: 2 }, 'echo'),
      q.request({ cmd: 'boom' }, 'never'),
    ]);
    expect([e1.v, e2.v]).toEqual([1, 2]);
    expect(f).toMatchObject({ event: 'failed', cmd: 'boom', code: 'MMB_ERR_X', message: 'no' });
    expect(await q.stop('end-stdin')).toBe(0);
    await expect(q.next('a')).rejects.toThrow(/exited \(0\)/);
  });

  it('keep and limit: only the kinds asked for are kept, the newest `limit` of them', async () => {
    const p = script(`for (let i = 0; i < 50; i++) out({ event: i % 2 ? 'odd' : 'even', i });`, { keep: (l) => l.event === 'odd', limit: 5 });
    await p.exited;
    await expect(p.next('nothing', () => true, 5000)).rejects.toThrow(/exited/);
    expect(p.lines.map((l) => l.i)).toEqual([41, 43, 45, 47, 49]);
  });
});

describe('BrokerProc', () => {
  it('is ready once it logged "listening", and refuses a log level that would not print it', async () => {
    await expect(BrokerProc.start({ socket: path.join(dir, 'x.sock'), logLevel: 'error' as 'info' })).rejects.toThrow(/listening/);
    const b = await BrokerProc.start({ socket: path.join(dir, 'b.sock'), spaces: ['vm0'], listenDelayMs: 300 });
    expect(b.lines.find((l) => l.msg === 'listening')).toMatchObject({ spaces: ['vm0'] });
    expect(await b.stop('SIGTERM')).toBe(0);
  });
});

describe('running as another uid', () => {
  it('the readable copy and every directory above it can be read and traversed by others', () => {
    const dir = readableCopy(['test/fixtures/connect-as.mjs']);
    for (let d = dir; d !== path.dirname(d); d = path.dirname(d)) expect(fs.statSync(d).mode & 0o001, d).toBe(0o001);
    for (const f of ['dist/index.js', 'test/fixtures/connect-as.mjs', 'package.json']) expect(fs.statSync(path.join(dir, f)).mode & 0o004, f).toBe(0o004);
  });

  it.skipIf(!canSwitchUid() && !IN_CI)('a program run as uid 65534 from the copy imports the library and says who it is', async () => {
    const p = spawnAsUid(65534, 'test/fixtures/connect-as.mjs', ['/nonexistent/socket', 'vm0', 'subscriber'], { stdin: 'ignore' });
    const outcome = await p.next(undefined, (l) => 'ok' in l, 30_000);
    expect(outcome).toMatchObject({ ok: false, code: 'MMB_ERR_CONNECT', uid: 65534 });
    expect(await p.exited).toBe(0);
  });
});
