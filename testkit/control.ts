// The process side of the control protocol (README.md, "The control protocol"): JSON commands on stdin,
// one per line, each answered by one JSON line on stdout. A command is {"cmd": NAME, ...}; its handler
// returns the reply; a failure is answered {"event":"failed","cmd":NAME,"code":...,"message":...}.
// Spoken by the scripted client, the test fixtures and `mmbroker attach --control`.
import readline from 'node:readline';

export type CommandHandler = (c: Record<string, unknown>) => Record<string, unknown> | Promise<Record<string, unknown>>;

/** Prints one line of the protocol: an event or a reply. */
export function out(line: Record<string, unknown>): void {
  process.stdout.write(JSON.stringify(line) + '\n');
}

export function serveCommands(handlers: Record<string, CommandHandler>, opts: { onEnd?: () => void } = {}): void {
  const rl = readline.createInterface({ input: process.stdin });
  // eslint-disable-next-line @typescript-eslint/no-misused-promises -- the handler catches every failure and answers it
  rl.on('line', async (line) => {
    let reply: Record<string, unknown>;
    let cmd: unknown;
    try {
      const c = JSON.parse(line) as Record<string, unknown>;
      cmd = c.cmd;
      const handler = typeof cmd === 'string' && Object.hasOwn(handlers, cmd) ? handlers[cmd] : undefined;
      reply = handler ? await handler(c) : { event: 'failed', cmd, message: `unknown command ${JSON.stringify(cmd)}` };
    } catch (err) {
      reply = { event: 'failed', cmd, code: (err as { code?: string }).code, message: (err as Error).message };
    }
    out(reply);
  });
  if (opts.onEnd) rl.on('close', opts.onEnd);
}
