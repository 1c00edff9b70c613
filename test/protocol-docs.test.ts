// docs/protocol.md documents every message of the table in protocol/messages.ts, with its id, and every
// feature bit.
import fs from 'node:fs';
import { describe, expect, it } from 'vitest';
import { Feature, MESSAGES } from '../protocol/index.js';

const doc = fs.readFileSync(new URL('../docs/protocol.md', import.meta.url), 'utf8');

describe('docs/protocol.md', () => {
  for (const spec of MESSAGES.values()) {
    it(`documents ${spec.name} with id ${spec.id}`, () => {
      const section = doc.split(/^### /m).find((s) => s.startsWith(`${spec.name}\n`));
      expect(section, `a "### ${spec.name}" section`).toBeDefined();
      expect(section).toMatch(new RegExp(`^- id: ${spec.id},`, 'm'));
      const fds = spec.fds.kind === 'none' ? 'fds: 0' : spec.fds.kind === 'one' ? 'fds: 1' : 'fds: one per entry';
      expect(section).toContain(fds);
    });
  }
  it('documents every feature bit', () => {
    for (const [name, bit] of Object.entries(Feature)) {
      expect(doc).toMatch(new RegExp(`\\| ${Math.log2(bit)} \\(0x${bit.toString(16)}\\) \\| \`${name}\``));
    }
  });
});
