// docs/operating.md's walkthrough, run as written: each `sh` block in bash (the env block first), the ones
// marked "background" left running until their readiness text shows, with `mmbroker` on the PATH (the
// built CLI) and the metrics port replaced by a free one. Then what each step claims is checked.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { IN_CI } from './helpers/ci.js';
import { CLI, ROOT, tempDir, waitFor } from './helpers/procs.js';

const doc = fs.readFileSync(path.join(ROOT, 'docs/operating.md'), 'utf8');
const haveActivate = spawnSync('systemd-socket-activate', ['--version'], { stdio: 'ignore' }).status === 0;
const haveCurl = spawnSync('curl', ['--version'], { stdio: 'ignore' }).status === 0;
const missing = !haveActivate ? 'systemd-socket-activate (package systemd)' : !haveCurl ? 'curl' : undefined;
if (missing && IN_CI) throw new Error(`docs/operating.md's walkthrough needs ${missing}`);

interface Block {
  kind: 'env' | 'background' | 'run';
  ready?: string;
  script: string;
}

/** The annotated `sh` blocks of the walkthrough, in order. */
function blocks(): Block[] {
  const out: Block[] = [];
  for (const m of doc.matchAll(/<!-- operating:(env|background|run)(?: ready="([^"]+)")? -->\n```sh\n([\s\S]*?)```/g)) {
    out.push({ kind: m[1] as Block['kind'], ...(m[2] ? { ready: m[2] } : {}), script: m[3] as string });
  }
  return out;
}

async function freePort(): Promise<number> {
  const srv = net.createServer();
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  const port = (srv.address() as net.AddressInfo).port;
  await new Promise((r) => srv.close(r));
  return port;
}

const running: { child: ChildProcess; out: string[] }[] = [];

afterAll(async () => {
  // Newest first: the subscriber and the watcher before the broker (SIGINT to the whole group).
  for (const r of running.reverse()) {
    if (r.child.exitCode !== null || r.child.signalCode !== null) continue;
    const exited = new Promise((res) => r.child.once('exit', res));
    process.kill(-(r.child.pid as number), 'SIGINT');
    const timer = setTimeout(() => process.kill(-(r.child.pid as number), 'SIGKILL'), 5000);
    await exited;
    clearTimeout(timer);
  }
});

describe.skipIf(missing !== undefined)('docs/operating.md walkthrough', () => {
  it('runs as written: socket activation, watch, status picture, metrics, history', async () => {
    const dir = tempDir('mmb-operating-');
    const bin = path.join(dir, 'bin');
    fs.mkdirSync(bin);
    fs.writeFileSync(path.join(bin, 'mmbroker'), `#!/bin/sh\nexec "${process.execPath}" "${CLI}" "$@"\n`, { mode: 0o755 });
    const work = path.join(dir, 'work');
    fs.mkdirSync(work);
    const port = String(await freePort());
    const all = blocks();
    expect(all.map((b) => b.kind)).toEqual(['env', 'background', 'background', 'background', 'run', 'run', 'run']);
    const env = all
      .filter((b) => b.kind === 'env')
      .map((b) => b.script)
      .join('\n');
    const { MMBROKER_SOCKET: _ignored, ...inherited } = process.env;
    const shellEnv = { ...inherited, PATH: `${bin}:${process.env.PATH}` };
    const outputs: string[] = [];
    for (const b of all.filter((x) => x.kind !== 'env')) {
      const script = `set -e\n${env}\n${b.script.replaceAll('9464', port)}`;
      if (b.kind === 'background') {
        const child = spawn('bash', ['-c', script], { cwd: work, env: shellEnv, stdio: ['ignore', 'pipe', 'pipe'], detached: true });
        const out: string[] = [];
        child.stdout?.setEncoding('utf8').on('data', (d: string) => out.push(d));
        child.stderr?.setEncoding('utf8').on('data', (d: string) => out.push(d));
        running.push({ child, out });
        await waitFor(
          `"${b.ready}" from: ${b.script.trim()}`,
          () => {
            if (child.exitCode !== null) throw new Error(`${b.script.trim()} exited ${child.exitCode}: ${out.join('')}`);
            return out.join('').includes(b.ready as string);
          },
          20_000,
        );
      } else {
        const r = spawnSync('bash', ['-c', script], { cwd: work, env: shellEnv, encoding: 'utf8', timeout: 30_000 });
        expect(r.status, `${b.script}\n${r.stdout}\n${r.stderr}`).toBe(0);
        outputs.push(r.stdout);
      }
    }
    const [changes, metrics, history] = outputs as [string, string, string];
    // 3: two hotplugs, a refusal, and the picture of the result.
    expect(changes).toMatch(/generation 1: added region "ram"/);
    expect(changes).toMatch(/generation 2: added region "dimm0" .* 128 MiB, read-only/);
    expect(changes).toContain('refused, as it should be');
    expect(changes).toMatch(/\n {2}0x0 +0x4000000 +64 MiB +ram \(#1, backing 1\) +rw +mapped/);
    expect(changes).toMatch(/0x100000000 +0x108000000 +128 MiB +dimm0 .* +ro +mapped/);
    expect(changes).toMatch(/0x4000000 +0x100000000 +4032 MiB +hole/);
    const svg = fs.readFileSync(path.join(work, 'vm0.svg'), 'utf8');
    expect(svg).toContain('<svg');
    expect(svg).toContain('dimm0');
    // 4: the metrics of that moment.
    expect(metrics).toMatch(/^mmb_transactions_total\{space="vm0",outcome="committed"\} 2$/m);
    expect(metrics).toMatch(/^mmb_transactions_total\{space="vm0",outcome="refused"\} 1$/m);
    expect(metrics).toMatch(/^mmb_generation\{space="vm0"\} 2$/m);
    expect(metrics).toMatch(/^mmb_client_lag_generations\{space="vm0",client="\d+",kind="plain",name="backend0"\} 0$/m);
    // 5: the history, oldest first.
    const rows = history.split('\n').filter((l) => /^ {2}\d+ /.test(l));
    expect(rows.map((l) => /(committed|rolled back|refused)/.exec(l)?.[1])).toEqual(['committed', 'committed', 'refused']);
    expect(history).toMatch(/why: MMB_ERR_OVERLAP/);
    // 2: the watcher saw it all as it happened.
    const watched = () => (running[1] as { out: string[] }).out.join('');
    await waitFor('the watcher to print the refusal', () => /vm0 refused +generation 3 refused/.test(watched()));
    const watch = watched();
    expect(watch).toMatch(/vm0 joined +plain client "backend0"/);
    expect(watch).toMatch(/vm0 txn +generation 1 to the vote, from owner client "mmbroker map add" .*: \+ ram 0x0 64 MiB rw/);
    expect(watch).toMatch(/vm0 committed +generation 2 committed in/);
    // 1: the broker was started by socket activation: it served the passed socket, never bound its own.
    const broker = (running[0] as { out: string[] }).out.join('');
    expect(broker).toContain('memmap-broker');
    expect(broker).toMatch(/"msg":"memmap-broker [^"]+ starting"/);
    expect(broker).not.toContain('"msg":"a socket was passed');
  });
});
