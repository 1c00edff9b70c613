// `mmbroker status` draws the map: the terminal picture checked row by row against the broker's own map
// (status --json), and `status --svg` rendered by a real headless Chromium: a DOM without parse error and
// a screenshot that is not blank. Through the real CLI, against `mmbroker serve` with real subscribers.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { OwnerClient } from '../clients/index.js';
import type { StatusResult } from '../protocol/index.js';
import { CHROMIUM, dumpDom, inkOf, readPng, screenshot } from './helpers/browser.js';
import { IN_CI } from './helpers/ci.js';
import { CLI, JsonProc, runCli, spawnBroker, stopProcess, tempDir } from './helpers/procs.js';
import type { BrokerProc } from '../testkit/broker.js';

if (!CHROMIUM && IN_CI) throw new Error("the SVG test needs Debian's chromium (.ci/run installs it)");

const MiB = 2 ** 20;
let dir: string;
let socket: string;
let broker: BrokerProc;
const procs: JsonProc[] = [];

async function attach(kind: string, name: string, extra: string[] = []): Promise<JsonProc> {
  const child = spawn(process.execPath, [CLI, 'attach', kind, '--socket', socket, '--space', 'pic', '--name', name, '--json', ...extra], {
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  const p = new JsonProc(child);
  procs.push(p);
  await p.next('attached');
  return p;
}

beforeAll(async () => {
  dir = tempDir('mmb-picture-');
  socket = path.join(dir, 'run', 'b.sock');
  broker = await spawnBroker(socket, ['--space', 'pic']);
  const add = async (args: string[]) => {
    const r = await runCli(['map', 'add', '--socket', socket, '--space', 'pic', ...args]);
    expect(r.code, r.stderr).toBe(0);
  };
  await add(['--gpa', '0', '--size', '64m', '--name', 'ram']);
  await add(['--gpa', '4G', '--size', '128M', '--name', 'dimm0', '--readonly']);
  await add(['--gpa', '0x108000000', '--size', '2MiB', '--name', 'dimm1']);
  // Logging on dimm1, by an owner of our own (the CLI has no flag for it).
  const owner = await OwnerClient.attach(socket, { space: 'pic', name: 'test-owner' });
  await owner.commit([{ op: 'set', region: 'dimm1', logDirty: true }]);
  owner.close();
  await attach('plain', 'backend0');
  await attach('vfio', 'nic0', ['--backend', 'soft']);
});

afterAll(async () => {
  for (const p of procs) await p.stop('SIGTERM');
  if (broker) expect(await stopProcess(broker)).toBe(0);
});

async function statusJson(): Promise<StatusResult> {
  const r = await runCli(['status', '--socket', socket, '--space', 'pic', '--json']);
  expect(r.code, r.stderr).toBe(0);
  return JSON.parse(r.stdout) as StatusResult;
}

describe('mmbroker status draws the map', () => {
  it('the terminal picture has one row per region, hole and reserved range, matching the map', async () => {
    const st = (await statusJson()).spaces[0]!;
    const r = await runCli(['status', '--socket', socket, '--space', 'pic']);
    expect(r.code, r.stderr).toBe(0);
    const out = r.stdout;
    expect(out).toMatch(new RegExp(`^space pic: generation ${st.generation}, published, epoch ${st.epoch}$`, 'm'));

    // Every region of the map, with its end, size and flags, and what each subscriber holds of it.
    for (const reg of st.regions) {
      const flags = [reg.readonly ? 'ro' : 'rw', reg.logDirty ? 'log' : ''].filter(Boolean).join(',');
      const row = new RegExp(
        `^ {2}0x${reg.gpa.toString(16)} +0x${(reg.gpa + reg.size).toString(16)} +\\S+ \\S+ +${reg.name} \\(#${reg.id}, backing ${reg.backing}\\) +${flags} +mapped +pinned$`,
        'm',
      );
      expect(out, reg.name).toMatch(row);
    }
    // The holes between them, and the MSI window the vfio client reported, cut out of the hole it lies in.
    expect(out).toMatch(/^ {2}0x4000000 +0xfee00000 +\S+ \S+ +hole$/m);
    expect(out).toMatch(/^ {2}0xfee00000 +0xfef00000 +1 MiB +reserved by nic0$/m);
    expect(out).toMatch(/^ {2}0xfef00000 +0x100000000 +17 MiB +hole$/m);
    // Rows in address order, contiguous from 0 to the end of the last region.
    const rows = [...out.matchAll(/^ {2}(0x[0-9a-f]+) +(0x[0-9a-f]+) /gm)].map((m) => [Number(m[1]), Number(m[2])] as const);
    expect(rows[0]?.[0]).toBe(0);
    for (let i = 1; i < rows.length; i++) expect(rows[i]?.[0], `row ${i}`).toBe(rows[i - 1]?.[1]);
    expect(rows.at(-1)?.[1]).toBe(0x108000000 + 2 * MiB);

    // The strip: 64 cells over [0, end): a region's cells drawn as regions, whatever their size.
    const strip = /^ {2}\[(.{64})\]$/m.exec(out)?.[1] as string;
    expect(strip).toBeDefined();
    const cell = (0x108000000 + 2 * MiB) / 64;
    expect(strip[0]).toBe('█'); // ram at 0
    expect(strip[Math.floor(2 ** 32 / cell)]).toBe('▓'); // dimm0, read-only
    expect(strip[63]).toBe('█'); // dimm1, 2 MiB of 4 GiB: still one cell
    expect(strip[Math.floor(0xfee00000 / cell)]).toBe('▒');
    expect(strip[20]).toBe('·');

    // Totals from the map, clients and holders.
    expect(out).toContain(`totals: 3 regions, ${64 + 128 + 2} MiB of guest memory (128 MiB read-only, 2 MiB logging dirty pages)`);
    expect(out).toMatch(/^ {2}#\d+ +subscriber +vfio +nic0 .* soft /m);
    expect(out).toMatch(/pinned in all: predicted 194 MiB, actual 194 MiB/);
    expect(out).toContain('holders: none');
  });

  it.skipIf(!CHROMIUM)('status --svg renders in headless Chromium: no parse error, not blank, every region drawn', async () => {
    const file = path.join(dir, 'pic.svg');
    const r = await runCli(['status', '--socket', socket, '--space', 'pic', '--svg', file]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toContain(`wrote the picture to ${file}`);
    const svg = fs.readFileSync(file, 'utf8');
    const dom = dumpDom(file);
    expect(dom).not.toMatch(/parsererror|This page contains the following errors/);
    // The DOM Chromium built has a group per region, with the region's name.
    const st = (await statusJson()).spaces[0]!;
    for (const reg of st.regions) expect(dom).toMatch(new RegExp(`data-region="${reg.id}"[^]*?${reg.name}`));
    expect(dom).toContain('reserved by nic0');
    const [, w, h] = /<svg[^>]* width="(\d+)" height="(\d+)"/.exec(svg) as unknown as [string, string, string];
    const png = readPng(screenshot(file, Number(w), Number(h)));
    const ink = inkOf(png);
    expect(ink.colours).toBeGreaterThan(8);
    expect(ink.inked).toBeGreaterThan(0.03);
    // A broken file (the XML cut short) is caught by the same check.
    const broken = path.join(dir, 'broken.svg');
    fs.writeFileSync(broken, svg.slice(0, svg.length / 2));
    expect(dumpDom(broken)).toMatch(/parsererror|This page contains the following errors/);
  });
});
