// docs/protocol.md documents every message of the table in protocol/messages.ts, with its id, its fds,
// every field of its request (and of its reply, for requests), and every feature bit.
import fs from 'node:fs';
import { describe, expect, it } from 'vitest';
import { Feature, MESSAGES, type Schema } from '../protocol/index.js';

/** The fields of an object schema (protocol/schema.ts object()): empty for any other. */
const fieldsOf = (s: Schema<unknown>): Record<string, unknown> => ('fields' in s ? (s as { fields: Record<string, unknown> }).fields : {});

const doc = fs.readFileSync(new URL('../docs/protocol.md', import.meta.url), 'utf8');

describe('docs/protocol.md', () => {
  for (const spec of MESSAGES.values()) {
    it(`documents ${spec.name} with id ${spec.id}`, () => {
      const section = doc.split(/^### /m).find((s) => s.startsWith(`${spec.name}\n`));
      expect(section, `a "### ${spec.name}" section`).toBeDefined();
      expect(section).toMatch(new RegExp(`^- id: ${spec.id},`, 'm'));
      const fds = spec.fds.kind === 'none' ? 'fds: 0' : spec.fds.kind === 'one' ? 'fds: 1' : 'fds: one per entry';
      expect(section).toContain(fds);
      // Every top-level field, written as in the section's maps ({name: type, name?: type}) or quoted.
      const named = (f: string) => new RegExp(`[{,\\s]${f}\\??[:,}]|\`${f}[\`.?:]`).test(section as string);
      for (const f of Object.keys(fieldsOf(spec.schema)).filter((k) => k !== 't')) expect(named(f), `${spec.name}.${f}`).toBe(true);
      if (spec.result) for (const f of Object.keys(fieldsOf(spec.result))) expect(named(f), `${spec.name}'s reply: ${f}`).toBe(true);
    });
  }
  it('documents every feature bit', () => {
    for (const [name, bit] of Object.entries(Feature)) {
      expect(doc).toMatch(new RegExp(`\\| ${Math.log2(bit)} \\(0x${bit.toString(16)}\\) \\| \`${name}\``));
    }
  });
});
