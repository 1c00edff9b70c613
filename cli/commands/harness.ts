import { InvalidArgError } from '../../protocol/index.js';
import { DEFAULT_OPTIONS, formatReport, jsonReport, parseClients, runHarness, type HarnessOptions } from '../../harness/index.js';
import { parseCommand, parseCount, parseSize, type Command } from '../args.js';

const d = DEFAULT_OPTIONS;
const usage = `Usage: mmbroker harness [--seed N] [--steps N] [--clients kvm:1,vhost:2,vfio:2] [--faults RATE] [--json]

Hammers one address space with random hotplug, unplug, moves, flag toggles, vfio device attach / detach,
client join / leave and faults, across real processes (a broker process, client processes, this process
as the owner), and checks after every step, against the kernel's own view (/proc/PID/maps, /proc/PID/fd,
VmLck), that nothing is inconsistent. The same seed replays the same operations and faults.

Invariants: convergence, no-stale-mapping, pins, data, leaks, all-or-nothing, outcome.
Faults: kill-mid-txn, stall, nack, broker-restart, slow-reader, owner-disconnect.

Options:
  --seed N          the generator's seed (default ${d.seed})
  --steps N         steps to run (default ${d.steps})
  --clients LIST    client processes by kind: kvm, vhost, vfio (soft backend), plain
                    (default ${Object.entries(d.clients).map(([k, n]) => `${k}:${n}`).join(',')})
  --faults RATE     probability that a step is a fault, 0 to 1 (default ${d.faultRate})
  --gig-rate RATE   probability that an added region is 1 GiB (default ${d.gigRate})
  --max-map SIZE    most guest memory mapped at once (default ${d.maxMapBytes / 2 ** 30}G)
  --ack-timeout MS  the broker's ack deadline, what a stalled client costs (default ${d.ackTimeoutMs})
  --self-test       also run two clients broken on purpose (one skips its unmap, one pins twice):
                    the run must report their violations; exits 0 only if it does
  --trace           print every step as it runs (to stderr)
  --json            print the summary as JSON: {steps, faults, checks, violations, ...}
  -h, --help        show this help

Exits 0 when no invariant was violated (with --self-test: when the planted ones were), 1 otherwise.`;

function rate(text: string, what: string): number {
  const v = Number(text);
  if (!/^\d*\.?\d+$/.test(text.trim()) || !(v >= 0 && v <= 1)) throw new InvalidArgError(`${what} ${JSON.stringify(text)} is not a number between 0 and 1`);
  return v;
}

/** The planted violations --self-test must find. */
export const SELF_TEST_EXPECTS = ['no-stale-mapping', 'pins'] as const;

export const harness: Command = {
  name: 'harness',
  summary: 'random hotplug, device and fault steps across real processes, checked against /proc',
  usage,
  async run(argv) {
    const values = parseCommand(
      argv,
      {
        seed: { type: 'string' },
        steps: { type: 'string' },
        clients: { type: 'string' },
        faults: { type: 'string' },
        'gig-rate': { type: 'string' },
        'max-map': { type: 'string' },
        'ack-timeout': { type: 'string' },
        'self-test': { type: 'boolean' },
        trace: { type: 'boolean' },
        json: { type: 'boolean' }
      },
      usage,
    );
    if (!values) return 0;
    const opts: Partial<HarnessOptions> = {
      ...(values.seed !== undefined ? { seed: parseCount(values.seed, '--seed') } : {}),
      ...(values.steps !== undefined ? { steps: parseCount(values.steps, '--steps') } : {}),
      ...(values.clients !== undefined ? { clients: parseClients(values.clients) } : {}),
      ...(values.faults !== undefined ? { faultRate: rate(values.faults, '--faults') } : {}),
      ...(values['gig-rate'] !== undefined ? { gigRate: rate(values['gig-rate'], '--gig-rate') } : {}),
      ...(values['max-map'] !== undefined ? { maxMapBytes: parseSize(values['max-map'], '--max-map') } : {}),
      ...(values['ack-timeout'] !== undefined ? { ackTimeoutMs: parseCount(values['ack-timeout'], '--ack-timeout') } : {}),
      ...(values['self-test'] ? { selfTest: true } : {}),
      ...(values.trace ? { onStep: (line: string) => console.error(line) } : {}),
    };
    // The options other than seed and steps, as given: a violation's replay command repeats them.
    const replay = argv.filter((a, i) => !['--seed', '--steps', '--json', '--trace'].includes(a) && !['--seed', '--steps'].includes(argv[i - 1] ?? '')).join(' ');
    const report = await runHarness(opts, replay);
    console.log(values.json ? JSON.stringify(jsonReport(report), null, 2) : formatReport(report));
    if (report.selfTest) {
      const found = SELF_TEST_EXPECTS.filter((name) => report.violations.some((v) => v.invariant === name));
      if (!values.json) console.log(`\nself-test: planted violations ${found.length === SELF_TEST_EXPECTS.length ? 'all reported' : `MISSED: ${SELF_TEST_EXPECTS.filter((n) => !found.includes(n)).join(', ')}`} (${SELF_TEST_EXPECTS.join(', ')})`);
      return found.length === SELF_TEST_EXPECTS.length ? 0 : 1;
    }
    return report.violations.length === 0 ? 0 : 1;
  },
};
