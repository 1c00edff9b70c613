// Where the compiled programs the testkit starts live. Tests run the testkit from source (vitest) while
// the processes it starts run the compiled tree (dist/, built by `npm run build`); from dist/ itself (the
// harness, a benchmark, an installed package) the same paths point next door.
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));

/** The compiled tree's root: the `dist/` this file is in, or the checkout's `dist/` when run from source. */
export const DIST = path.basename(path.dirname(here)) === 'dist' ? path.dirname(here) : path.resolve(here, '../dist');

/** The checkout (or installed package) root: the parent of DIST. */
export const ROOT = path.dirname(DIST);

/** `mmbroker`, compiled. */
export const CLI = path.join(DIST, 'cli/mmbroker.js');

/** A compiled testkit module, e.g. `preload/stop-at.js`. */
export const testkitFile = (name: string): string => path.join(DIST, 'testkit', name);
