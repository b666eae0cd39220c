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
replayed into the new pager's state, so removed pages stay zero across a restart. Runs of
REMOVEs are kept as merged intervals, and the replay goes out in messages of at most
``REPLAY_BATCH`` events, so no message grows with a client's history. Known limits: forked
children of a client have no socket and are not kept; a REMOVE the kernel handed to a pager
killed (-9) before it recorded it is lost, so that range is fetched again instead of zero.

Signals: SIGHUP restarts the pager on purpose (it hands every client over and exits, the next
one takes them); SIGTERM/SIGINT are passed to the pager, which stops as documented in
pager/service/lifecycle.py, and the supervisor exits with it. A pager that fails before it
starts serving is restarted with a growing delay, and after ``MAX_START_FAILURES`` failures in a
row the supervisor gives up with exit code 1, poisoning the clients it still holds. The
pager is signalled (PR_SET_PDEATHSIG) if the supervisor dies and then stops like on SIGTERM.
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
from dataclasses import dataclass

from pager.core.intervals import IntervalSet
from pager.core.region import Region
from pager.service.handoff import HandoffServer, Handshake, parse_regions
from pager.service.lifecycle import HANDOVER_EXIT

log = logging.getLogger(__name__)

MAX_MSG = 96 * 1024
REPLAY_BATCH = 512  # layout events per replay message (a few tens of bytes each)
MAX_START_FAILURES = 5
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

    def close(self) -> None:
        """Let the client go: its fds and the socket it watches (a VMM then stops)."""
        for fd in (self.uffd, self.memfd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.conn.close()


class KeeperLink:
    """The pager's side of the keeper link."""

    def __init__(self, fd: int) -> None:
        self.sock = socket.socket(fileno=fd)
        self.sock.setblocking(True)
        self._lock = threading.Lock()
        self.detached = False

    def take_over(self) -> list[Held]:
        """The clients the supervisor holds (from a previous pager)."""
        _send(self.sock, {"op": "hello"})
        out: dict[int, Held] = {}
        while True:
            msg, fds = _recv(self.sock)
            if msg is None or msg.get("op") == "ready":
                for fd in fds:
                    os.close(fd)
                return list(out.values())
            if msg.get("op") == "layout":  # the replay of a client sent just before
                out[msg["key"]].layout.extend(msg["events"])
                continue
            regions = parse_regions(msg["body"].encode())
            memfd = fds[1] if msg.get("memfd") else None
            out[msg["key"]] = Held(key=msg["key"], pid=msg["pid"], regions=regions,
                                   uffd=fds[0], memfd=memfd,
                                   conn=socket.socket(fileno=fds[-1]), layout=[])

    def detach(self) -> None:
        """From now on hold/layout/drop are not sent: the supervisor keeps every client as it
        is for the next pager (a restart on purpose)."""
        with self._lock:
            self.detached = True

    def hold(self, key: int, hs: Handshake) -> None:
        fds = [hs.uffd] + ([hs.memfd] if hs.memfd is not None else []) + [hs.conn.fileno()]
        msg = {"op": "hold", "key": key, "pid": hs.pid, "body": hs.body.decode(),
               "memfd": hs.memfd is not None}
        with self._lock, contextlib.suppress(OSError):
            if not self.detached:
                _send(self.sock, msg, fds)

    def layout(self, key: int, kind: str, *args: int) -> None:
        """A layout event of a held client (replayed by the next pager)."""
        with self._lock, contextlib.suppress(OSError):
            if not self.detached:
                _send(self.sock, {"op": "layout", "key": key, "event": [kind, *args]})

    def drop(self, key: int) -> None:
        with self._lock, contextlib.suppress(OSError):
            if not self.detached:
                _send(self.sock, {"op": "drop", "key": key})


class Layout:
    """A held client's layout events, compact: each run of REMOVEs is one merged IntervalSet,
    so repeated or adjacent removals cost nothing and memory grows only with distinct ranges."""

    def __init__(self) -> None:
        self._items: list[list | IntervalSet] = []

    def add(self, event: list) -> None:
        if event[0] == "remove":
            if not self._items or not isinstance(self._items[-1], IntervalSet):
                self._items.append(IntervalSet())
            self._items[-1].add(event[1], event[2])
        else:
            self._items.append(event)

    def events(self):
        for item in self._items:
            if isinstance(item, IntervalSet):
                for start, end in item:
                    yield ["remove", start, end]
            else:
                yield item


class Keeper:
    """The supervisor's store of held clients, served over one keeper link at a time."""

    def __init__(self) -> None:
        self.held: dict[int, tuple[dict, list[int], Layout]] = {}
        self.lock = threading.Lock()
        self.greeted = threading.Event()  # the current pager asked for its clients: it runs

    def serve_link(self, sock: socket.socket) -> None:
        """Handle one pager's link until it closes (the pager exited)."""
        while True:
            try:
                msg, fds = _recv(sock)
            except (OSError, ValueError) as exc:
                if not isinstance(exc, OSError):
                    log.error("keeper link: unreadable message (%s); closing the link", exc)
                return
            if msg is None:
                return
            op = msg.get("op")
            try:
                self._handle(sock, op, msg, fds)
            except OSError as exc:
                log.error("keeper link: %s failed: %s", op, exc)
                return
            for fd in fds if op != "hold" else ():
                os.close(fd)

    def _handle(self, sock: socket.socket, op: str | None, msg: dict, fds: list[int]) -> None:
        if op == "hello":
            with self.lock:
                items = list(self.held.items())
            for key, (m, held_fds, layout) in items:
                _send(sock, {**m, "op": "client"}, held_fds)
                batch: list = []
                for ev in layout.events():
                    batch.append(ev)
                    if len(batch) == REPLAY_BATCH:
                        _send(sock, {"op": "layout", "key": key, "events": batch})
                        batch = []
                if batch:
                    _send(sock, {"op": "layout", "key": key, "events": batch})
            _send(sock, {"op": "ready"})
            self.greeted.set()
        elif op == "hold":
            with self.lock:
                self.held[msg["key"]] = (msg, fds, Layout())
        elif op == "layout":
            with self.lock:
                entry = self.held.get(msg["key"])
                if entry is not None:
                    entry[2].add(msg["event"])
        elif op == "drop":
            with self.lock:
                _, old, _ = self.held.pop(msg["key"], (None, [], None))
            for fd in old:
                os.close(fd)

    def poison_all(self, why: str) -> None:
        """Clients no pager will serve again (the supervisor exits with them held): poison
        what they were not served, loudly, rather than leave them blocked forever."""
        from pager.service.lifecycle import poison_unserved
        with self.lock:
            items = list(self.held.values())
        for msg, fds, _ in items:
            print(f"supervisor: {why}: poisoning the pages not served yet of client pid "
                  f"{msg['pid']} (it gets SIGBUS there)", file=sys.stderr, flush=True)
            try:
                poison_unserved(os.dup(fds[0]), parse_regions(msg["body"].encode()),
                                f"pid {msg['pid']}")
            except Exception as exc:  # keep going: the other clients matter as much
                log.error("poisoning client pid %s failed: %s", msg["pid"], exc)

    def close(self) -> None:
        with self.lock:
            for _, fds, _ in self.held.values():
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self.held.clear()


def _clients(n: int) -> str:
    return f"{n} client" + ("" if n == 1 else "s")


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
    from pager.cli import build_parser
    from pager.service.access import resolve_gid
    ns = build_parser(args).parse_args(args)
    path = ns.socket
    listener = HandoffServer.bind(path, resolve_gid(ns.socket_group) if ns.socket_group
                                  else None)
    keeper = Keeper()
    stopping = threading.Event()
    restart = threading.Event()
    child: subprocess.Popen | None = None

    def on_signal(signum, _frame):
        if signum == signal.SIGHUP:
            restart.set()
        else:
            stopping.set()
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    print(f"supervisor: pid {os.getpid()} keeping clients of {path}", file=sys.stderr,
          flush=True)
    env = dict(os.environ, SSI_PAGER_SUPERVISOR_PID=str(os.getpid()))
    restarts = failures = 0
    try:
        while not stopping.is_set():
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            cmd = [sys.executable, "-m", "pager.cli", *args, "--listen-fd",
                   str(listener.fileno()), "--keeper-fd", str(theirs.fileno())]
            keeper.greeted.clear()
            restart.clear()
            child = subprocess.Popen(cmd, pass_fds=(listener.fileno(), theirs.fileno()),
                                     env=env)
            theirs.close()
            print(f"supervisor: pager pid {child.pid} started", file=sys.stderr, flush=True)
            link = threading.Thread(target=keeper.serve_link, args=(ours,), daemon=True)
            link.start()
            rc = child.wait()
            link.join(2)
            ours.close()
            if stopping.is_set() or rc == 0:
                return 0 if rc in (0, -signal.SIGTERM, -signal.SIGINT) else rc
            if rc == HANDOVER_EXIT or restart.is_set():
                print(f"supervisor: restarting the pager on request, "
                      f"{_clients(len(keeper.held))} kept", file=sys.stderr, flush=True)
                failures = 0
                continue
            restarts += 1
            failures = 0 if keeper.greeted.is_set() else failures + 1
            if failures >= MAX_START_FAILURES:
                print(f"supervisor: the pager failed to start {failures} times in a row (last "
                      f"exit code {rc}); giving up: fix the error it printed above, then start "
                      f"again ({_clients(len(keeper.held))} kept)", file=sys.stderr,
                      flush=True)
                return 1
            delay = min(restart_delay * (2 ** failures), 10.0)
            print(f"supervisor: pager exited with {rc}; restarting ({restarts}), "
                  f"{_clients(len(keeper.held))} kept, in {delay:.1f} s", file=sys.stderr,
                  flush=True)
            stopping.wait(delay)
        return 0
    finally:
        if keeper.held:
            keeper.poison_all("no pager will serve them any more")
        keeper.close()
        listener.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
