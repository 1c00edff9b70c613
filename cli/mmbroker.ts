#!/usr/bin/env node
// mmbroker: the command line of memmap-broker.
import { isMmbError } from '../protocol/index.js';
import type { Command } from './args.js';
import { attach } from './commands/attach.js';
import { demo } from './commands/demo.js';
import { harness } from './commands/harness.js';
import { ioas } from './commands/ioas.js';
import { map } from './commands/map.js';
import { migrate } from './commands/migrate.js';
import { publish } from './commands/publish.js';
import { serve } from './commands/serve.js';
import { status } from './commands/status.js';

const commands: Command[] = [serve, map, ioas, publish, status, attach, migrate, harness, demo];

function help(): string {
  const width = Math.max(...commands.map((c) => c.name.length));
  return `Usage: mmbroker <command> [options]

A guest-memory-map broker: one versioned map per VM, changed by transactions that every subscriber
acknowledges, with memory fds passed over a Unix socket.

Commands:
${commands.map((c) => `  ${c.name.padEnd(width)}  ${c.summary}`).join('\n')}

Run \`mmbroker <command> --help\` for a command's options.`;
}

async function main(argv: string[]): Promise<number> {
  const [name, ...rest] = argv;
  if (name === undefined || name === '--help' || name === '-h' || name === 'help') {
    console.log(help());
    return name === undefined ? 2 : 0;
  }
  const command = commands.find((c) => c.name === name);
  if (!command) {
    console.error(`mmbroker: unknown command ${JSON.stringify(name)}\n\n${help()}`);
    return 2;
  }
  try {
    return await command.run(rest);
  } catch (err) {
    if (isMmbError(err)) {
      console.error(`mmbroker ${name}: ${err.code} (${err.errno}): ${err.message}`);
      if (err.client) console.error(`  refused by: ${err.client.kind} client ${JSON.stringify(err.client.name)} (#${err.client.id}, pid ${err.client.pid})`);
      if (err.code === 'MMB_ERR_INVALID_ARG') console.error(`\n${command.usage}`);
      return 1;
    }
    console.error(`mmbroker ${name}: ${(err as Error).stack ?? String(err)}`);
    return 1;
  }
}

process.exitCode = await main(process.argv.slice(2));
