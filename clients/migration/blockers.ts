// Migration blockers: clients whose devices would make a migration lose data or state. Pre-copy migration
// copies guest memory while the guest runs and stops every writer for the last round (PAUSE); a device
// that keeps doing DMA after the pause writes pages the last round does not carry, and a device whose
// state stays behind cannot continue at the destination. QEMU refuses to migrate such a VM (a VFIO
// device without VFIO migration support is a "migration blocker"); so does this engine, unless the owner
// explicitly accepts the risk (MigrationOptions.acceptDeviceRisk, `mmbroker migrate --accept-device-risk`).
//
// The rule: a subscriber of kind "vfio" with at least one device attached (STATUS `devices`) blocks,
// unless it declares both that it stops its devices' DMA before it acks a pause (`quiesce`) and that
// their state is migrated (`deviceState`): REPORT.migration (feature MIGRATION), shown in its STATUS
// entry. A vfio client with devices that declares nothing blocks. A vfio client with no device attached
// reaches no memory by DMA and does not block.
import { MigrationBlockedError as BlockedError, type ClientRef, type StatusResult } from '../../protocol/index.js';

type StatusClient = StatusResult['spaces'][number]['clients'][number];

/** What a client declares about its devices and migration (the proposed STATUS / REPORT key). */
export interface MigrationDeclaration {
  /** It stops its devices' DMA before it acks EV_PAUSE. */
  quiesce: boolean;
  /** Its devices' state is migrated (by it or its VMM). */
  deviceState: boolean;
}

export interface MigrationBlocker {
  client: ClientRef;
  /** Its devices, as it reported them. */
  devices: string[];
  backend: string | undefined;
  /** Why it blocks, in words. */
  reason: string;
}

const declaration = (c: StatusClient): MigrationDeclaration | undefined => c.migration;

/** The clients of a space (a STATUS entry's `clients`) that block a migration, with why. */
export function migrationBlockers(clients: readonly StatusClient[]): MigrationBlocker[] {
  const out: MigrationBlocker[] = [];
  for (const c of clients) {
    if (c.role !== 'subscriber' || c.kind !== 'vfio') continue;
    const devices = c.devices ?? [];
    if (devices.length === 0) continue;
    const d = declaration(c);
    if (d?.quiesce && d.deviceState) continue;
    const missing = [
      ...(d?.quiesce ? [] : ['cannot be quiesced (nothing stops its DMA at the pause)']),
      ...(d?.deviceState ? [] : ['has no migratable state']),
    ];
    out.push({
      client: { id: c.id, kind: c.kind, name: c.name, pid: c.pid },
      devices: [...devices],
      backend: c.backend,
      reason: `vfio client ${JSON.stringify(c.name)} (${c.backend ?? 'unknown backend'}, devices ${devices.join(', ')}) ${missing.join(' and ')}`,
    });
  }
  return out;
}

/**
 * A migration refused because of device clients (MMB_ERR_MIGRATION_BLOCKED): `client` names the first of
 * them, `blockers` lists all. Pass acceptDeviceRisk (--accept-device-risk) to migrate anyway.
 */
export class MigrationBlockedError extends BlockedError {
  constructor(readonly blockers: readonly MigrationBlocker[]) {
    super(
      `migration blocked: ${blockers.map((b) => b.reason).join('; ')}. A device that keeps writing after the pause, ` +
        `or whose state stays behind, makes the copy wrong; accept the risk explicitly to migrate anyway (--accept-device-risk, MigrationOptions.acceptDeviceRisk)`,
      { client: (blockers[0] as MigrationBlocker).client },
    );
  }
}
