// The one struct-layout format of the client library: every structure it hands to the kernel or puts on a
// wire (KVM and VFIO / iommufd ioctl arguments, vhost-user message bodies) is a table of members with their
// offset and size, as C lays it out, and is packed and parsed by the functions here.
//
// Each table says where its layout comes from (`header`), and a test compiles the same members with gcc
// against that definition (test/helpers/layout-probe.ts: the kernel's uAPI headers for KVM and VFIO, the
// vhost-user spec's structs for vhost-user) and compares every offset and size.
//
// Byte order: the machine's own. The kernel's uAPI structs are native-endian, and so is every number of the
// vhost-user protocol ("the machine native byte order"). Pure data and DataView code, no native import.
import os from 'node:os';
import { hex } from '../../protocol/index.js';

const LE = os.endianness() === 'LE';

/** A scalar member, or (with `count` or a size that is not 1, 2, 4 or 8) an array or embedded struct. */
export interface Field {
  offset: number;
  /** Bytes: of the scalar, or of the whole array / embedded struct. */
  size: number;
  /** An array of `count` elements of size / count bytes each; only its offset is used here. */
  count?: number;
  /** An embedded struct: its name in the same table. */
  struct?: string;
  /** The member's C path when it is not the field's name (`mmio.phys_addr` for `mmio_phys_addr`). */
  c?: string;
}

export interface Layout {
  /** Bytes we pack (see `otherSizes`). Flexible array members are not counted, as in C's sizeof. */
  size: number;
  fields: Readonly<Record<string, Field>>;
  /** Where the definition lives: a uAPI header ('linux/vfio.h') or a spec ('vhost-user.rst'). */
  header: string;
  /** Sizes the struct has in other versions (members appended later, which we do not use). */
  otherSizes?: readonly number[];
  /** Kernel release that introduced the struct, when it is newer than the installed headers. */
  since?: string;
  /** Only some members are listed (the rest are never read or written here, e.g. kvm_run's other exits). */
  partial?: boolean;
}

/** A scalar member at `offset` (u8, u16, u32 or u64). */
export const f = (offset: number, size: 1 | 2 | 4 | 8, c?: string): Field => (c === undefined ? { offset, size } : { offset, size, c });

/** The members of `F` that are scalars: what pack writes and unpack reads. */
export type ScalarKeys<F> = {
  [K in keyof F]: F[K] extends { count: number } ? never : F[K] extends { struct: string } ? never : K;
}[keyof F] &
  string;

/** A JS number or a bigint for 64-bit fields (IOVA ranges reach 2^64 - 1). */
export type U64 = number | bigint;

const isScalar = (at: Field): at is Field & { size: 1 | 2 | 4 | 8 } =>
  at.count === undefined && at.struct === undefined && (at.size === 1 || at.size === 2 || at.size === 4 || at.size === 8);

/** Every member's offset by name, with `size`: the shape code indexing a struct by hand reads (REGS.rip). */
export function offsets<L extends Layout>(layout: L): { readonly size: number } & { readonly [K in keyof L['fields']]: number } {
  const out: Record<string, number> = { size: layout.size };
  for (const [name, at] of Object.entries(layout.fields)) out[name] = at.offset;
  return out as { readonly size: number } & { readonly [K in keyof L['fields']]: number };
}

/**
 * Packing and parsing for one table of layouts, typed by its struct names and their members. The leading
 * size word of a VFIO / iommufd struct (argsz, or size at offset 0) is set to the buffer's length unless
 * given; every other byte not given stays zero (reserved members, padding).
 */
export function layoutCodec<T extends Record<string, Layout>>(table: T) {
  type Name = keyof T & string;
  type Values<S extends Name> = { [K in ScalarKeys<T[S]['fields']>]?: number | bigint };
  type Parsed<S extends Name> = { [K in ScalarKeys<T[S]['fields']>]: bigint };
  const fieldOf = (name: string, layout: Layout, field: string): Field & { size: 1 | 2 | 4 | 8 } => {
    const at = layout.fields[field];
    if (!at) throw new RangeError(`${name} has no field ${field}`);
    if (!isScalar(at)) throw new RangeError(`${name}.${field} is an array or embedded struct: pack or read its elements by offset`);
    return at;
  };

  /** A zeroed buffer of `total` bytes (default the struct's size) with the given members set. */
  function pack<S extends Name>(name: S, values: Values<S>, total: number = table[name]!.size): Uint8Array {
    const layout: Layout = table[name]!;
    if (total < layout.size) throw new RangeError(`${name}: ${total} bytes is less than its ${layout.size}`);
    const buf = new Uint8Array(total);
    const sizeField = 'argsz' in layout.fields ? 'argsz' : layout.fields.size?.offset === 0 && layout.fields.size.size === 4 ? 'size' : undefined;
    const all: Record<string, number | bigint | undefined> = {
      ...(sizeField ? { [sizeField]: total } : {}),
      ...(values as Record<string, number | bigint | undefined>),
    };
    for (const [field, value] of Object.entries(all)) {
      if (value === undefined) continue;
      write(buf, fieldOf(name, layout, field), 0, value, `${name}.${field}`);
    }
    return buf;
  }

  /** Sets members of `name` placed at `offset` of `buf` (a struct that follows or is embedded in another). */
  function packInto<S extends Name>(name: S, buf: Uint8Array, offset: number, values: Values<S>): void {
    const layout: Layout = table[name]!;
    if (offset < 0 || offset + layout.size > buf.length) throw new RangeError(`${name} at ${offset} runs past the ${buf.length}-byte buffer`);
    for (const [field, value] of Object.entries(values as Record<string, number | bigint | undefined>)) {
      if (value === undefined) continue;
      write(buf, fieldOf(name, layout, field), offset, value, `${name}.${field}`);
    }
  }

  /** Reads every scalar member of `name` at `offset` of `buf` (as bigint). */
  function unpack<S extends Name>(name: S, buf: Uint8Array, offset = 0): Parsed<S> {
    const layout: Layout = table[name]!;
    const scalars = Object.entries(layout.fields).filter((e): e is [string, Field & { size: 1 | 2 | 4 | 8 }] => isScalar(e[1]));
    if (offset < 0 || offset + layout.size > buf.length) {
      // Some structs are read with only their leading part present (a cap header, a short reply).
      const end = Math.max(...scalars.map(([, x]) => x.offset + x.size));
      if (offset < 0 || offset + end > buf.length) throw new RangeError(`${name} at ${offset} runs past the ${buf.length}-byte buffer`);
    }
    const out: Record<string, bigint> = {};
    for (const [field, at] of scalars) out[field] = read(buf, offset + at.offset, at.size);
    return out as Parsed<S>;
  }

  /** One member, as a number (throws if it is not exactly representable). */
  function get<S extends Name>(name: S, buf: Uint8Array, field: ScalarKeys<T[S]['fields']>, offset = 0): number {
    const at = fieldOf(name, table[name]!, field);
    return toNumber(read(buf, offset + at.offset, at.size), `${name}.${field}`);
  }

  return { pack, packInto, unpack, get };
}

export function toNumber(v: bigint, what: string): number {
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new RangeError(`${what} = ${hex(v)} does not fit a JS number`);
  return Number(v);
}

function view(buf: Uint8Array): DataView {
  return new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
}

function write(buf: Uint8Array, at: { offset: number; size: 1 | 2 | 4 | 8 }, base: number, value: number | bigint, what: string): void {
  const dv = view(buf);
  const off = base + at.offset;
  const max = 2n ** BigInt(at.size * 8) - 1n;
  let v: bigint;
  if (typeof value === 'bigint') v = value;
  else {
    if (!Number.isSafeInteger(value)) throw new RangeError(`${what}: ${value} is not a safe integer`);
    // Signed 32-bit fields (an fd of -1) are written as their two's complement.
    v = value < 0 && at.size === 4 && value >= -(2 ** 31) ? BigInt(value >>> 0) : BigInt(value);
  }
  if (v < 0n || v > max) throw new RangeError(`${what}: ${value} does not fit ${at.size} bytes`);
  switch (at.size) {
    case 1:
      dv.setUint8(off, Number(v));
      return;
    case 2:
      dv.setUint16(off, Number(v), LE);
      return;
    case 4:
      dv.setUint32(off, Number(v), LE);
      return;
    case 8:
      dv.setBigUint64(off, v, LE);
  }
}

function read(buf: Uint8Array, offset: number, size: 1 | 2 | 4 | 8): bigint {
  const dv = view(buf);
  switch (size) {
    case 1:
      return BigInt(dv.getUint8(offset));
    case 2:
      return BigInt(dv.getUint16(offset, LE));
    case 4:
      return BigInt(dv.getUint32(offset, LE));
    case 8:
      return dv.getBigUint64(offset, LE);
  }
}
