// One broker process for a whole test file, each test in spaces of its own: started before the file's
// tests with a 20 s ack deadline, the cleanups of each test run after it, and the broker must exit 0 when
// stopped after the last one. For dirty.test.ts and migration.test.ts, which drive writer processes.
import { spawn } from 'node:child_process';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, expect } from 'vitest';
import { OwnerClient } from '../../clients/index.js';
import { JsonProc, spawnBroker, stopProcess, tempDir, type BrokerProc } from './procs.js';

export class SharedBroker {
  /** The broker's directory (its socket is there; tests put their files there too). */
  dir = '';
  socket = '';
  private proc?: BrokerProc;
  private spaces = 0;
  /** Run after each test, last first. */
  readonly cleanups: (() => unknown)[] = [];

  /**
   * A broker serving spaces PREFIX1 .. PREFIX`count`, for the file that calls this at its top level;
   * `writerFixture` is the file's writer process (test/fixtures/NAME).
   */
  constructor(
    private readonly prefix: string,
    count: number,
    private readonly writerFixture: string,
  ) {
    beforeAll(async () => {
      this.dir = tempDir();
      this.socket = path.join(this.dir, 'broker.sock');
      const spaces = Array.from({ length: count }, (_, i) => ['--space', `${prefix}${i + 1}`]).flat();
      this.proc = await spawnBroker(this.socket, [...spaces, '--ack-timeout', '20000']);
    });
    afterEach(async () => {
      for (const c of this.cleanups.splice(0).reverse()) await c();
    });
    afterAll(async () => {
      if (this.proc) expect(await stopProcess(this.proc)).toBe(0);
    });
  }

  get broker(): BrokerProc {
    if (!this.proc) throw new Error('the shared broker is not started yet');
    return this.proc;
  }

  /** A space no other test of the file used. */
  nextSpace(): string {
    return `${this.prefix}${++this.spaces}`;
  }

  // owner and writer are arrow properties so that tests can take them out of the object.

  /** The owner of `space`, closed after the test. */
  readonly owner = async (space: string): Promise<OwnerClient> => {
    const o = await OwnerClient.attach(this.socket, { space });
    this.cleanups.push(() => o.close());
    return o;
  };

  /** The file's writer process attached to `space` with `extra` arguments, once it is ready; stopped after the test. */
  readonly writer = async (space: string, extra: string[] = []): Promise<JsonProc> => {
    const script = new URL(`../fixtures/${this.writerFixture}`, import.meta.url).pathname;
    const child = spawn(process.execPath, [script, '--socket', this.socket, '--space', space, ...extra], { stdio: ['pipe', 'pipe', 'pipe'] });
    const p = new JsonProc(child);
    this.cleanups.push(() => p.stop());
    await p.next('ready');
    return p;
  };
}
