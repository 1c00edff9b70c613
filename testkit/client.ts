// The scripted client: a subscriber of any kind in its own process, driven by the control protocol
// (README.md, "The scripted client"). Tests and the harness run it; it is not the shipped `mmbroker
// attach`, which answers the same inspection commands but no faults.
//
//   node dist/testkit/client.js [plain|vhost|kvm|vfio|vhost-user] --socket PATH --space NAME [options]
import { parseArgs } from 'node:util';
import pino from 'pino';
import { MappingSubscriber, type SubscriberOptions } from '../clients/index.js';
import { KvmSubscriber } from '../clients/kvm/index.js';
import { VfioSubscriber } from '../clients/vfio/index.js';
import { VhostSubscriber } from '../clients/vhost/index.js';
import { BLK_FEATURES, VhostUserSubscriber } from '../clients/vhost-user/index.js';
import { CLIENT_KINDS, type ClientKind } from './clients.js';
import { kvmCommands, vfioCommands } from './commands.js';
import { out } from './control.js';
import { runScripted, type Attached } from './scripted.js';

const argv = process.argv.slice(2);
const kind = (argv[0] !== undefined && !argv[0].startsWith('-') ? argv.shift() : 'plain') as ClientKind;
if (!CLIENT_KINDS.includes(kind)) throw new Error(`unknown kind ${kind} (${CLIENT_KINDS.join(', ')})`);
const { values } = parseArgs({
  args: argv,
  strict: true,
  options: {
    socket: { type: 'string' },
    space: { type: 'string' },
    name: { type: 'string' },
    token: { type: 'string' },
    'max-regions': { type: 'string' },
    coalesce: { type: 'boolean' },
    'no-reconnect': { type: 'boolean' },
    'reconnect-delay': { type: 'string' },
    nack: { type: 'string' },
    'nack-delay': { type: 'string' },
    'ack-delay': { type: 'string' },
    log: { type: 'boolean' },
    software: { type: 'boolean' },
    backend: { type: 'string' },
    device: { type: 'string', multiple: true },
    'pin-limit': { type: 'string' },
    'pin-chunk': { type: 'string' },
    reserved: { type: 'string' },
    ioas: { type: 'string' },
    'backend-socket': { type: 'string' },
  },
});
const num = (v: string | undefined) => (v === undefined ? undefined : Number(v));
const socket = values.socket ?? '';
const base: SubscriberOptions = {
  space: values.space ?? 'default',
  name: values.name ?? `${kind}-${process.pid}`,
  reconnect: !values['no-reconnect'],
  ...(values.token !== undefined ? { token: values.token } : {}),
  ...(values['reconnect-delay'] !== undefined ? { reconnectDelayMs: Number(values['reconnect-delay']) } : {}),
  ...(values['max-regions'] !== undefined ? { maxRegions: Number(values['max-regions']) } : {}),
  ...(values.coalesce ? { coalesce: true } : {}),
};
// --log: the client library's own log lines as `log` events; else its warnings on stderr.
const logger = values.log
  ? {
      info: (obj: object, msg: string) => out({ event: 'log', level: 'info', msg, ...obj }),
      warn: (obj: object, msg: string) => out({ event: 'log', level: 'warn', msg, ...obj }),
    }
  : pino({ level: 'warn' }, pino.destination(2));

async function attach(): Promise<Attached> {
  if (kind === 'kvm') {
    const kvm = await KvmSubscriber.attach(socket, { ...base, ...(values.software ? { software: true } : {}), logger: logger as pino.Logger });
    return { sub: kvm, memory: kvm.memory, commands: kvmCommands(kvm), ready: () => ({ backend: kvm.backend, maxSlots: kvm.maxSlots }) };
  }
  if (kind === 'vfio') {
    const backend = values.backend ?? 'soft';
    if (backend !== 'soft' && backend !== 'type1' && backend !== 'iommufd') throw new Error(`--backend ${backend}: soft, type1 or iommufd`);
    const pinLimit = num(values['pin-limit']);
    const pinChunkBytes = num(values['pin-chunk']);
    const vfio = await VfioSubscriber.attach(socket, {
      ...base,
      backend,
      devices: values.device ?? (backend === 'soft' ? ['dev0'] : []),
      ...(pinLimit !== undefined ? { pinLimit } : {}),
      ...(pinChunkBytes !== undefined ? { pinChunkBytes } : {}),
      // Shadow mode: the devices join this I/O address space, and only what it maps is pinned.
      ...(values.ioas !== undefined ? { ioas: values.ioas } : {}),
      ...(values.reserved !== undefined
        ? {
            reserved: values.reserved
              .split(',')
              .filter(Boolean)
              .map((r) => ({ start: Number(r.split('-')[0]), last: Number(r.split('-')[1]) })),
          }
        : {}),
      onPinProgress: (p) => out({ event: 'pinProgress', ...p }),
      logger,
    });
    return {
      sub: vfio,
      memory: vfio.memory,
      commands: vfioCommands(vfio),
      ready: () => ({ domain: vfio.domain }),
      state: () => ({ pinned: vfio.domain.pinnedBytes }),
    };
  }
  if (kind === 'vhost-user') {
    if (values['backend-socket'] === undefined) throw new Error('vhost-user: --backend-socket PATH (a vhost-user-blk back-end) is needed');
    // The bridge maps guest memory itself too (read, write, hand-on), as `mmbroker attach vhost-user --control` does.
    const vu = await VhostUserSubscriber.attach(socket, {
      ...base,
      backendSocket: values['backend-socket'],
      virtioFeatures: BLK_FEATURES,
      mapMemory: true,
      backendTimeoutMs: 5000,
    });
    return { sub: vu, memory: vu.memory, ready: () => ({ memMode: vu.memMode, maxSlots: vu.maxSlots }) };
  }
  const sub = kind === 'vhost' ? await VhostSubscriber.attach(socket, base) : await MappingSubscriber.attach(socket, base);
  return { sub, memory: sub.memory };
}

await runScripted(
  {
    kind,
    ...(values.nack !== undefined ? { nack: values.nack } : {}),
    ...(values['nack-delay'] !== undefined ? { nackDelayMs: Number(values['nack-delay']) } : {}),
    ...(values['ack-delay'] !== undefined ? { ackDelayMs: Number(values['ack-delay']) } : {}),
  },
  attach,
);
