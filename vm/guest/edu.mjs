// A driver for QEMU's `edu` PCI device (hw/misc/edu.c), programmed from user space through its VFIO
// device fd: BAR0 mmapped at its VFIO region offset, PCI_COMMAND written through the config region.
//
// BAR0 registers: 0x00 id (0x010000ed), 0x04 liveness (reads back ~value), 0x80 DMA source, 0x88 DMA
// destination, 0x90 DMA count, 0x98 DMA command (bit 0 start / busy, bit 1 device -> RAM, bit 2 irq).
// The device's own buffer is at "address" 0x40000-0x40fff. Pitfalls (QEMU 7.2):
//   - accesses below 0x80 must be 32-bit (the device ignores others), so every access here goes through a
//     Uint32Array: a DataView may be done byte by byte by V8's builtins, which the device drops;
//   - a 32-bit write to 0x80 / 0x88 / 0x90 sets the whole 64-bit register (upper half zero);
//   - DMA addresses are masked to 28 bits: keep IOVAs below 256 MiB;
//   - a transfer ending exactly at 0x41000 calls hw_error() and kills QEMU: at most 4095 bytes;
//   - without bus mastering (PCI_COMMAND bit 2) DMA goes nowhere;
//   - a DMA is run by a 100 ms QEMU_CLOCK_VIRTUAL timer: poll the command register's bit 0.
import fs from 'node:fs';
import { native, constants } from '/mmb/dist/native/index.js';

export const EDU_BUFFER = 0x40000;
export const EDU_BUFFER_SIZE = 0x1000;
/** The longest transfer QEMU 7.2's edu survives (see above). */
export const EDU_MAX_DMA = EDU_BUFFER_SIZE - 1;
export const EDU_ADDR_MASK = 2 ** 28 - 1;
const REG = { id: 0x00, live: 0x04, src: 0x80, dst: 0x88, count: 0x90, cmd: 0x98 };
const CMD = { start: 1, toRam: 2 };
const PCI_COMMAND = 0x04;
const PCI_COMMAND_MEMORY = 0x2;
const PCI_COMMAND_MASTER = 0x4;

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const hex = (n) => `0x${n.toString(16)}`;

export class Edu {
  /** @param {{name: string, fd: number, regionInfo(i: number): {offset: number, size: number, mmappable: boolean, flags: number}}} device */
  constructor(device) {
    this.name = device.name;
    this.fd = device.fd;
    const bar = device.regionInfo(0);
    const config = device.regionInfo(7);
    if (!bar.mmappable || bar.size < 0x100) throw new Error(`${this.name}: BAR0 is not mmappable (${JSON.stringify(bar)})`);
    this.bar = bar;
    this.configOffset = config.offset;
    // Memory decoding and bus mastering on: without MASTER, edu's DMA goes nowhere.
    const cmd = this.configRead16(PCI_COMMAND);
    this.configWrite16(PCI_COMMAND, cmd | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER);
    this.command = this.configRead16(PCI_COMMAND);
    if ((this.command & (PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)) !== (PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)) {
      throw new Error(`${this.name}: PCI_COMMAND reads ${hex(this.command)} after setting MEMORY|MASTER`);
    }
    this.mapping = native.mmap(this.fd, bar.offset, bar.size, constants.PROT_READ | constants.PROT_WRITE, constants.MAP_SHARED);
    this.regs = new Uint32Array(this.mapping.buffer, 0, 0x100 / 4);
    this.id = this.read(REG.id);
    if ((this.id & 0xffff) !== 0x00ed) throw new Error(`${this.name}: edu id register reads ${hex(this.id)}, expected 0x..0000ed`);
    this.write(REG.live, 0x12345678);
    const live = this.read(REG.live);
    if (live !== ~0x12345678 >>> 0) throw new Error(`${this.name}: liveness register reads ${hex(live)}, expected ${hex(~0x12345678 >>> 0)}`);
  }

  configRead16(off) {
    const b = Buffer.alloc(2);
    if (fs.readSync(this.fd, b, 0, 2, this.configOffset + off) !== 2) throw new Error(`${this.name}: short config read at ${hex(off)}`);
    return b.readUInt16LE(0);
  }

  configWrite16(off, value) {
    const b = Buffer.alloc(2);
    b.writeUInt16LE(value, 0);
    if (fs.writeSync(this.fd, b, 0, 2, this.configOffset + off) !== 2) throw new Error(`${this.name}: short config write at ${hex(off)}`);
  }

  read(reg) {
    return this.regs[reg / 4];
  }

  write(reg, value) {
    this.regs[reg / 4] = value >>> 0;
  }

  /**
   * One DMA: `toRam` false copies `count` bytes from IOVA `src` into the device buffer at `dst`
   * (0x40000 + offset); true copies the device buffer at `src` to IOVA `dst`. Resolves when the device
   * says it is done (it does not say whether the IOMMU let the transfer through: check the memory).
   */
  async dma({ src, dst, count, toRam }, timeoutMs = 5000) {
    const [bufAddr, ramAddr] = toRam ? [src, dst] : [dst, src];
    if (count < 1 || count > EDU_MAX_DMA)
      throw new RangeError(`edu DMA of ${count} bytes: 1 to ${EDU_MAX_DMA} (QEMU 7.2 aborts on a transfer ending at the buffer's end)`);
    if (bufAddr < EDU_BUFFER || bufAddr + count >= EDU_BUFFER + EDU_BUFFER_SIZE)
      throw new RangeError(`edu buffer range ${hex(bufAddr)}+${count} outside 0x40000-0x40ffe`);
    if (ramAddr + count - 1 > EDU_ADDR_MASK) throw new RangeError(`IOVA ${hex(ramAddr)} is beyond edu's 28-bit DMA mask`);
    if (this.read(REG.cmd) & CMD.start) throw new Error(`${this.name}: a DMA is still running`);
    this.write(REG.src, src);
    this.write(REG.dst, dst);
    this.write(REG.count, count);
    this.write(REG.cmd, CMD.start | (toRam ? CMD.toRam : 0));
    const deadline = Date.now() + timeoutMs;
    while (this.read(REG.cmd) & CMD.start) {
      if (Date.now() > deadline) throw new Error(`${this.name}: DMA ${hex(src)} -> ${hex(dst)} (${count} bytes) still running after ${timeoutMs} ms`);
      await sleep(10);
    }
  }

  /** RAM (IOVA `from`) -> device buffer -> RAM (IOVA `to`), `count` bytes. */
  async copy(from, to, count) {
    await this.dma({ src: from, dst: EDU_BUFFER, count, toRam: false });
    await this.dma({ src: EDU_BUFFER, dst: to, count, toRam: true });
  }

  close() {
    if (this.mapping) native.munmap(this.mapping);
    this.mapping = undefined;
  }
}
