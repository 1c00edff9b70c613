// A small, strict validator for decoded msgpack values, with TypeScript types inferred from the
// schemas so the checks and the types cannot drift. Kernel-uAPI habits: unknown fields are refused,
// integers must be exact and in range, nil counts as "absent" only where a field is optional.
// Every failure is a BadMessageError whose message names the field path.
import { BadMessageError } from './errors.js';

export interface Schema<T> {
  /** Short description used in docs and error messages ("u32", "name", "array of region"). */
  readonly describe: string;
  readonly optional?: boolean;
  /** For a primitive, the `typeof` of every value it accepts: a union skips it for any other value. */
  readonly jsType?: 'number' | 'string' | 'boolean';
  parse(value: unknown, path: string): T;
}

export type Infer<S> = S extends Schema<infer T> ? T : never;

function fail(path: string, what: string): never {
  throw new BadMessageError(`${path}: ${what}`);
}

function typeName(v: unknown): string {
  if (v === null) return 'nil';
  if (Array.isArray(v)) return 'array';
  if (v instanceof Uint8Array) return 'bin';
  if (typeof v === 'object') return v.constructor && v.constructor !== Object ? v.constructor.name : 'map';
  return typeof v;
}

/** An unsigned integer in [0, max]; max defaults to Number.MAX_SAFE_INTEGER (exact in a JS number). */
export function uint(max: number = Number.MAX_SAFE_INTEGER): Schema<number> {
  const describe = max === 0xffff_ffff ? 'u32' : max === Number.MAX_SAFE_INTEGER ? 'uint' : `uint <= ${max}`;
  return {
    describe,
    jsType: 'number',
    parse(v, path) {
      if (typeof v !== 'number' || !Number.isInteger(v)) fail(path, `expected ${describe}, got ${typeName(v)}`);
      if (v < 0 || v > max) fail(path, `${v} is out of range for ${describe}`);
      return v;
    },
  };
}

export const u32 = (): Schema<number> => uint(0xffff_ffff);

/** A UTF-8 string of at most maxBytes bytes; `name` strings additionally forbid control characters. */
export function str(maxBytes: number, opts: { minBytes?: number; printable?: boolean } = {}): Schema<string> {
  const min = opts.minBytes ?? 0;
  const describe = opts.printable ? `name (${min}..${maxBytes} bytes)` : `str (<= ${maxBytes} bytes)`;
  return {
    describe,
    jsType: 'string',
    parse(v, path) {
      if (typeof v !== 'string') fail(path, `expected string, got ${typeName(v)}`);
      const n = Buffer.byteLength(v, 'utf8');
      if (n < min || n > maxBytes) fail(path, `string of ${n} bytes is outside ${min}..${maxBytes}`);
      // eslint-disable-next-line no-control-regex
      if (opts.printable && /[\u0000-\u001f\u007f]/.test(v)) fail(path, 'control characters are not allowed');
      return v;
    },
  };
}

export function bool(): Schema<boolean> {
  return {
    describe: 'bool',
    jsType: 'boolean',
    parse(v, path) {
      if (typeof v !== 'boolean') fail(path, `expected bool, got ${typeName(v)}`);
      return v;
    },
  };
}

export function literal<const T extends string | number>(...values: T[]): Schema<T> {
  const describe = values.map((x) => JSON.stringify(x)).join(' | ');
  return {
    describe,
    parse(v, path) {
      if (!(values as unknown[]).includes(v)) fail(path, `expected ${describe}, got ${JSON.stringify(v) ?? typeName(v)}`);
      return v as T;
    },
  };
}

/**
 * A value either schema accepts. An alternative whose `jsType` does not match the value is not tried, so
 * a valid value costs no exception (a region named in a COMMIT, on the broker's hot path).
 */
export function either<A, B>(a: Schema<A>, b: Schema<B>): Schema<A | B> {
  const describe = `${a.describe} | ${b.describe}`;
  const alternatives: readonly Schema<A | B>[] = [a, b];
  return {
    describe,
    parse(v, path) {
      for (const s of alternatives) {
        if (s.jsType !== undefined && typeof v !== s.jsType) continue;
        try {
          return s.parse(v, path);
        } catch {
          // Try the other one.
        }
      }
      return fail(path, `expected ${describe}, got ${typeName(v)}`);
    },
  };
}

export function array<T>(of: Schema<T>, maxItems: number): Schema<T[]> {
  return {
    describe: `array of ${of.describe} (<= ${maxItems})`,
    parse(v, path) {
      if (!Array.isArray(v)) fail(path, `expected array, got ${typeName(v)}`);
      if (v.length > maxItems) fail(path, `${v.length} items exceed the limit of ${maxItems}`);
      // As object(): returned as it came unless an item parses to something else.
      let out: T[] | undefined;
      for (let i = 0; i < v.length; i++) {
        const raw: unknown = v[i];
        const parsed = parseAt(of, raw, path, i);
        if (out === undefined && parsed !== raw) out = v.slice(0, i) as T[];
        if (out !== undefined) out.push(parsed);
      }
      return out ?? (v as T[]);
    },
  };
}

export interface OptionalSchema<T> extends Schema<T | undefined> {
  readonly optional: true;
}

/** Marks an object field as optional: absent or nil both mean "not given". */
export function optional<T>(s: Schema<T>): OptionalSchema<T> {
  return {
    describe: `${s.describe}, optional`,
    optional: true,
    parse(v, path) {
      return v === undefined || v === null ? undefined : s.parse(v, path);
    },
  };
}

type Fields = Record<string, Schema<unknown>>;
type OptionalKeys<F extends Fields> = { [K in keyof F]: F[K] extends OptionalSchema<unknown> ? K : never }[keyof F];
type RequiredKeys<F extends Fields> = Exclude<keyof F, OptionalKeys<F>>;
type Simplify<T> = { [K in keyof T]: T[K] } & {};
export type ObjectOf<F extends Fields> = Simplify<{ [K in RequiredKeys<F>]: Infer<F[K]> } & { [K in OptionalKeys<F>]?: Exclude<Infer<F[K]>, undefined> }>;

export interface ObjectSchema<F extends Fields> extends Schema<ObjectOf<F>> {
  readonly fields: F;
}

export function isPlainMap(v: unknown): v is Record<string, unknown> {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) return false;
  const proto: unknown = Object.getPrototypeOf(v);
  return proto === Object.prototype || proto === null;
}

/**
 * A msgpack map with exactly these string keys (optional ones may be missing or nil).
 * `open: true` tolerates unknown keys (used only for replies whose documented form says "extra fields
 * may follow"); a strict object refuses them, as the kernel refuses unknown flags.
 */
export function object<F extends Fields>(fields: F, opts: { open?: boolean } = {}): ObjectSchema<F> {
  const keys = Object.keys(fields);
  return {
    describe: 'map',
    fields,
    parse(v, path) {
      if (!isPlainMap(v)) fail(path, `expected map, got ${typeName(v)}`);
      if (!opts.open) {
        for (const k in v) if (!Object.hasOwn(fields, k)) fail(path, `unknown field "${k}"`);
      }
      // A strict map whose every field parses to itself (primitives, and maps and arrays that needed no
      // change) is returned as it came: the decoder made it for us alone, and copying every map of every
      // message (65,536 regions in a large sync) costs more than checking it. The first field that parses
      // to something else (a nil optional, a nested copy) starts the copy; an open map always copies,
      // which drops its unknown fields.
      let out: Record<string, unknown> | undefined = opts.open ? {} : undefined;
      for (let i = 0; i < keys.length; i++) {
        const k = keys[i] as string;
        const s = fields[k] as Schema<unknown>;
        const raw = Object.hasOwn(v, k) ? v[k] : undefined;
        if (raw === undefined && !s.optional) fail(`${path}.${k}`, `missing ${s.describe}`);
        const parsed = parseAt(s, raw, path, k);
        if (out === undefined && parsed !== raw) {
          out = {};
          for (let j = 0; j < i; j++) {
            const kj = keys[j] as string;
            if (Object.hasOwn(v, kj)) out[kj] = v[kj];
          }
        }
        if (out !== undefined && parsed !== undefined) out[k] = parsed;
      }
      return (out ?? v) as ObjectOf<F>;
    },
  };
}

/**
 * Parses the member `key` of a map or array at `path`. Its path is built only when it fails: tried first
 * without one, then again with it, to throw the error that names it. (Building `path.key` for every field
 * of every message was the largest cost of validation; schemas are pure, so the retry fails the same way.)
 */
function parseAt<T>(s: Schema<T>, raw: unknown, path: string, key: string | number): T {
  try {
    return s.parse(raw, '');
  } catch {
    return s.parse(raw, typeof key === 'number' ? `${path}[${key}]` : `${path}.${key}`);
  }
}

/** A union of maps told apart by the string field `tag` (e.g. op: "add" | "remove" | "set"). */
export function tagged<const Tag extends string, M extends Record<string, ObjectSchema<Fields>>>(
  tag: Tag,
  variants: M,
): Schema<{ [K in keyof M]: Infer<M[K]> }[keyof M]> {
  const names = Object.keys(variants);
  return {
    describe: `map tagged by ${tag} (${names.join(', ')})`,
    parse(v, path) {
      if (!isPlainMap(v)) fail(path, `expected map, got ${typeName(v)}`);
      const t = v[tag];
      if (typeof t !== 'string' || !Object.hasOwn(variants, t)) {
        fail(`${path}.${tag}`, `expected one of ${names.join(', ')}, got ${JSON.stringify(t) ?? typeName(t)}`);
      }
      return (variants[t] as ObjectSchema<Fields>).parse(v, path) as { [K in keyof M]: Infer<M[K]> }[keyof M];
    },
  };
}

/**
 * A msgpack bin, handed to `decode` (which throws a BadMessageError naming the path, or returns what the
 * bytes say). Only fields of feature-gated extensions take one: validate.ts refuses a body holding a bin
 * unless its message allows bin under a negotiated feature (MessageSpec.binFeature).
 */
export function bin<T>(describe: string, decode: (bytes: Uint8Array, path: string) => T): Schema<T> {
  return {
    describe: `bin (${describe})`,
    parse(v, path) {
      if (!(v instanceof Uint8Array)) fail(path, `expected bin, got ${typeName(v)}`);
      return decode(v, path);
    },
  };
}

/** Any value; used only where a later, specific schema takes over (a REPLY's result). */
export function unknownValue(): Schema<unknown> {
  return { describe: 'any', parse: (v) => v };
}
