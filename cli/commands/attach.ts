import { MappingSubscriber, type Subscriber } from '../../clients/index.js';
import { DeviceSubscriber } from '../../clients/device/index.js';
import { KvmSubscriber } from '../../clients/kvm/index.js';
import { VfioSubscriber } from '../../clients/vfio/index.js';
import { VhostUserSubscriber } from '../../clients/vhost-user/index.js';
import pino from 'pino';
import { InvalidArgError, type MmbError } from '../../protocol/index.js';
import { kvmCommands, memoryCommands, vfioCommands, type Commands } from '../../testkit/commands.js';
import { serveCommands } from '../../testkit/control.js';
import { stopRequested } from '../../testkit/signals.js';
import { formatSize, hex, parseCommand, parseCount, parseSize, readToken, required, type Command } from '../args.js';

const KINDS = ['plain', 'vhost', 'vhost-user', 'kvm', 'vfio'] as const;
type Kind = (typeof KINDS)[number];

const usage = `Usage: mmbroker attach [plain|vhost|vhost-user|kvm|vfio] --socket PATH --space NAME [options]

Runs a subscriber of the given kind until SIGTERM or SIGINT, logging each event on stdout. Every kind
acks every change, reconnects and resumes by itself.

Kinds:
  plain   (default) maps every region MAP_SHARED, never pins
  vhost   a device back-end's view: maps every region (read-only ones PROT_READ), never pins, translates
          guest addresses; declares --max-regions slots and can follow a coalesced view (--coalesce)
  vhost-user
          a vhost-user front-end: feeds the map to an unmodified vhost-user back-end listening on
          --backend-socket (qemu-storage-daemon, DPDK net_vhost, virtiofsd) as SET_MEM_TABLE /
          ADD_MEM_REG / REM_MEM_REG, acking each change once the back-end confirmed it; declares the
          back-end's slots (GET_MAX_MEM_SLOTS, or 8) and follows a coalesced view; exits 1 when the
          back-end goes away. With --ioas the back-end's device sits behind a guest IOMMU: the IOAS
          becomes its device IOTLB (VHOST_USER_IOTLB_MSG; the back-end must offer
          VIRTIO_F_ACCESS_PLATFORM, e.g. dpdk-testpmd with iommu-support=1)
  kvm     keeps the map as KVM memslots of a real VM (/dev/kvm), the kernel judging every slot; without
          /dev/kvm (or with --software) the same table in software, reported as backend "software"
  vfio    pins every region and maps it into an IOMMU domain shared by its devices: --backend type1 (VFIO
          container), iommufd, or soft (a software stand-in for machines without an IOMMU: an IOVA table
          plus real mlock pinning); reports reserved IOVA ranges, DMA budget, coherency, pinned bytes

Options:
  --socket PATH       the broker's socket
  --space NAME        the address space to follow
  --name NAME         client name shown by status (default: <kind>-<pid>)
  --token-file PATH   present the space's token from this file (first line), when it has one
  --max-regions N     the most regions (slots) this client accepts; the broker refuses changes beyond it
  --coalesce          follow a coalesced view (adjacent regions of one backing merged into one)
  --software          (kvm) keep the memslot table in software even where /dev/kvm works
  --max-slots N       (kvm) use at most N memslots (default: what KVM offers, KVM_CAP_NR_MEMSLOTS);
                      (vhost-user) give the back-end at most N regions (default: all its slots)
  --backend B         (vfio) soft, type1 or iommufd (default soft)
  --device BDF        (vfio) a device to attach to the shared domain (repeatable; a PCI address for
                      type1 / iommufd, any name for soft; default for soft: one device "dev0")
  --pin-limit SIZE    (vfio) most bytes this client may pin; declared to the broker, which refuses
                      hotplug beyond it before anything changes
  --pin-chunk SIZE    (vfio) bytes per pinning call (default 128M)
  --ioas ID           (vfio) shadow mode: the devices sit behind a guest IOMMU and are attached to this
                      I/O address space of the space (mmbroker ioas create); the client pins and maps
                      only what it maps (IOVA -> guest memory), not all RAM;
                      (vhost-user) the back-end's device (named --name) is attached to this IOAS, which
                      becomes its IOTLB: an unmap returns once the back-end dropped the entry
  --backend-socket PATH
                      (vhost-user) the back-end's vhost-user socket (it listens, we connect)
  --no-coalesce       (vhost-user) follow the map region by region instead of a coalesced view
  --backend-timeout MS
                      (vhost-user) deadline of each back-end request (default 5000)
  --json              log one JSON object per event instead of text
  --control           also read JSON commands on stdin, one per line, answered on stdout:
                      {"cmd":"read","gpa":N,"len":N} {"cmd":"write","gpa":N,"hex":"..."} {"cmd":"regions"}
                      kvm also: {"cmd":"slots"} and {"cmd":"run","codeGpa":N,"writes":[{"gpa":N,"hex":"..."}]}
                      (a vCPU writes the bytes and halts); vfio also: {"cmd":"domain"},
                      {"cmd":"attach-device","device":"..."}, {"cmd":"detach-device","device":"..."};
                      vhost-user also: {"cmd":"table"} (with --ioas: the IOTLB's mappings and counters)
  -h, --help          show this help`;

export const attach: Command = {
  name: 'attach',
  summary: 'run a subscriber of a kind (plain, vhost, kvm, vfio) that follows a space',
  usage,
  async run(argv) {
    const kind: Kind = argv[0] !== undefined && !argv[0].startsWith('-') ? (argv.shift() as Kind) : 'plain';
    if (!KINDS.includes(kind)) throw new InvalidArgError(`unknown kind ${JSON.stringify(kind)} (${KINDS.join(', ')})`);
    const values = parseCommand(
      argv,
      {
        socket: { type: 'string' },
        space: { type: 'string' },
        name: { type: 'string' },
        'token-file': { type: 'string' },
        'max-regions': { type: 'string' },
        coalesce: { type: 'boolean' },
        software: { type: 'boolean' },
        'max-slots': { type: 'string' },
        backend: { type: 'string' },
        device: { type: 'string', multiple: true },
        'pin-limit': { type: 'string' },
        'pin-chunk': { type: 'string' },
        ioas: { type: 'string' },
        'backend-socket': { type: 'string' },
        'no-coalesce': { type: 'boolean' },
        'backend-timeout': { type: 'string' },
        json: { type: 'boolean' },
        control: { type: 'boolean' },
      },
      usage,
    );
    if (!values) return 0;
    if (values.ioas !== undefined && kind !== 'vfio' && kind !== 'vhost-user')
      throw new InvalidArgError('--ioas is an option of the vfio kind and of vhost-user');
    // From here on SIGTERM / SIGINT end the client cleanly, also while it is still attaching.
    const stop = stopRequested();
    const json = values.json ?? false;
    const log = (event: string, text: string, data: Record<string, unknown> = {}) =>
      console.log(json ? JSON.stringify({ time: Date.now(), pid: process.pid, kind, event, ...data }) : `[${kind} ${process.pid}] ${text}`);
    const opts = {
      space: required(values, 'space'),
      name: values.name ?? `${kind}-${process.pid}`,
      ...(values['token-file'] !== undefined ? { token: readToken(values['token-file']) } : {}),
      ...(values['max-regions'] ? { maxRegions: parseCount(values['max-regions'], '--max-regions') } : {}),
      ...(values.coalesce ? { coalesce: true } : {}),
    };
    const socket = required(values, 'socket');
    if (kind === 'kvm') {
      const kvm = await KvmSubscriber.attach(socket, {
        ...opts,
        ...(values.software ? { software: true } : {}),
        ...(values['max-slots'] ? { maxSlots: parseCount(values['max-slots'], '--max-slots') } : {}),
        logger: pino({ level: 'warn' }, pino.destination(2)),
      });
      log(
        'backend',
        `memslots kept by ${kvm.backend === 'kvm' ? 'a real KVM VM' : `software (${kvm.backendReason ?? 'no /dev/kvm'})`}, ${kvm.maxSlots} slots`,
        {
          backend: kvm.backend,
          maxSlots: kvm.maxSlots,
          ...(kvm.backendReason ? { reason: kvm.backendReason } : {}),
        },
      );
      kvm.on('change', () =>
        log(
          'slots',
          `${kvm.slots().length} slot(s): ${kvm
            .slots()
            .map((x) => `${x.slot}@${hex(x.gpa)}`)
            .join(' ')}`,
          { slots: kvm.slots() },
        ),
      );
      await follow(
        kvm,
        kvm.memory.regions.bind(kvm.memory),
        log,
        stop,
        values.control ? { ...memoryCommands(kvm, kvm.memory), ...kvmCommands(kvm) } : undefined,
      );
      return 0;
    }
    if (kind === 'vhost-user') {
      const vu = await VhostUserSubscriber.attach(socket, {
        ...opts,
        backendSocket: required(values, 'backend-socket'),
        ...(values['max-slots'] ? { maxSlots: parseCount(values['max-slots'], '--max-slots') } : {}),
        ...(values['no-coalesce'] ? { coalesce: false } : {}),
        ...(values['backend-timeout'] ? { backendTimeoutMs: parseCount(values['backend-timeout'], '--backend-timeout') } : {}),
        ...(values.ioas !== undefined ? { ioas: values.ioas } : {}),
        // A pure bridge needs no mapping of its own; --control (read/write) does.
        mapMemory: values.control ?? false,
        logger: pino({ level: 'warn' }, pino.destination(2)),
      });
      const n = vu.negotiated;
      log(
        'backend',
        `vhost-user back-end ${vu.frontend.path}: ${n.memMode === 'slots' ? `${vu.maxSlots} slots (ADD_MEM_REG / REM_MEM_REG)` : `SET_MEM_TABLE only, ${vu.maxSlots} regions`}`,
        {
          backend: vu.frontend.path,
          memMode: n.memMode,
          maxSlots: vu.maxSlots,
          features: hex(n.features),
          protocolFeatures: hex(n.protocolFeatures),
          ...(vu.iotlb ? { ioas: vu.iotlb.ioas } : {}),
        },
      );
      const iotlb = () => (vu.iotlb ? { iotlb: { ioas: vu.iotlb.ioas, mappings: vu.iotlb.established(), stats: vu.iotlb.stats } } : {});
      vu.on('ioas', () => log('iotlb', `IOTLB of IOAS ${vu.iotlb?.ioas}: ${vu.iotlb?.established().length} mapping(s)`, iotlb()));
      vu.on('change', () =>
        log(
          'table',
          `back-end table: ${
            vu
              .backendTable()
              .map((e) => `${e.name}@${hex(e.gpa)}+${formatSize(e.size)}`)
              .join(' ') || '(empty)'
          }`,
          {
            table: vu.backendTable().map(({ name, gpa, size, mmapOffset }) => ({ name, gpa, size, mmapOffset })),
          },
        ),
      );
      let backendGone = false;
      const gone = new Promise<void>((resolve) =>
        vu.frontend.once('close', () => {
          backendGone = true;
          resolve();
        }),
      );
      const mapped = () => (values.control ? vu.memory.regions() : []);
      const table = () => ({
        event: 'table',
        memMode: vu.memMode,
        maxSlots: vu.maxSlots,
        table: vu.backendTable().map(({ name, gpa, size, mmapOffset }) => ({ name, gpa, size, mmapOffset })),
        ...iotlb(),
      });
      await follow(vu, mapped, log, Promise.race([stop, gone]), values.control ? { ...memoryCommands(vu, vu.memory), table } : undefined);
      if (!backendGone) return 0;
      // The device is gone: stop reading control commands too, so that the process ends.
      process.stdin.destroy();
      return 1;
    }
    if (kind === 'vfio') {
      const backend = values.backend ?? 'soft';
      if (backend !== 'soft' && backend !== 'type1' && backend !== 'iommufd') throw new InvalidArgError(`--backend ${backend}: soft, type1 or iommufd`);
      let lastProgress = 0;
      let relayed = 0;
      const attached: { sub?: VfioSubscriber } = {};
      const vfio = await VfioSubscriber.attach(socket, {
        ...opts,
        backend,
        devices: values.device ?? (backend === 'soft' ? ['dev0'] : []),
        ...(values['pin-limit'] ? { pinLimit: parseSize(values['pin-limit'], '--pin-limit') } : {}),
        ...(values['pin-chunk'] ? { pinChunkBytes: parseSize(values['pin-chunk'], '--pin-chunk') } : {}),
        ...(values.ioas !== undefined ? { ioas: values.ioas } : {}),
        onPinProgress: (p) => {
          const now = Date.now();
          // Relayed to the broker too (REPORT.pinned), which passes it on to watchers (`map add` on a TTY
          // shows it), a few times a second at most.
          const sub = attached.sub;
          if (p.done < p.total && now - relayed >= 250 && sub) {
            relayed = now;
            sub.report({ pinned: sub.domain.pinnedBytes + p.done }).catch(() => undefined);
          }
          if (p.done < p.total && now - lastProgress < 200) return;
          lastProgress = now;
          log('pinning', `pinning ${p.region}: ${formatSize(p.done)} of ${formatSize(p.total)}`, { ...p });
        },
      });
      attached.sub = vfio;
      const d = vfio.domain;
      log('backend', `${d.description}; devices ${d.devices.join(', ') || '(none)'}; pinned ${formatSize(d.pinnedBytes)}`, { ...d });
      vfio.on(vfio.shadowing ? 'ioas' : 'change', () => {
        const dd = vfio.domain;
        log(
          'pinned',
          `${dd.backend}: pinned ${formatSize(dd.pinnedBytes)} once for ${dd.devices.length} device(s)${vfio.shadowing ? ` (shadow mode: ${dd.mappings.length} IOVA mapping(s))` : ''}`,
          { backend: dd.backend, pinned: dd.pinnedBytes, devices: dd.devices, ...(vfio.shadowing ? { mappings: dd.mappings.length } : {}) },
        );
      });
      await follow(
        vfio,
        vfio.memory.regions.bind(vfio.memory),
        log,
        stop,
        values.control ? { ...memoryCommands(vfio, vfio.memory), ...vfioCommands(vfio) } : undefined,
      );
      return 0;
    }
    const sub = kind === 'vhost' ? await DeviceSubscriber.attach(socket, opts) : await MappingSubscriber.attach(socket, opts);
    await follow(sub, sub.memory.regions.bind(sub.memory), log, stop, values.control ? memoryCommands(sub, sub.memory) : undefined);
    return 0;
  },
};

type Log = (event: string, text: string, data?: Record<string, unknown>) => void;

/**
 * Logs a subscriber's events until `stop` settles (SIGTERM / SIGINT, the device behind it gone), then
 * closes it. The "attached" line is printed once the initial map is applied and acked; the caller
 * installed its signal handlers before attaching, so a signal at any moment from then on detaches cleanly.
 */
async function follow(
  sub: Subscriber,
  mapped: () => readonly { region: { key: string }; address: number }[],
  log: Log,
  stop: Promise<unknown>,
  /** Under --control: the commands it answers on stdin. */
  commands?: Commands,
): Promise<void> {
  if (commands) serveCommands(commands);
  const addressOf = (key: string) => mapped().find((m) => m.region.key === key)?.address;
  sub.on('change', ({ change }) => {
    for (const r of change.removed)
      log('unmapped', `unmapped ${JSON.stringify(r.name)} gpa ${hex(r.gpa)} size ${formatSize(r.size)}`, { region: r.name, gpa: r.gpa, size: r.size });
    for (const r of change.added) {
      const address = addressOf(r.key);
      log(
        'mapped',
        `mapped ${JSON.stringify(r.name)} gpa ${hex(r.gpa)} size ${formatSize(r.size)}${address !== undefined ? ` at ${hex(address)}` : ''}${r.readonly ? ' read-only' : ''}`,
        {
          region: r.name,
          gpa: r.gpa,
          size: r.size,
          address,
          readonly: r.readonly,
        },
      );
    }
    for (const { after } of change.updated) log('updated', `updated ${JSON.stringify(after.name)} (logDirty ${after.logDirty})`, { region: after.name });
  });
  sub.on('committed', (g) => log('committed', `generation ${g} committed`, { generation: g }));
  sub.on('rolledBack', (g) => log('rolledBack', `generation ${g} rolled back`, { generation: g }));
  sub.on('disconnected', (reason?: MmbError) =>
    log('disconnected', `disconnected${reason ? `: ${reason.code} ${reason.message}` : ''}`, reason ? { code: reason.code } : {}),
  );
  sub.on('reconnected', (r) => log('reconnected', `reconnected as client ${r.client}, ${r.sync} at generation ${r.generation}`, { ...r }));
  sub.on('error', (e) => log('error', `${e.code}: ${e.message}`, { code: e.code, message: e.message }));
  log('attached', `attached to ${JSON.stringify(sub.space)} as client ${sub.id} at generation ${sub.generation}, ${sub.regions().length} region(s)`, {
    client: sub.id,
    generation: sub.generation,
    regions: sub.regions().map((r) => ({ name: r.name, gpa: r.gpa, size: r.size, address: addressOf(r.key), readonly: r.readonly })),
  });
  await stop;
  await sub.close();
  log('detached', 'detached');
  // Under --control, stdin would keep the process alive after it detached.
  if (commands) process.stdin.destroy();
}
