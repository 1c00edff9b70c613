// The guest: a 38-byte program for 32-bit flat mode that never halts. It stands in for a guest OS in the
// two ways that matter to memory hotplug:
//   - its state lives in registers as well as in memory (EBX counts iterations and is stored to memory on
//     every one), so a migration that loses the registers shows: the counter would restart from 0;
//   - it uses hotplugged memory only when the VMM offers it, and says when it stopped using a DIMM, as a
//     guest OS onlines a DIMM and offlines it before acknowledging an eject request (ACPI _EJ0).
//
//   loop: inc ebx
//         mov [COUNTER], ebx          ; progress, visible to the VMM
//         mov esi, [OFFER]            ; the DIMM the VMM offers (0: none)
//         mov [ACK], esi              ; "this iteration I use ESI"
//         test esi, esi
//         jz loop
//         mov eax, ebx
//         and eax, 0xff
//         shl eax, 12
//         mov [esi + eax], ebx        ; one word in page (EBX mod 256) of the DIMM
//         jmp loop
//
// ACK is written before the DIMM is touched and x86 stores are seen in program order: once the VMM has
// changed OFFER and then reads an ACK different from the DIMM, the guest will not touch that DIMM again.
import { ACK_GPA, COUNTER_GPA, OFFER_GPA } from './layout.js';

/** The guest program, to be placed at CODE_GPA (any address below 4 GiB works: it has no absolute jumps). */
export function guestProgram(): Uint8Array {
  const code = new Uint8Array(38);
  const dv = new DataView(code.buffer);
  let at = 0;
  const bytes = (...b: number[]) => {
    code.set(b, at);
    at += b.length;
  };
  const u32 = (v: number) => {
    dv.setUint32(at, v, true);
    at += 4;
  };
  bytes(0x43); //                        inc ebx
  bytes(0x89, 0x1d);
  u32(COUNTER_GPA); // mov [COUNTER], ebx
  bytes(0x8b, 0x35);
  u32(OFFER_GPA); //   mov esi, [OFFER]
  bytes(0x89, 0x35);
  u32(ACK_GPA); //     mov [ACK], esi
  bytes(0x85, 0xf6); //                  test esi, esi
  bytes(0x74, 0x100 - (at + 2)); //      jz loop (back to 0)
  bytes(0x89, 0xd8); //                  mov eax, ebx
  bytes(0x25);
  u32(0xff); //             and eax, 0xff
  bytes(0xc1, 0xe0, 0x0c); //            shl eax, 12
  bytes(0x89, 0x1c, 0x06); //            mov [esi + eax], ebx
  bytes(0xeb, 0x100 - (at + 2)); //      jmp loop
  if (at !== code.length) throw new Error(`internal: the guest program is ${at} bytes, not ${code.length}`);
  return code;
}

/** What the guest has published in its mailbox page, read through one of the VMM's mappings. */
export interface Mailbox {
  /** EBX as of the guest's last iteration. */
  counter: number;
  /** The DIMM gpa the VMM offers (0: none). */
  offer: number;
  /** The DIMM gpa the guest used in its last iteration (0: none). */
  ack: number;
}

export function readMailbox(read: (gpa: number, length: number) => Uint8Array): Mailbox {
  const word = (gpa: number) => Buffer.from(read(gpa, 4)).readUInt32LE(0);
  return { counter: word(COUNTER_GPA), offer: word(OFFER_GPA), ack: word(ACK_GPA) };
}
