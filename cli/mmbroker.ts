#!/usr/bin/env node
// mmbroker: the command line of memmap-broker.
//
// Conventions: `--help` on every command; `--version`; a usage mistake prints one line and a hint to
// --help and exits 2; any other failure prints one line (code, errno, message naming the path or value)
// and a hint, and exits 1, never a stack trace (MMBROKER_DEBUG=1 shows one for an unexpected error).
// SIGUSR1 is caught so that it never opens Node's inspector (a debugging port in what often runs as root).
import { BROKER_VERSION } from '../broker/version.js';
import { PROTOCOL_VERSION, isMmbError, toMmbError } from '../protocol/index.js';
import type { Command } from './args.js';
import { attach } from './commands/attach.js';
import { demo } from './commands/demo.js';
import { harness } from './commands/harness.js';
import { history } from './commands/history.js';
import { ioas } from './commands/ioas.js';
import { map } from './commands/map.js';
import { migrate } from './commands/migrate.js';
import { publish } from './commands/publish.js';
import { receive } from './commands/receive.js';
import { serve } from './commands/serve.js';
import { status } from './commands/status.js';
import { watch } from './commands/watch.js';
import { hintFor } from './hints.js';

const commands: Command[] = [serve, map, ioas, publish, status, watch, history, attach, migrate, receive, harness, demo];

function help(): string {
  const width = Math.max(...commands.map((c) => c.name.length));
  return `Usage: mmbroker <command> [options]
       mmbroker --version

A guest-memory-map broker: one versioned map per VM, changed by transactions that every subscriber
acknowledges, with memory fds passed over a Unix socket.

Commands:
${commands.map((c) => `  ${c.name.padEnd(width)}  ${c.summary}`).join('\n')}

Every command that talks to a broker takes --socket PATH (default: $MMBROKER_SOCKET, else
/run/memmap-broker/broker.sock). Sizes and addresses take QEMU's syntax (4096, 128m, 1.5G, 2MiB,
0x100000000, 4G). Run \`mmbroker <command> --help\` for a command's options.`;
}

const versionLine = (): string => `mmbroker (memmap-broker) ${BROKER_VERSION}, protocol ${PROTOCOL_VERSION}`;

/** The value of --socket in argv, or the default every command uses, for hints. */
function socketOf(argv: string[]): string | undefined {
  const i = argv.findIndex((a) => a === '--socket' || a.startsWith('--socket='));
  if (i < 0) return process.env.MMBROKER_SOCKET || '/run/memmap-broker/broker.sock';
  const a = argv[i] as string;
  return a.includes('=') ? a.slice(a.indexOf('=') + 1) : argv[i + 1];
}

async function main(argv: string[]): Promise<number> {
  const [name, ...rest] = argv;
  if (name === '--version' || name === '-V' || name === 'version') {
    console.log(versionLine());
    return 0;
  }
  if (name === undefined || name === '--help' || name === '-h' || name === 'help') {
    console.log(help());
    return name === undefined ? 2 : 0;
  }
  const command = commands.find((c) => c.name === name);
  if (!command) {
    console.error(`mmbroker: unknown command ${JSON.stringify(name)}\nTry 'mmbroker --help'.`);
    return 2;
  }
  try {
    return await command.run(rest);
  } catch (err) {
    const e = isMmbError(err) ? err : undefined;
    const label = name === 'map' && (rest[0] === 'add' || rest[0] === 'remove') ? `map ${rest[0]}` : name;
    if (!e) {
      const x = toMmbError(err);
      console.error(`mmbroker ${label}: internal error: ${x.message}`);
      console.error(
        process.env.MMBROKER_DEBUG
          ? String((err as Error).stack)
          : '  hint: this is a bug; please report it with MMBROKER_DEBUG=1 set, which prints where it happened.',
      );
      return 1;
    }
    console.error(`mmbroker ${label}: ${e.code} (${e.errno}): ${e.message}`);
    if (e.client) console.error(`  refused by: ${e.client.kind} client ${JSON.stringify(e.client.name)} (#${e.client.id}, pid ${e.client.pid})`);
    const hint = hintFor(e, label, socketOf(rest));
    if (hint) console.error(e.code === 'MMB_ERR_INVALID_ARG' ? hint : `  hint: ${hint}`);
    return e.code === 'MMB_ERR_INVALID_ARG' ? 2 : 1;
  }
}

// Never an inspector on SIGUSR1 (Node opens one on 127.0.0.1:9229 unless the signal has a listener).
process.on('SIGUSR1', () => undefined);
process.exitCode = await main(process.argv.slice(2));
