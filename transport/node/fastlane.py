"""The memory node's C fault lane: FETCH frames of a pager's fault-lane connection served by
a thread that does not hold the GIL (the loop is ``fastlane.c`` beside this file, built by
``_fastlane_build.py`` as ``transport.node._fastlane_cffi``).

Python keeps everything else. `MemoryNode` hands a connection over (`FastLane.start`) only when
it announced ``"lane": "fault"`` in HELLO, finished the handshake, opened a space and has no
buffered bytes or unsent replies; the C loop answers FETCH frames until it meets anything else
and then hands the connection back with its unconsumed bytes (`FastLane.finish`), so every
other frame, good or bad, is answered by the same Python code as on any other connection.

The node can serve every connection in Python (``SSI_PAGER_NO_FASTLANE=1`` or
``memnode --no-fastlane``), but a missing or broken extension is not a silent fallback: the
node warns, naming the import error, each time it starts without the lane it was asked for.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from transport.node.checksum import CRC32C
from transport.node.store import Space
from transport.polling import DEFAULT_POLL_MAX_US, DEFAULT_POLL_US, check_poll_us
from transport.wire import HEADER_SIZE, MAX_DATA, MAX_FRAME

log = logging.getLogger(__name__)

try:
    from transport.node._fastlane_cffi import ffi, lib
except ImportError as _exc:  # not built, or built wrong: said loudly by `enabled`
    ffi = lib = None
    MISSING = f"{type(_exc).__name__}: {_exc}"
else:
    MISSING = ""

ENV_OFF = "SSI_PAGER_NO_FASTLANE"
HANDBACK = lib.SSI_FL_HANDBACK if lib is not None else 1
EOF_ = lib.SSI_FL_EOF if lib is not None else 2
ERROR = lib.SSI_FL_ERROR if lib is not None else 3
MAX_SPACES = lib.SSI_FL_MAX_SPACES if lib is not None else 0
_poll_us = DEFAULT_POLL_US
_poll_max_us = DEFAULT_POLL_MAX_US


def set_poll_us(poll_us: int, poll_max_us: int = DEFAULT_POLL_MAX_US) -> None:
    """The adaptive polling window of the lanes started from now on in this process (µs of
    non-blocking reads after the last frame; 0 = off), growing up to ``poll_max_us`` while
    frames come just after it: ``memnode --poll-us``, ``--poll-max-us``."""
    global _poll_us, _poll_max_us
    _poll_us = check_poll_us(poll_us)
    _poll_max_us = check_poll_us(poll_max_us)


def poll_us() -> int:
    return _poll_us


def enabled(requested: bool | None = None) -> bool:
    """Whether the node should use the C fault lane: ``requested`` (None: unless
    $SSI_PAGER_NO_FASTLANE is set) and the extension is built."""
    if requested is None:
        requested = os.environ.get(ENV_OFF, "") in ("", "0")
    if requested and lib is None:
        log.warning("memnode: the C fault lane (transport.node._fastlane_cffi) did not load "
                    "(%s): serving fault lanes in Python, slower. Rebuild it with `pip "
                    "install -e .` (or `python3 setup.py build_ext --inplace`), or pass "
                    "--no-fastlane to mean it", MISSING)
    return bool(requested and lib is not None)


class FastLane:
    """One connection's C lane: buffers, the C state and its counters, the serving thread."""

    def __init__(self, max_space_bytes: int) -> None:
        assert ffi is not None
        self._in = ffi.new("uint8_t[]", 2 * MAX_FRAME)
        self._out = ffi.new("uint8_t[]", HEADER_SIZE + MAX_DATA)
        c = self.c = ffi.new("struct ssi_fl_conn *")
        c.fd = -1
        c.max_space_bytes = max_space_bytes
        c.poll_ns = _poll_us * 1000
        c.poll_max_ns = _poll_max_us * 1000
        self._bitmaps: list[Any] = []  # keeps the bitmaps' buffer exports alive
        self._names: list[str] = []
        self._fenced: set[str] = set()  # spaces C no longer serves (`fence`)
        self.thread: threading.Thread | None = None
        self._tls: Any = None  # the connection's TLS session while C serves it

    def can_serve(self, names: list[str]) -> bool:
        return 0 < len(names) <= MAX_SPACES

    def start(self, sock_fd: int, names: list[str], spaces: list[Space],
              done: Callable[[int], None], tls: Any = None) -> None:
        """Serve FETCH frames on a duplicate of ``sock_fd`` from a new thread; ``done(rc)``
        is called from that thread when the C loop returns. ``tls``: the connection's
        `transport.tlsc.TlsSession` (no ciphertext buffered), moved onto the socket until
        `finish`."""
        c = self.c
        fd = os.dup(sock_fd)
        if tls is not None and not tls.to_fd(fd):
            os.close(fd)
            raise OSError(f"its TLS session still buffers {tls.buffered()} bytes")
        self._tls = tls
        c.ssl = ffi.cast("void *", tls.handle if tls is not None else 0)
        c.nspaces = len(spaces)
        c.pos = c.end = 0
        c.inbuf = self._in
        c.in_cap = len(self._in)
        c.out = self._out
        c.out_cap = len(self._out)
        if names != self._names:
            self._bitmaps = []
            for i, space in enumerate(spaces):
                slot = c.spaces[i]
                if space.fd < 0:
                    slot.fd = -1
                    continue
                bits = ffi.from_buffer("uint8_t[]", space.bitmap)
                sums = ffi.from_buffer("uint32_t[]", space.sums)
                self._bitmaps += (bits, sums)
                slot.fd = space.fd
                slot.bits = bits
                slot.sums = sums
                slot.sum_kind = (lib.SSI_FL_SUM_CRC32C if space.checksum == CRC32C
                                 else lib.SSI_FL_SUM_CRC32)
                slot.nbits = min(space.capacity_pages, len(space.bitmap) * 8)
            self._names = list(names)
        for i, name in enumerate(names):
            if name in self._fenced:
                c.spaces[i].fd = -1

        def run() -> None:
            done(lib.ssi_fl_serve(c))

        thread = threading.Thread(target=run, name="memnode-fastlane", daemon=True)
        c.fd = fd
        self.thread = thread
        try:
            thread.start()
        except RuntimeError:
            self.thread = None
            c.fd = -1
            self._untls()
            os.close(fd)
            raise

    def _untls(self) -> None:
        """The TLS session back onto memory buffers (its socket BIO is forgotten)."""
        if self._tls is not None:
            self._tls.to_mem()
            self._tls = None
            self.c.ssl = ffi.NULL

    def finish(self) -> bytes:
        """After the loop returned: close the duplicate, return the unconsumed bytes."""
        c = self.c
        self.thread = None
        self._untls()
        if c.fd >= 0:
            os.close(c.fd)
            c.fd = -1
        return bytes(ffi.buffer(c.inbuf + c.pos, c.end - c.pos))

    def fence(self, name: str) -> None:
        """Serve space ``name`` no longer in C (a newer owner fenced it): its FETCHes go back
        to Python, which refuses them. Safe while the loop runs: C reads a slot's fd per frame,
        and a read it started with the old fd fails over to Python the same way."""
        self._fenced.add(name)
        if name in self._names:
            self.c.spaces[self._names.index(name)].fd = -1

    def stop(self) -> None:
        """Make a running loop return (the node closes the connection)."""
        if self.thread is not None and self.c.fd >= 0:
            lib.ssi_fl_stop(self.c)

    def join(self, timeout: float = 2.0) -> None:
        t = self.thread
        if t is not None:
            t.join(timeout)

    def forget_counters(self) -> None:
        """Zero the C counters (they were folded into the node's); only while not serving."""
        c = self.c
        c.fetch_ok = 0
        for i in range(len(self._names)):
            c.spaces[i].fetched_pages = c.spaces[i].zero_pages = 0

    def counters(self) -> tuple[int, list[tuple[str, int, int]]]:
        """FETCH requests answered, and per space (name, pages fetched, zero pages)."""
        c = self.c
        per = [(name, int(lib.ssi_fl_load(ffi.addressof(c.spaces[i], "fetched_pages"))),
                int(lib.ssi_fl_load(ffi.addressof(c.spaces[i], "zero_pages"))))
               for i, name in enumerate(self._names)]
        return int(lib.ssi_fl_load(ffi.addressof(c, "fetch_ok"))), per
