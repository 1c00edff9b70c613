"""The memmap-broker wire, protocol version 1 (docs/protocol.md), for subscriber.py and owner.py.

Frames are an 8-byte little-endian header (body size u32, number of fds u16, flags u16) and one msgpack
map. Descriptors travel as SCM_RIGHTS with the sendmsg(2) that carries a frame's first byte, and arrive
with the recvmsg(2) call that returns that byte: a frame claims the batch received with its first byte.
Only the standard library and the msgpack package (Debian: python3-msgpack). No feature is negotiated,
so the broker treats these clients exactly as version 1 defines, whatever extensions it gains later.
"""
import collections
import errno
import os
import socket
import struct

import msgpack

HEADER = struct.Struct("<IHH")
HELLO, STATUS, ATTACH, BACKING_ADD, BACKING_DROP, COMMIT = 1, 2, 3, 4, 5, 6
ACK, NACK = 16, 17
REPLY, EV_BACKINGS, EV_BACKINGS_GONE, EV_SYNC, EV_TXN, EV_ROLLBACK, EV_COMMITTED, EV_GOODBYE, EV_ERROR = range(32, 41)
READ_BYTES = 256 * 1024
SCM_MAX_FD = 253


class BrokerError(Exception):
    """An error map the broker sent: in a REPLY, an EV_GOODBYE or an EV_ERROR."""

    def __init__(self, error):
        super().__init__(f"{error.get('code')}: {error.get('message')}")
        self.code, self.errno, self.error = error.get("code"), error.get("errno"), error


class ProtocolError(Exception):
    """The broker sent something the protocol does not allow; `code` is the MMB_ERR_* it amounts to."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


def close_all(fds):
    for fd in fds:
        os.close(fd)


def errno_name(err):
    return errno.errorcode.get(err.errno, "EIO") if isinstance(err, OSError) else "EIO"


class Connection:
    """One client connection: HELLO is done when the constructor returns."""

    def __init__(self, path, name):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.connect(path)
        self.buf = bytearray()
        self.offset = 0  # stream offset of self.buf[0]
        self.batches = []  # [start, end, fds]: the stream range one recvmsg returned with these fds
        self.events = collections.deque()  # events that arrived while a request waited for its reply
        self.max_frame, self.max_fds, self.next_id = 1 << 20, 64, 1
        hello = self.request({"t": HELLO, "version": 1, "features": 0, "name": name})
        self.broker = hello["broker"]
        self.max_frame = hello["limits"]["maxFrameBytes"]
        self.max_fds = hello["limits"]["maxFdsPerFrame"]

    def close(self):
        self.sock.close()
        for batch in self.batches:
            close_all(batch[2])
        self.batches = []

    def send(self, message, fds=()):
        body = msgpack.packb(message, use_bin_type=True)
        data = HEADER.pack(len(body), len(fds), 0) + body
        # The fds go with the first byte; whatever the kernel did not take follows without them.
        sent = socket.send_fds(self.sock, [data], list(fds)) if fds else self.sock.send(data)
        self.sock.sendall(data[sent:])

    def request(self, message, fds=()):
        """Sends a request and waits for its REPLY; events that come first are kept for next_event()."""
        rid, self.next_id = self.next_id, self.next_id + 1
        self.send({**message, "id": rid}, fds)
        while True:
            frame = self.receive()
            if frame is None:
                raise ProtocolError("MMB_ERR_PROTOCOL", "the broker closed the connection")
            msg, got = frame
            if msg["t"] == REPLY and msg.get("id") == rid:
                if ("error" in msg) == ("result" in msg):
                    raise ProtocolError("MMB_ERR_PROTOCOL", "REPLY with both or neither of result and error")
                if "error" in msg:
                    raise BrokerError(msg["error"])
                return msg["result"]
            if msg["t"] == EV_GOODBYE:
                raise BrokerError(msg["error"])
            self.events.append(frame)

    def next_event(self):
        """The next (message, fds) from the broker, in order; None at EOF."""
        return self.events.popleft() if self.events else self.receive()

    def receive(self):
        while True:
            frame = self._frame()
            if frame is not None:
                return frame
            data, fds, flags, _ = socket.recv_fds(self.sock, READ_BYTES, SCM_MAX_FD, socket.MSG_CMSG_CLOEXEC)
            if flags & socket.MSG_CTRUNC:
                close_all(fds)
                raise ProtocolError("MMB_ERR_FDS_TRUNCATED", "the kernel dropped descriptors (MSG_CTRUNC)")
            if not data:
                if self.buf:
                    raise ProtocolError("MMB_ERR_PROTOCOL", "the connection ended inside a frame")
                return None
            end = self.offset + len(self.buf) + len(data)
            if fds:
                self.batches.append([end - len(data), end, fds])
            self.buf += data

    def _frame(self):
        if len(self.buf) < HEADER.size:
            return None
        size, nfds, flags = HEADER.unpack_from(self.buf)
        if flags != 0 or not 1 <= size <= self.max_frame:
            raise ProtocolError("MMB_ERR_BAD_FRAME", f"bad frame header: size {size}, flags {flags}")
        if nfds > self.max_fds:
            raise ProtocolError("MMB_ERR_TOO_MANY_FDS", f"a frame declares {nfds} fds")
        if len(self.buf) < HEADER.size + size:
            return None
        fds = self._claim(self.offset, nfds)
        body = bytes(self.buf[HEADER.size:HEADER.size + size])
        del self.buf[:HEADER.size + size]
        self.offset += HEADER.size + size
        try:
            msg = msgpack.unpackb(body, raw=False, strict_map_key=True)
        except Exception as err:
            close_all(fds)
            raise ProtocolError("MMB_ERR_BAD_FRAME", f"body is not one msgpack value: {err}")
        if not isinstance(msg, dict) or not isinstance(msg.get("t"), int):
            close_all(fds)
            raise ProtocolError("MMB_ERR_BAD_FRAME", "body is not a map with an integer t")
        return msg, fds

    def _claim(self, start, nfds):
        """The fds of the frame starting at stream offset `start`: the batch received with that byte."""
        if self.batches and self.batches[0][1] <= start:
            raise ProtocolError("MMB_ERR_FD_MISMATCH", "descriptors arrived that no frame claims")
        if nfds == 0:
            return []
        if not self.batches or not self.batches[0][0] <= start < self.batches[0][1] or len(self.batches[0][2]) != nfds:
            raise ProtocolError("MMB_ERR_FD_MISMATCH", f"a frame declares {nfds} fds that did not arrive with it")
        return self.batches.pop(0)[2]


def say(event, **fields):
    """One line per event on stdout, flushed, so another program can follow along."""
    print(" ".join([event] + [f"{k}={v}" for k, v in fields.items()]), flush=True)
