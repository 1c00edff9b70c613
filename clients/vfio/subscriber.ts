// The vfio-like client: a subscriber (kind "vfio") that maps every region, pins it and maps it into an
// IOMMU domain at IOVA = GPA through one of three backends, shared by all of its devices:
//   type1    VFIO container + groups (/dev/vfio/vfio), VFIO_IOMMU_MAP_DMA;
//   iommufd  one IOAS in /dev/iommu, devices through VFIO cdevs, IOMMU_IOAS_MAP;
//   soft     a software stand-in for machines without an IOMMU: an IOVA table and mlock pinning. It is
//            reported as `soft` in every status and log line, never as an IOMMU.
//
// It declares pinning to the broker (ATTACH pin, with `pinLimit`), so the broker refuses beyond the limit
// before anything changes; it enforces the limit locally too. It reports (REPORT) its reserved IOVA
// ranges, remaining DMA mappings, bytes actually pinned, coherency, backend and devices: first before it
// acks its initial sync, then after every change and device change.
//
// Shadow mode (option `ioas`, feature IOAS, docs/ioas.md): the devices sit behind a guest IOMMU. The client
// then pins nothing for the map (it only maps guest memory into this process) and declares no pinning;
// each IOAS its devices are attached to gets a host IOMMU domain that maps exactly what the guest's IOMMU
// maps (shadow.ts): pinned bytes = mapped bytes, and an unmap is acked once the host IOMMU no longer maps
// it. Reports are then sent at most every REPORT_INTERVAL_MS (a guest's DMA mappings change thousands of
// times a second).
import {
  isMmbError,
  InvalidArgError,
  NoDeviceError,
  ReservedRangeError,
  toMmbError,
  type DmaRules,
  type Iova,
  type IovaRange,
  type Range,
  fromInclusive,
  inclusiveText,
  iovaOfGpa,
  rangeContains,
  rangeText,
  toInclusive,
} from '../../protocol/index.js';
import { PAGE_SIZE } from '../../native/index.js';
import type { BrokerTarget } from '../connection.js';
import type { GuestMemory } from '../memory.js';
import { Subscriber, type ClientReport, type SubscriberEvents, type SubscriberOptions } from '../subscriber.js';
import { VfioApplier } from './applier.js';
import {
  DIRTY_TRACKER_NAMES,
  checkBdf,
  checkName,
  clash,
  isBdf,
  mergeRanges,
  type IommuBackendName,
  type DeviceMigration,
  type DirtyTracking,
  type IommuBackend,
  type VfioDevice,
} from './iommu-backend.js';
import { Domain, type DomainMapping, type PinProgress } from './domain.js';
import { IommufdBackend } from './iommufd.js';
import { DEFAULT_PIN_CHUNK_BYTES } from './pinning.js';
import { SoftBackend } from './soft.js';
import { Type1Backend } from './type1.js';
import { ShadowApplier } from './shadow.js';
import type { PageLocks } from './page-locks.js';
import type { IoasDomain } from './ioas-domain.js';
import { readReservedRegions, reservedRegionsPath } from './sysfs-reserved.js';
import { realSys, type VfioSys } from './sys.js';

/** Shadow mode: at most one REPORT per this many ms (trailing), so that IOVA churn cannot flood the broker. */
export const REPORT_INTERVAL_MS = 20;

/** A pino-compatible logger (only what this client uses). */
export interface VfioLogger {
  info(obj: object, msg: string): void;
  warn(obj: object, msg: string): void;
}

export interface VfioSubscriberOptions extends SubscriberOptions {
  /** How memory reaches the devices: 'type1', 'iommufd', or the software stand-in 'soft'. */
  backend: IommuBackendName;
  /** Devices to attach at once: PCI addresses for type1 / iommufd ("0000:00:01.0"), names for soft. */
  devices?: readonly string[];
  /** Most bytes this client may pin (the whole map, counted once). Declared to the broker and enforced here. */
  pinLimit?: number;
  /** Bytes per pinning call (mlock / MAP_DMA / IOAS_MAP), a page multiple. Default 128 MiB. */
  pinChunkBytes?: number;
  /**
   * Reserved IOVA ranges, inclusive {start, last} as sysfs and the kernel write them (held half-open
   * inside). soft: replaces its list (default: the x86 MSI window 0xfee00000-0xfeefffff); type1 /
   * iommufd: added to what the kernel reports.
   */
  reserved?: readonly IovaRange[];
  /** soft: entries of its IOVA table (one per region). Default 65535, type1's dma_entry_limit. */
  dmaEntryLimit?: number;
  /**
   * soft: what every mapping's IOVA and size must be a multiple of, as an IOMMU whose smallest page is
   * larger than 4 KiB needs (type1 and iommufd read theirs from the kernel). Default 4 KiB.
   */
  iovaAlignment?: number;
  /**
   * PCI addresses of devices this client may attach later: the reserved regions of their IOMMU groups
   * (sysfs reserved_regions) are read at attach, before any of them is opened, and reported from the first
   * REPORT on, so that the broker places no RAM where they could not map it. Every backend; a device
   * without them is MMB_ERR_NO_DEVICE. (type1 / iommufd also read them for every device they attach, before
   * opening it.)
   */
  reserveFor?: readonly string[];
  /** What the hardware backends and the sysfs reads go through (default the real system; tests simulate it). */
  sys?: VfioSys;
  /** Progress of pinning, also during the initial sync (before attach() resolves). */
  onPinProgress?: (p: PinProgress) => void;
  /**
   * Shadow mode (feature IOAS): the devices are attached to this I/O address space of the broker (it must
   * exist), and the client maps and pins only what it maps. attachDevice(name, { ioas }) puts a device in
   * another one.
   */
  ioas?: string;
  logger?: VfioLogger;
}

export interface VfioDomainInfo {
  backend: IommuBackendName;
  /** True for the software stand-in. */
  software: boolean;
  description: string;
  /** The domain exists (at least one device is attached). */
  active: boolean;
  devices: string[];
  /** Bytes pinned now, once per domain. */
  pinnedBytes: number;
  /** Bytes mapped in this process (pinned as long as the domain exists; in shadow mode, never pinned). */
  mappedBytes: number;
  /** Shadow mode: the IOASes, each with its host domain's devices and the bytes it maps. */
  ioas?: { ioas: string; devices: string[]; mappings: number; bytes: number }[];
  pinLimit: number | undefined;
  mappings: DomainMapping[];
  /** Whether DMA is cache-coherent in the domain (undefined: unknown, or no domain yet). */
  coherent: boolean | undefined;
  /** Half-open; REPORT sends them in the wire's inclusive form. */
  reserved: Range<Iova>[];
  dmaAvailable: number | undefined;
  /** How regions are cut into DMA mappings and their IOVA alignment (REPORT.dma); none in shadow mode. */
  dma?: DmaRules;
  /**
   * While a region logs: the kernel's dirty tracker in use (`type1`, `iommufd`), or `none` (every writable
   * page counts as dirty at every sync) with the reason. Undefined while nothing logs.
   */
  dirtyTracking?: DirtyTracking | undefined;
}

/**
 * What a migration needs from this client's devices: to stop their DMA when paused, and to carry their
 * state. Neither is something this client does today (it drives no VFIO migration states), so a client
 * with a device is a migration blocker (clients/migration/blockers.ts); `devices` says what the kernel
 * would allow for each (VFIO_DEVICE_FEATURE_MIGRATION), for a VMM that migrates device state itself.
 */
export interface VfioMigrationSupport {
  /** The client stops its devices' DMA before it acks a pause. */
  quiesce: boolean;
  /** The devices' state is migrated (by this client or its VMM). */
  deviceState: boolean;
  devices: (DeviceMigration & { name: string })[];
}

export interface VfioSubscriberEvents extends SubscriberEvents {
  pinProgress: [progress: PinProgress];
}

/**
 * Opens the backend; for type1 / iommufd MMB_ERR_UNSUPPORTED names what this machine lacks. `locks`: shadow
 * mode's counted page locks, for soft.
 */
export function openIommuBackend(
  opts: Pick<VfioSubscriberOptions, 'backend' | 'reserved' | 'dmaEntryLimit' | 'iovaAlignment' | 'sys'>,
  locks?: PageLocks,
): IommuBackend {
  switch (opts.backend) {
    case 'soft':
      return new SoftBackend({
        ...(opts.reserved ? { reserved: opts.reserved } : {}),
        ...(opts.dmaEntryLimit !== undefined ? { dmaEntryLimit: opts.dmaEntryLimit } : {}),
        ...(opts.iovaAlignment !== undefined ? { iovaAlignment: opts.iovaAlignment } : {}),
        ...(locks ? { locks } : {}),
      });
    case 'type1':
      return Type1Backend.open(opts.sys);
    case 'iommufd':
      return IommufdBackend.open(opts.sys);
    default:
      throw new InvalidArgError(`unknown vfio backend ${JSON.stringify(opts.backend)}: use 'soft', 'type1' or 'iommufd'`);
  }
}

/**
 * What sysfs says the IOMMU groups of `devices` reserve (sysfs-reserved.ts), merged. `required`: a device
 * without a reserved_regions file is MMB_ERR_NO_DEVICE; else it is skipped (attaching it will say why).
 */
function sysfsReserved(opts: VfioSubscriberOptions, devices: readonly string[], required: boolean): Range<Iova>[] {
  const out: Range<Iova>[] = [];
  for (const bdf of devices) {
    if (!isBdf(bdf)) continue; // not a PCI address: the backend refuses it by name
    const ranges = readReservedRegions(opts.sys ?? realSys, bdf);
    if (ranges === undefined && required) throw new NoDeviceError(`${bdf} has no ${reservedRegionsPath(bdf)}: no such PCI device, or it is in no IOMMU group`);
    out.push(...(ranges ?? []));
  }
  return mergeRanges(out);
}

function validate(opts: VfioSubscriberOptions): void {
  if (opts.pinLimit !== undefined && (!Number.isSafeInteger(opts.pinLimit) || opts.pinLimit < 0)) {
    throw new InvalidArgError(`pinLimit must be a non-negative integer, got ${opts.pinLimit}`);
  }
  const chunk = opts.pinChunkBytes;
  if (chunk !== undefined && (!Number.isSafeInteger(chunk) || chunk < PAGE_SIZE || chunk % PAGE_SIZE !== 0)) {
    throw new InvalidArgError(`pinChunkBytes must be a positive multiple of the page size (${PAGE_SIZE}), got ${chunk}`);
  }
  const devices = opts.devices ?? [];
  for (const d of devices) checkName(d, 'device');
  if (new Set(devices).size !== devices.length) throw new InvalidArgError(`devices ${JSON.stringify(devices)} lists a device twice`);
  if (devices.length > 256) throw new InvalidArgError('at most 256 devices');
  for (const d of opts.reserveFor ?? []) checkBdf(d);
  if (opts.reserveFor?.length && opts.ioas !== undefined)
    throw new InvalidArgError('reserveFor reserves GPAs (IOVA = GPA); a shadow-mode client (ioas) maps IOVAs of its IOAS instead');
  for (const r of opts.reserved ?? []) {
    if (!Number.isSafeInteger(r.start) || !Number.isSafeInteger(r.last) || r.start < 0 || r.last < r.start) {
      throw new InvalidArgError(`reserved range ${JSON.stringify(r)} must be {start, last} with 0 <= start <= last`);
    }
  }
}

/**
 * REPORT's `dirtyTracking` (feature MIGRATION), while the client logs: the dirty tracker in use,
 * "VFIO_IOMMU_DIRTY_PAGES", "IOMMU_HWPT_GET_DIRTY_BITMAP", or "all" (every writable page counts).
 */
export function reportedDirtyTracking(tracking: DirtyTracking | undefined): string | undefined {
  return tracking ? DIRTY_TRACKER_NAMES[tracking.mode] : undefined;
}

export class VfioSubscriber extends Subscriber {
  private readonly vfio: VfioApplier | undefined;
  /** Shadow mode: the applier of the map and of the IOASes. */
  private readonly shadow: ShadowApplier | undefined;
  private readonly log: VfioLogger | undefined;
  private readonly pinLimit: number | undefined;
  private readonly vfioOpts: VfioSubscriberOptions;
  private reporting: { inFlight: boolean; again: boolean; timer: NodeJS.Timeout | undefined; last: number } = {
    inFlight: false,
    again: false,
    timer: undefined,
    last: 0,
  };

  private constructor(target: BrokerTarget, applier: VfioApplier | ShadowApplier, opts: VfioSubscriberOptions) {
    super(target, applier, opts);
    if (applier instanceof ShadowApplier) {
      this.shadow = applier;
      this.followIoas(applier);
    } else this.vfio = applier;
    this.log = opts.logger;
    this.pinLimit = opts.pinLimit;
    this.vfioOpts = opts;
  }

  /**
   * Opens the backend, attaches `devices` (creating the domain), attaches to the broker as kind "vfio",
   * reports, and resolves once the initial map is mapped, pinned and acked. Fails before connecting if the
   * backend is unavailable (MMB_ERR_UNSUPPORTED) or a device cannot be attached (MMB_ERR_NO_DEVICE).
   */
  static async attach(target: BrokerTarget, opts: VfioSubscriberOptions): Promise<VfioSubscriber> {
    validate(opts);
    if (opts.ioas !== undefined) return VfioSubscriber.attachShadow(target, opts);
    const backend = openIommuBackend(opts);
    let sub: VfioSubscriber | undefined;
    const domain = new Domain(backend, {
      chunkBytes: opts.pinChunkBytes ?? DEFAULT_PIN_CHUNK_BYTES,
      ...(backend.software ? {} : opts.reserved ? { extraReserved: opts.reserved.map(fromInclusive<Iova>) } : {}),
      onProgress: (p) => {
        opts.onPinProgress?.(p);
        sub?.emit('pinProgress' as keyof SubscriberEvents, p as never);
      },
    });
    const applier = new VfioApplier(domain, {
      ...(opts.pinLimit !== undefined ? { pinLimit: opts.pinLimit } : {}),
      onChanged: () => sub?.sendReport(),
      onError: (err) => {
        sub?.log?.warn(
          { ...sub.logFields(), err: toMmbError(err).toWire() },
          'vfio client: an unmap or an undo failed; what it keeps pinned is what the kernel still maps',
        );
        sub?.emit('error', toMmbError(err));
      },
      dirtyLog: () => sub?.dirty,
    });
    try {
      // Before any device is opened: what sysfs says their IOMMU groups reserve, reported with the first REPORT.
      domain.reserve(sysfsReserved(opts, opts.reserveFor ?? [], true));
      if (!backend.software) domain.reserve(sysfsReserved(opts, opts.devices ?? [], false));
      for (const d of opts.devices ?? []) await applier.attachDevice(d);
      sub = new VfioSubscriber(target, applier, { ...opts, kind: 'vfio', pin: opts.pinLimit !== undefined ? { limit: opts.pinLimit } : {} });
      // Remembered now and sent right after ATTACH, before the initial sync is acked.
      await sub.report(sub.currentReport());
      sub.log?.info(
        { ...sub.logFields(), reserved: sub.domain.reserved },
        backend.software
          ? 'vfio client attaching with the soft backend (software stand-in, no IOMMU)'
          : `vfio client attaching with the ${backend.name} backend`,
      );
      const log = sub.log;
      if (log) {
        const s = sub;
        s.on('change', ({ change: c }) =>
          log.info(
            { ...s.logFields(), cause: c.cause, generation: c.generation, added: c.added.map((r) => r.name), removed: c.removed.map((r) => r.name) },
            'vfio change pinned and mapped',
          ),
        );
      }
      await sub.start();
      return sub;
    } catch (err) {
      await applier.close().catch(() => undefined);
      throw err;
    }
  }

  /**
   * Shadow mode: the backend is opened for each IOAS (its own container / IOAS / table) when its first
   * device attaches; the devices attach to it before the client attaches to the broker, and to the broker's
   * IOAS once the map is established. The client declares no pinning: it pins only what the IOASes map.
   */
  private static async attachShadow(target: BrokerTarget, opts: VfioSubscriberOptions): Promise<VfioSubscriber> {
    checkName(opts.ioas as string, 'IOAS');
    // Fails here, before connecting, if this machine lacks the backend.
    openIommuBackend(opts).close();
    let sub: VfioSubscriber | undefined;
    const applier = new ShadowApplier({
      chunkBytes: opts.pinChunkBytes ?? DEFAULT_PIN_CHUNK_BYTES,
      ...(opts.backend !== 'soft' && opts.reserved ? { extraReserved: opts.reserved.map(fromInclusive<Iova>) } : {}),
      ...(opts.pinLimit !== undefined ? { pinLimit: opts.pinLimit } : {}),
      open: (locks) => openIommuBackend(opts, locks),
      onChanged: () => sub?.sendReport(),
      dirtyLog: () => sub?.dirty,
    });
    try {
      for (const d of opts.devices ?? []) await applier.attachDevice(d, opts.ioas as string);
      sub = new VfioSubscriber(target, applier, { ...opts, kind: 'vfio' });
      await sub.report(sub.currentReport());
      sub.log?.info(
        { ...sub.logFields(), ioas: opts.ioas },
        `vfio client attaching in shadow mode (${opts.backend}): it pins only what IOAS ${JSON.stringify(opts.ioas)} maps`,
      );
      await sub.start();
      if ((opts.devices ?? []).length > 0) await sub.attachIoas(opts.ioas as string, opts.devices ?? []);
      return sub;
    } catch (err) {
      if (sub) await sub.close().catch(() => undefined);
      else await applier.close().catch(() => undefined);
      throw err;
    }
  }

  /** Shadow mode: whether this client shadows guest IOMMUs (option `ioas`). */
  get shadowing(): boolean {
    return this.shadow !== undefined;
  }

  /** Shadow mode: the host IOMMU domain of each IOAS this client's devices are attached to. */
  ioasDomains(): IoasDomain[] {
    return this.shadow?.ioasDomains() ?? [];
  }

  /** Guest memory as mapped in this process. */
  get memory(): GuestMemory {
    return (this.vfio ?? (this.shadow as ShadowApplier)).memory;
  }

  /** The backend (in shadow mode: of the first IOAS's domain, or of `ioas`'s). */
  get backend(): IommuBackend {
    if (this.vfio) return this.vfio.domain.backend;
    const d = this.ioasDomains()[0];
    if (!d) throw new InvalidArgError('this shadow-mode vfio client has no device attached, hence no IOMMU domain');
    return d.backend;
  }

  /** The IOMMU domain: backend, devices, pinned bytes, mappings, coherency, reserved ranges. */
  get domain(): VfioDomainInfo {
    if (this.shadow) return this.shadowDomain(this.shadow);
    const d = (this.vfio as VfioApplier).domain;
    const limits = d.limits();
    return {
      backend: d.backend.name,
      software: d.backend.software,
      description: d.backend.description,
      active: d.active,
      devices: [...d.devices],
      pinnedBytes: d.pinnedBytes,
      mappedBytes: (this.vfio as VfioApplier).mappedBytes,
      pinLimit: this.pinLimit,
      mappings: d.mappings(),
      coherent: d.active ? limits.coherent : undefined,
      reserved: limits.reserved,
      dmaAvailable: d.active ? limits.dmaAvailable : undefined,
      dirtyTracking: (this.vfio as VfioApplier).dirtyTracking,
      dma: d.dmaRules(),
    };
  }

  /**
   * The devices' migration support as the kernel reports it (soft devices are names: none). No device
   * here is quiesced or has its state migrated by this client: VFIO migration v2 (device states STOP,
   * STOP_COPY, RESUMING) is not driven, and QEMU's edu, the device of the VM test, has no migration driver
   * at all (ENOTTY). See docs/migration.md, "Devices".
   */
  migrationSupport(): VfioMigrationSupport {
    const d = this.domain;
    const devices = d.devices.map((name) => {
      const dev = this.device(name);
      const m: DeviceMigration = dev?.migration
        ? dev.migration()
        : { supported: false, stopCopy: false, p2p: false, reason: `${name} is a ${d.backend} device: a name, with no device state` };
      return { name, ...m };
    });
    return { quiesce: false, deviceState: false, devices };
  }

  /** Shadow mode: what `domain` says, across the IOASes. */
  private shadowDomain(shadow: ShadowApplier): VfioDomainInfo {
    const domains = shadow.ioasDomains();
    const limits = domains.map((d) => d.limits());
    const first = domains[0]?.backend;
    const avail = limits.map((l) => l.dmaAvailable).filter((n): n is number => n !== undefined);
    const coherent = limits.map((l) => l.coherent);
    return {
      backend: this.vfioOpts.backend,
      software: this.vfioOpts.backend === 'soft',
      description: `${first?.description ?? this.vfioOpts.backend}; shadow mode: one domain per IOAS, pinning only what the guest's IOMMU maps`,
      active: domains.some((d) => d.active),
      devices: domains.flatMap((d) => [...d.devices]),
      pinnedBytes: shadow.pinnedBytes,
      mappedBytes: shadow.memory.regions().reduce((n, m) => n + m.region.size, 0),
      pinLimit: this.pinLimit,
      mappings: domains.flatMap((d) =>
        d.mappings().map((m) => {
          const r = shadow.memory.regionAt(m.gpa)?.region;
          return { region: r?.name ?? '?', id: r?.id ?? 0, gpa: m.gpa, size: m.size, iova: m.iova, readonly: m.readonly, pieces: 0, ioas: d.ioas };
        }),
      ),
      coherent: coherent.length > 0 && coherent.every((c) => c !== undefined) ? coherent.every(Boolean) : undefined,
      reserved: mergeRanges(limits.flatMap((l) => l.reserved)),
      dmaAvailable: avail.length > 0 ? Math.min(...avail) : undefined,
      ioas: domains.map((d) => ({ ioas: d.ioas, devices: [...d.devices], mappings: d.mappings().length, bytes: d.mappedBytes })),
    };
  }

  /** A device behind this client (its VFIO fd and region info, for type1 / iommufd). */
  device(name: string): VfioDevice | undefined {
    if (this.vfio) return this.vfio.domain.backend.device(name);
    const ioas = this.shadow?.ioasOf(name);
    return this.ioasDomains()
      .find((d) => d.ioas === ioas)
      ?.backend.device(name);
  }

  /**
   * Hot-adds a device. The first one creates the domain and pins everything mapped into it (with
   * progress); later ones join the same domain and pin nothing more. Waits for a change in progress.
   * Shadow mode: the device joins `ioas` (default: the client's `ioas` option), whose host domain is made
   * with its first device, and the client follows that IOAS from then on.
   */
  async attachDevice(name: string, opts: { signal?: AbortSignal; ioas?: string } = {}): Promise<void> {
    checkName(name, 'device');
    if (this.shadow) {
      const ioas = opts.ioas ?? (this.vfioOpts.ioas as string);
      checkName(ioas, 'IOAS');
      await this.shadow.attachDevice(name, ioas);
      try {
        await this.attachIoas(ioas, [name]);
      } catch (err) {
        await this.shadow.detachDevice(name).catch(() => undefined);
        throw err;
      }
      this.log?.info({ ...this.logFields(), device: name, ioas }, 'vfio device attached (shadow mode)');
      return;
    }
    const vfio = this.vfio as VfioApplier;
    if (!vfio.domain.backend.software) await this.reserveBeforeOpening(name);
    const created = !vfio.domain.active;
    await vfio.attachDevice(name, opts.signal);
    this.log?.info({ ...this.logFields(), device: name, domainCreated: created }, 'vfio device attached');
  }

  /** Hot-removes a device; the last one unpins everything and destroys the domain. */
  async detachDevice(name: string): Promise<void> {
    if (this.shadow) {
      const ioas = this.shadow.ioasOf(name);
      if (ioas === undefined) throw new NoDeviceError(`${JSON.stringify(name)} is not attached to this vfio client`);
      // The broker's IOAS first: with the last device there, this client unmaps everything before it is out.
      await this.detachIoas(ioas, [name]);
      await this.shadow.detachDevice(name);
      this.log?.info({ ...this.logFields(), device: name, ioas }, 'vfio device detached (shadow mode)');
      return;
    }
    const vfio = this.vfio as VfioApplier;
    await vfio.detachDevice(name);
    this.log?.info({ ...this.logFields(), device: name, domainDestroyed: !vfio.domain.active }, 'vfio device detached');
  }

  /**
   * A device about to be hot-added: what sysfs says its IOMMU group reserves is reported (and awaited)
   * before the device is opened, and memory this client maps there refuses the attach before anything is
   * opened (MMB_ERR_RESERVED_RANGE naming the region): the kernel would refuse the device's group then.
   */
  private async reserveBeforeOpening(name: string): Promise<void> {
    const ranges = sysfsReserved(this.vfioOpts, [name], false);
    if (ranges.length === 0) return;
    const vfio = this.vfio as VfioApplier;
    const known = vfio.domain.limits().reserved;
    const isNew = ranges.some((x) => !known.some((k) => rangeContains(k.start, k.size, x.start, x.size)));
    if (isNew) {
      vfio.domain.reserve(ranges);
      await this.report(this.currentReport());
    }
    for (const m of vfio.memory.regions()) {
      const x = clash(ranges, iovaOfGpa(m.region.gpa), m.region.size);
      if (x) {
        throw new ReservedRangeError(
          `${name} cannot join this vfio client: region ${JSON.stringify(m.region.name)} ${rangeText(m.region.gpa, m.region.size)} covers ${inclusiveText(x.start, x.size)}, which ${reservedRegionsPath(name)} reserves`,
        );
      }
    }
  }

  override on<T extends keyof VfioSubscriberEvents>(event: T, fn: (...args: VfioSubscriberEvents[T]) => void, context?: unknown): this {
    return super.on(event as keyof SubscriberEvents, fn as never, context);
  }

  override once<T extends keyof VfioSubscriberEvents>(event: T, fn: (...args: VfioSubscriberEvents[T]) => void, context?: unknown): this {
    return super.once(event as keyof SubscriberEvents, fn as never, context);
  }

  override off<T extends keyof VfioSubscriberEvents>(event: T, fn?: (...args: VfioSubscriberEvents[T]) => void, context?: unknown, once?: boolean): this {
    return super.off(event as keyof SubscriberEvents, fn as never, context, once);
  }

  /** What REPORT says now. */
  currentReport(): ClientReport {
    const d = this.domain;
    return {
      reserved: mergeRanges(d.reserved).slice(0, 1024).map(toInclusive),
      ...(d.dmaAvailable !== undefined ? { dmaAvailable: Math.min(d.dmaAvailable, 0xffff_ffff) } : {}),
      pinned: d.pinnedBytes,
      ...(d.coherent !== undefined ? { coherent: d.coherent } : {}),
      backend: d.backend,
      devices: d.devices,
      // REPORT replaces only what it names: 'none' says that logging stopped.
      dirtyTracking: reportedDirtyTracking(d.dirtyTracking) ?? 'none',
      // No device here stops its DMA at a pause on its own or has its state migrated by this client (VFIO
      // migration v2 needs a device and a VMM that move it): said plainly, so a migration blocks on it.
      ...(d.devices.length > 0 ? { migration: { quiesce: false, deviceState: false } } : {}),
      // Feature DMA_RULES: so the broker counts this client's DMA mappings and checks their alignment as it will.
      ...(d.dma ? { dma: d.dma } : {}),
    };
  }

  private sendReport(): void {
    if (!this.shadow) return this.reportNow();
    // Shadow mode: one in flight at a time, at most one every REPORT_INTERVAL_MS, the last state always sent.
    const st = this.reporting;
    if (st.inFlight || st.timer) {
      st.again = true;
      return;
    }
    const wait = st.last + REPORT_INTERVAL_MS - Date.now();
    if (wait > 0) {
      st.timer = setTimeout(() => {
        st.timer = undefined;
        this.sendReport();
      }, wait);
      st.timer.unref();
      return;
    }
    st.inFlight = true;
    st.last = Date.now();
    st.again = false;
    this.reportNow(() => {
      st.inFlight = false;
      if (st.again) this.sendReport();
    });
  }

  override async close(): Promise<void> {
    clearTimeout(this.reporting.timer);
    this.reporting.timer = undefined;
    await super.close();
  }

  private reportNow(done?: () => void): void {
    let r: ClientReport;
    try {
      r = this.currentReport();
    } catch (err) {
      this.emit('error', toMmbError(err));
      return;
    }
    this.report(r)
      .catch((err: unknown) => {
        if (!isMmbError(err, 'MMB_ERR_DISCONNECTED') && !isMmbError(err, 'MMB_ERR_TIMEOUT')) this.emit('error', toMmbError(err));
      })
      .finally(done);
  }

  private logFields(): Record<string, unknown> {
    const d = this.domain;
    return {
      kind: 'vfio',
      backend: d.backend,
      software: d.software,
      devices: d.devices,
      pinned: d.pinnedBytes,
      ...(this.shadow ? { shadow: true } : {}),
      ...(d.dirtyTracking ? { dirtyTracking: d.dirtyTracking } : {}),
    };
  }
}
