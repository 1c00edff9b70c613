// The example machine's guest-physical layout. One place for every address the VMM, its guest program
// and its disk driver agree on; nothing here does anything.
//
//   0x0000_0000  RAM ("ram", --ram bytes, one memfd)
//     0x1000       the guest program (guest.ts)
//     0x2000       the mailbox page: the guest's counter, the DIMM the VMM offers it, the guest's ack
//     0x10_0000    the disk driver's rings and request headers (VirtioBlk)
//     0x20_0000    the disk driver's data buffers
//   0x4000_0000  the hotplug window: DIMMs are placed here, below 4 GiB (the guest runs in 32-bit mode)
//   0xfee0_0000  the x86 MSI window, which a VFIO device reports as reserved: FIND_FREE never places RAM there
//   0x1_0000_0000 end of the hotplug window

export const KiB = 2 ** 10;
export const MiB = 2 ** 20;
export const GiB = 2 ** 30;

/** The address space the VMM owns in its embedded broker. */
export const SPACE = 'vm0';

export const RAM_GPA = 0;
/** Smallest RAM that holds everything below (program, mailbox, disk rings and buffers). */
export const MIN_RAM = 4 * MiB;

export const CODE_GPA = 0x1000;

/** The mailbox: three 32-bit words in guest RAM that the guest and the VMM share. */
export const MAILBOX_GPA = 0x2000;
/** The guest writes its loop counter (its EBX) here on every iteration. */
export const COUNTER_GPA = MAILBOX_GPA;
/** The VMM writes the gpa of the DIMM the guest may use (0: none); the guest reads it every iteration. */
export const OFFER_GPA = MAILBOX_GPA + 8;
/** The guest writes the value of OFFER it is using this iteration: the VMM's proof it let go of a DIMM. */
export const ACK_GPA = MAILBOX_GPA + 16;

export const DISK_AREA_GPA = 0x10_0000;
export const DISK_BUFFERS_GPA = 0x20_0000;

export const HOTPLUG_MIN = 0x4000_0000;
export const HOTPLUG_MAX = 0x1_0000_0000;
/** DIMMs start on 2 MiB boundaries (THP and huge pages), or on their huge page size if larger. */
export const DIMM_ALIGN = 2 * MiB;
/** The guest writes one word in each of the first 256 pages of the DIMM it uses. */
export const MIN_DIMM = 2 * MiB;

/** The library's address formatter, re-exported for the files of this example. */
export { hex } from '../../index.js';
