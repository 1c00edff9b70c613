// A client process of bench/ioas.ts and bench/ioas-vhost-user.ts: follows one I/O address space of a
// broker until its stdin closes. Lean on purpose: nothing on its event loop but the subscriber.
//
//   node dist/bench/ioas-client.js SOCKET SPACE NAME vfio|vhost|vhost-user IOAS [BACKEND_SOCKET]
//     vfio        a VfioSubscriber in shadow mode, soft backend (counted mlock of exactly the mapped pages)
//     vhost       a DeviceSubscriber whose device translates IOVAs through the IOAS (its table)
//     vhost-user  a VhostUserSubscriber (the bridge) whose back-end at BACKEND_SOCKET (dpdk-testpmd,
//                 iommu-support=1) has the IOAS as its device IOTLB; no mapping of guest memory here (a
//                 pure bridge), and the back-end's two virtio-net queues allocated (SET_VRING_NUM), so
//                 that every IOTLB entry goes into both queues' caches, as for the C peer
//
// The control protocol (testkit/README.md): {"event":"ready","pid":N} once attached to the IOAS; then for
// each {"cmd":"stats"} on stdin {"event":"stats","changes":N,"mappings":N,"pinned":N,"vmLck":N} (vmLck: the
// kernel's VmLck, bytes; vhost-user adds "iotlb": the bridge's IOTLB counters). Exits 0 when stdin
// closes, 1 if the broker (or the back-end) drops it.
import fs from 'node:fs';
import { out, serveCommands } from '../testkit/control.js';
import { VfioSubscriber } from '../clients/vfio/index.js';
import { DeviceSubscriber } from '../clients/device/index.js';
import { VhostUserSubscriber, NET_FEATURES, type IotlbStats } from '../clients/vhost-user/index.js';
import type { Subscriber } from '../clients/subscriber.js';

const [socket, space, name, kind, ioas, backendSocket] = process.argv.slice(2);
if (
  socket === undefined ||
  space === undefined ||
  name === undefined ||
  ioas === undefined ||
  (kind !== 'vfio' && kind !== 'vhost' && kind !== 'vhost-user') ||
  (kind === 'vhost-user' && backendSocket === undefined)
) {
  console.error('usage: ioas-client.js SOCKET SPACE NAME vfio|vhost|vhost-user IOAS [BACKEND_SOCKET]');
  process.exit(2);
}
const common = { space, name, reconnect: false, requestTimeoutMs: 120_000 };
let sub: Subscriber;
let pinned = () => 0;
let iotlb: () => IotlbStats | undefined = () => undefined;
if (kind === 'vhost-user') {
  const v = await VhostUserSubscriber.attach(socket, {
    ...common,
    backendSocket: backendSocket as string,
    virtioFeatures: NET_FEATURES,
    ioas,
    device: `${name}-dev`,
    mapMemory: false,
    backendTimeoutMs: 60_000,
  });
  for (const q of [0, 1]) await v.frontend.setVringNum(q, 16);
  iotlb = () => v.iotlb?.stats;
  sub = v;
} else if (kind === 'vfio') {
  const v = await VfioSubscriber.attach(socket, { ...common, backend: 'soft', ioas, devices: [`${name}-dev`] });
  pinned = () => v.domain.pinnedBytes;
  sub = v;
} else {
  const v = await DeviceSubscriber.attach(socket, common);
  await v.attachIoas(ioas, [`${name}-dev`]);
  sub = v;
}
let changes = 0;
sub.on('ioas', () => changes++);
sub.on('disconnected', (reason) => {
  console.error(`${name}: disconnected${reason ? `: ${reason.code} ${reason.message}` : ''}`);
  process.exit(1);
});
const vmLck = () => Number(/^VmLck:\s+(\d+) kB$/m.exec(fs.readFileSync('/proc/self/status', 'utf8'))?.[1] ?? NaN) * 1024;
out({ event: 'ready', pid: process.pid });
serveCommands(
  {
    stats: () => ({
      event: 'stats',
      changes,
      mappings: sub.ioasMappings(ioas).length,
      pinned: pinned(),
      vmLck: vmLck(),
      ...(iotlb() ? { iotlb: iotlb() } : {}),
    }),
  },
  { onEnd: () => void sub.close().then(() => process.exit(0)) },
);
