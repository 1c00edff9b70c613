// The vhost-user wire format, front-end side (QEMU docs/interop/vhost-user.rst). Every message is a fixed
// 12-byte header { u32 request, u32 flags, u32 size } and `size` bytes of payload, in the machine's byte
// order (little-endian on every host we run on); descriptors ride with the message as SCM_RIGHTS.
//
// Only what a front-end following a memory map and driving a few virtqueues needs is here: feature
// negotiation, the memory table (SET_MEM_TABLE, ADD_MEM_REG, REM_MEM_REG, GET_MAX_MEM_SLOTS), vring setup,
// GET_CONFIG, the shared dirty log (SET_LOG_BASE), the device IOTLB behind a guest IOMMU (IOTLB_MSG, and
// the back-end's request channel, SET_BACKEND_REQ_FD, on which it reports misses). u64 fields that hold feature bits are bigints (bits 32 and up are used); addresses and sizes
// are numbers (GPAs fit 52 bits), written as u64.
//
// Every message body is a table in the one layout format of clients/abi/layout.ts (VHOST_USER_LAYOUTS),
// shared with KVM and VFIO. test/vhost-user-layout.test.ts compiles the same members with gcc: the structs
// the kernel's linux/vhost_types.h defines (vring state and address, the IOTLB message) from that header,
// the vhost-user-only ones from C structs transcribed from the spec (test/fixtures/vhost-user-structs.h).
import { InvalidArgError, hex } from '../../protocol/index.js';
import { f, layoutCodec, type Layout } from '../abi/layout.js';

/** The message header and bodies, by the names QEMU's hw/virtio/vhost-user.c and linux/vhost_types.h give them. */
export const VHOST_USER_LAYOUTS = {
  /** VhostUserHeader (packed): every message starts with it. */
  vhost_user_header: { header: 'vhost-user.rst', size: 12, fields: { request: f(0, 4), flags: f(4, 4), size: f(8, 4) } },
  /** "A vring state description": SET_VRING_NUM, SET_VRING_BASE, GET_VRING_BASE, SET_VRING_ENABLE. */
  vhost_vring_state: { header: 'linux/vhost_types.h', size: 8, fields: { index: f(0, 4), num: f(4, 4) } },
  /** "A vring address description": SET_VRING_ADDR (used comes before avail). */
  vhost_vring_addr: {
    header: 'linux/vhost_types.h',
    size: 40,
    fields: { index: f(0, 4), flags: f(4, 4), desc_user_addr: f(8, 8), used_user_addr: f(16, 8), avail_user_addr: f(24, 8), log_guest_addr: f(32, 8) },
  },
  /** VhostUserMemoryRegion: "memory region description". */
  vhost_user_memory_region: {
    header: 'vhost-user.rst',
    size: 32,
    fields: { guest_phys_addr: f(0, 8), memory_size: f(8, 8), userspace_addr: f(16, 8), mmap_offset: f(24, 8) },
  },
  /** VhostUserMemory: SET_MEM_TABLE's "multiple memory regions description"; regions[] at 8, nregions of them sent. */
  vhost_user_memory: { header: 'vhost-user.rst', size: 8, fields: { nregions: f(0, 4), padding: f(4, 4) } },
  /** VhostUserMemRegMsg: ADD_MEM_REG / REM_MEM_REG's "single memory region description". */
  vhost_user_mem_reg_msg: {
    header: 'vhost-user.rst',
    size: 40,
    fields: { padding: f(0, 8), region: { offset: 8, size: 32, struct: 'vhost_user_memory_region' } },
  },
  /** VhostUserLog: SET_LOG_BASE's "log description" (the log's fd rides along). */
  vhost_user_log: { header: 'vhost-user.rst', size: 16, fields: { mmap_size: f(0, 8), mmap_offset: f(8, 8) } },
  /** VhostUserConfig: GET_CONFIG / SET_CONFIG's "device config space"; region[] (size bytes) at 12. */
  vhost_user_config: { header: 'vhost-user.rst', size: 12, fields: { offset: f(0, 4), size: f(4, 4), flags: f(8, 4) } },
  /** struct vhost_iotlb_msg: IOTLB_MSG both ways (padded to 32 bytes, as QEMU and DPDK send it). */
  vhost_iotlb_msg: {
    header: 'linux/vhost_types.h',
    size: 32,
    fields: { iova: f(0, 8), size: f(8, 8), uaddr: f(16, 8), perm: f(24, 1), type: f(25, 1) },
  },
} as const satisfies Record<string, Layout>;

const codec = layoutCodec(VHOST_USER_LAYOUTS);
/** The packed bytes as a Buffer (no copy): what sendmsg and the callers take. */
const asBuffer = (u: Uint8Array): Buffer => Buffer.from(u.buffer, u.byteOffset, u.byteLength);

/** Front-end request ids (the `request` field). */
export const Req = {
  GET_FEATURES: 1,
  SET_FEATURES: 2,
  SET_OWNER: 3,
  RESET_OWNER: 4,
  SET_MEM_TABLE: 5,
  SET_LOG_BASE: 6,
  SET_LOG_FD: 7,
  SET_VRING_NUM: 8,
  SET_VRING_ADDR: 9,
  SET_VRING_BASE: 10,
  GET_VRING_BASE: 11,
  SET_VRING_KICK: 12,
  SET_VRING_CALL: 13,
  SET_VRING_ERR: 14,
  GET_PROTOCOL_FEATURES: 15,
  SET_PROTOCOL_FEATURES: 16,
  GET_QUEUE_NUM: 17,
  SET_VRING_ENABLE: 18,
  /** The back-end's request channel: one end of a socketpair, as the message's one fd (BACKEND_REQ). */
  SET_BACKEND_REQ_FD: 21,
  /** struct vhost_iotlb_msg: an IOTLB update or invalidation (VIRTIO_F_ACCESS_PLATFORM). */
  IOTLB_MSG: 22,
  GET_CONFIG: 24,
  SET_CONFIG: 25,
  RESET_DEVICE: 34,
  GET_MAX_MEM_SLOTS: 36,
  ADD_MEM_REG: 37,
  REM_MEM_REG: 38,
  SET_STATUS: 39,
  GET_STATUS: 40,
} as const;

export type ReqId = (typeof Req)[keyof typeof Req];

const REQ_NAMES = new Map<number, string>(Object.entries(Req).map(([k, v]) => [v, k]));

/** 'ADD_MEM_REG' for 37; the number itself for ids this module does not know. */
export function reqName(id: number): string {
  return REQ_NAMES.get(id) ?? String(id);
}

/** Back-end request ids, on the back-end's request channel (VHOST_USER_BACKEND_*). */
export const BackendReq = {
  /** struct vhost_iotlb_msg: an IOTLB miss or an access failure. */
  IOTLB_MSG: 1,
  CONFIG_CHANGE_MSG: 2,
  VRING_HOST_NOTIFIER_MSG: 3,
} as const;

/** Header flags. */
export const Flag = {
  /** The protocol version, in the low two bits. */
  VERSION: 0x1,
  /** Set on every reply from the back-end. */
  REPLY: 0x4,
  /** The front-end wants a reply-ack (VHOST_USER_PROTOCOL_F_REPLY_ACK). */
  NEED_REPLY: 0x8,
} as const;

export const HEADER_BYTES = VHOST_USER_LAYOUTS.vhost_user_header.size;
/** The most payload we accept in a reply (the largest reply we ask for is GET_CONFIG's 256 + 12 bytes). */
export const MAX_PAYLOAD_BYTES = 4096;
/** SET_MEM_TABLE carries at most this many regions (VHOST_MEMORY_BASELINE_NREGIONS): one fd each. */
export const MEM_TABLE_MAX_REGIONS = 8;
/** The spec's upper bound on memory slots with CONFIGURE_MEM_SLOTS (VHOST_USER_MAX_RAM_SLOTS in QEMU). */
export const MAX_RAM_SLOTS = 509;

/** Protocol feature bits (GET/SET_PROTOCOL_FEATURES). */
export const ProtocolFeature = {
  MQ: 0,
  LOG_SHMFD: 1,
  RARP: 2,
  REPLY_ACK: 3,
  MTU: 4,
  BACKEND_REQ: 5,
  CROSS_ENDIAN: 6,
  CRYPTO_SESSION: 7,
  PAGEFAULT: 8,
  CONFIG: 9,
  BACKEND_SEND_FD: 10,
  HOST_NOTIFIER: 11,
  INFLIGHT_SHMFD: 12,
  RESET_DEVICE: 13,
  INBAND_NOTIFICATIONS: 14,
  CONFIGURE_MEM_SLOTS: 15,
  STATUS: 16,
} as const;

/** Virtio and vhost feature bits (GET/SET_FEATURES) this front-end knows by name. */
export const Feature = {
  /** VHOST_USER_F_PROTOCOL_FEATURES: the back-end speaks GET/SET_PROTOCOL_FEATURES. */
  PROTOCOL_FEATURES: 30,
  /** VHOST_F_LOG_ALL: the back-end logs every write to guest memory in the shared log (SET_LOG_BASE). */
  LOG_ALL: 26,
  VERSION_1: 32,
  RING_INDIRECT_DESC: 28,
  RING_EVENT_IDX: 29,
  /**
   * VIRTIO_F_ACCESS_PLATFORM (called VIRTIO_F_IOMMU_PLATFORM by QEMU and DPDK): the device reaches guest
   * memory through the platform's IOMMU. For vhost-user: ring and buffer addresses are IOVAs, translated
   * by the back-end's IOTLB, which the front-end fills (IOTLB_MSG) and the back-end asks for on a miss.
   */
  ACCESS_PLATFORM: 33,
  /** virtio-blk */
  BLK_SIZE_MAX: 1,
  BLK_SEG_MAX: 2,
  BLK_BLK_SIZE: 6,
  BLK_FLUSH: 9,
  /** virtio-net */
  NET_MAC: 5,
  NET_MRG_RXBUF: 15,
} as const;

export const bit = (n: number): bigint => 1n << BigInt(n);

/** Protocol features this front-end asks for when offered. STATUS is never asked for: DPDK would then
 *  wait for SET_STATUS before starting the device. LOG_SHMFD: the dirty log is a shared memfd. */
export const WANTED_PROTOCOL_FEATURES =
  bit(ProtocolFeature.MQ) |
  bit(ProtocolFeature.REPLY_ACK) |
  bit(ProtocolFeature.CONFIG) |
  bit(ProtocolFeature.CONFIGURE_MEM_SLOTS) |
  bit(ProtocolFeature.LOG_SHMFD);

/**
 * What a device IOTLB needs besides VIRTIO_F_ACCESS_PLATFORM. There is no IOMMU protocol feature: the IOTLB
 * messages come with the virtio feature, and QEMU refuses an IOMMU back-end without both of these
 * ("IOMMU support requires reply-ack and backend-req protocol features"): BACKEND_REQ for the channel on
 * which misses come, REPLY_ACK so that an invalidation is confirmed.
 */
export const IOTLB_PROTOCOL_FEATURES = bit(ProtocolFeature.BACKEND_REQ) | bit(ProtocolFeature.REPLY_ACK);

/** struct vhost_vring_addr flags: VHOST_VRING_F_LOG, the back-end logs its writes to the used ring. */
export const VRING_F_LOG = 0x1;

/**
 * The dirty log's page: one bit per 4 KiB of guest-physical address space, bit (gpa / 4096) % 8 of byte
 * gpa / 4096 / 8 (VHOST_LOG_PAGE). The log covers guest-physical addresses from 0.
 */
export const LOG_PAGE_BYTES = 4096;
/** The log grows in u64 words (VHOST_LOG_CHUNK = 64 pages per word), as QEMU sizes it. */
export const LOG_CHUNK_BYTES = LOG_PAGE_BYTES * 64;

export interface Header {
  request: number;
  flags: number;
  size: number;
}

/** One memory region as the back-end is told about it. */
export interface MemRegion {
  /** Guest-physical address of the first byte. */
  gpa: number;
  size: number;
  /** The "user address" the back-end translates ring addresses with (any unique, consistent value). */
  uaddr: bigint;
  /** Offset of the region inside its fd; the back-end maps the fd from 0 over size + mmapOffset. */
  mmapOffset: number;
}

export const MEM_REGION_BYTES = VHOST_USER_LAYOUTS.vhost_user_memory_region.size;

function u64(n: number | bigint, what: string): bigint {
  const v = typeof n === 'bigint' ? n : BigInt(n);
  if (v < 0n || v >= 1n << 64n || (typeof n === 'number' && !Number.isSafeInteger(n))) throw new InvalidArgError(`${what} ${n} is not a u64`);
  return v;
}

/** A whole message: header and payload, ready for sendmsg. */
export function encode(request: number, flags: number, payload: Uint8Array = new Uint8Array(0)): Buffer {
  const b = Buffer.allocUnsafe(HEADER_BYTES + payload.length);
  codec.packInto('vhost_user_header', b, 0, { request, flags, size: payload.length });
  b.set(payload, HEADER_BYTES);
  return b;
}

export function decodeHeader(b: Uint8Array, at = 0): Header {
  const h = codec.unpack('vhost_user_header', b.subarray(at, at + HEADER_BYTES));
  return { request: Number(h.request), flags: Number(h.flags), size: Number(h.size) };
}

export function u64Payload(n: number | bigint): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(u64(n, 'u64 payload'));
  return b;
}

export function readU64(payload: Uint8Array, what: string): bigint {
  if (payload.length < 8) throw new InvalidArgError(`${what}: reply payload of ${payload.length} bytes, expected a u64`);
  return Buffer.from(payload.buffer, payload.byteOffset, 8).readBigUInt64LE(0);
}

/** struct vhost_vring_state { u32 index; u32 num; } */
export function vringState(index: number, num: number): Buffer {
  return asBuffer(codec.pack('vhost_vring_state', { index, num }));
}

/** A struct vhost_vring_state reply (GET_VRING_BASE); the caller checks it is long enough. */
export function readVringState(payload: Uint8Array): { index: number; num: number } {
  const v = codec.unpack('vhost_vring_state', payload);
  return { index: Number(v.index), num: Number(v.num) };
}

/** GET_CONFIG / SET_CONFIG's header bytes before the config space itself. */
export const CONFIG_HEADER_BYTES = VHOST_USER_LAYOUTS.vhost_user_config.size;

/** struct vhost_vring_addr { u32 index, flags; u64 desc, used, avail, log } (used comes before avail). */
export function vringAddr(index: number, desc: bigint, used: bigint, avail: bigint, flags = 0, log = 0n): Buffer {
  return asBuffer(codec.pack('vhost_vring_addr', { index, flags, desc_user_addr: desc, used_user_addr: used, avail_user_addr: avail, log_guest_addr: log }));
}

/** The u64 of SET_VRING_KICK / SET_VRING_CALL: the ring index (bits 0-7), bit 8 set when no fd is sent. */
export function vringFdPayload(index: number, noFd = false): Buffer {
  if (!Number.isInteger(index) || index < 0 || index > 0xff) throw new InvalidArgError(`vring index ${index} out of range`);
  return u64Payload(BigInt(index) | (noFd ? 0x100n : 0n));
}

function writeRegion(b: Buffer, at: number, r: MemRegion): void {
  codec.packInto('vhost_user_memory_region', b, at, {
    guest_phys_addr: u64(r.gpa, 'gpa'),
    memory_size: u64(r.size, 'size'),
    userspace_addr: u64(r.uaddr, 'userspace_addr'),
    mmap_offset: u64(r.mmapOffset, 'mmap_offset'),
  });
}

/** SET_MEM_TABLE's payload: { u32 nregions, u32 padding, regions[nregions] }; one fd per region, same order. */
export function memTable(regions: readonly MemRegion[]): Buffer {
  if (regions.length > MEM_TABLE_MAX_REGIONS) {
    throw new InvalidArgError(`SET_MEM_TABLE carries at most ${MEM_TABLE_MAX_REGIONS} regions, got ${regions.length}`);
  }
  // As QEMU does: nregions entries, not the whole 8-entry array.
  const head = VHOST_USER_LAYOUTS.vhost_user_memory.size;
  const b = Buffer.alloc(head + regions.length * MEM_REGION_BYTES);
  codec.packInto('vhost_user_memory', b, 0, { nregions: regions.length });
  regions.forEach((r, i) => writeRegion(b, head + i * MEM_REGION_BYTES, r));
  return b;
}

/** ADD_MEM_REG / REM_MEM_REG payload: { u64 padding, region }. */
export function memReg(r: MemRegion): Buffer {
  const msg = VHOST_USER_LAYOUTS.vhost_user_mem_reg_msg;
  const b = Buffer.alloc(msg.size);
  writeRegion(b, msg.fields.region.offset, r);
  return b;
}

/** SET_LOG_BASE payload with LOG_SHMFD: { u64 mmap_size, u64 mmap_offset }; the log's fd rides along. */
export function logPayload(size: number, offset = 0): Buffer {
  return asBuffer(codec.pack('vhost_user_log', { mmap_size: u64(size, 'log mmap_size'), mmap_offset: u64(offset, 'log mmap_offset') }));
}

/** GET_CONFIG / SET_CONFIG payload: { u32 offset, u32 size, u32 flags, u8 payload[size] }. */
export function configPayload(offset: number, size: number, flags = 0, data?: Uint8Array): Buffer {
  const b = Buffer.alloc(CONFIG_HEADER_BYTES + size);
  codec.packInto('vhost_user_config', b, 0, { offset, size, flags });
  if (data) b.set(data.subarray(0, size), CONFIG_HEADER_BYTES);
  return b;
}

/** struct vhost_iotlb_msg's `type`. */
export const IotlbType = {
  /** Back-end to front-end: no entry for `iova` with `perm`. */
  MISS: 1,
  /** Front-end to back-end: [iova, iova + size) translates to [uaddr, uaddr + size) with `perm`. */
  UPDATE: 2,
  /** Front-end to back-end: drop every entry overlapping [iova, iova + size). */
  INVALIDATE: 3,
  /** Back-end to front-end: an access to `iova` with `perm` was refused. */
  ACCESS_FAIL: 4,
} as const;

/** struct vhost_iotlb_msg's `perm` (VHOST_ACCESS_*). */
export const IotlbPerm = { RO: 1, WO: 2, RW: 3 } as const;

/**
 * struct vhost_iotlb_msg { u64 iova; u64 size; u64 uaddr; u8 perm; u8 type; } padded to 32 bytes, as the
 * kernel header lays it out and as QEMU and DPDK send it (msg.size = sizeof, 32).
 */
export const IOTLB_MSG_BYTES = VHOST_USER_LAYOUTS.vhost_iotlb_msg.size;

export interface IotlbMsg {
  iova: number;
  size: number;
  /** The front-end's user address (memory table coordinates); 0 where the type has none. */
  uaddr: bigint;
  perm: number;
  type: number;
}

function writeIotlb(b: Buffer, at: number, m: IotlbMsg): void {
  codec.packInto('vhost_iotlb_msg', b, at, { iova: u64(m.iova, 'iova'), size: u64(m.size, 'size'), uaddr: u64(m.uaddr, 'uaddr'), perm: m.perm, type: m.type });
}

export function iotlbPayload(m: IotlbMsg): Buffer {
  const b = Buffer.alloc(IOTLB_MSG_BYTES);
  writeIotlb(b, 0, m);
  return b;
}

/** VHOST_USER_IOTLB_MSG for each of `msgs`, header and payload, back to back in one buffer (one write). */
export function iotlbMessages(msgs: readonly IotlbMsg[], flags: number): Buffer {
  const one = HEADER_BYTES + IOTLB_MSG_BYTES;
  const b = Buffer.alloc(one * msgs.length);
  msgs.forEach((m, i) => {
    codec.packInto('vhost_user_header', b, i * one, { request: Req.IOTLB_MSG, flags, size: IOTLB_MSG_BYTES });
    writeIotlb(b, i * one + HEADER_BYTES, m);
  });
  return b;
}

/** Decodes a struct vhost_iotlb_msg; addresses beyond 2^53 are refused (no IOVA we map is that high). */
export function decodeIotlb(payload: Uint8Array): IotlbMsg {
  // The members end at 26 (perm, type); the rest is padding a sender may leave out.
  if (payload.length < 26) throw new InvalidArgError(`an IOTLB message of ${payload.length} bytes, expected ${IOTLB_MSG_BYTES}`);
  const m = codec.unpack('vhost_iotlb_msg', payload);
  const num = (n: bigint, what: string) => {
    if (n > BigInt(Number.MAX_SAFE_INTEGER)) throw new InvalidArgError(`IOTLB message: ${what} ${hex(n)} is beyond 2^53`);
    return Number(n);
  };
  return { iova: num(m.iova, 'iova'), size: num(m.size, 'size'), uaddr: m.uaddr, perm: Number(m.perm), type: Number(m.type) };
}
