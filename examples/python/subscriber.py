#!/usr/bin/env python3
"""A memmap-broker subscriber in Python: maps the guest memory it is given and acks every change.

    python3 subscriber.py --socket /run/mmb/broker.sock --space vm0 [--name NAME]
        [--peek GPA:LEN]...     after each applied change, print LEN bytes at GPA if they are mapped
        [--refuse NAME]         nack any transaction that adds region NAME (the others roll it back)

Every region is mapped MAP_SHARED from its backing's memfd (PROT_READ only when read-only). The client
keeps the map it applied as {region id: region} and makes its mappings equal it after every event:
unmapping what left or changed first, then mapping what is new. A removal is therefore munmap()ed before
its ACK is sent, which is the ACK's promise. A rollback restores the map from before the transaction.
"""
import argparse
import mmap
import signal
import sys

import wire
from wire import say

KEY = ("gpa", "size", "backing", "offset", "readonly")  # what a mapping depends on (logDirty is not)


class Subscriber:
    def __init__(self, conn, peeks, refuse):
        self.conn, self.peeks, self.refuse = conn, peeks, refuse
        self.backings = {}  # backing id -> {"fd", "size", "name"}
        self.regions = {}  # region id -> region: the map this client applied (tentatively, until committed)
        self.mapped = {}  # region id -> (region, mmap)
        self.before = None  # the map before the tentative transaction, restored by EV_ROLLBACK
        self.parts = []  # regions of an EV_SYNC whose last part has not come yet

    def close(self):
        for _, m in self.mapped.values():
            m.close()
        wire.close_all(b["fd"] for b in self.backings.values())
        self.mapped, self.backings = {}, {}

    def reconcile(self):
        for rid, (region, m) in list(self.mapped.items()):
            if rid not in self.regions or any(self.regions[rid][k] != region[k] for k in KEY):
                m.close()  # munmap(2) now, before any ack
                del self.mapped[rid]
                say("unmapped", name=region["name"], id=rid)
        for rid, region in sorted(self.regions.items(), key=lambda item: item[1]["gpa"]):
            if rid in self.mapped:
                continue
            if region["name"] == self.refuse:
                raise OSError(0, f"region {region['name']!r} is refused by --refuse")
            backing = self.backings[region["backing"]]
            prot = mmap.PROT_READ | (0 if region["readonly"] else mmap.PROT_WRITE)
            m = mmap.mmap(backing["fd"], region["size"], flags=mmap.MAP_SHARED, prot=prot, offset=region["offset"])
            self.mapped[rid] = (region, m)
            say("mapped", name=region["name"], id=rid, gpa=hex(region["gpa"]), size=hex(region["size"]),
                prot="r" if region["readonly"] else "rw")

    def apply(self, seq, undo):
        """Makes the mappings follow self.regions, then acks; on failure restores `undo` and nacks."""
        try:
            self.reconcile()
        except OSError as err:
            self.regions = undo
            self.reconcile()
            refused = err.errno == 0
            self.conn.send({"t": wire.NACK, "seq": seq, "error": {
                "code": "MMB_ERR_CLIENT_REFUSED" if refused else "MMB_ERR_MAP_FAILED",
                "errno": "EIO" if refused else wire.errno_name(err), "message": err.strerror or str(err)}})
            say("nacked", seq=seq)
            return
        self.conn.send({"t": wire.ACK, "seq": seq})
        say("acked", seq=seq)
        for gpa, length in self.peeks:
            data = self.read(gpa, length)
            if data is not None:
                say("peek", gpa=hex(gpa), hex=data.hex())

    def read(self, gpa, length):
        for region, m in self.mapped.values():
            if region["gpa"] <= gpa and gpa + length <= region["gpa"] + region["size"]:
                return m[gpa - region["gpa"]:gpa - region["gpa"] + length]
        return None

    def handle(self, msg, fds):
        t = msg["t"]
        if t == wire.EV_BACKINGS:
            for entry, fd in zip(msg["backings"], fds):
                old = self.backings.pop(entry["backing"], None)
                if old:  # sent again read-write: this descriptor replaces the read-only one
                    wire.close_all([old["fd"]])
                self.backings[entry["backing"]] = {"fd": fd, "size": entry["size"], "name": entry["name"]}
                say("backing", id=entry["backing"], name=entry["name"], size=hex(entry["size"]))
        elif t == wire.EV_BACKINGS_GONE:
            for bid in msg["backings"]:
                wire.close_all([self.backings.pop(bid)["fd"]])
                say("backing-gone", id=bid)
        elif t == wire.EV_SYNC:
            self.parts += msg["regions"]
            if msg["last"]:
                undo, self.regions, self.parts = self.regions, {r["id"]: r for r in self.parts}, []
                self.apply(msg["seq"], undo)
                say("synced", generation=msg["generation"], regions=len(self.regions))
        elif t == wire.EV_TXN:
            self.before = dict(self.regions)
            for op in msg["ops"]:  # removes, then sets, then adds: the broker sends them in that order
                if op["op"] == "remove":
                    del self.regions[op["region"]]
                elif op["op"] == "set":
                    self.regions[op["region"]] = {**self.regions[op["region"]], "readonly": op["readonly"], "logDirty": op["logDirty"]}
                else:
                    self.regions[op["region"]["id"]] = op["region"]
            say("txn", generation=msg["generation"], seq=msg["seq"], ops=len(msg["ops"]))
            self.apply(msg["seq"], self.before)
        elif t == wire.EV_ROLLBACK:
            self.regions, self.before = self.before, None
            self.apply(msg["seq"], self.regions)
            say("rolledback", generation=msg["generation"])
        elif t == wire.EV_COMMITTED:
            self.before = None
            say("committed", generation=msg["generation"])
        elif t == wire.EV_ERROR:
            say("ev-error", code=msg["error"]["code"], message=msg["error"]["message"])
        elif t == wire.EV_GOODBYE:
            raise wire.BrokerError(msg["error"])
        else:
            wire.close_all(fds)
            raise wire.ProtocolError("MMB_ERR_UNKNOWN_MESSAGE", f"message {t} is not for a subscriber")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--socket", required=True)
    parser.add_argument("--space", required=True)
    parser.add_argument("--name", default="python-subscriber")
    parser.add_argument("--peek", action="append", default=[], metavar="GPA:LEN")
    parser.add_argument("--refuse", metavar="NAME")
    args = parser.parse_args()
    peeks = [tuple(int(x, 0) for x in p.split(":")) for p in args.peek]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))

    conn = sub = None
    try:
        conn = wire.Connection(args.socket, args.name)
        say("hello", broker=conn.broker)
        # The reply may come later than at once (a space not yet published): it is simply waited for.
        reply = conn.request({"t": wire.ATTACH, "space": args.space, "role": "subscriber", "kind": "python"})
        say("attached", client=reply["client"], epoch=reply["epoch"], generation=reply["generation"])
        sub = Subscriber(conn, peeks, args.refuse)
        while (frame := conn.next_event()) is not None:
            sub.handle(*frame)
        say("eof")
        return 0
    except wire.BrokerError as err:
        say("goodbye" if sub else "refused", code=err.code, message=err.error.get("message"))
        return 0 if err.code == "MMB_ERR_SHUTDOWN" else 1
    except wire.ProtocolError as err:
        say("protocol-error", code=err.code, message=err)
        return 2
    finally:
        if sub:
            sub.close()
        if conn:
            conn.close()


if __name__ == "__main__":
    sys.exit(main())
