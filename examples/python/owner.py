#!/usr/bin/env python3
"""A memmap-broker owner in Python: adds and removes guest memory regions, one command per stdin line.

    python3 owner.py --socket /run/mmb/broker.sock --space vm0 [--name NAME]

Commands (GPA, SIZE and OFFSET take 0x..., plain numbers, or a K/M/G suffix for sizes):
    add NAME GPA SIZE [OFFSET:HEX]...   a new sealed memfd of SIZE bytes with HEX written at each OFFSET,
                                        registered (BACKING_ADD) and mapped at GPA (COMMIT add)
    remove NAME                         COMMIT remove; the reply means every subscriber has unmapped it.
                                        Then the memfd is dropped (BACKING_DROP) and closed here
Output, one line each: `added name=.. id=.. gpa=.. size=.. backing=.. generation=..`,
`removed name=.. generation=..`, `dropped backing=.. released=..`, or `error code=MMB_ERR_.. message=..`
for a refused command (the broker changed nothing; the owner goes on). EOF detaches and exits 0.
"""
import argparse
import fcntl
import os
import sys

import wire
from wire import say

UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def number(text):
    if text[-1:].upper() in UNITS:
        return int(text[:-1], 0) * UNITS[text[-1].upper()]
    return int(text, 0)


def sealed_memfd(name, size):
    """A memfd the broker accepts: close-on-exec, sealed against shrinking (nobody can SIGBUS the others)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    except OSError:
        os.close(fd)
        raise
    return fd


class Owner:
    def __init__(self, conn):
        self.conn = conn
        self.memfds = {}  # region name -> (backing id, our own fd)

    def add(self, name, gpa, size, *writes):
        if name in self.memfds:
            raise ValueError(f"{name} was added already")
        fd = sealed_memfd(name, number(size))
        try:
            for write in writes:
                offset, data = write.split(":")
                os.pwrite(fd, bytes.fromhex(data), number(offset))
            backing = self.conn.request({"t": wire.BACKING_ADD, "name": name}, [fd])["backing"]
        except BaseException:
            os.close(fd)
            raise
        self.memfds[name] = (backing, fd)
        try:
            result = self.conn.request({"t": wire.COMMIT, "ops": [
                {"op": "add", "name": name, "gpa": number(gpa), "size": number(size), "backing": backing, "offset": 0}]})
        except wire.BrokerError:
            self.drop(name)  # refused: the backing is no use
            raise
        say("added", name=name, id=result["added"][0]["id"], gpa=hex(number(gpa)), size=hex(number(size)),
            backing=backing, generation=result["generation"])

    def remove(self, name):
        result = self.conn.request({"t": wire.COMMIT, "ops": [{"op": "remove", "region": name}]})
        say("removed", name=name, generation=result["generation"])
        if name in self.memfds and self.memfds[name][0] in result["unreferenced"]:
            self.drop(name)

    def drop(self, name):
        backing, fd = self.memfds.pop(name)
        released = self.conn.request({"t": wire.BACKING_DROP, "backing": backing})["released"]
        os.close(fd)
        say("dropped", backing=backing, released=str(released).lower())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--socket", required=True)
    parser.add_argument("--space", required=True)
    parser.add_argument("--name", default="python-owner")
    args = parser.parse_args()
    conn = None
    try:
        conn = wire.Connection(args.socket, args.name)
        # Without features this attach also publishes the space to its subscribers (version 1's behaviour).
        reply = conn.request({"t": wire.ATTACH, "space": args.space, "role": "owner", "kind": "python-owner"})
        say("attached", client=reply["client"], generation=reply["generation"])
        owner = Owner(conn)
        for line in sys.stdin:
            command, *argv = line.split() or [""]
            try:
                if command == "add" and len(argv) >= 3:
                    owner.add(*argv)
                elif command == "remove" and len(argv) == 1:
                    owner.remove(argv[0])
                elif command:
                    say("usage", line=line.strip())
            except wire.BrokerError as err:
                say("error", code=err.code, message=err.error.get("message"))
            except (OSError, ValueError) as err:
                say("usage", line=line.strip(), error=err)
        return 0
    except wire.BrokerError as err:
        say("refused", code=err.code, message=err.error.get("message"))
        return 1
    except wire.ProtocolError as err:
        say("protocol-error", code=err.code, message=err)
        return 2
    finally:
        if conn:
            conn.close()  # the broker drops what this owner registered and did not drop; regions stay


if __name__ == "__main__":
    sys.exit(main())
