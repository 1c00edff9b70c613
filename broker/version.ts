// The software release of this broker (package.json's "version"): printed by `mmbroker --version`, in the
// first log line of `mmbroker serve`, and sent in the HELLO reply to clients that negotiated WATCH.
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

function readVersion(): string {
  // broker/ in a checkout (tests run the sources), dist/broker/ in a build or the installed package.
  const here = path.dirname(fileURLToPath(import.meta.url));
  for (const dir of [path.resolve(here, '..'), path.resolve(here, '../..')]) {
    try {
      const pkg = JSON.parse(fs.readFileSync(path.join(dir, 'package.json'), 'utf8')) as { name?: unknown; version?: unknown };
      if (pkg.name === 'memmap-broker' && typeof pkg.version === 'string') return pkg.version;
    } catch {
      // not there: try the next candidate
    }
  }
  return 'unknown';
}

export const BROKER_VERSION: string = readVersion();
