// Hostile sessions for the socket fuzzer: deterministic from a seed. A session is what one connection
// sends: a sequence of chunks of bytes, each with descriptors of some kind attached. Most sessions start
// like a real client (HELLO, ATTACH) so the hostile part reaches deep into the broker, then send mutated
// messages, lying headers, random bytes, and every kind of descriptor where it does not belong.
import fs from 'node:fs';
import { constants, native } from '../native/index.js';
import { HEADER_SIZE, Msg, encodeBody } from '../protocol/index.js';
import type { Rng } from '../testkit/rng.js';

export type FdKind = 'sealed-memfd' | 'unsealed-memfd' | 'small-memfd' | 'readonly-memfd' | 'pipe' | 'socket' | 'devnull' | 'file';
const FD_KINDS: FdKind[] = ['sealed-memfd', 'unsealed-memfd', 'small-memfd', 'readonly-memfd', 'pipe', 'socket', 'devnull', 'file'];

export interface Chunk {
  bytes: Buffer;
  fds: FdKind[];
}

/** Creates descriptors of a kind; returns them and what to close afterwards (some kinds need two fds). */
export function makeFd(kind: FdKind, tmpFile: string): { fd: number; extra: number[] } {
  switch (kind) {
    case 'sealed-memfd':
    case 'unsealed-memfd':
    case 'small-memfd': {
      const fd = native.memfdCreate(`fuzz-${kind}`, constants.MFD_CLOEXEC | constants.MFD_ALLOW_SEALING);
      native.ftruncate(fd, kind === 'small-memfd' ? 4096 : 1 << 20);
      if (kind !== 'unsealed-memfd') native.addSeals(fd, constants.F_SEAL_SHRINK);
      return { fd, extra: [] };
    }
    case 'readonly-memfd': {
      const rw = native.memfdCreate('fuzz-ro', constants.MFD_CLOEXEC | constants.MFD_ALLOW_SEALING);
      native.ftruncate(rw, 1 << 20);
      native.addSeals(rw, constants.F_SEAL_SHRINK);
      return { fd: fs.openSync(`/proc/self/fd/${rw}`, 'r'), extra: [rw] };
    }
    case 'pipe':
    case 'socket': {
      const [a, b] = native.socketPair();
      return { fd: a, extra: [b] };
    }
    case 'devnull':
      return { fd: fs.openSync('/dev/null', 'r'), extra: [] };
    case 'file':
      return { fd: fs.openSync(tmpFile, 'r+'), extra: [] };
  }
}

function frame(body: unknown, nfds: number, opts: { lieLength?: number; flags?: number } = {}): Buffer {
  const b = Buffer.from(encodeBody(body));
  const h = Buffer.alloc(HEADER_SIZE);
  h.writeUInt32LE(Math.max(0, b.length + (opts.lieLength ?? 0)), 0);
  h.writeUInt16LE(nfds, 4);
  h.writeUInt16LE(opts.flags ?? 0, 6);
  return Buffer.concat([h, b]);
}

/** Values that break things: wrong types, huge and negative numbers, long strings, nesting. */
function nasty(r: Rng): unknown {
  const choices: (() => unknown)[] = [
    () => -r.below(1 << 30),
    () => 2 ** 53 + r.below(1000),
    () => 2 ** 64,
    () => 0.5 + r.below(10),
    () => 'x'.repeat(r.below(300)),
    () => '\u0000bad\u0007',
    () => null,
    () => true,
    () => [],
    () => [1, [2, [3, [4]]]],
    () => ({ nested: { deep: { deeper: r.below(10) } } }),
    () => r.below(2 ** 32),
    () => 0,
    () => '',
    () => 'vm0',
  ];
  return r.pick(choices)();
}

/** A valid-looking message of each client-to-broker kind, to mutate. */
function template(r: Rng, id: number): Record<string, unknown> {
  const t = r.pick([
    Msg.HELLO,
    Msg.STATUS,
    Msg.ATTACH,
    Msg.BACKING_ADD,
    Msg.BACKING_DROP,
    Msg.COMMIT,
    Msg.REPORT,
    Msg.FIND_FREE,
    Msg.DIRTY_SYNC,
    Msg.PAUSE,
    Msg.ACK,
    Msg.NACK,
  ]);
  const gpa = r.below(64) * 0x10_0000;
  switch (t) {
    case Msg.HELLO:
      return { t, id, version: r.chance(0.8) ? 1 : r.below(5), features: r.below(128) };
    case Msg.STATUS:
      return { t, id, space: r.pick(['vm0', 'nope', 'x'.repeat(70)]) };
    case Msg.ATTACH:
      return {
        t,
        id,
        space: 'vm0',
        role: r.pick(['owner', 'subscriber', 'observer', 'king']),
        kind: 'fuzz',
        ...(r.chance(0.3) ? { limits: { maxRegions: r.below(4), coalesce: r.chance(0.5) } } : {}),
        ...(r.chance(0.2) ? { resume: { epoch: 'e', generation: r.below(100), backings: [r.below(10)] } } : {}),
      };
    case Msg.BACKING_ADD:
      return { t, id, name: 'fuzz' };
    case Msg.BACKING_DROP:
      return { t, id, backing: r.below(10) };
    case Msg.COMMIT:
      return {
        t,
        id,
        ops: Array.from({ length: 1 + r.below(3) }, () =>
          r.pick([
            {
              op: 'add',
              name: `f${r.below(20)}`,
              gpa,
              size: r.pick([0, 4096, 0x10_0000, 3]),
              backing: r.below(5),
              offset: r.pick([0, 4096, 1 << 40]),
              readonly: r.chance(0.3),
              logDirty: r.chance(0.3),
            },
            { op: 'remove', region: r.chance(0.5) ? r.below(10) : `f${r.below(20)}` },
            { op: 'set', region: r.below(10), logDirty: r.chance(0.5) },
          ]),
        ),
      };
    case Msg.REPORT:
      return { t, id, reserved: [{ start: gpa, last: gpa + r.below(1 << 20) }], dmaAvailable: r.below(10), pinned: r.below(1 << 20) };
    case Msg.FIND_FREE:
      return { t, id, size: r.pick([0, 4096, 3, 2 ** 52]), align: r.pick([4096, 3, 0, 2 ** 21]) };
    case Msg.DIRTY_SYNC:
      return { t, id };
    case Msg.PAUSE:
      return { t, id, paused: r.chance(0.5) };
    case Msg.ACK:
      return { t, seq: r.below(20) };
    default:
      return { t, seq: r.below(20), error: { code: 'MMB_ERR_CLIENT_REFUSED', errno: 'EIO', message: 'fuzz' } };
  }
}

/** How many descriptors the template's message takes (BACKING_ADD, DIRTY_SYNC: one). */
const takesFd = (m: Record<string, unknown>) => m.t === Msg.BACKING_ADD || m.t === Msg.DIRTY_SYNC;

/** One session: a prologue most of the time, then `frames` hostile or half-hostile chunks. */
export function session(r: Rng, frames: number): Chunk[] {
  const out: Chunk[] = [];
  let id = 1;
  if (r.chance(0.85)) {
    out.push({ bytes: frame({ t: Msg.HELLO, id: id++, version: 1, features: r.chance(0.7) ? 0x7f : r.below(128) }, 0), fds: [] });
    if (r.chance(0.8))
      out.push({
        bytes: frame({ t: Msg.ATTACH, id: id++, space: 'vm0', role: r.pick(['owner', 'subscriber', 'subscriber', 'observer']), kind: 'fuzz' }, 0),
        fds: [],
      });
  }
  for (let i = 0; i < frames; i++) {
    const m = template(r, id++);
    // Most frames are valid-looking, so a session lives long enough to reach deep states; the stream
    // breakers (lying headers, random bytes, truncation) end a session, so they come less often.
    const kind = r.below(20);
    if (kind < 13) {
      // A valid-looking message, perhaps with one field made nasty, with the fds it takes (of any kind).
      if (r.chance(0.6)) {
        const keys = Object.keys(m).filter((k) => k !== 't');
        if (keys.length > 0) m[r.pick(keys)] = nasty(r);
        else m.extra = nasty(r);
      }
      const n = takesFd(m) ? (r.chance(0.85) ? 1 : r.below(3)) : r.chance(0.1) ? 1 + r.below(3) : 0;
      out.push({ bytes: frame(m, n), fds: Array.from({ length: n }, () => r.pick(FD_KINDS)) });
    } else if (kind < 15) {
      // A header that lies about the fds it carries.
      const declared = r.below(4);
      const sent = r.below(4);
      out.push({ bytes: frame(m, declared), fds: Array.from({ length: sent }, () => r.pick(FD_KINDS)) });
    } else if (kind < 16) {
      // A header that lies about its length or sets reserved flags.
      out.push({ bytes: frame(m, 0, r.chance(0.5) ? { lieLength: r.pick([-3, 5, 1 << 24]) } : { flags: 1 + r.below(0xffff) }), fds: [] });
    } else if (kind < 17) {
      // Random bytes.
      const b = Buffer.alloc(1 + r.below(200));
      for (let j = 0; j < b.length; j++) b[j] = r.below(256);
      out.push({ bytes: b, fds: r.chance(0.2) ? [r.pick(FD_KINDS)] : [] });
    } else if (kind < 19) {
      // A valid frame of a message id nobody knows, or one sent the wrong way.
      out.push({ bytes: frame({ t: r.pick([0, 11, 15, 31, 32, 33, 36, 99, 255, 65535]), id: id++, x: nasty(r) }, 0), fds: [] });
    } else {
      // A truncated frame: the connection ends in the middle of it.
      const f = frame(m, 0);
      out.push({ bytes: f.subarray(0, 1 + r.below(f.length - 1)), fds: [] });
      break;
    }
  }
  return out;
}
