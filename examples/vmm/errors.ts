// The VMM's own refusals (the library's are MmbError, with MMB_ERR_* codes): a stable code to match on
// and a sentence. The control socket sends both kinds the same way: {class: code, desc: message}.
export type VmmErrorCode =
  /** The command is not valid in the VMM's state (e.g. hotplug while migrating, `cont` while running). */
  | 'VMM_ERR_STATE'
  /** The guest did not let go of a DIMM it was using within the deadline; nothing was changed. */
  | 'VMM_ERR_GUEST_BUSY'
  /** The control request is malformed (not JSON, unknown command, bad arguments). */
  | 'VMM_ERR_REQUEST';

export class VmmError extends Error {
  constructor(
    readonly code: VmmErrorCode,
    message: string,
  ) {
    super(message);
    this.name = 'VmmError';
  }
}
