// docs/errors.md and the error table in protocol/errors.ts must list exactly the same codes, with the
// same errno and class name; the count is pinned so adding a code means touching this test on purpose.
import fs from 'node:fs';
import { describe, expect, it } from 'vitest';
import * as protocol from '../protocol/index.js';
import { ERROR_TABLE, MmbError, className, createError, isMmbError, type ErrorCode } from '../protocol/index.js';

const doc = fs.readFileSync(new URL('../docs/errors.md', import.meta.url), 'utf8');
const rows = [...doc.matchAll(/^\| `(MMB_ERR_[A-Z0-9_]+)` \| ([A-Z0-9]+) \| `([A-Za-z]+)` \|/gm)].map((m) => ({
  code: m[1] as string,
  errno: m[2] as string,
  cls: m[3] as string,
}));

describe('error table and docs/errors.md', () => {
  it('pins the number of error codes', () => {
    expect(Object.keys(ERROR_TABLE)).toHaveLength(67);
  });

  it('documents every code exactly once, and nothing else', () => {
    expect(rows.map((r) => r.code).sort()).toEqual(Object.keys(ERROR_TABLE).sort());
    expect(new Set(rows.map((r) => r.code)).size).toBe(rows.length);
  });

  it('documents the errno and class name of every code', () => {
    for (const r of rows) {
      const code = r.code as ErrorCode;
      expect(r.errno, code).toBe(ERROR_TABLE[code].errno);
      expect(r.cls, code).toBe(className(code));
    }
  });

  it('exports one class per code, which createError and fromWire use', () => {
    for (const code of Object.keys(ERROR_TABLE) as ErrorCode[]) {
      const cls = (protocol as unknown as Record<string, unknown>)[className(code)] as new (m: string) => MmbError;
      expect(typeof cls, className(code)).toBe('function');
      const e = new cls('x');
      expect(e.code).toBe(code);
      expect(e.name).toBe(className(code));
      expect(e).toBeInstanceOf(MmbError);
      expect(isMmbError(e, code)).toBe(true);
      expect(createError(code, 'y')).toBeInstanceOf(cls);
      expect(MmbError.fromWire(e.toWire())).toBeInstanceOf(cls);
    }
  });

  it('carries client, generation and one level of cause across the wire', () => {
    const inner = createError('MMB_ERR_MAP_FAILED', 'mmap failed', { errno: 'ENOMEM' });
    const e = createError('MMB_ERR_MAP_FAILED', 'refused', {
      client: { id: 3, kind: 'vhost', name: 'b', pid: 9 },
      generation: 5,
      cause: inner,
      errno: 'ENOMEM',
    });
    const back = MmbError.fromWire(e.toWire());
    expect(back.client).toEqual({ id: 3, kind: 'vhost', name: 'b', pid: 9 });
    expect(back.generation).toBe(5);
    expect(back.errno).toBe('ENOMEM');
    expect(isMmbError(back.cause, 'MMB_ERR_MAP_FAILED')).toBe(true);
  });

  it('turns unknown codes from a peer into MMB_ERR_INTERNAL keeping the text', () => {
    const e = MmbError.fromWire({ code: 'X_WEIRD', errno: 'EIO', message: 'odd' });
    expect(e.code).toBe('MMB_ERR_INTERNAL');
    expect(e.message).toContain('X_WEIRD');
  });
});
