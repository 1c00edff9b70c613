// Nothing imports upward: every relative import in the repository (TypeScript and the .mjs fixtures,
// whose `dist/...` imports count as imports of the folder compiled there) stays within what the folder's
// README allows. The layers, bottom up: the library (native, protocol, transport, broker, clients),
// testkit, harness, cli; the tools (test, bench, fuzz) on top; vm imports nothing, the examples the package.
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { ROOT } from '../testkit/paths.js';

const LIBRARY = ['native', 'protocol', 'transport', 'broker', 'clients'];
/** The library and its face, the package's index.ts. */
const PACKAGE = [...LIBRARY, '.'];

/** What each top-level folder may import (besides itself). */
const ALLOWED: Record<string, readonly string[]> = {
  native: [],
  protocol: ['native'],
  transport: ['native', 'protocol'],
  broker: ['native', 'protocol', 'transport'],
  // Only the InProcessConnector type from broker/ (clients/README.md).
  clients: ['native', 'protocol', 'transport', 'broker'],
  '.': LIBRARY,
  testkit: PACKAGE,
  harness: [...PACKAGE, 'testkit'],
  cli: [...PACKAGE, 'testkit', 'harness'],
  bench: [...PACKAGE, 'testkit'],
  fuzz: [...PACKAGE, 'testkit', 'cli'],
  test: [...PACKAGE, 'testkit', 'harness', 'cli', 'bench', 'fuzz', 'examples'],
  // The VMM example embeds the package (its public face, index.ts) and runs its demo's management-layer
  // processes with the testkit; the other examples (C, Python) speak the wire and import nothing.
  examples: ['.', 'testkit'],
  vm: [],
};

const topOf = (file: string) => (file.includes('/') ? (file.split('/')[0] as string) : '.');

function imports(): { from: string; to: string; spec: string }[] {
  const files = execFileSync('git', ['ls-files', '*.ts', '*.mjs'], { cwd: ROOT, encoding: 'utf8' }).split('\n').filter(Boolean);
  const out: { from: string; to: string; spec: string }[] = [];
  for (const file of files) {
    const text = fs.readFileSync(path.join(ROOT, file), 'utf8');
    for (const m of text.matchAll(/(?:\bfrom|\bimport)\s*\(?\s*['"](\.{1,2}\/[^'"]+)['"]/g)) {
      let target = path.normalize(path.join(path.dirname(file), m[1] as string));
      if (target.startsWith('dist/')) target = target.slice('dist/'.length);
      out.push({ from: file, to: topOf(target), spec: m[1] as string });
    }
  }
  return out;
}

describe('layers', () => {
  it('every import stays within what its folder may import (nothing imports upward)', () => {
    const all = imports();
    expect(all.length).toBeGreaterThan(500);
    const bad = all.filter((i) => {
      const top = topOf(i.from);
      return i.to !== top && !(ALLOWED[top] ?? []).includes(i.to);
    });
    expect(bad.map((i) => `${i.from} imports ${i.spec} (${i.to}/)`)).toEqual([]);
  });

  it('every folder with a README names each source file directly in it, and every top-level folder has a README', () => {
    const files = execFileSync('git', ['ls-files'], { cwd: ROOT, encoding: 'utf8' }).split('\n').filter(Boolean);
    const readmes = new Set(files.filter((f) => path.basename(f) === 'README.md').map((f) => path.dirname(f)));
    const tops = new Set(files.filter((f) => f.includes('/') && /\.(ts|mjs|c)$/.test(f)).map(topOf));
    expect([...tops].filter((t) => !readmes.has(t))).toEqual([]);
    const unnamed = files.filter((f) => {
      const dir = path.dirname(f);
      if (dir === '.' || !readmes.has(dir) || !/\.(ts|mjs|c|h|sh|py)$/.test(f)) return false;
      return !fs.readFileSync(path.join(ROOT, dir, 'README.md'), 'utf8').includes(path.basename(f));
    });
    expect(unnamed).toEqual([]);
  });

  it("the product never loads the testkit's preloads, and harness/ imports nothing from cli/", () => {
    const all = imports();
    expect(all.filter((i) => /preload\//.test(i.spec)).map((i) => i.from)).toEqual([]);
    expect(all.filter((i) => topOf(i.from) === 'harness' && i.to === 'cli').map((i) => i.from)).toEqual([]);
  });
});
