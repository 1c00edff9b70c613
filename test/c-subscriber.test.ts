// The C subscriber (examples/c-subscriber, plain C with Debian's msgpack-c) against a real broker: it maps
// guest memory from the fds it received and reads / writes it, follows hotplug and unplug (checked in its
// /proc/PID/maps, not in its messages), refuses a region and is rolled back, and decodes / encodes the wire
// fixtures exactly like the TypeScript side. Needs gcc and libmsgpack-dev; under CI a missing library fails.
import { spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { Broker } from '../broker/index.js';
import { OwnerClient, type CreatedBacking } from '../clients/index.js';
import { constants, native, type Mapping } from '../native/index.js';
import { FrameDecoder, MESSAGES, encodeFrame, isMmbError, parseToBroker, parseToClient, type Frame } from '../protocol/index.js';
import { SAMPLES } from './fixtures/samples.js';
import { IN_CI } from './helpers/ci.js';
import { LineProc, buildCExample, missingCToolchain } from './helpers/examples.js';
import { fdTargets, holdsMemfd, memfdMappings } from '../testkit/procfs.js';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const DIR = path.join(ROOT, 'examples/c-subscriber');
const BIN = path.join(DIR, 'c-subscriber');
const FIXTURES = JSON.parse(fs.readFileSync(new URL('./fixtures/frames.json', import.meta.url), 'utf8')) as Record<string, string>;
const LIMITS = { maxFrameBytes: 1 << 20, maxFdsPerFrame: 64, maxPendingFds: 256 };
const MiB = 1 << 20;

const missing = missingCToolchain();
const skip = missing !== undefined && !IN_CI;
if (skip) console.warn(`c-subscriber tests skipped: ${missing}; run apt-get install libmsgpack-dev`);

// --- helpers -----------------------------------------------------------------------------------------------

/** A running c-subscriber. */
class CProc extends LineProc {
  constructor(args: string[]) {
    super(BIN, args);
  }
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function until<T>(what: string, fn: () => T | undefined | false, timeoutMs = 5000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = fn();
    if (v !== undefined && v !== false) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(5);
  }
}

/** The ranges of `pid`'s address space that map the memfd called `name` (as /proc/PID/maps shows it). */
const memfdRanges = (pid: number, name: string): { start: number; size: number; perms: string }[] =>
  memfdMappings(pid)
    .filter((m) => m.memfd === name)
    .map((m) => ({ start: m.start, size: m.end - m.start, perms: m.perms }));

/** This process's open fds, by number, with what they point at. */
const openFds = (): Map<string, string> => fdTargets('self');

/** Waits until this process holds exactly the fds of `baseline` again (the broker closes a peer's socket
 *  once it notices the EOF). */
async function expectFdsBack(baseline: Map<string, string>): Promise<void> {
  const describe = (m: Map<string, string>) =>
    [...m]
      .map(([k, v]) => `${k}->${v}`)
      .sort()
      .join(', ');
  const want = describe(baseline);
  try {
    await until('fds back to baseline', () => describe(openFds()) === want, 5000);
  } catch {
    expect(describe(openFds())).toBe(want);
  }
}

const hex = (b: Uint8Array) => Buffer.from(b).toString('hex');

/** What the TypeScript side makes of a frame (as a client): the validated message, or the error code. */
function tsDecode(bytes: Buffer, nfds: number): { nfds: number; message: unknown } | { error: string } {
  const d = new FrameDecoder(LIMITS);
  try {
    d.push(
      bytes,
      Array.from({ length: nfds }, (_, i) => 1000 + i),
    ); // carried, never touched
    const frame = d.next();
    if (!frame) return { error: 'incomplete' };
    return { nfds: frame.fds.length, message: parseToClient(frame, 0xffff_ffff) };
  } catch (err) {
    if (isMmbError(err)) return { error: err.code };
    throw err;
  }
}

/** What the C subscriber makes of the same frame: --decode-hex sends it through a socketpair, with as many
 *  descriptors as its header declares, into its real receive path. */
function cDecode(bytes: Buffer): { nfds: number; message: unknown } | { error: string } {
  const r = spawnSync(BIN, ['--decode-hex', bytes.toString('hex')], { encoding: 'utf8' });
  const out = JSON.parse(r.stdout.trim().split('\n').pop() ?? 'null') as { nfds: number; message: unknown } | { error: { code: string } };
  if ('error' in out) {
    expect(r.status, r.stderr).toBe(2);
    return { error: out.error.code };
  }
  expect(r.status, r.stderr).toBe(0);
  return out;
}

/** A frame around raw msgpack body bytes. */
function rawFrame(bodyHex: string, nfds = 0, flags = 0): Buffer {
  const body = Buffer.from(bodyHex, 'hex');
  const h = Buffer.alloc(8);
  h.writeUInt32LE(body.length, 0);
  h.writeUInt16LE(nfds, 4);
  h.writeUInt16LE(flags, 6);
  return Buffer.concat([h, body]);
}
const frameOf = (message: object, nfds = 0) => Buffer.from(encodeFrame(message, nfds, 1 << 20));
const str = (s: string) => Buffer.concat([Buffer.from([0xa0 | s.length]), Buffer.from(s)]).toString('hex');

// --- the tests -----------------------------------------------------------------------------------------------

describe.skipIf(skip)(`C subscriber${skip ? ` (skipped: ${missing}; apt-get install libmsgpack-dev)` : ''}`, () => {
  beforeAll(() => buildCExample(DIR));
  // libuv keeps a few descriptors open for child processes after the first spawn: make them exist before
  // any fd baseline is taken.
  beforeAll(() => new Promise<void>((resolve) => spawn('true').once('close', () => resolve())));

  describe('against a real broker', () => {
    let dir: string;
    let socketPath: string;
    let broker: Broker;
    let owner: OwnerClient;
    let ram: CreatedBacking;
    let ramMap: Mapping;
    let procs: CProc[];
    let extra: { fd: number; map: Mapping }[];
    let baseline: Map<string, string>;
    const PATTERN = randomBytes(64);

    const start = (args: string[]) => {
      const p = new CProc(['--socket', socketPath, '--space', 'vm0', ...args]);
      procs.push(p);
      return p;
    };
    const clientOf = (p: CProc) => broker.status('vm0').spaces[0]?.clients.find((c) => c.pid === p.pid);
    /** A second backing the owner maps too. */
    const backing = async (size: number, name: string) => {
      const b = await owner.createBacking(size, name);
      const map = native.mmap(b.fd, 0, size, constants.PROT_READ | constants.PROT_WRITE, constants.MAP_SHARED);
      extra.push({ fd: b.fd, map });
      return { ...b, bytes: new Uint8Array(map.buffer) };
    };

    beforeEach(async () => {
      procs = [];
      extra = [];
      dir = fs.mkdtempSync(path.join(os.tmpdir(), 'mmb-c-subscriber-'));
      socketPath = path.join(dir, 'broker.sock');
      broker = new Broker({ spaces: ['vm0'], limits: { ackTimeoutMs: 5000 } });
      broker.listen(socketPath);
      owner = await OwnerClient.attach(broker, { space: 'vm0' });
      ram = await owner.createBacking(16 * MiB, 'ram');
      ramMap = native.mmap(ram.fd, 0, 16 * MiB, constants.PROT_READ | constants.PROT_WRITE, constants.MAP_SHARED);
      new Uint8Array(ramMap.buffer).set(PATTERN, 0x2000);
      await owner.addRegion({ name: 'ram', gpa: 0, size: 16 * MiB, backing: ram.backing });
      baseline = openFds();
    });

    afterEach(async () => {
      for (const p of procs) await p.stop();
      owner.close();
      await broker.close();
      for (const e of extra) {
        native.munmap(e.map);
        native.close(e.fd);
      }
      native.munmap(ramMap);
      native.close(ram.fd);
      fs.rmSync(dir, { recursive: true, force: true });
    });

    it("reads the owner's pattern through its own mapping and writes bytes the owner sees", async () => {
      const WRITE = randomBytes(32);
      const guest = new Uint8Array(ramMap.buffer);
      expect(guest.subarray(0x5000, 0x5000 + 32).every((b) => b === 0)).toBe(true);
      const c = start([
        '--name',
        'c-reader',
        '--expect-gpa',
        '0x2000',
        '--expect-len',
        '64',
        '--expect-hex',
        hex(PATTERN),
        '--write-gpa',
        '0x5000',
        '--write-hex',
        hex(WRITE),
      ]);
      const mapped = await c.waitFor(/^mapped name=ram id=\d+ gpa=0x0 size=0x1000000 backing=\d+ offset=0x0 prot=rw addr=0x([0-9a-f]+)$/);
      await c.waitFor(/^pattern ok gpa=0x2000 len=64$/);
      await c.waitFor(/^wrote gpa=0x5000 len=32$/);
      await c.waitFor(/^synced gen=1 regions=1$/);
      // The owner reads what the C process wrote, through its own mapping of the same memfd.
      expect(hex(guest.subarray(0x5000, 0x5000 + 32))).toBe(hex(WRITE));
      // The kernel's view: one 16 MiB read-write shared mapping of the ram memfd, where it said.
      expect(memfdRanges(c.pid, 'ram')).toEqual([{ start: parseInt(mapped[1] as string, 16), size: 16 * MiB, perms: 'rw-s' }]);
      const client = await until('the C client acked its sync', () => (clientOf(c)?.ackedGeneration === 1 ? clientOf(c) : undefined));
      expect(client).toMatchObject({ role: 'subscriber', kind: 'c-subscriber', name: 'c-reader', transport: 'socket', state: 'ready' });

      // The check can fail: a wrong expectation is reported with the bytes actually there.
      const wrong = Buffer.from(PATTERN);
      wrong[5] = (wrong[5] as number) ^ 0xff;
      const c2 = start(['--expect-gpa', '0x2000', '--expect-len', '64', '--expect-hex', hex(wrong)]);
      const mismatch = await c2.waitFor(/^pattern (ok|MISMATCH got=([0-9a-f]+))/);
      expect(mismatch[2]).toBe(hex(PATTERN));

      expect(await c.stop()).toEqual({ code: 0, signal: null });
      expect(await c2.stop()).toEqual({ code: 0, signal: null });
      expect(c.lines).toContain('signal Terminated');
      await expectFdsBack(baseline);
    });

    it("presents a space's token from --token-file (feature AUTH); a wrong token is refused with MMB_ERR_PERMISSION", async () => {
      broker.createSpace('sealed', { access: { token: 'c-token-0123456789abcdef' } });
      const good = path.join(dir, 'good-token');
      const bad = path.join(dir, 'bad-token');
      fs.writeFileSync(good, 'c-token-0123456789abcdef\n');
      fs.writeFileSync(bad, 'c-token-0123456789abcdeX\n');
      const ok = start(['--space', 'sealed', '--token-file', good]);
      await ok.waitFor(/^hello broker=\S+ version=1 features=0x40 /);
      await ok.waitFor(/^synced gen=0 regions=0$/);
      const refused = start(['--space', 'sealed', '--token-file', bad]);
      await refused.waitFor(/^attach-refused code=MMB_ERR_PERMISSION errno=EPERM /);
      expect((await refused.stop()).code).toBe(1);
      const none = start(['--space', 'sealed']);
      await none.waitFor(/^attach-refused code=MMB_ERR_PERMISSION /);
      expect((await none.stop()).code).toBe(1);
      expect(await ok.stop()).toEqual({ code: 0, signal: null });
      await expectFdsBack(baseline);
    });

    it('maps a hotplugged backing before acking, unmaps it on removal and closes it when it is gone', async () => {
      const GPA = 1 << 30;
      const c = start([
        '--name',
        'c-hotplug',
        '--expect-gpa',
        `${GPA + 0x1000}`,
        '--expect-len',
        '16',
        '--expect-hex',
        '00'.repeat(8) + 'ff'.repeat(8),
        '--write-gpa',
        `${GPA + 0x3000}`,
        '--write-hex',
        'c0ffee',
      ]);
      const once = start(['--name', 'c-once', '--exit-after-gen', '2']);
      await c.waitFor(/^synced gen=1 regions=1$/);
      await once.waitFor(/^synced gen=1 regions=1$/);
      expect(c.has(/^pattern/)).toBe(false); // its GPA is not mapped yet

      const dimm = await backing(2 * MiB, 'dimm0');
      dimm.bytes.fill(0xff, 0x1008, 0x1010);
      expect(memfdRanges(c.pid, 'dimm0')).toEqual([]);
      expect(holdsMemfd(c.pid, 'dimm0')).toBe(false);

      const r = await owner.addRegion({ name: 'dimm0', gpa: GPA, size: 2 * MiB, backing: dimm.backing });
      expect(r.generation).toBe(2);
      // The commit resolved, so the C client acked generation 2, so it has the memory mapped: right now.
      expect(clientOf(c)?.ackedGeneration).toBe(2);
      expect(memfdRanges(c.pid, 'dimm0')).toEqual([expect.objectContaining({ size: 2 * MiB, perms: 'rw-s' })]);
      expect(holdsMemfd(c.pid, 'dimm0')).toBe(true);
      await c.waitFor(/^committed gen=2$/);
      await c.waitFor(/^pattern ok gpa=0x40001000 len=16$/);
      await c.waitFor(/^wrote gpa=0x40003000 len=3$/);
      expect(hex(dimm.bytes.subarray(0x3000, 0x3003))).toBe('c0ffee');

      // --exit-after-gen: the other client leaves by itself once generation 2 is committed.
      expect(await once.closed).toEqual({ code: 0, signal: null });
      expect(once.lines).toContain('committed gen=2');

      const removed = await owner.removeRegion('dimm0');
      expect(removed).toMatchObject({ generation: 3, unreferenced: [dimm.backing] });
      expect(clientOf(c)?.ackedGeneration).toBe(3);
      expect(memfdRanges(c.pid, 'dimm0')).toEqual([]); // unmapped before it acked
      expect(memfdRanges(c.pid, 'ram')).toHaveLength(1);
      await c.waitFor(/^unmapped name=dimm0 id=\d+$/);
      expect(holdsMemfd(c.pid, 'dimm0')).toBe(true); // the owner still holds the backing

      expect(await owner.dropBacking(dimm.backing)).toEqual({ released: true });
      await c.waitFor(new RegExp(`^backing-gone id=${dimm.backing} name=dimm0$`));
      expect(holdsMemfd(c.pid, 'dimm0')).toBe(false);

      expect(await c.stop()).toEqual({ code: 0, signal: null });
      // The broker closed its dimm0 descriptor; the owner's own fd and mapping (in `extra`) remain.
      baseline.set(String(dimm.fd), fs.readlinkSync(`/proc/self/fd/${dimm.fd}`));
      await expectFdsBack(baseline);
    });

    it('refuses a region with a typed error naming it, undoes its partial work, and the others roll back', async () => {
      const a = start(['--name', 'c-applies']);
      const b = start(['--name', 'c-refuses', '--nack-region', 'bad']);
      await a.waitFor(/^synced gen=1/);
      await b.waitFor(/^synced gen=1/);
      const dimm1 = await backing(2 * MiB, 'dimm1');
      const bad = await backing(2 * MiB, 'bad');

      const commit = owner.commit([
        { op: 'add', name: 'dimm1', gpa: 1 << 30, size: 2 * MiB, backing: dimm1.backing, offset: 0 },
        { op: 'add', name: 'bad', gpa: 2 ** 31, size: 2 * MiB, backing: bad.backing, offset: 0 },
      ]);
      await expect(commit).rejects.toMatchObject({
        code: 'MMB_ERR_CLIENT_REFUSED',
        errno: 'EIO',
        generation: 2,
        client: { kind: 'c-subscriber', name: 'c-refuses', pid: b.pid },
      });
      const err = (await commit.catch((e: unknown) => e)) as Error & { cause?: Error & { code?: string } };
      expect(err.cause).toMatchObject({ code: 'MMB_ERR_CLIENT_REFUSED', message: expect.stringContaining('"bad"') });

      // Nothing changed anywhere: the broker's generation and map, and both processes' address spaces.
      const space = broker.status('vm0').spaces[0];
      expect(space?.generation).toBe(1);
      expect(space?.regions.map((r) => r.name)).toEqual(['ram']);
      for (const p of [a, b]) {
        expect(memfdRanges(p.pid, 'bad')).toEqual([]);
        expect(memfdRanges(p.pid, 'dimm1')).toEqual([]);
        expect(memfdRanges(p.pid, 'ram')).toHaveLength(1);
      }
      // (Their stdout may still be in the pipe when the commit rejects: wait for the lines.)
      // The refusing client had mapped dimm1 (the first add) and undid it before it nacked...
      const transcript = (p: CProc, re: RegExp) => until(`${re}`, () => re.test(p.lines.join('\n')));
      await transcript(b, /mapped name=dimm1 [^\n]*\nunmapped name=dimm1 id=\d+\nnacked seq=\d+ code=MMB_ERR_CLIENT_REFUSED errno=EIO /);
      expect(b.has(/^mapped name=bad /)).toBe(false);
      // ...and the client that applied it was told to roll back, and did (it acked before the reply).
      await transcript(a, /mapped name=bad [^\n]*\nacked seq=\d+\nunmapped name=bad id=\d+\nunmapped name=dimm1 id=\d+\nrolledback gen=2\nacked seq=\d+/);

      // Both keep serving: the next transaction reuses generation 2 and both ack it.
      expect((await owner.addRegion({ name: 'dimm1', gpa: 1 << 30, size: 2 * MiB, backing: dimm1.backing })).generation).toBe(2);
      for (const p of [a, b]) {
        expect(clientOf(p)?.ackedGeneration).toBe(2);
        expect(memfdRanges(p.pid, 'dimm1')).toHaveLength(1);
      }
      await b.waitFor(/^committed gen=2$/);
      expect(b.has(/^rolledback/)).toBe(false); // the broker does not roll back the client that refused
      expect(await a.stop()).toEqual({ code: 0, signal: null });
      expect(await b.stop()).toEqual({ code: 0, signal: null });
    });

    it('follows flag changes and a move at the same GPA in one transaction', async () => {
      const c = start(['--name', 'c-flags']);
      await c.waitFor(/^synced gen=1/);
      const rom = await backing(2 * MiB, 'rom');
      const GPA = 1 << 30;
      await owner.addRegion({ name: 'rom', gpa: GPA, size: 2 * MiB, backing: rom.backing, readonly: true });
      expect(memfdRanges(c.pid, 'rom')).toEqual([expect.objectContaining({ perms: 'r--s' })]);
      await owner.commit([{ op: 'set', region: 'rom', readonly: false, logDirty: true }]);
      expect(memfdRanges(c.pid, 'rom')).toEqual([expect.objectContaining({ perms: 'rw-s' })]);
      // Replace rom by a slice of ram's backing at the same GPA: remove and add in one transaction.
      await owner.commit([
        { op: 'remove', region: 'rom' },
        { op: 'add', name: 'alias', gpa: GPA, size: 2 * MiB, backing: ram.backing, offset: 0 },
      ]);
      expect(memfdRanges(c.pid, 'rom')).toEqual([]);
      expect(
        memfdRanges(c.pid, 'ram')
          .map((m) => m.size)
          .sort((x, y) => x - y),
      ).toEqual([2 * MiB, 16 * MiB]);
      await c.waitFor(/^committed gen=4$/);
      expect(await c.stop()).toEqual({ code: 0, signal: null });
    });

    it('leaves cleanly when the broker shuts down', async () => {
      const c = start([]);
      await c.waitFor(/^synced gen=1/);
      await broker.close();
      expect(await c.closed).toEqual({ code: 0, signal: null });
      expect(c.has(/^goodbye code=MMB_ERR_SHUTDOWN errno=ESHUTDOWN /)).toBe(true);
    });
  });

  describe('validates what it receives, in the live receive path', () => {
    it('exits 2 with MMB_ERR_BAD_MESSAGE when a (fake) broker sends an event with an unknown key', async () => {
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'mmb-c-fake-'));
      const sock = path.join(dir, 'fake.sock');
      const received: Frame[] = [];
      const server = net.createServer((s) => {
        const d = new FrameDecoder(LIMITS);
        s.on('data', (chunk) => {
          d.push(chunk);
          for (let f = d.next(); f; f = d.next()) {
            received.push(f);
            const msg = parseToBroker(f, 0);
            if (msg.t === 1)
              s.write(
                frameOf({
                  t: 32,
                  id: msg.id,
                  result: {
                    version: 1,
                    features: 0,
                    broker: 'fake',
                    limits: { maxFrameBytes: 1 << 20, maxFdsPerFrame: 64, maxOpsPerCommit: 4096, maxNameBytes: 64 },
                  },
                }),
              );
            if (msg.t === 3) {
              s.write(frameOf({ t: 32, id: msg.id, result: { client: 1, epoch: 'e1', generation: 0, sync: 'snapshot' } }));
              s.write(frameOf({ t: 35, seq: 1, epoch: 'e1', generation: 0, mode: 'snapshot', part: 0, last: true, regions: [], removed: [], color: 'red' }));
            }
          }
        });
      });
      await new Promise<void>((r) => server.listen(sock, r));
      try {
        const c = new CProc(['--socket', sock, '--space', 'vm0', '--name', 'strict']);
        expect(await c.closed).toEqual({ code: 2, signal: null });
        expect(c.lines).toContain('attached client=1 epoch=e1 generation=0 sync=snapshot');
        expect(c.lines.at(-1)).toBe('protocol-error code=MMB_ERR_BAD_MESSAGE message=EV_SYNC: unknown field "color"');
        // What it sent was HELLO then ATTACH, each valid for the TypeScript broker code.
        expect(received.map((f) => parseToBroker(f, 0))).toEqual([
          { t: 1, id: 1, version: 1, features: 0, name: 'strict' },
          { t: 3, id: 2, space: 'vm0', role: 'subscriber', kind: 'c-subscriber' },
        ]);
      } finally {
        server.close();
        fs.rmSync(dir, { recursive: true, force: true });
      }
    });
  });

  describe('byte-for-byte agreement with the TypeScript codec', () => {
    // The C client negotiates no features: it must handle every broker-to-client message of the base
    // protocol (feature-gated ones can never reach it).
    const toClient = SAMPLES.filter((s) => {
      const spec = MESSAGES.get(s.message.t as number);
      return spec?.direction === 'to-client' && spec.feature === 0 && s.feature === undefined;
    });
    const toBroker = SAMPLES.filter((s) => MESSAGES.get(s.message.t as number)?.direction !== 'to-client');

    it('covers every broker-to-client message of the base protocol', () => {
      const ids = new Set(toClient.map((s) => s.message.t));
      for (const [id, spec] of MESSAGES) if (spec.direction === 'to-client' && spec.feature === 0) expect(ids, spec.name).toContain(id);
    });

    for (const s of toClient) {
      it(`decodes the ${s.name} fixture exactly as parseToClient does`, () => {
        const bytes = Buffer.from(FIXTURES[s.name] as string, 'hex');
        const ts = tsDecode(bytes, s.fds);
        expect(ts).not.toHaveProperty('error');
        expect(cDecode(bytes)).toEqual(ts);
      });
    }

    it('refuses every client-to-broker fixture as a message a client does not accept', () => {
      for (const s of toBroker) {
        const bytes = Buffer.from(FIXTURES[s.name] as string, 'hex');
        expect(tsDecode(bytes, s.fds), s.name).toEqual({ error: 'MMB_ERR_UNKNOWN_MESSAGE' });
        expect(cDecode(bytes), s.name).toEqual({ error: 'MMB_ERR_UNKNOWN_MESSAGE' });
      }
    });

    const gen = str('generation');
    const cases: [string, Buffer, string | 'ok'][] = [
      ['generation as uint8', rawFrame(`82${str('t')}26${gen}cc2b`), 'ok'],
      ['generation as uint16', rawFrame(`82${str('t')}26${gen}cd002b`), 'ok'],
      ['generation as uint32', rawFrame(`82${str('t')}26${gen}ce0000002b`), 'ok'],
      ['generation as uint64', rawFrame(`82${str('t')}26${gen}cf000000000000002b`), 'ok'],
      ['generation as positive int8', rawFrame(`82${str('t')}26${gen}d02b`), 'ok'],
      ['generation 2^53 - 1', rawFrame(`82${str('t')}26${gen}cf001fffffffffffff`), 'ok'],
      ['nil for an optional key', frameOf({ t: 32, id: 9, result: { any: [1, 'x', true, null] }, error: null }), 'ok'],
      ['generation 2^53', rawFrame(`82${str('t')}26${gen}cf0020000000000000`), 'MMB_ERR_BAD_MESSAGE'],
      ['negative generation', rawFrame(`82${str('t')}26${gen}d0ff`), 'MMB_ERR_BAD_MESSAGE'],
      ['unknown key', frameOf({ t: 38, generation: 1, extra: 1 }), 'MMB_ERR_BAD_MESSAGE'],
      ['wrong type', frameOf({ t: 38, generation: '1' }), 'MMB_ERR_BAD_MESSAGE'],
      ['missing key', frameOf({ t: 37, seq: 1 }), 'MMB_ERR_BAD_MESSAGE'],
      ['nil for a required key', frameOf({ t: 38, generation: null }), 'MMB_ERR_BAD_MESSAGE'],
      ['u32 out of range', frameOf({ t: 34, backings: [2 ** 32] }), 'MMB_ERR_BAD_MESSAGE'],
      ['unknown op', frameOf({ t: 36, seq: 1, generation: 2, ops: [{ op: 'move', region: 1 }] }), 'MMB_ERR_BAD_MESSAGE'],
      ['key of another op', frameOf({ t: 36, seq: 1, generation: 2, ops: [{ op: 'remove', region: 1, readonly: true }] }), 'MMB_ERR_BAD_MESSAGE'],
      ['control character in a name', frameOf({ t: 33, backings: [{ backing: 1, size: 4096, name: 'a\nb' }] }, 1), 'MMB_ERR_BAD_MESSAGE'],
      ['empty name', frameOf({ t: 33, backings: [{ backing: 1, size: 4096, name: '' }] }, 1), 'MMB_ERR_BAD_MESSAGE'],
      [
        'bin where a string belongs',
        rawFrame(`82${str('t')}28${str('error')}83${str('code')}c4024142${str('errno')}${str('E')}${str('message')}a0`),
        'MMB_ERR_BAD_MESSAGE',
      ],
      ['unknown message id', frameOf({ t: 63 }), 'MMB_ERR_UNKNOWN_MESSAGE'],
      ['body is an array', rawFrame('9101'), 'MMB_ERR_BAD_FRAME'],
      ['no integer t', frameOf({ t: 'x' }), 'MMB_ERR_BAD_FRAME'],
      ['bytes after the map', rawFrame(`81${str('t')}26c0`), 'MMB_ERR_BAD_FRAME'],
      ['reserved header flags', rawFrame(`82${str('t')}26${gen}01`, 0, 1), 'MMB_ERR_BAD_FRAME'],
      ['fewer fds than backings', frameOf({ t: 33, backings: [{ backing: 1, size: 4096, name: 'ram' }] }, 0), 'MMB_ERR_FD_MISMATCH'],
      ['fds on a message that takes none', frameOf({ t: 38, generation: 1 }, 1), 'MMB_ERR_FD_MISMATCH'],
      ['more fds than the frame limit', frameOf({ t: 38, generation: 1 }, 65), 'MMB_ERR_TOO_MANY_FDS'],
    ];
    for (const [name, bytes, want] of cases) {
      it(`agrees on ${name}: ${want}`, () => {
        const nfds = bytes.readUInt16LE(4);
        const ts = tsDecode(bytes, nfds);
        const c = cDecode(bytes);
        if (want === 'ok') expect(ts).not.toHaveProperty('error');
        else expect(ts).toEqual({ error: want });
        expect(c).toEqual(ts);
      });
    }

    // Stricter than the TypeScript decoder, as docs/protocol.md asks ("no floats", UTF-8 strings, unknown
    // things refused). The TypeScript side accepts all three today: msgpackr decodes an integer-valued
    // float64 as a JS integer that uint() passes, keeps the last of two equal keys, and turns invalid UTF-8
    // into U+FFFD.
    for (const [name, bytes] of [
      ['an integer-valued float64', rawFrame(`82${str('t')}26${gen}cb3ff0000000000000`)],
      ['a duplicate key', rawFrame(`83${str('t')}26${gen}01${gen}02`)],
      ['invalid UTF-8', rawFrame(`82${str('t')}28${str('error')}83${str('code')}a2c328${str('errno')}${str('E')}${str('message')}a0`)],
    ] as const) {
      it(`refuses ${name} (MMB_ERR_BAD_MESSAGE)`, () => {
        expect(cDecode(bytes)).toEqual({ error: 'MMB_ERR_BAD_MESSAGE' });
      });
    }

    it('encodes HELLO, ATTACH, ACK and NACK so the TypeScript FrameDecoder and parseToBroker accept them', () => {
      const expected: Record<string, { fixture?: string; message: object }> = {
        hello: { fixture: 'HELLO', message: { t: 1, id: 1, version: 1, features: 1, name: 'vhost-blk0' } },
        attach: { message: { t: 3, id: 3, space: 'vm0', role: 'subscriber', kind: 'c-subscriber' } },
        ack: { fixture: 'ACK', message: { t: 16, seq: 12 } },
        nack: { fixture: 'NACK', message: { t: 17, seq: 13, error: { code: 'MMB_ERR_MAP_FAILED', errno: 'ENOMEM', message: 'cannot map region "dimm0"' } } },
      };
      for (const [name, { fixture, message }] of Object.entries(expected)) {
        const r = spawnSync(BIN, ['--encode', name], { encoding: 'utf8' });
        expect(r.status, r.stderr).toBe(0);
        const bytes = Buffer.from(r.stdout.trim(), 'hex');
        const d = new FrameDecoder(LIMITS);
        d.push(bytes);
        const frame = d.next() as Frame;
        expect(frame, name).not.toBeNull();
        expect(d.idle).toBe(true);
        expect(parseToBroker(frame, 0xffff_ffff), name).toEqual(message);
        // Same values, same key order, same shortest integer forms: the same bytes as msgpackr's.
        if (fixture) expect(r.stdout.trim(), name).toBe(FIXTURES[fixture]);
      }
    });
  });
});
