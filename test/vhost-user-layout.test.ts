// The vhost-user message bodies of clients/vhost-user/messages.ts (VHOST_USER_LAYOUTS, in the one layout
// format of clients/abi/layout.ts) against C, with the layout probe KVM and VFIO are checked with: the
// kernel's linux/vhost_types.h for the structs vhost-user borrows from it, and for the rest the spec's
// descriptions transcribed as C structs (test/fixtures/vhost-user-structs.h). The spec's sizes are also
// written out below, so a wrong transcription and a wrong table would have to agree to pass.
import { beforeAll, describe, expect, it } from 'vitest';
import { asGpa, asOffset } from '../protocol/index.js';
import {
  Flag,
  Req,
  VHOST_USER_LAYOUTS,
  configPayload,
  decodeHeader,
  decodeIotlb,
  encode,
  iotlbMessages,
  iotlbPayload,
  logPayload,
  memReg,
  memTable,
  readVringState,
  vringAddr,
  vringState,
} from '../clients/vhost-user/messages.js';
import { expectLayout, probeSource, runProbe, type Probe } from './helpers/layout-probe.js';

/** Bytes per the spec (QEMU docs/interop/vhost-user.rst): members only, u64s 8-byte aligned. */
const SPEC_SIZES: Record<keyof typeof VHOST_USER_LAYOUTS, number> = {
  vhost_user_header: 12, // u32 request, u32 flags, u32 size
  vhost_vring_state: 8, // u32 index, u32 num
  vhost_vring_addr: 40, // u32 index, u32 flags, u64 descriptor, u64 used, u64 available, u64 log
  vhost_user_memory_region: 32, // u64 guest address, u64 size, u64 user address, u64 mmap offset
  vhost_user_memory: 8, // u32 num regions, u32 padding, then the regions
  vhost_user_mem_reg_msg: 40, // u64 padding, one region
  vhost_user_log: 16, // u64 log size, u64 log offset
  vhost_user_config: 12, // u32 offset, u32 size, u32 flags, then the payload
  vhost_iotlb_msg: 32, // u64 iova, u64 size, u64 user address, u8 permissions, u8 type; padded as the kernel's struct
};

let probe: Probe;

beforeAll(() => {
  probe = runProbe(probeSource(['"vhost-user-structs.h"'], VHOST_USER_LAYOUTS));
});

describe('vhost-user message layouts against C (gcc)', () => {
  it.each(Object.keys(VHOST_USER_LAYOUTS))("%s: every member at C's offset and size, and C's size", (name) => {
    expectLayout(name, VHOST_USER_LAYOUTS[name as keyof typeof VHOST_USER_LAYOUTS], probe.structs[name]);
  });

  it("the sizes are the spec's", () => {
    for (const [name, layout] of Object.entries(VHOST_USER_LAYOUTS)) expect(layout.size, name).toBe(SPEC_SIZES[name as keyof typeof SPEC_SIZES]);
  });
});

describe('the bodies packed through the layouts', () => {
  it('header, vring state and address, log, config: member bytes where C has them', () => {
    const msg = encode(Req.SET_VRING_NUM, Flag.VERSION, vringState(1, 256));
    expect(msg.toString('hex')).toBe('08000000' + '01000000' + '08000000' + '01000000' + '00010000');
    expect(decodeHeader(msg)).toEqual({ request: Req.SET_VRING_NUM, flags: Flag.VERSION, size: 8 });
    expect(readVringState(vringState(3, 77))).toEqual({ index: 3, num: 77 });
    const addr = vringAddr(2, 0x1000n, 0x3000n, 0x2000n, 1, 0x4000n);
    const fields = VHOST_USER_LAYOUTS.vhost_vring_addr.fields;
    expect([addr.length, addr.readBigUInt64LE(fields.used_user_addr.offset), addr.readBigUInt64LE(fields.avail_user_addr.offset)]).toEqual([
      40,
      0x3000n,
      0x2000n,
    ]);
    expect(logPayload(0x10000, 0x200).toString('hex')).toBe('0000010000000000' + '0002000000000000');
    expect(configPayload(4, 2, 0, Uint8Array.of(9, 8)).toString('hex')).toBe('04000000' + '02000000' + '00000000' + '0908');
  });

  it('memory tables: nregions then the regions; ADD_MEM_REG: padding then the region', () => {
    const r = { gpa: asGpa(0x10_0000), size: 0x20_0000, uaddr: 0x7f00_0000_0000n, mmapOffset: asOffset(0x1000) };
    const table = memTable([r, { ...r, gpa: asGpa(0x40_0000) }]);
    expect(table.length).toBe(8 + 2 * 32);
    expect([table.readUInt32LE(0), table.readBigUInt64LE(8 + 32)]).toEqual([2, 0x40_0000n]);
    const one = memReg(r);
    expect(one.subarray(8).equals(table.subarray(8, 40))).toBe(true);
    expect(one.readBigUInt64LE(0)).toBe(0n);
  });

  it('IOTLB messages round-trip; several go back to back with their headers', () => {
    const m = { iova: 0x1_0000_1000, size: 0x1000, uaddr: 0x7f00_1234_5000n, perm: 3, type: 2 };
    expect(decodeIotlb(iotlbPayload(m))).toEqual(m);
    const two = iotlbMessages([m, { ...m, type: 3 }], Flag.VERSION | Flag.NEED_REPLY);
    expect(two.length).toBe(2 * (12 + 32));
    expect(decodeHeader(two, 44)).toEqual({ request: Req.IOTLB_MSG, flags: Flag.VERSION | Flag.NEED_REPLY, size: 32 });
    expect(decodeIotlb(two.subarray(44 + 12)).type).toBe(3);
  });
});
