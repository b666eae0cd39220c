"""Pager restart: a supervisor keeps every client's uffd so a new pager can take it over.

Firecracker sends its uffd once and never again; if the pager dies, the guest's vCPUs stay
blocked in their faults forever. ``ssi-pager serve --supervise`` therefore runs as two
processes:

- the *supervisor* (this module, no hot path): binds the handoff socket, starts the pager as a
  child (passing it the listening socket and one end of a SOCK_SEQPACKET pair, the *keeper
  link*), and restarts it when it dies;
- the *pager*: for every accepted client it sends the supervisor a ``hold`` message with the
  handshake's region JSON and duplicates of the uffd, the memfd (if any) and the client's
  connection; when the client hangs up it sends ``drop``.

A restarted pager asks for what the supervisor holds, serves each client again and issues
UFFDIO_WAKE over every region: a fault whose event the dead pager had read is raised again by
the kernel, and faults whose events were never read are still queued on the uffd. The held
connection tells the new pager when the client exits, as the original one did.

Layout events (REMOVE, UNMAP, REMAP) are sent to the supervisor as the pager handles them and
replayed into the new pager's state, so removed pages stay zero across a restart. Known limit:
forked children of a client have no socket and are not kept.
"""

from __future__ import annotations

import array
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from pager.core.region import Region
from pager.service.handoff import HandoffServer, Handshake, parse_regions

log = logging.getLogger(__name__)

MAX_MSG = 96 * 1024
FDSZ = array.array("i").itemsize


def _send(sock: socket.socket, obj: dict, fds: list[int] = ()) -> None:  # type: ignore[assignment]
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sock.sendmsg([json.dumps(obj).encode()], anc)


def _recv(sock: socket.socket) -> tuple[dict | None, list[int]]:
    data, anc, _flags, _ = sock.recvmsg(MAX_MSG, socket.CMSG_SPACE(8 * FDSZ))
    fds: list[int] = []
    for level, kind, cdata in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(cdata[: len(cdata) - len(cdata) % FDSZ])
            fds.extend(a)
    if not data:
        return None, fds
    return json.loads(data), fds


@dataclass
class Held:
    """A client kept across a pager restart (fds owned by whoever takes it)."""

    key: int
    pid: int
    regions: list[Region]
    uffd: int
    memfd: int | None
    conn: socket.socket
    layout: list[list]


class KeeperLink:
    """The pager's side of the keeper link."""

    def __init__(self, fd: int) -> None:
        self.sock = socket.socket(fileno=fd)
        self.sock.setblocking(True)
        self._lock = threading.Lock()

    def take_over(self) -> list[Held]:
        """The clients the supervisor holds (from a previous pager)."""
        _send(self.sock, {"op": "hello"})
        out: list[Held] = []
        while True:
            msg, fds = _recv(self.sock)
            if msg is None or msg.get("op") == "ready":
                for fd in fds:
                    os.close(fd)
                return out
            regions = parse_regions(msg["body"].encode())
            memfd = fds[1] if msg.get("memfd") else None
            out.append(Held(key=msg["key"], pid=msg["pid"], regions=regions, uffd=fds[0],
                            memfd=memfd, conn=socket.socket(fileno=fds[-1]),
                            layout=msg.get("layout", [])))

    def hold(self, key: int, hs: Handshake) -> None:
        fds = [hs.uffd] + ([hs.memfd] if hs.memfd is not None else []) + [hs.conn.fileno()]
        msg = {"op": "hold", "key": key, "pid": hs.pid, "body": hs.body.decode(),
               "memfd": hs.memfd is not None}
        with self._lock, contextlib.suppress(OSError):
            _send(self.sock, msg, fds)

    def layout(self, key: int, kind: str, *args: int) -> None:
        """A layout event of a held client (replayed by the next pager)."""
        with self._lock, contextlib.suppress(OSError):
            _send(self.sock, {"op": "layout", "key": key, "event": [kind, *args]})

    def drop(self, key: int) -> None:
        with self._lock, contextlib.suppress(OSError):
            _send(self.sock, {"op": "drop", "key": key})


class Keeper:
    """The supervisor's store of held clients, served over one keeper link at a time."""

    def __init__(self) -> None:
        self.held: dict[int, tuple[dict, list[int]]] = {}
        self.lock = threading.Lock()

    def serve_link(self, sock: socket.socket) -> None:
        """Handle one pager's link until it closes (the pager exited)."""
        while True:
            try:
                msg, fds = _recv(sock)
            except OSError:
                return
            if msg is None:
                return
            op = msg.get("op")
            if op == "hello":
                with self.lock:
                    items = list(self.held.values())
                for m, held_fds in items:
                    _send(sock, {**m, "op": "client"}, held_fds)
                _send(sock, {"op": "ready"})
            elif op == "hold":
                with self.lock:
                    self.held[msg["key"]] = (msg, fds)
            elif op == "layout":
                with self.lock:
                    entry = self.held.get(msg["key"])
                    if entry is not None:
                        entry[0].setdefault("layout", []).append(msg["event"])
            elif op == "drop":
                with self.lock:
                    _, old = self.held.pop(msg["key"], (None, []))
                for fd in old:
                    os.close(fd)
            for fd in fds if op != "hold" else ():
                os.close(fd)

    def close(self) -> None:
        with self.lock:
            for _, fds in self.held.values():
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self.held.clear()


def _strip(argv: list[str]) -> list[str]:
    out = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--supervise":
            continue
        if a in ("--listen-fd", "--keeper-fd"):
            skip = True
            continue
        out.append(a)
    return out


def run_supervised(argv: list[str], *, restart_delay: float = 0.2) -> int:
    """Supervise ``ssi-pager serve`` with ``argv`` (its own arguments, ``serve`` included)."""
    args = _strip(argv)
    path = args[args.index("--socket") + 1]
    listener = HandoffServer.bind(path)
    keeper = Keeper()
    stopping = threading.Event()
    child: subprocess.Popen | None = None

    def on_signal(signum, _frame):
        stopping.set()
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"supervisor: pid {os.getpid()} keeping clients of {path}", file=sys.stderr,
          flush=True)
    restarts = 0
    try:
        while not stopping.is_set():
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            cmd = [sys.executable, "-m", "pager.cli", *args, "--listen-fd",
                   str(listener.fileno()), "--keeper-fd", str(theirs.fileno())]
            child = subprocess.Popen(cmd, pass_fds=(listener.fileno(), theirs.fileno()))
            theirs.close()
            print(f"supervisor: pager pid {child.pid} started", file=sys.stderr, flush=True)
            link = threading.Thread(target=keeper.serve_link, args=(ours,), daemon=True)
            link.start()
            rc = child.wait()
            link.join(2)
            ours.close()
            if stopping.is_set() or rc == 0:
                return 0 if rc in (0, -signal.SIGTERM, -signal.SIGINT) else rc
            restarts += 1
            print(f"supervisor: pager exited with {rc}; restarting ({restarts}), "
                  f"{len(keeper.held)} clients kept", file=sys.stderr, flush=True)
            time.sleep(restart_delay)
        return 0
    finally:
        keeper.close()
        listener.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
