// `mmbroker serve --metrics`: Prometheus text scraped over loopback while a transaction is in flight (a
// subscriber holds it), and after: transactions by outcome, the commit latency histogram, evictions and
// holders, queue depth, per-client acked generation and lag, pinned bytes (a soft vfio client), dirty-sync
// timings. A non-loopback address is refused unless --metrics-public.
import { spawn } from 'node:child_process';
import http from 'node:http';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { OwnerClient } from '../clients/index.js';
import { CLI, JsonProc, runCli, spawnBroker, stopProcess, tempDir, waitFor } from './helpers/procs.js';
import type { BrokerProc } from '../testkit/broker.js';
import { startClient } from '../testkit/clients.js';

let socket: string;
let broker: BrokerProc;
let url: string;
const procs: JsonProc[] = [];

function scrape(): Promise<{ status: number; type: string; body: string }> {
  return new Promise((resolve, reject) => {
    http
      .get(url, (res) => {
        let body = '';
        res.setEncoding('utf8').on('data', (d: string) => (body += d));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, type: String(res.headers['content-type']), body }));
      })
      .on('error', reject);
  });
}

/** The value of one sample, by metric name and exact label set ("" for none). */
function sample(body: string, name: string, labels: string): number | undefined {
  const line = body.split('\n').find((l) => l.startsWith(`${name}${labels ? `{${labels}}` : ''} `));
  return line === undefined ? undefined : Number(line.split(' ').at(-1));
}

async function attach(kind: string, name: string, extra: string[] = []): Promise<JsonProc> {
  const p = new JsonProc(
    spawn(process.execPath, [CLI, 'attach', kind, '--socket', socket, '--space', 'm', '--name', name, '--json', '--control', ...extra], {
      stdio: ['pipe', 'pipe', 'pipe'],
    }),
  );
  procs.push(p);
  await p.next('attached');
  return p;
}

beforeAll(async () => {
  socket = path.join(tempDir('mmb-metrics-'), 'run', 'b.sock');
  broker = await spawnBroker(socket, ['--space', 'm', '--ack-timeout', '2000', '--metrics', '127.0.0.1:0']);
  await waitFor('the metrics endpoint', () => /"msg":"metrics served"/.test(broker.text()));
  url = /"url":"([^"]+)"/.exec(broker.text())?.[1] as string;
});

afterAll(async () => {
  for (const p of procs) await p.stop('SIGTERM');
  if (broker) expect(await stopProcess(broker)).toBe(0);
});

describe('mmbroker serve --metrics', () => {
  it('is scraped over loopback during and after a transaction', async () => {
    expect(url).toMatch(/^http:\/\/127\.0\.0\.1:\d+\/metrics$/);
    const first = await scrape();
    expect(first.status).toBe(200);
    expect(first.type).toContain('text/plain; version=0.0.4');
    expect(sample(first.body, 'mmb_transactions_total', 'space="m",outcome="committed"')).toBe(0);
    expect(first.body).toMatch(/^mmb_build_info\{version="\d+\.\d+\.\d+[^"]*"\} 1$/m);

    expect((await runCli(['map', 'add', '--socket', socket, '--space', 'm', '--gpa', '0', '--size', '4m', '--name', 'ram'])).code).toBe(0);
    const vfio = await attach('vfio', 'nic0', ['--backend', 'soft']);
    // The testkit's scripted client: fault commands are test tooling, not `mmbroker attach`'s.
    const held = await startClient({ socket, space: 'm', args: ['--name', 'holder'] });
    procs.push(held);
    await held.request({ cmd: 'hold-next' }, 'armed');
    // A hotplug the held subscriber will not ack: in flight until the 2 s deadline evicts it.
    const add = runCli(['map', 'add', '--socket', socket, '--space', 'm', '--gpa', '1G', '--size', '2m', '--name', 'dimm0']);
    await held.next('holding');
    const during = (await scrape()).body;
    expect(sample(during, 'mmb_queue_depth', 'space="m",what="commits"')).toBe(1);
    expect(sample(during, 'mmb_generation', 'space="m"')).toBe(1);
    expect(during).toMatch(/^mmb_client_acked_generation\{space="m",client="\d+",kind="plain",name="holder"\} 1$/m);
    expect(during).toMatch(/^mmb_client_lag_generations\{space="m",client="\d+",kind="vfio",name="nic0"\} 0$/m);
    expect(sample(during, 'mmb_transactions_total', 'space="m",outcome="committed"')).toBe(1);
    const done = await add;
    expect(done.code, done.stderr).toBe(0);

    const after = (await scrape()).body;
    expect(sample(after, 'mmb_transactions_total', 'space="m",outcome="committed"')).toBe(2);
    expect(sample(after, 'mmb_commit_duration_seconds_count', 'space="m",outcome="committed"')).toBe(2);
    // The held one took at least the deadline: it is in no bucket below 1 s.
    expect(sample(after, 'mmb_commit_duration_seconds_bucket', 'le="1",space="m",outcome="committed"')).toBe(1);
    expect(sample(after, 'mmb_evictions_total', 'space="m"')).toBe(1);
    expect(sample(after, 'mmb_holders_total', 'space="m",event="created"')).toBe(1);
    expect(sample(after, 'mmb_queue_depth', 'space="m",what="commits"')).toBe(0);
    expect(sample(after, 'mmb_generation', 'space="m"')).toBe(2);
    expect(sample(after, 'mmb_pinned_bytes', 'space="m",kind="predicted"')).toBe(6 * 2 ** 20);
    await waitFor(
      'the vfio client to report what it pinned',
      async () => sample((await scrape()).body, 'mmb_pinned_bytes', 'space="m",kind="actual"') === 6 * 2 ** 20,
    );
    await waitFor('the evicted holder to be fenced', async () => sample((await scrape()).body, 'mmb_holders_total', 'space="m",event="fenced"') === 1);
    void vfio;

    // A dirty sync, timed.
    const owner = await OwnerClient.attach(socket, { space: 'm', name: 'migrator' });
    await owner.commit([{ op: 'set', region: 'ram', logDirty: true }]);
    const snap = await owner.dirtySync();
    snap.release();
    owner.close();
    const synced = (await scrape()).body;
    expect(sample(synced, 'mmb_dirty_sync_duration_seconds_count', 'space="m"')).toBe(1);
  });

  it('refuses a non-loopback address unless --metrics-public', async () => {
    const r = await runCli(['serve', '--socket', path.join(tempDir(), 's.sock'), '--metrics', '0.0.0.0:9464']);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/--metrics 0\.0\.0\.0:9464: 0\.0\.0\.0 is not a loopback address.*--metrics-public/);
    const taken = /:(\d+)\/metrics/.exec(url)?.[1] as string;
    const busy = await runCli(['serve', '--socket', path.join(tempDir(), 's.sock'), '--metrics', `127.0.0.1:${taken}`]);
    expect(busy.code).toBe(1);
    expect(busy.stderr).toContain('MMB_ERR_ADDRESS_IN_USE');
  });
});
