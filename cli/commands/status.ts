import fs from 'node:fs';
import { fetchStatus } from '../../clients/index.js';
import { InvalidArgError } from '../../protocol/index.js';
import { parseCommand, required, type Command } from '../args.js';
import { checkOutputFile } from '../paths.js';
import { draw } from '../picture.js';
import { statusSvg } from '../svg.js';
import { renderIoas } from './ioas.js';

const usage = `Usage: mmbroker status [--socket PATH] [--space NAME] [--json | --svg FILE]

Draws every address space (or one) as a picture of its guest-physical space: a strip over the whole map,
then in address order each region (name, id, backing, read-only and logging flags), each hole and each
range a subscriber reported reserved, with what every subscriber holds of each region (mapped, pinned,
pending: not yet acked, REFUSED: it covers a range that client cannot map); then the totals, the clients
and the holders (clients whose connection ended while they may still reach memory, until fenced).

Options:
  --socket PATH   the broker's socket (default: $MMBROKER_SOCKET, else /run/memmap-broker/broker.sock)
  --space NAME    only this address space
  --json          print the broker's STATUS reply as JSON { "spaces": [ { "name", "generation", ... } ] }
  --svg FILE      also write the picture as an SVG document to FILE (- for standard output)
  -h, --help      show this help`;

export const status: Command = {
  name: 'status',
  summary: 'draw the map of each address space, its clients and holders',
  usage,
  async run(argv) {
    const values = parseCommand(argv, { socket: { type: 'string' }, space: { type: 'string' }, json: { type: 'boolean' }, svg: { type: 'string' } }, usage);
    if (!values) return 0;
    if (values.json && values.svg !== undefined) throw new InvalidArgError('give at most one of --json and --svg');
    const svg = values.svg;
    if (svg !== undefined && svg !== '-') checkOutputFile(svg, '--svg');
    const socket = required(values, 'socket');
    const result = await fetchStatus(socket, values.space);
    if (values.json) {
      console.log(JSON.stringify(result, null, 2));
      return 0;
    }
    if (svg === '-') {
      process.stdout.write(statusSvg(result, { title: `mmbroker status, ${socket}, ${new Date().toISOString()}` }));
      return 0;
    }
    console.log(draw(result));
    // The I/O address spaces of each space (feature IOAS), after its picture: cli/commands/ioas.ts.
    for (const sp of result.spaces) {
      const io = renderIoas(sp);
      if (io.length > 0) console.log(`\nI/O address spaces of ${sp.name}:\n${io.join('\n')}`);
    }
    if (svg !== undefined) {
      fs.writeFileSync(svg, statusSvg(result, { title: `mmbroker status, ${socket}, ${new Date().toISOString()}` }));
      console.log(`\nwrote the picture to ${svg}`);
    }
    return 0;
  },
};
