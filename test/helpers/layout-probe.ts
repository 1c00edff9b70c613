// The layout probe: every struct table in the one layout format (clients/abi/layout.ts) is checked against a
// C definition compiled by gcc. A probe program prints sizeof / offsetof / member sizes as JSON through
// test/fixtures/layout-probe.h; it is either a fixture written by hand (test/fixtures/vfio-offsets.c, which
// also prints constants and request numbers) or generated here from the table itself (KVM against the kernel
// headers, vhost-user against the spec's structs in test/fixtures/vhost-user-structs.h). The comparison is the
// same for all of them.
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'vitest';
import type { Layout } from '../../clients/abi/layout.js';
import { ROOT } from './procs.js';

const FIXTURES = path.join(ROOT, 'test/fixtures');

export interface ProbeStruct {
  size: number;
  fields: Record<string, [number, number]>;
}

export interface Probe {
  structs: Record<string, ProbeStruct>;
  constants: Record<string, number>;
  requests: Record<string, number>;
}

/** Compiles a probe program (C source text) with gcc, -Werror, test/fixtures on the include path, and runs it. */
export function runProbe(source: string): Probe {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'mmb-layout-probe-'));
  try {
    const src = path.join(dir, 'probe.c');
    const exe = path.join(dir, 'probe');
    fs.writeFileSync(src, source);
    execFileSync('gcc', ['-std=gnu11', '-Wall', '-Wextra', '-Werror', '-I', FIXTURES, '-o', exe, src]);
    const out = JSON.parse(execFileSync(exe, { encoding: 'utf8' })) as Partial<Probe>;
    return { structs: out.structs ?? {}, constants: out.constants ?? {}, requests: out.requests ?? {} };
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

/** The probe of a fixture in test/fixtures (read here, so a checkout gcc cannot read as itself still works). */
export function runFixtureProbe(file: string): Probe {
  return runProbe(fs.readFileSync(path.join(FIXTURES, file), 'utf8'));
}

/**
 * A probe program for every member of every struct of `table`: `struct NAME` from `includes`, each member at
 * its C path (Field.c, else its name). Constants are printed as numbers.
 */
export function probeSource(includes: readonly string[], table: Readonly<Record<string, Layout>>, constants: readonly string[] = []): string {
  const lines = [...includes.map((h) => `#include ${h}`), '#include "layout-probe.h"', 'int main(void) {', '  probe_open("structs");'];
  for (const [name, layout] of Object.entries(table)) {
    lines.push(`  S(${name});`);
    for (const [field, at] of Object.entries(layout.fields)) lines.push(`  FM(${name}, "${field}", ${at.c ?? field});`);
    lines.push('  E();');
  }
  lines.push('  probe_next("constants");', ...constants.map((c) => `  C(${c});`), '  probe_close();', '  return 0;', '}', '');
  return lines.join('\n');
}

/**
 * `layout` against the C definition `ref`: every member at C's offset and size, the struct's size one the
 * table allows (size or otherSizes), and, when C lists more members than the table (a hand-written probe of
 * a whole header struct), every member before the end of what we pack is in the table.
 */
export function expectLayout(name: string, layout: Layout, ref: ProbeStruct | undefined): void {
  expect(ref, `${name}: the probe has no such struct`).toBeDefined();
  if (!ref) return;
  for (const [field, at] of Object.entries(layout.fields)) {
    expect([at.offset, at.size], `${name}.${field}`).toEqual(ref.fields[field]);
  }
  for (const [field, [offset, size]] of Object.entries(ref.fields)) {
    if (offset + size <= layout.size && size > 0) expect(layout.fields, `${name}.${field} is in the header`).toHaveProperty(field);
  }
  const sizes = [layout.size, ...(layout.otherSizes ?? [])];
  expect(sizes, `${name}: sizeof ${ref.size}`).toContain(ref.size);
}
