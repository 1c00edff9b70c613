// The wire format: hex fixtures for every message (both directions), every truncated prefix decodes as
// "incomplete", byte-at-a-time feeding gives the same frames, and malformed frames get typed errors.
import fs from 'node:fs';
import { describe, expect, it } from 'vitest';
import {
  FrameDecoder,
  MESSAGES,
  Msg,
  decodeBody,
  encodeBody,
  encodeFrame,
  encodeSeqFrame,
  integerizeFloats,
  parseToBroker,
  parseToClient,
  setSeq,
  type Frame,
} from '../protocol/index.js';
import { SAMPLES } from './fixtures/samples.js';
import { thrownCode as codeOf } from './helpers/throws.js';

const FIXTURES = new URL('./fixtures/frames.json', import.meta.url);
if (process.env.UPDATE_FIXTURES) {
  const out = Object.fromEntries(SAMPLES.map((s) => [s.name, encodeFrame(s.message, s.fds, 1 << 20).toString('hex')]));
  fs.writeFileSync(FIXTURES, JSON.stringify(out, null, 2) + '\n');
}
const frames = JSON.parse(fs.readFileSync(FIXTURES, 'utf8')) as Record<string, string>;

const limits = { maxFrameBytes: 1 << 20, maxFdsPerFrame: 64, maxPendingFds: 256 };
/** Fake fds for decoder tests: the decoder only carries them, it never touches them. */
const fakeFds = (n: number, base = 1000) => Array.from({ length: n }, (_, i) => base + i);

function drain(d: FrameDecoder): Frame[] {
  const out: Frame[] = [];
  for (let f = d.next(); f; f = d.next()) out.push(f);
  return out;
}

describe('wire fixtures', () => {
  it('has a fixture for every message id', () => {
    const ids = new Set(SAMPLES.map((s) => s.message.t));
    for (const id of MESSAGES.keys()) expect(ids, `message ${id}`).toContain(id);
    expect(Object.keys(frames).sort()).toEqual(SAMPLES.map((s) => s.name).sort());
  });

  for (const s of SAMPLES) {
    it(`${s.name}: encodes to the fixture bytes and decodes back to the same message`, () => {
      const bytes = Buffer.from(frames[s.name] as string, 'hex');
      expect(encodeFrame(s.message, s.fds, 1 << 20).toString('hex')).toBe(frames[s.name]);
      const d = new FrameDecoder(limits);
      const fds = fakeFds(s.fds);
      d.push(bytes, fds);
      const [frame, ...rest] = drain(d);
      expect(rest).toHaveLength(0);
      expect(frame?.fds).toEqual(fds);
      expect(frame?.body).toEqual(s.message);
      // And it passes validation on the side it is meant for.
      const spec = MESSAGES.get(s.message.t as number);
      const parse = spec?.direction === 'to-client' ? parseToClient : parseToBroker;
      expect(() => parse(frame as Frame, 0xffff_ffff)).not.toThrow();
    });

    it(`${s.name}: every truncated prefix is incomplete, never a frame`, () => {
      const bytes = Buffer.from(frames[s.name] as string, 'hex');
      for (let n = 0; n < bytes.length; n++) {
        const d = new FrameDecoder(limits);
        d.push(bytes.subarray(0, n), n > 0 ? fakeFds(s.fds) : []);
        expect(d.next(), `prefix of ${n} bytes`).toBeNull();
      }
    });
  }

  it('byte-at-a-time feeding of all fixtures back to back yields the same frames', () => {
    const d = new FrameDecoder(limits);
    const got: Frame[] = [];
    let fd = 2000;
    for (const s of SAMPLES) {
      const bytes = Buffer.from(frames[s.name] as string, 'hex');
      for (let i = 0; i < bytes.length; i++) {
        // fds arrive with the frame's first byte, as the kernel delivers them.
        d.push(bytes.subarray(i, i + 1), i === 0 ? fakeFds(s.fds, fd) : []);
        got.push(...drain(d));
      }
      fd += s.fds;
    }
    expect(got.map((f) => f.body)).toEqual(SAMPLES.map((s) => s.message));
    expect(got.reduce((n, f) => n + f.fds.length, 0)).toBe(SAMPLES.reduce((n, s) => n + s.fds, 0));
  });

  it('frames split across reads with fds arriving with a read that starts mid-frame are matched', () => {
    const a = Buffer.from(frames.ACK as string, 'hex');
    const b = Buffer.from(frames.BACKING_ADD as string, 'hex');
    const d = new FrameDecoder(limits);
    d.push(a.subarray(0, 3));
    // The kernel may glue the tail of a fd-less frame to the next frame's segment carrying fds.
    d.push(Buffer.concat([a.subarray(3), b]), [77]);
    const got = drain(d);
    expect(got.map((f) => f.fds)).toEqual([[], [77]]);
  });
});

describe('events encoded once for many recipients (SeqFrame)', () => {
  const txn = { t: Msg.EV_TXN, generation: 7, ops: [{ op: 'remove', region: 3 }] };
  it('each seq patched in decodes, and validates, as that message encoded on its own', () => {
    const shared = encodeSeqFrame(txn, 1 << 20);
    expect(shared).toBeDefined();
    for (const seq of [0, 1, 127, 128, 65_535, 65_536, 0xffff_ffff]) {
      const d = new FrameDecoder(limits);
      d.push(setSeq(shared!, seq));
      const [f] = drain(d);
      expect(f?.body).toEqual({ ...txn, seq });
      expect(f?.invalid).toBeUndefined();
      expect(parseToClient(f!, 0)).toEqual({ ...txn, seq });
    }
  });
  it('a message that does not start with a one-byte t is not shared (the caller encodes it per recipient)', () => {
    expect(encodeSeqFrame({ t: 200, generation: 1 }, 1 << 20)).toBeUndefined();
    expect(encodeSeqFrame({ t: Msg.EV_COMMITTED, seq: 1 }, 1 << 20)).toBeUndefined();
  });
  it('over the frame limit it throws FRAME_TOO_LARGE, as encodeFrame does', () => {
    expect(codeOf(() => encodeSeqFrame({ t: Msg.EV_TXN, generation: 1, ops: [] }, 4))).toBe('MMB_ERR_FRAME_TOO_LARGE');
  });
});

describe('malformed frames get typed errors', () => {
  const header = (len: number, nfds: number, flags: number) => {
    const h = Buffer.alloc(8);
    h.writeUInt32LE(len, 0);
    h.writeUInt16LE(nfds, 4);
    h.writeUInt16LE(flags, 6);
    return h;
  };
  const decode =
    (bytes: Buffer, fds: number[] = []) =>
    () => {
      const d = new FrameDecoder(limits);
      d.push(bytes, fds);
      return drain(d);
    };
  const body = Buffer.from(encodeBody({ t: 16, seq: 1 }));

  it('reserved flags', () => expect(codeOf(decode(Buffer.concat([header(body.length, 0, 1), body])))).toBe('MMB_ERR_BAD_FRAME'));
  it('empty body', () => expect(codeOf(decode(header(0, 0, 0)))).toBe('MMB_ERR_BAD_FRAME'));
  it('oversized length', () => expect(codeOf(decode(header((1 << 20) + 1, 0, 0)))).toBe('MMB_ERR_FRAME_TOO_LARGE'));
  it('too many fds declared', () => expect(codeOf(decode(header(1, 65, 0)))).toBe('MMB_ERR_TOO_MANY_FDS'));
  it('declared fds that did not arrive', () => expect(codeOf(decode(Buffer.concat([header(body.length, 1, 0), body])))).toBe('MMB_ERR_FD_MISMATCH'));
  it('fds that arrived with a frame declaring none', () =>
    expect(codeOf(decode(Buffer.concat([header(body.length, 0, 0), body]), [5]))).toBe('MMB_ERR_FD_MISMATCH'));
  it('wrong fd count', () => expect(codeOf(decode(Buffer.concat([header(body.length, 2, 0), body]), [5]))).toBe('MMB_ERR_FD_MISMATCH'));
  it('body that is not msgpack', () => expect(codeOf(decode(Buffer.concat([header(1, 0, 0), Buffer.from([0xc1])])))).toBe('MMB_ERR_BAD_FRAME'));
  it('body with trailing bytes', () =>
    expect(codeOf(decode(Buffer.concat([header(body.length + 1, 0, 0), body, Buffer.from([0])])))).toBe('MMB_ERR_BAD_FRAME'));
  it('body that is an array', () => {
    const arr = Buffer.from(encodeBody([16, 1]));
    expect(codeOf(decode(Buffer.concat([header(arr.length, 0, 0), arr])))).toBe('MMB_ERR_BAD_FRAME');
  });
  it('the decoder stays failed and hands back every fd it held', () => {
    const d = new FrameDecoder(limits);
    d.push(Buffer.concat([header(body.length, 0, 0), body]), [9, 10]);
    expect(codeOf(() => drain(d))).toBe('MMB_ERR_FD_MISMATCH');
    expect(codeOf(() => d.next())).toBe('MMB_ERR_FD_MISMATCH');
    expect(d.dispose().sort()).toEqual([10, 9].sort());
  });
  it('too many pending fds', () => {
    const d = new FrameDecoder({ ...limits, maxPendingFds: 4 });
    expect(codeOf(() => d.push(Buffer.from([1]), fakeFds(5)))).toBe('MMB_ERR_TOO_MANY_FDS');
    expect(d.dispose()).toHaveLength(5);
  });
});

describe('message validation', () => {
  const frame = (message: Record<string, unknown>, fds: number[] = []): Frame => ({
    type: message.t as number,
    body: decodeBody(encodeBody(message)) as Record<string, unknown>,
    fds,
    size: 0,
  });
  const code = (message: Record<string, unknown>, fds: number[] = []) => codeOf(() => parseToBroker(frame(message, fds), 1));

  it('accepts a valid message and treats nil as an absent optional field', () => expect(code({ t: 2, id: 1, space: null })).toBeUndefined());
  it('refuses unknown fields, as the kernel refuses unknown flags', () => expect(code({ t: 16, seq: 1, extra: 0 })).toBe('MMB_ERR_BAD_MESSAGE'));
  it('refuses missing fields', () => expect(code({ t: 16 })).toBe('MMB_ERR_BAD_MESSAGE'));
  it('refuses non-integers, negatives and huge numbers', () => {
    expect(code({ t: 16, seq: 1.5 })).toBe('MMB_ERR_BAD_MESSAGE');
    expect(code({ t: 16, seq: -1 })).toBe('MMB_ERR_BAD_MESSAGE');
    expect(code({ t: 16, seq: 2 ** 64 })).toBe('MMB_ERR_BAD_MESSAGE');
    expect(code({ t: 1, id: 2 ** 32, version: 1, features: 0 })).toBe('MMB_ERR_BAD_MESSAGE');
  });
  it('refuses msgpack extensions (a timestamp) where a number belongs', () => {
    const bytes = Buffer.from('82a17410a3736571d6ff00000001', 'hex'); // {t:16, seq: <timestamp ext>}
    expect(codeOf(() => parseToBroker({ type: 16, body: decodeBody(bytes) as Record<string, unknown>, fds: [], size: 0 }, 1))).toBe('MMB_ERR_BAD_MESSAGE');
  });
  it('refuses unknown message ids and messages sent the wrong way', () => {
    expect(code({ t: 99, id: 1 })).toBe('MMB_ERR_UNKNOWN_MESSAGE');
    expect(code({ t: 38, generation: 1 })).toBe('MMB_ERR_UNKNOWN_MESSAGE');
  });
  it('checks the fds a message takes', () => {
    expect(code({ t: 4, id: 1 })).toBe('MMB_ERR_FD_MISMATCH');
    expect(code({ t: 4, id: 1 }, [3, 4])).toBe('MMB_ERR_FD_MISMATCH');
    expect(code({ t: 5, id: 1, backing: 1 }, [3])).toBe('MMB_ERR_FD_MISMATCH');
    expect(code({ t: 4, id: 1 }, [3])).toBeUndefined();
  });
  it('refuses control characters in names and over-long names', () => {
    expect(code({ t: 2, id: 1, space: 'a\nb' })).toBe('MMB_ERR_BAD_MESSAGE');
    expect(code({ t: 2, id: 1, space: 'x'.repeat(65) })).toBe('MMB_ERR_BAD_MESSAGE');
  });
});

describe('only plain msgpack is accepted', () => {
  const viaDecoder = (hexBody: string) => {
    const body = Buffer.from(hexBody, 'hex');
    const h = Buffer.alloc(8);
    h.writeUInt32LE(body.length, 0);
    const d = new FrameDecoder(limits);
    d.push(Buffer.concat([h, body, h, Buffer.from(encodeBody({ t: 16, seq: 2 }))].slice(0, 2)));
    const frame = d.next() as Frame;
    return { frame, code: codeOf(() => parseToBroker(frame, 1)), next: d };
  };
  it('an integer-valued float64 is refused (MMB_ERR_BAD_MESSAGE), the stream stays usable', () => {
    const { frame, code, next } = viaDecoder('82a17410a3736571cb4059000000000000'); // {t:16, seq: 100.0}
    expect(frame.body.seq).toBe(100);
    expect(code).toBe('MMB_ERR_BAD_MESSAGE');
    expect(frame.invalid?.message).toMatch(/floats/);
    const ok = Buffer.from(encodeBody({ t: 16, seq: 2 }));
    const h = Buffer.alloc(8);
    h.writeUInt32LE(ok.length, 0);
    next.push(Buffer.concat([h, ok]));
    expect(codeOf(() => parseToBroker(next.next() as Frame, 1))).toBeUndefined();
  });
  it('bin and invalid UTF-8 are refused', () => {
    expect(viaDecoder('83a17402a2696401a5737061636ec40176').code).toBe('MMB_ERR_BAD_MESSAGE'); // space: bin
    expect(viaDecoder('83a17402a2696401a57370616365a2c328').code).toBe('MMB_ERR_BAD_MESSAGE'); // space: "\xc3\x28"
    expect(viaDecoder('83a17402a2696401a57370616365a3766d30').code).toBeUndefined(); // space: "vm0"
  });
});

describe('integers on the wire are msgpack integers', () => {
  it('writes integers beyond 32 bits as uint64 / int64, not float64', () => {
    expect(Buffer.from(encodeBody(2 ** 40)).toString('hex')).toBe('cf0000010000000000');
    expect(Buffer.from(encodeBody(-(2 ** 40))).toString('hex')).toBe('d3ffffff0000000000');
    expect(Buffer.from(encodeBody(1.5)).toString('hex')).toBe('cb3ff8000000000000');
    expect(decodeBody(encodeBody({ gpa: 2 ** 52 - 4096, s: 'x\xcb' }))).toEqual({ gpa: 2 ** 52 - 4096, s: 'x\xcb' });
  });
  it('skips string payloads that contain float markers', () => {
    const b = Buffer.from(encodeBody(['\xcbAAAAAAAA', 2 ** 33]));
    const copy = Buffer.from(b);
    integerizeFloats(copy);
    expect(copy).toEqual(b);
    expect(decodeBody(b)).toEqual(['\xcbAAAAAAAA', 2 ** 33]);
  });
});
