#!/usr/bin/env node
// One command to a VMM's control socket, by hand:
//   node dist/examples/vmm/ctl.js DIR/control.sock dimm-add '{"id":"dimm1","size":67108864}'
// Prints the result as JSON; a failure prints {"class", "desc"} on stderr and exits 1.
import { ControlClient } from './control.js';

const [socket, command, args] = process.argv.slice(2);
if (!socket || !command) {
  console.error('Usage: node dist/examples/vmm/ctl.js CONTROL_SOCKET COMMAND [JSON_ARGUMENTS]');
  process.exit(2);
}
const client = await ControlClient.connect(socket);
try {
  console.log(JSON.stringify(await client.call(command, args ? (JSON.parse(args) as Record<string, unknown>) : {}), null, 2));
} catch (err) {
  const e = err as Error & { code?: string; client?: unknown };
  console.error(JSON.stringify({ class: e.code, desc: e.message, ...(e.client ? { client: e.client } : {}) }));
  process.exitCode = 1;
} finally {
  client.close();
}
