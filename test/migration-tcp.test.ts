// Migration to another host: `mmbroker migrate --to tcp://HOST:PORT` (or migrateTo()) streams to
// `mmbroker receive` (or receive()), which publishes the copy into a space of its own broker, where
// subscribers attach as usual. A real broker on each side (`mmbroker serve`, the destination's spaces
// unpublished as it starts them), real processes, loopback TCP (and a network namespace standing in for
// another host where `ip netns` works). A broken connection must leave the source running and the
// destination unpublished; a wrong token is turned away.
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { MappingSubscriber, OwnerClient } from '../clients/index.js';
import { Receiver, migrateTo, readTokenFile, stream, type ReceiveEvent } from '../clients/migration/index.js';
import { authMac } from '../clients/migration/token.js';
import { constants, native } from '../native/index.js';
import { isMmbError, type StatusResult } from '../protocol/index.js';
import { IN_CI } from './helpers/ci.js';
import { CLI, JsonProc, runCli, spawnBroker, stopProcess, tempDir, waitFor } from './helpers/procs.js';

const MiB = 1 << 20;
const PAGE = 4096;
const { RecordType, RecordReader, encodeControl, encodeData } = stream;
let dir: string;
let srcSock: string;
let dstSock: string;
let src: Awaited<ReturnType<typeof spawnBroker>>;
let dst: Awaited<ReturnType<typeof spawnBroker>>;
let tokenFile: string;
let token: string;
let n = 0;
const cleanups: (() => unknown)[] = [];

beforeAll(async () => {
  dir = tempDir();
  srcSock = path.join(dir, 'src.sock');
  dstSock = path.join(dir, 'dst.sock');
  const spaces = (p: string) => Array.from({ length: 10 }, (_, i) => ['--space', `${p}${i + 1}`]).flat();
  src = await spawnBroker(srcSock, [...spaces('s'), '--ack-timeout', '20000']);
  // As `mmbroker serve` starts them by default: unpublished until their owner publishes.
  dst = await spawnBroker(dstSock, [...spaces('d'), ...spaces('p').slice(0, 2)], { published: false });
  tokenFile = path.join(dir, 'token');
  fs.writeFileSync(tokenFile, 'a-migration-token-0123456789\n', { mode: 0o600 });
  token = readTokenFile(tokenFile);
});
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});
afterAll(async () => {
  if (src) expect(await stopProcess(src)).toBe(0);
  if (dst) expect(await stopProcess(dst)).toBe(0);
});

type Space = StatusResult['spaces'][number];
async function status(sock: string, space: string): Promise<Space> {
  const o = await import('../clients/owner.js');
  return (await o.fetchStatus(sock, space)).spaces[0] as Space;
}
const mapOf = (st: Space) => st.regions.map((r) => ({ name: r.name, gpa: r.gpa, size: r.size, readonly: r.readonly })).sort((a, b) => a.gpa - b.gpa);

/** Fills [0, filled) of a memfd with a pattern. */
function fill(fd: number, filled: number, seed: number): void {
  const m = native.mmap(fd, 0, filled, constants.PROT_READ | constants.PROT_WRITE, constants.MAP_SHARED);
  const w = new Uint32Array(m.buffer);
  for (let i = 0; i < w.length; i += 512) w[i] = (seed * 40503 + i) >>> 0;
  native.munmap(m);
}

function writer(sock: string, space: string, extra: string[] = []): Promise<JsonProc> {
  const child = spawn(process.execPath, [new URL('./fixtures/migration-writer.mjs', import.meta.url).pathname, '--socket', sock, '--space', space, ...extra], {
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  const p = new JsonProc(child);
  cleanups.push(() => p.stop());
  return p.next('ready').then(() => p);
}

/** `mmbroker receive` as a process, printing JSON lines; resolves once it listens. */
async function receiver(args: string[], wrap: string[] = []): Promise<{ proc: JsonProc; port: number; host: string }> {
  const argv = [...wrap, process.execPath, CLI, 'receive', '--socket', dstSock, '--token-file', tokenFile, '--json', ...args];
  const child = spawn(argv[0] as string, argv.slice(1), { stdio: ['ignore', 'pipe', 'pipe'] });
  const proc = new JsonProc(child);
  cleanups.push(() => proc.stop());
  const l = await proc.next('listening');
  return { proc, port: l.port as number, host: l.host as string };
}

const exited = (p: JsonProc) =>
  p.child.exitCode !== null ? Promise.resolve(p.child.exitCode) : new Promise<number | null>((r) => p.child.once('exit', (code) => r(code)));

/** A subscriber of an unpublished destination space: attaching resolves only once the space is published. */
function early(space: string) {
  let sub: MappingSubscriber | undefined;
  const attached = MappingSubscriber.attach(dstSock, { space, name: `early-${space}`, writes: false, reconnect: false }).then((s) => {
    sub = s;
    cleanups.push(() => s.close());
    return s;
  });
  attached.catch(() => undefined);
  return {
    attached,
    get sub() {
      return sub;
    },
  };
}

describe('migration to another host over TCP', () => {
  it('mmbroker migrate --to tcp:// into mmbroker receive, a real broker on each side; subscribers attach to the published copy as usual', async () => {
    const s = `s${++n}`;
    const d = `d${n}`;
    for (const [name, gpa, size] of [
      ['ram', '0x100000', '48M'],
      ['high', '0x100000000', '16M'],
    ] as const) {
      const r = await runCli(['map', 'add', '--socket', srcSock, '--space', s, '--gpa', gpa, '--size', size, '--name', name]);
      expect(r.code, r.stderr).toBe(0);
    }
    const w = await writer(srcSock, s, ['--burst', '32']);
    const waiting = early(d);
    const rcv = await receiver(['--listen', '0', '--space', d]);
    expect(rcv.host).toBe('127.0.0.1'); // loopback unless told otherwise
    // The destination is unpublished: a subscriber attaching to it waits (it gets the whole map at the
    // commit; that it stays unpublished while receiving is checked round by round in the next test).
    await waitFor('the early subscriber to wait', async () => (await status(dstSock, d)).clients.find((c) => c.name === `early-${d}`)?.state === 'waiting');
    const m = await runCli(
      ['migrate', '--socket', srcSock, '--space', s, '--to', `tcp://127.0.0.1:${rcv.port}`, '--token-file', tokenFile, '--keep-paused', '--json'],
      90_000,
    );
    expect(m.code, m.stderr).toBe(0);
    const lines = m.stdout
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(lines[0]).toMatchObject({ event: 'start', destination: expect.stringMatching(/receiver at tcp:\/\/127\.0\.0\.1:\d+/) });
    expect(lines.some((l) => l.event === 'sending' && typeof l.bytes === 'number')).toBe(true); // the first write is always reported
    const result = lines.at(-1) as {
      event: string;
      verified: boolean;
      destination: { space: string; generation: number };
      totalBytes: number;
      memoryBytes: number;
      downtimeMs: number;
    };
    expect(result).toMatchObject({ event: 'result', verified: true, destination: { space: d } });
    expect(await exited(rcv.proc)).toBe(0);
    const events = rcv.proc.lines.map((e) => e.event);
    expect(events[0]).toBe('listening');
    expect(events).toContain('authenticated');
    expect(events.at(-1)).toBe('committed');

    // Published: the early subscriber got the whole map at once; a new one attaches as usual.
    const dstSt = await status(dstSock, d);
    expect(dstSt.published).toBe(true);
    const srcSt = await status(srcSock, s);
    expect(srcSt.paused).toBe(true); // --keep-paused: the source stopped for good
    expect(mapOf(dstSt)).toEqual(mapOf(srcSt));
    const a = await waiting.attached;
    const b = await MappingSubscriber.attach(dstSock, { space: d, writes: false, reconnect: false });
    cleanups.push(() => b.close());
    const reader = await MappingSubscriber.attach(srcSock, { space: s, writes: false, reconnect: false });
    cleanups.push(() => reader.close());
    for (const r of srcSt.regions) {
      const want = Buffer.from(reader.memory.read(r.gpa, r.size));
      expect(Buffer.compare(want, Buffer.from(a.memory.read(r.gpa, r.size))), r.name).toBe(0);
      expect(Buffer.compare(want, Buffer.from(b.memory.read(r.gpa, r.size))), r.name).toBe(0);
    }
    expect(((await w.request({ cmd: 'written', since: 0 }, 'written')).pages as number[]).length).toBeGreaterThan(0);
    const o = await OwnerClient.attach(srcSock, { space: s });
    await o.resume();
    o.close();
  }, 120_000);

  it('migrateTo() / receive() in a VMM: hotplug, unplug and a read-only toggle during pre-copy reach the destination over TCP', async () => {
    const s = `s${++n}`;
    const d = `d${n}`;
    const o = await OwnerClient.attach(srcSock, { space: s });
    cleanups.push(() => o.close());
    const ram = await o.createBacking(32 * MiB, 'ram');
    const gone = await o.createBacking(8 * MiB, 'gone');
    cleanups.push(() => native.close(ram.fd));
    cleanups.push(() => native.close(gone.fd));
    fill(ram.fd, 16 * MiB, 1);
    fill(gone.fd, 8 * MiB, 2);
    await o.commit([
      { op: 'add', name: 'ram', gpa: 0, size: 32 * MiB, backing: ram.backing, offset: 0 },
      { op: 'add', name: 'gone', gpa: 0x1_0000_0000, size: 8 * MiB, backing: gone.backing, offset: 0 },
    ]);
    const w = await writer(srcSock, s, ['--burst', '24']);
    const reader = await MappingSubscriber.attach(srcSock, { space: s, writes: false, reconnect: false });
    cleanups.push(() => reader.close());
    const events: ReceiveEvent[] = [];
    const waiting = early(d);
    const r = await Receiver.listen({ listen: { host: '127.0.0.1', port: 0 }, space: d, broker: dstSock, token, onEvent: (e) => events.push(e) });
    // Round by round, the destination is not published and its subscriber waits with nothing mapped.
    const whileReceiving: string[] = [];
    cleanups.push(() => r.close());
    let hot: { fd: number } | undefined;
    let inFlight: Promise<unknown> = Promise.resolve();
    const result = await migrateTo(`tcp://127.0.0.1:${r.address.port}`, {
      owner: o,
      reader,
      token,
      dataCrc: true,
      keepPaused: true,
      stopBytes: 0,
      maxRounds: 6,
      onProgress: async (p) => {
        const ds = await status(dstSock, d);
        whileReceiving.push(`${ds.published}:${ds.clients.find((c) => c.name === `early-${d}`)?.state}:${waiting.sub === undefined}`);
        if (p.phase === 'final') return;
        await inFlight;
        if (p.round === 0) {
          await w.request({ cmd: 'mark' }, 'marked');
          inFlight = (async () => {
            const b = await o.createBacking(8 * MiB, 'hot');
            hot = b;
            cleanups.push(() => native.close(b.fd));
            fill(b.fd, 4 * MiB, 3);
            await o.addRegion({ name: 'hot', gpa: 0x2_0000_0000, size: 8 * MiB, backing: b.backing });
          })();
        }
        if (p.round === 1) inFlight = Promise.all([o.removeRegion('gone'), o.commit([{ op: 'set', region: 'ram', readonly: true }])]);
      },
    });
    try {
      const rcv = await r.result;
      expect(result.verified).toBe(true);
      expect(whileReceiving).toEqual(result.rounds.map(() => 'false:waiting:true'));
      // Published: the waiting subscriber got the final map in one snapshot.
      expect(
        (await waiting.attached)
          .regions()
          .map((x) => x.name)
          .sort(),
      ).toEqual(['hot', 'ram']);
      expect(result.destination).toEqual({ space: d, generation: rcv.generation });
      expect(rcv.regions.map((x) => `${x.name}${x.readonly ? ':ro' : ''}`).sort()).toEqual(['hot', 'ram:ro']);
      // Each round's map reached the receiver: the hotplug and the unplug in pre-copy rounds.
      const maps = events.filter((e): e is Extract<ReceiveEvent, { event: 'map' }> => e.event === 'map');
      expect(maps.length).toBe(result.rounds.length);
      expect(maps.some((e) => e.phase === 'dirty' && e.added === 1)).toBe(true);
      expect(maps.some((e) => e.phase === 'dirty' && e.removed === 1 && e.changed === 1)).toBe(true);
      const copy = await MappingSubscriber.attach(dstSock, { space: d, writes: false, reconnect: false });
      cleanups.push(() => copy.close());
      const late = (await w.request({ cmd: 'written', since: 1 }, 'written')).pages as number[];
      expect(late.some((p) => p * PAGE >= 0x2_0000_0000)).toBe(true);
      for (const [gpa, size] of [
        [0, 32 * MiB],
        [0x2_0000_0000, 8 * MiB],
      ] as const) {
        expect(Buffer.compare(Buffer.from(reader.memory.read(gpa, size)), Buffer.from(copy.memory.read(gpa, size)))).toBe(0);
      }
      expect(hot).toBeDefined();
    } finally {
      await o.resume();
    }
  }, 120_000);

  it('the receiver killed mid-migration: the sender fails (MMB_ERR_DISCONNECTED), the source runs on with its writers resumed, the destination stays unpublished', async () => {
    const s = `s${++n}`;
    const d = `d${n}`;
    const o = await OwnerClient.attach(srcSock, { space: s });
    cleanups.push(() => o.close());
    const ram = await o.createBacking(32 * MiB, 'ram');
    cleanups.push(() => native.close(ram.fd));
    fill(ram.fd, 32 * MiB, 5);
    await o.addRegion({ name: 'ram', gpa: 0, size: 32 * MiB, backing: ram.backing });
    const w = await writer(srcSock, s, ['--burst', '24']);
    const reader = await MappingSubscriber.attach(srcSock, { space: s, writes: false, reconnect: false });
    cleanups.push(() => reader.close());
    const waiting = early(d);
    const rcv = await receiver(['--listen', '0', '--space', d]);
    const err = await migrateTo(`tcp://127.0.0.1:${rcv.port}`, {
      owner: o,
      reader,
      token,
      stopBytes: 0,
      maxRounds: 30,
      onProgress: async (p) => {
        // After the first copy: the receiving host goes away.
        if (p.round === 0) await rcv.proc.stop('SIGKILL');
      },
    }).catch((e: unknown) => e);
    expect(isMmbError(err, 'MMB_ERR_DISCONNECTED'), String(err)).toBe(true);
    // The source: not paused, logging back off, the writer writing.
    const st = await status(srcSock, s);
    expect(st.paused).toBe(false);
    expect(st.regions.every((r) => !r.logDirty)).toBe(true);
    const before = (await w.request({ cmd: 'written', since: 0 }, 'written')).ticks as number;
    await waitFor('the writer to write on', async () => ((await w.request({ cmd: 'written', since: 0 }, 'written')).ticks as number) > before);
    // The destination: unpublished (what the receiver built before it died stays unpublished), and the
    // subscriber that attached to it still waits with nothing mapped.
    const ds = await status(dstSock, d);
    expect(ds.published).toBe(false);
    expect(ds.clients.find((c) => c.name === `early-${d}`)?.state).toBe('waiting');
    expect(waiting.sub).toBeUndefined();
  }, 120_000);

  it('the sender gone in the middle of a record: the receiver removes everything and exits 1, the space stays unpublished and empty; a wrong token is turned away first and listening goes on', async () => {
    const d = `d${++n}`;
    const waiting = early(d);
    const rcv = await receiver(['--listen', '0', '--space', d]);
    /** A raw sender: reads records, sends what it is told. */
    const connect = async () => {
      const sock = net.connect({ host: '127.0.0.1', port: rcv.port });
      const got: { type: number; body: Record<string, unknown> }[] = [];
      const reader = new RecordReader({
        control: (type, body) => void got.push({ type, body: body as Record<string, unknown> }),
        dataStart: () => undefined,
        data: () => undefined,
        dataEnd: () => undefined,
      });
      sock.on('data', (c: Buffer) => reader.push(c));
      const closed = new Promise<void>((res) => sock.on('close', () => res()));
      sock.on('error', () => undefined);
      const next = (type: number) => waitFor(`record ${type}`, () => got.find((g) => g.type === type));
      return { sock, next, closed };
    };
    // A sender with the wrong token: ERROR (MMB_ERR_PERMISSION) and closed; the receiver goes on.
    const bad = await connect();
    const hello1 = await bad.next(RecordType.HELLO);
    bad.sock.write(
      encodeControl(RecordType.AUTH, {
        version: 1,
        mac: authMac('not-the-token-at-all', Buffer.from(hello1.body.nonce as string, 'hex')).toString('hex'),
        source: { space: 'x', epoch: 'e' },
        dataCrc: false,
        memoryBytes: 0,
      }),
    );
    expect((await bad.next(RecordType.ERROR)).body).toMatchObject({ code: 'MMB_ERR_PERMISSION' });
    await bad.closed;
    expect((await rcv.proc.next('refused')).code).toBe('MMB_ERR_PERMISSION');

    // The right token; a map; one whole DATA record, then half of one, and the connection drops.
    const good = await connect();
    const hello = await good.next(RecordType.HELLO);
    good.sock.write(
      encodeControl(RecordType.AUTH, {
        version: 1,
        mac: authMac(token, Buffer.from(hello.body.nonce as string, 'hex')).toString('hex'),
        source: { space: 'x', epoch: 'e' },
        dataCrc: false,
        memoryBytes: 16 * MiB,
      }),
    );
    await good.next(RecordType.READY);
    good.sock.write(
      encodeControl(RecordType.MAP, { round: 0, phase: 'full', generation: 1, regions: [{ id: 1, name: 'ram', gpa: 0, size: 16 * MiB, readonly: false }] }),
    );
    // Written through to the kernel before the drop (destroy() discards what Node still queues).
    const sent = (b: Buffer) => new Promise<void>((res) => good.sock.write(b, () => res()));
    await sent(encodeData(0, Buffer.alloc(MiB, 0x5a), false));
    const half = encodeData(MiB, Buffer.alloc(MiB, 0xa5), false);
    await sent(half.subarray(0, half.length / 2));
    await rcv.proc.next('map');
    // The receiver built the region (unpublished): the map has it before the drop.
    await waitFor('the region at the destination', async () => (await status(dstSock, d)).regions.length === 1);
    good.sock.destroy();
    expect(await exited(rcv.proc)).toBe(1);
    const aborted = await rcv.proc.next('aborted');
    expect(aborted.code).toBe('MMB_ERR_DISCONNECTED');
    expect(aborted.message).toMatch(/middle of a record/);
    const st = await status(dstSock, d);
    expect(st.published).toBe(false);
    expect(st.regions).toEqual([]);
    expect(st.backings).toEqual([]);
    expect(waiting.sub).toBeUndefined();
  }, 60_000);

  it('receive refuses a published space and a token file others can read; migrate refuses a token file others can read', async () => {
    const loose = path.join(dir, 'loose-token');
    fs.writeFileSync(loose, 'a-migration-token-0123456789\n', { mode: 0o644 });
    fs.chmodSync(loose, 0o644);
    // Usage mistakes exit 2 (the CLI's convention), with the typed error on stderr.
    const r1 = await runCli(['receive', '--listen', '0', '--space', 'd9', '--socket', dstSock, '--token-file', loose]);
    expect(r1.code).toBe(2);
    expect(r1.stderr).toMatch(/MMB_ERR_INVALID_ARG .*mode is 644.*chmod 600/);
    const r2 = await runCli(['migrate', '--socket', srcSock, '--space', 's9', '--to', 'tcp://127.0.0.1:1', '--token-file', loose]);
    expect(r2.code).toBe(2);
    expect(r2.stderr).toMatch(/mode is 644/);
    // A published destination (someone published p1): subscribers would apply the map as it arrives.
    const o = await OwnerClient.attach(dstSock, { space: 'p1' });
    await o.publish();
    o.close();
    const r3 = await runCli(['receive', '--listen', '0', '--space', 'p1', '--socket', dstSock, '--token-file', tokenFile]);
    expect(r3.code).toBe(2);
    expect(r3.stderr).toMatch(/"p1" is published/);
    // No token file at all for tcp.
    const r4 = await runCli(['migrate', '--socket', srcSock, '--space', 's9', '--to', 'tcp://127.0.0.1:1']);
    expect(r4.stderr).toMatch(/needs --token-file/);
  });

  it('on a terminal, progress is a line rewritten in place (script(1) gives the command a pty)', async () => {
    const s = `s${++n}`;
    const add = await runCli(['map', 'add', '--socket', srcSock, '--space', s, '--gpa', '0', '--size', '64M', '--name', 'ram']);
    expect(add.code, add.stderr).toBe(0);
    const image = path.join(dir, `${s}.img`);
    const cmd = [process.execPath, CLI, 'migrate', '--socket', srcSock, '--space', s, '--to', image].map((a) => `'${a}'`).join(' ');
    const r = spawnSync('script', ['-q', '-e', '-c', cmd, '/dev/null'], { encoding: 'utf8', timeout: 60_000 });
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/^migrating "s\d+" to sparse image/);
    expect(r.stdout).toMatch(/round {2}0 full/);
    expect(r.stdout).toMatch(/done: 64 MiB of guest memory/);
    expect(r.stdout).not.toMatch(/^\{/m); // no JSON on a terminal
  }, 60_000);

  const netns = process.getuid?.() === 0 && spawnSync('ip', ['netns', 'list'], { stdio: 'ignore' }).status === 0;
  it.skipIf(!netns && !IN_CI)(
    'another host: a receiver in its own network namespace behind a veth pair, reached at its address; one listening on its loopback is out of reach',
    async () => {
      const tag = `${process.pid % 100000}`;
      const ns = `mmbmig${tag}`;
      const [host, peer] = [`mmbh${tag}`, `mmbp${tag}`];
      const net3 = 1 + (process.pid % 250);
      const [hostIp, nsIp] = [`10.213.${net3}.1`, `10.213.${net3}.2`];
      const ip = (...a: string[]) => execFileSync('ip', a, { stdio: 'pipe' });
      ip('netns', 'add', ns);
      cleanups.push(() => spawnSync('ip', ['netns', 'del', ns]));
      ip('link', 'add', host, 'type', 'veth', 'peer', 'name', peer);
      cleanups.push(() => spawnSync('ip', ['link', 'del', host]));
      ip('link', 'set', peer, 'netns', ns);
      ip('addr', 'add', `${hostIp}/30`, 'dev', host);
      ip('link', 'set', host, 'up');
      ip('netns', 'exec', ns, 'ip', 'addr', 'add', `${nsIp}/30`, 'dev', peer);
      ip('netns', 'exec', ns, 'ip', 'link', 'set', peer, 'up');
      ip('netns', 'exec', ns, 'ip', 'link', 'set', 'lo', 'up');

      const s = `s${++n}`;
      const d = `d${n}`;
      const add = await runCli(['map', 'add', '--socket', srcSock, '--space', s, '--gpa', '0x100000', '--size', '32M', '--name', 'ram']);
      expect(add.code, add.stderr).toBe(0);
      await writer(srcSock, s);
      // Loopback inside the namespace: nothing outside it can connect.
      const local = await receiver(['--listen', '0', '--space', d], ['ip', 'netns', 'exec', ns]);
      const refused = await new Promise<string>((res) => {
        const c = net.connect({ host: nsIp, port: local.port });
        c.on('connect', () => {
          c.destroy();
          res('connected');
        });
        c.on('error', (e: NodeJS.ErrnoException) => res(e.code ?? 'error'));
      });
      expect(refused).toBe('ECONNREFUSED');
      await local.proc.stop('SIGTERM');
      // Listening on the namespace's own address: the migration crosses the veth pair.
      const far = await receiver(['--listen', `${nsIp}:0`, '--space', d], ['ip', 'netns', 'exec', ns]);
      expect(far.host).toBe(nsIp);
      const m = await runCli(['migrate', '--socket', srcSock, '--space', s, '--to', `tcp://${nsIp}:${far.port}`, '--token-file', tokenFile, '--json'], 90_000);
      expect(m.code, m.stderr).toBe(0);
      expect(await exited(far.proc)).toBe(0);
      expect((await far.proc.next('authenticated')).peer).toMatch(new RegExp(`^${hostIp.replace(/\./g, '\\.')}:`));
      const st = await status(dstSock, d);
      expect(st.published).toBe(true);
      expect(mapOf(st)).toEqual([{ name: 'ram', gpa: 0x100000, size: 32 * MiB, readonly: false }]);
    },
    120_000,
  );
});

describe('the stream format', () => {
  const sink = () => {
    const seen: string[] = [];
    const bytes: number[] = [];
    return {
      seen,
      bytes,
      s: {
        control: (type: number, body: unknown) => void seen.push(`${type}:${JSON.stringify(body)}`),
        dataStart: (gpa: number, length: number) => void seen.push(`data ${gpa} ${length}`),
        data: (_gpa: number, b: Uint8Array) => void bytes.push(...b.subarray(0, 2)),
        dataEnd: () => void seen.push('end'),
      },
    };
  };

  it('records parse the same whatever the chunking, and DATA bodies arrive as pieces', () => {
    const all = Buffer.concat([
      encodeControl(RecordType.MAP, { round: 0, phase: 'full', generation: 1, regions: [] }),
      encodeData(0x1000, Buffer.alloc(8192, 7), true),
      encodeControl(RecordType.SYNC, { seq: 1 }),
    ]);
    for (const size of [1, 3, 16, 23, 24, 25, 4096, all.length]) {
      const { seen, s } = sink();
      const r = new RecordReader(s);
      r.limit = 1 << 20;
      for (let at = 0; at < all.length; at += size) expect(r.push(all.subarray(at, at + size))).toBe(Math.min(size, all.length - at));
      expect(seen).toEqual([`4:{"round":0,"phase":"full","generation":1,"regions":[]}`, 'data 4096 8192', 'end', '6:{"seq":1}']);
      expect(r.records).toBe(3);
      expect(r.midRecord).toBe(false);
    }
  });

  it('refuses a flipped bit (CRC), unknown types, reserved bits, misaligned DATA, and large records before AUTH', () => {
    const bad = (buf: Buffer, limit = 1 << 20) => {
      const r = new RecordReader(sink().s);
      r.limit = limit;
      try {
        r.push(buf);
      } catch (e) {
        return (e as { code?: string }).code;
      }
      return 'accepted';
    };
    const rec = encodeControl(RecordType.SYNC, { seq: 1 });
    const flipped = Buffer.from(rec);
    flipped[rec.length - 2] = (flipped[rec.length - 2] as number) ^ 1;
    expect(bad(flipped)).toBe('MMB_ERR_BAD_FRAME');
    const data = encodeData(0x1000, Buffer.alloc(4096, 1), true);
    const d2 = Buffer.from(data);
    d2[d2.length - 1] = 0;
    expect(bad(d2)).toBe('MMB_ERR_BAD_FRAME'); // DATA_CRC covers the bytes
    const noCrc = Buffer.from(encodeData(0x1000, Buffer.alloc(4096, 1), false));
    noCrc[noCrc.length - 1] = 0;
    expect(bad(noCrc)).toBe('accepted'); // without it, only the header and the GPA
    const unknown = Buffer.from(rec);
    unknown.writeUInt16LE(99, 4);
    expect(bad(unknown)).toBe('MMB_ERR_BAD_FRAME');
    const reserved = Buffer.from(rec);
    reserved.writeUInt32LE(1, 12);
    expect(bad(reserved)).toBe('MMB_ERR_BAD_FRAME');
    expect(bad(encodeData(0x1001, Buffer.alloc(4096), false))).toBe('MMB_ERR_BAD_FRAME');
    expect(bad(encodeControl(RecordType.MAP, { regions: Array.from({ length: 1000 }, (_, i) => ({ i })) }), stream.MAX_UNAUTHENTICATED_BYTES)).toBe(
      'MMB_ERR_BAD_FRAME',
    );
    expect(() =>
      stream.checkMap({
        round: 0,
        phase: 'full',
        generation: 0,
        regions: [
          { id: 1, name: 'a', gpa: 0, size: 8192, readonly: false },
          { id: 2, name: 'b', gpa: 4096, size: 4096, readonly: false },
        ],
      }),
    ).toThrow(/overlap/);
  });
});
