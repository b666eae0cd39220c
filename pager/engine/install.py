"""Installs for the Python fault path, through the one C installer (``pager.uffd.install``).

``Installer`` is one client's: it leaves out the ranges a REMOVE dropped (they are zero-filled
only when faulted on), hands each remaining piece with its slice of the zero mask to
``ssi_install`` (COPY of written runs, ZEROPAGE of the rest, EEXIST finished and woken), then
reports every resident chunk to the client state and folds the counters into the client's
stats, also when the install failed half way (what was installed is resident). Errors propagate:
``UffdRetry`` (EAGAIN) is the caller's to defer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from pager.core.state import ClientState, segments
from pager.engine.stats import EngineStats
from pager.uffd.install import WIRE_PAGE, InstallLog, install


class Installer:
    """One client's installs: uffd, residency log, state and stats."""

    def __init__(self, uffd_fd: int, state: ClientState, stats: EngineStats) -> None:
        self.fd = uffd_fd
        self.state = state
        self.stats = stats
        self.log = InstallLog()
        self._fits = 0  # the log has room for an install of this many bytes
        self.mode = 0  # UFFDIO_COPY mode (far memory: write-protected copies)
        # held while the state learns what was installed (far memory: the evictor reads it)
        self.lock: contextlib.AbstractContextManager = contextlib.nullcontext()

    def install(self, start: int, length: int, src: int | None, mask: int,
                removed: tuple[tuple[int, int], ...], page_size: int, *, mode: int = 0) -> None:
        """Install ``[start, start+length)`` from address ``src`` (None: zero pages); bit i of
        ``mask``: wire page i was never written; pages in ``removed`` are left alone. ``mode``:
        UFFDIO_COPY mode bits (``COPY_DONTWAKE``: the caller wakes the range later)."""
        log = self.log
        if not removed:
            if length > self._fits:
                log.reserve(length)
                self._fits = length
            try:
                install(self.fd, start, src, length, mask, page_size, log, self.mode | mode)
            finally:
                self.drain()
            return
        for s, n in segments(start, length, removed):
            off = s - start
            log.reserve(n)
            try:
                install(self.fd, s, None if src is None else src + off, n,
                        mask >> (off // WIRE_PAGE), page_size, log, self.mode | mode)
            finally:
                self.drain()

    def drain(self, log: InstallLog | None = None,
              also: Callable[[int, int, str], None] | None = None) -> None:
        """Residency and counters of ``log`` (default this installer's) to state and stats;
        ``also(addr, length, how)`` is told each range too."""
        on = self.state.on_installed
        if also is not None:
            def on(addr: int, length: int, how: str, _state=on) -> None:
                _state(addr, length, how)
                also(addr, length, how)
        with self.lock:
            c, z, e = (log or self.log).drain(on)
        if c or z or e:
            st = self.stats
            st.copied_bytes += c
            st.zero_pages += z
            st.eexist += e
