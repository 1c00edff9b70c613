// Starting scripted clients (testkit/client.ts) and waiting for them to be ready: the `ready` line, which
// the client prints once its initial map is applied and acked and SIGTERM is handled.
import { JsonProc, type SpawnOptions } from './jsonproc.js';
import { testkitFile } from './paths.js';

export const CLIENT_KINDS = ['plain', 'vhost', 'kvm', 'vfio', 'vhost-user'] as const;
export type ClientKind = (typeof CLIENT_KINDS)[number];

/** The scripted client, compiled. */
export const SCRIPTED_CLIENT = testkitFile('client.js');

export interface ClientSpec {
  socket: string;
  space: string;
  kind?: ClientKind;
  /** More options (`--name`, `--nack`, `--device`, ...: README.md, "The scripted client"). */
  args?: readonly string[];
}

/** The scripted client's argv for `spec`. */
export function clientArgs(spec: ClientSpec): string[] {
  return [spec.kind ?? 'plain', '--socket', spec.socket, '--space', spec.space, ...(spec.args ?? [])];
}

/** Starts a scripted client without waiting for it. */
export function spawnClient(spec: ClientSpec, opts: SpawnOptions = {}): JsonProc {
  return JsonProc.spawn(SCRIPTED_CLIENT, clientArgs(spec), opts);
}

/** Starts a scripted client and resolves once it printed `ready`; rejects (with its stderr) if it ends first. */
export async function startClient(spec: ClientSpec, opts: SpawnOptions = {}, timeoutMs = 30_000): Promise<JsonProc> {
  const p = spawnClient(spec, opts);
  await ready(p, timeoutMs);
  return p;
}

/** Waits for a started client's `ready` line. */
export async function ready(p: JsonProc, timeoutMs = 30_000): Promise<void> {
  try {
    await p.next('ready', () => true, timeoutMs);
  } catch (err) {
    p.signal('SIGKILL');
    throw err;
  }
}
