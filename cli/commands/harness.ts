import { InvalidArgError } from '../../protocol/index.js';
import {
  DEFAULT_OPTIONS,
  FAULTS,
  INVARIANTS,
  formatReport,
  planted,
  jsonReport,
  missedPlanted,
  parseClients,
  runHarness,
  type HarnessOptions,
} from '../../harness/index.js';
import { parseCommand, parseCount, parseSize, type Command } from '../args.js';

const d = DEFAULT_OPTIONS;
const usage = `Usage: mmbroker harness [--seed N] [--steps N] [--clients kvm:1,vhost:2,vfio:2] [--faults RATE]
                        [--hugetlb 2M|1G] [--bridge N] [--ioas] [--json]

Hammers one address space with random hotplug, unplug, moves, flag toggles, vfio device attach / detach,
client join / leave and faults, across real processes (a broker process, client processes, this process
as the owner), and checks after every step, against the kernel's own view (/proc/PID/maps, /proc/PID/fd,
VmLck), that nothing is inconsistent, at the moment each commit is answered (the answer held until /proc
was read) and after every step. The same seed replays the same operations and faults.

Invariants: ${INVARIANTS.join(', ')}.
Faults: ${Object.keys(FAULTS).join(', ')}.

Options:
  --seed N          the generator's seed (default ${d.seed})
  --steps N         steps to run (default ${d.steps})
  --clients LIST    client processes by kind: kvm, vhost, vfio (soft backend), plain, bridge,
                    shadow (default ${Object.entries(d.clients)
                      .map(([k, n]) => `${k}:${n}`)
                      .join(',')})
  --hugetlb SIZE    back the regions of that alignment class (2M: 2 MiB multiples at 2 MiB-aligned
                    GPAs; 1G: 1 GiB regions) with MFD_HUGETLB memfds of that page size; the pages
                    are reserved in the kernel's pool for the run (as root) and given back after it
  --bridge N        N vhost-user bridge clients, each driving its own qemu-storage-daemon, whose
                    /proc/PID/maps is judged like every client's (same as --clients ...,bridge:N)
  --ioas            I/O address spaces: IOAS create / map / unmap / destroy by the owner, vfio clients
                    in shadow mode (shadow:2 unless --clients names them) and their faults
  --faults RATE     probability that a step is a fault, 0 to 1 (default ${d.faultRate})
  --gig-rate RATE   probability that an added region is 1 GiB (default ${d.gigRate})
  --max-map SIZE    most guest memory mapped at once (default ${d.maxMapBytes / 2 ** 30}G)
  --ack-timeout MS  the broker's ack deadline, what a stalled client costs (default ${d.ackTimeoutMs})
  --pipeline N      the broker pipelines up to N transactions (serve --pipeline; default: one at a time)
  --self-test       also run clients broken on purpose (skip-unmap, pin-twice, ignore-eviction,
                    teardown-on-wait; with --ioas keep-pin-after-unmap) and restart the broker every
                    15th step: each must be caught by name by the invariant it breaks; exits 0 only
                    if every one is
  --trace           print every step as it runs (to stderr)
  --json            print the summary as JSON: {steps, faults, checks, violations, ...}
  -h, --help        show this help

Exits 0 when no invariant was violated (with --self-test: when the planted ones were), 1 otherwise.`;

function rate(text: string, what: string): number {
  const v = Number(text);
  if (!/^\d*\.?\d+$/.test(text.trim()) || !(v >= 0 && v <= 1)) throw new InvalidArgError(`${what} ${JSON.stringify(text)} is not a number between 0 and 1`);
  return v;
}

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
        hugetlb: { type: 'string' },
        bridge: { type: 'string' },
        ioas: { type: 'boolean' },
        pipeline: { type: 'string' },
        'self-test': { type: 'boolean' },
        trace: { type: 'boolean' },
        json: { type: 'boolean' },
      },
      usage,
    );
    if (!values) return 0;
    const clients = { ...(values.clients !== undefined ? parseClients(values.clients) : d.clients) };
    if (values.bridge !== undefined) clients.bridge = parseCount(values.bridge, '--bridge');
    if (values.ioas && clients.shadow === undefined) clients.shadow = 2;
    const opts: Partial<HarnessOptions> = {
      ...(values.seed !== undefined ? { seed: parseCount(values.seed, '--seed') } : {}),
      ...(values.steps !== undefined ? { steps: parseCount(values.steps, '--steps') } : {}),
      clients,
      ...(values.hugetlb !== undefined ? { hugetlb: parseSize(values.hugetlb, '--hugetlb') } : {}),
      ...(values.ioas ? { ioas: true } : {}),
      ...(values.faults !== undefined ? { faultRate: rate(values.faults, '--faults') } : {}),
      ...(values['gig-rate'] !== undefined ? { gigRate: rate(values['gig-rate'], '--gig-rate') } : {}),
      ...(values['max-map'] !== undefined ? { maxMapBytes: parseSize(values['max-map'], '--max-map') } : {}),
      ...(values['ack-timeout'] !== undefined ? { ackTimeoutMs: parseCount(values['ack-timeout'], '--ack-timeout') } : {}),
      ...(values.pipeline !== undefined ? { pipeline: parseCount(values.pipeline, '--pipeline') } : {}),
      ...(values['self-test'] ? { selfTest: true } : {}),
      ...(values.trace ? { onStep: (line: string) => console.error(line) } : {}),
    };
    // The options other than seed and steps, as given: a violation's replay command repeats them.
    const replay = argv
      .filter((a, i) => !['--seed', '--steps', '--json', '--trace'].includes(a) && !['--seed', '--steps'].includes(argv[i - 1] ?? ''))
      .join(' ');
    const report = await runHarness(opts, replay);
    console.log(values.json ? JSON.stringify(jsonReport(report), null, 2) : formatReport(report));
    if (report.selfTest) {
      const missed = missedPlanted(report);
      if (!values.json)
        console.log(
          `\nself-test: broken clients ${missed.length === 0 ? 'all caught by name' : `MISSED: ${missed.join(', ')}`} (${planted(report).join(', ')})`,
        );
      return missed.length === 0 ? 0 : 1;
    }
    return report.violations.length === 0 ? 0 : 1;
  },
};
