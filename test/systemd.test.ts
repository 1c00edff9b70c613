// systemd without systemd as PID 1: the shipped units pass `systemd-analyze verify`, and the broker runs
// under `systemd-socket-activate` (the socket passed as descriptor 3) with a notify socket of the test's
// own, receiving READY=1 once it serves, WATCHDOG=1 pings, and STOPPING=1 on SIGTERM; the socket file,
// which the service manager owns, survives the broker.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import readline from 'node:readline';
import { afterAll, describe, expect, it } from 'vitest';
import { IN_CI } from './helpers/ci.js';
import { CLI, ROOT, runCli, stopProcess, tempDir, waitFor } from './helpers/procs.js';

const have = (cmd: string) => spawnSync(cmd, ['--version'], { stdio: 'ignore' }).status === 0;
const missing = ['systemd-analyze', 'systemd-socket-activate', 'python3'].find((c) => !have(c));
if (missing && IN_CI) throw new Error(`the systemd tests need ${missing}`);

const children: ChildProcess[] = [];
afterAll(async () => {
  for (const c of children) await stopProcess(c, 'SIGKILL');
});

/** A datagram socket of our own that prints every message it receives as one JSON string per line. */
function notifySocket(file: string): { child: ChildProcess; messages: string[] } {
  const py = `import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
print(json.dumps("bound"), flush=True)
while True:
    print(json.dumps(s.recv(4096).decode()), flush=True)
`;
  const child = spawn('python3', ['-c', py, file], { stdio: ['ignore', 'pipe', 'inherit'] });
  children.push(child);
  const messages: string[] = [];
  readline.createInterface({ input: child.stdout! }).on('line', (l) => messages.push(JSON.parse(l) as string));
  return { child, messages };
}

describe.skipIf(missing !== undefined)('systemd', () => {
  it('systemd-analyze verify accepts the shipped units', () => {
    // The units name /usr/local/bin/mmbroker (npm install -g); verify checks that it exists, so the copies
    // verified here point at this checkout's CLI instead. Nothing else is changed.
    const dir = tempDir('mmb-units-');
    const bin = path.join(dir, 'mmbroker');
    fs.writeFileSync(bin, `#!/bin/sh\nexec "${process.execPath}" "${CLI}" "$@"\n`, { mode: 0o755 });
    for (const unit of ['memmap-broker.socket', 'memmap-broker.service']) {
      const text = fs.readFileSync(path.join(ROOT, 'contrib/systemd', unit), 'utf8');
      fs.writeFileSync(path.join(dir, unit), text.replaceAll('/usr/local/bin/mmbroker', bin));
    }
    const r = spawnSync('systemd-analyze', ['verify', path.join(dir, 'memmap-broker.socket'), path.join(dir, 'memmap-broker.service')], {
      encoding: 'utf8',
      cwd: dir,
    });
    expect(`${r.stdout}${r.stderr}`.trim()).toBe('');
    expect(r.status).toBe(0);
    const service = fs.readFileSync(path.join(ROOT, 'contrib/systemd/memmap-broker.service'), 'utf8');
    expect(service).toMatch(/^Type=notify$/m);
    expect(service).toMatch(/^RuntimeDirectory=memmap-broker$/m);
    expect(fs.readFileSync(path.join(ROOT, 'contrib/systemd/memmap-broker.socket'), 'utf8')).toMatch(/^ListenStream=\/run\/memmap-broker\/broker\.sock$/m);
  });

  it('socket activation and sd_notify: READY=1, WATCHDOG=1, STOPPING=1; the passed socket outlives the broker', async () => {
    const dir = tempDir('mmb-sd-');
    fs.chmodSync(dir, 0o700);
    const socket = path.join(dir, 'broker.sock');
    const notify = notifySocket(path.join(dir, 'notify.sock'));
    await waitFor('the notify socket', () => notify.messages.includes('bound'));
    const activator = spawn(
      'systemd-socket-activate',
      [
        '--listen',
        socket,
        '--fdname=memmap-broker',
        '-E',
        `NOTIFY_SOCKET=${path.join(dir, 'notify.sock')}`,
        '-E',
        'WATCHDOG_USEC=400000',
        process.execPath,
        CLI,
        'serve',
        '--space',
        'vm0',
        '--published',
        '--log-format',
        'json',
      ],
      { stdio: ['ignore', 'pipe', 'pipe'] },
    );
    children.push(activator);
    const out: string[] = [];
    activator.stdout?.setEncoding('utf8').on('data', (d: string) => out.push(d));
    activator.stderr?.setEncoding('utf8').on('data', (d: string) => out.push(d));
    await waitFor('the socket to be bound', () => out.join('').includes('Listening on'));
    const inode = fs.statSync(socket).ino;
    // The first client starts the broker, which serves the socket it was handed.
    const st = await runCli(['status', '--socket', socket, '--json']);
    expect(st.code, st.stderr + out.join('')).toBe(0);
    expect((JSON.parse(st.stdout) as { spaces: { name: string }[] }).spaces.map((s) => s.name)).toEqual(['vm0']);
    const logs = out.join('');
    expect(logs).toMatch(/"msg":"memmap-broker \S+ starting"/);
    expect(logs).toContain(`"socket":"${socket}"`);
    await waitFor('READY=1', () => notify.messages.find((m) => m.startsWith('READY=1')));
    const ready = notify.messages.find((m) => m.startsWith('READY=1')) as string;
    expect(ready).toContain(`MAINPID=${activator.pid}`); // socket-activate execs the broker in its place
    await waitFor('two watchdog pings', () => notify.messages.filter((m) => m === 'WATCHDOG=1').length >= 2);
    expect(notify.messages.indexOf(ready)).toBeLessThan(notify.messages.lastIndexOf('WATCHDOG=1'));
    expect(await stopProcess(activator, 'SIGTERM')).toBe(0);
    expect(notify.messages.some((m) => m.startsWith('STOPPING=1'))).toBe(true);
    // The broker did not remove the socket it did not create.
    expect(fs.statSync(socket).ino).toBe(inode);
  });

  it('passed descriptors that are missing or not sockets are refused with a typed error, not a stack trace', () => {
    const { LISTEN_PID: _pid, ...inherited } = process.env;
    const env = { ...inherited, LISTEN_FDS: '1' };
    const none = spawnSync(process.execPath, [CLI, 'serve', '--space', 'vm0'], { encoding: 'utf8', env, timeout: 20_000 });
    expect(none.status).toBe(2);
    // Descriptor 3 is not ours to take: closed, or one Node itself opened (never a socket).
    expect(none.stderr).toMatch(/MMB_ERR_INVALID_ARG .*descriptor 3 (is not open|passed by the service manager is not a socket)/);
    const file = fs.openSync(path.join(tempDir('mmb-sd-bad-'), 'plain-file'), 'w');
    const notSocket = spawnSync(process.execPath, [CLI, 'serve', '--space', 'vm0'], {
      encoding: 'utf8',
      env,
      timeout: 20_000,
      stdio: ['ignore', 'pipe', 'pipe', file],
    });
    fs.closeSync(file);
    expect(notSocket.status).toBe(2);
    expect(notSocket.stderr).toMatch(/MMB_ERR_INVALID_ARG .*descriptor 3 passed by the service manager is not a socket/);
    for (const r of [none, notSocket]) expect(r.stderr).not.toMatch(/\n\s+at /);
  });
});
