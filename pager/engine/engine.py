"""``FaultEngine``: owns the page source and the clients (one ``ClientPager`` each); the
control plane (handoff server, supervisor, metrics) calls ``add_client``, ``stats`` and
``close``. See the package docstring for the fault path."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

from pager.core.farmem import POLICIES, FarMemory
from pager.core.readahead import NEVER, Readahead
from pager.core.region import PAGE_SIZE, Region, RegionTable
from pager.core.state import ClientState
from pager.engine.client import ClientPager
from pager.engine.dirty import (
    check_far_memory,
    check_writable,
    rebuild_residency,
    register_wp,
)
from pager.engine.readahead import RA_BATCH
from pager.engine.stats import EngineStats
from pager.errors import ConfigError, HandoffError
from pager.source import PageSource
from pager.uffd.binding import Userfaultfd
from pager.uffd.faultloop import enabled_by_env
from transport.polling import DEFAULT_POLL_US, MAX_POLL_US

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 64 * 1024
DEFAULT_READAHEAD = 2 * 1024 * 1024


class FaultEngine:
    """Owns the source and the clients; the control plane calls ``add_client``/``close``."""

    def __init__(self, source: PageSource, *, chunk_size: int = DEFAULT_CHUNK,
                 readahead: int = DEFAULT_READAHEAD, fetch_timeout: float = 60.0,
                 c_loop: bool | None = None, max_resident: int | None = None,
                 pager_max_resident: int | None = None, evict_policy: str = "clock",
                 poll_us: int = DEFAULT_POLL_US, ws_window: float = 0.0, prefetch: bool = True,
                 prefetch_rate: int = 0, ws_max_fraction: float = 0.5) -> None:
        if chunk_size < PAGE_SIZE or chunk_size & (chunk_size - 1):
            raise ConfigError(f"chunk size {chunk_size} must be a power of two >= "
                              f"{PAGE_SIZE}; pass e.g. --chunk 64K")
        self.source = source
        self.chunk_size = chunk_size
        self.readahead = readahead
        self.fetch_timeout = fetch_timeout
        self.c_loop = enabled_by_env() if c_loop is None else c_loop
        self.max_resident = max_resident  # per client (None: no limit)
        self.pager_max_resident = pager_max_resident  # all far-memory clients together
        if evict_policy not in POLICIES:
            raise ConfigError(f"eviction policy {evict_policy!r}: use one of "
                              f"{', '.join(POLICIES)}")
        self.evict_policy = evict_policy
        for what, v in (("--max-resident", max_resident),
                        ("--pager-max-resident", pager_max_resident)):
            if v is not None and v < 4 * max(chunk_size, PAGE_SIZE):
                raise ConfigError(f"{what} {v} is too small: give at least 4 chunks "
                                  f"({4 * chunk_size} bytes), e.g. {what} 128M")
        if max_resident is not None or pager_max_resident is not None:
            check_writable(source)
        if not 0 <= poll_us <= MAX_POLL_US:
            raise ConfigError(f"poll window {poll_us} µs must be 0 (off) to {MAX_POLL_US}; "
                              f"pass e.g. --poll-us {DEFAULT_POLL_US}")
        self.poll_us = poll_us  # the C loop's adaptive polling window
        if ws_window < 0 or prefetch_rate < 0 or not 0 < ws_max_fraction <= 1:
            raise ConfigError(f"working set: window {ws_window} s, prefetch rate "
                              f"{prefetch_rate} B/s, cap {ws_max_fraction}: the window and rate "
                              f"must be >= 0 and the cap a fraction in (0, 1]")
        # working sets (pager.engine.prefetch): recorded for ws_window s after a client starts
        # (0: neither recorded nor replayed), replayed on the next start unless not prefetch
        self.ws_window = ws_window
        self.prefetch = prefetch and ws_window > 0
        self.prefetch_rate = prefetch_rate
        self.ws_max_fraction = ws_max_fraction
        # space -> set once the working set a client of it recorded is stored (a client of
        # the space starting meanwhile, a resume, waits for it before loading)
        self.ws_stored: dict[str, threading.Event] = {}
        self.clients: list[ClientPager] = []
        # far memory: space -> pid of the guest writing its pages back to it (`_claim`)
        self._writers: dict[str | None, int] = {}
        self._closed_stats = EngineStats()
        self._lock = threading.Lock()
        self._next_id = 1

    def add_client(self, uffd_fd: int, regions: list[Region], *, memfd: int | None = None,
                   pid: int = 0, wake: bool = False, name: str | None = None,
                   layout: list[list] | None = None,
                   on_layout: Callable[..., None] | None = None) -> ClientPager:
        """Serve a client's uffd (ownership of the fds passes to the engine).

        ``wake``: a restarted pager taking over a uffd wakes every region, so faults whose
        events the previous pager read (and lost) are raised again. ``layout``: the layout
        events (``["remove", start, end]``, ``["unmap", ...]``, ``["remap", old, new, len]``)
        the previous pager saw, replayed first. ``on_layout(kind, *args)`` is told of each new
        one (the supervisor keeps them).
        """
        for r in regions:
            self.source.check_region(r)
        claimed: set[str | None] = set()
        if self.far_memory:
            check_far_memory(regions, memfd)
            self._check_share(max(self.chunk_size, *(r.page_size for r in regions)))
            claimed = self._claim(regions, pid)
        try:
            return self._add(uffd_fd, regions, claimed, memfd=memfd, pid=pid, wake=wake,
                             name=name, layout=layout, on_layout=on_layout)
        except BaseException:
            self._release(claimed)
            raise

    def _add(self, uffd_fd: int, regions: list[Region], claimed: set[str | None], *,
             memfd: int | None, pid: int, wake: bool, name: str | None,
             layout: list[list] | None, on_layout: Callable[..., None] | None
             ) -> ClientPager:
        limited = self.far_memory
        u = Userfaultfd.adopt(uffd_fd)
        state = ClientState(RegionTable(regions), chunk_size=self.chunk_size,
                            readahead=self._detector() if not limited
                            else Readahead(min_hits=NEVER))
        if limited:
            register_wp(u, regions)
            state.farmem = FarMemory(self.max_resident or self.pager_max_resident or 0,
                                     max(self.chunk_size, *(r.page_size for r in regions)),
                                     policy=self.evict_policy)
        with self._lock:
            cid = self._next_id
            self._next_id += 1
        for kind, *args in layout or ():
            getattr(state, f"on_{kind}")(*args)
        client = ClientPager(self, u, state, name=name or f"client{cid}", pid=pid, memfd=memfd)
        client.on_layout = on_layout
        client.claimed = claimed
        if state.farmem is not None:
            found = rebuild_residency(client)
            if found:
                log.info("%s: %d bytes already resident in the memfd (taken as dirty)",
                         client.name, found)
        with self._lock:
            self.clients.append(client)
            self._share_limit()
        client.start()
        if wake:
            client.wake_all()
        return client

    @property
    def far_memory(self) -> bool:
        """Whether the pager keeps its guests under a resident limit."""
        return self.max_resident is not None or self.pager_max_resident is not None

    def spaces_of(self, regions: Iterable[Region]) -> set[str | None]:
        """The address spaces ``regions`` are in (a region naming none: the source's)."""
        default = getattr(self.source, "space", None)
        return {r.space if r.space is not None else default for r in regions}

    def _claim(self, regions: list[Region], pid: int) -> set[str | None]:
        """A far-memory guest writes its pages back to its space: the spaces of ``regions``
        are its alone while it is attached, or two guests would overwrite each other's pages
        (and read them back as their own). Another guest of a claimed space is refused."""
        spaces = self.spaces_of(regions)
        with self._lock:
            for space in sorted(spaces, key=str):
                other = self._writers.get(space)
                if other is not None:
                    raise HandoffError(
                        f"space {space!r} is in use by another far-memory guest of this pager "
                        f"(pid {other}): a guest under a resident limit writes its pages back "
                        f"to its space, so two would overwrite each other's; give each guest "
                        f"its own space (\"space\" in the handshake, SSI_PAGER_SPACE for "
                        f"QEMU's shim, or a pager per guest with its own --space) or stop "
                        f"the other guest first")
            for space in spaces:
                self._writers[space] = pid
        return spaces

    def _release(self, spaces: set[str | None]) -> None:
        with self._lock:
            for space in spaces:
                self._writers.pop(space, None)

    def _check_share(self, unit: int) -> None:
        """Refuse a far-memory client the pager-wide limit cannot give its floor (4 units;
        a smaller share would silently exceed that limit)."""
        if self.pager_max_resident is None:
            return
        with self._lock:
            n = 1 + sum(1 for c in self.clients if c.state.farmem is not None)
        if self.pager_max_resident // n < 4 * unit:
            raise HandoffError(
                f"--pager-max-resident {self.pager_max_resident >> 10} KiB cannot take another "
                f"guest: {n} guests would get {self.pager_max_resident // n >> 10} KiB each, "
                f"under the 4 chunks ({4 * unit >> 10} KiB) a guest needs; raise the limit or "
                f"serve this guest from another pager")

    def _share_limit(self) -> None:
        """Holding ``_lock``: each far-memory client's limit, its own one capped by an even
        share of the pager-wide one."""
        fm_clients = [c for c in self.clients if c.state.farmem is not None]
        if not fm_clients:
            return
        cap = None
        if self.pager_max_resident is not None:
            cap = self.pager_max_resident // len(fm_clients)
        for c in fm_clients:
            fm = c.state.farmem
            own = self.max_resident if self.max_resident is not None else cap
            limit = min(x for x in (own, cap) if x is not None)
            with c.fm_lock:
                fm.set_limit(max(limit, 4 * fm.unit))  # type: ignore[union-attr]
            if c.evictor is not None:
                c.evictor.kick()

    @property
    def readahead_active(self) -> bool:
        """Whether sequential streams are read ahead (see ``_detector``)."""
        return bool(self.readahead) and self.chunk_size < RA_BATCH

    def _detector(self) -> Readahead:
        # Readahead moves 64 KiB groups through a second thread; with chunks that large the
        # fault path already streams as fast, and the thread hand-off only adds latency
        # (measured: README "Design"), so it is used for smaller chunks only.
        if not self.readahead_active:
            return Readahead(min_hits=NEVER)
        return Readahead(max_chunks=max(2, self.readahead // self.chunk_size))

    def adopt_child(self, parent: ClientPager, fd: int) -> ClientPager:
        u = Userfaultfd.adopt(fd)
        child = ClientPager(self, u, parent.state.fork(), name=f"{parent.name}.fork",
                            pid=0, memfd=None, parent=parent)
        with self._lock:
            self.clients.append(child)
        child.start()
        return child

    def _retire(self, client: ClientPager) -> None:
        with self._lock:
            if client in self.clients:
                self.clients.remove(client)
                for space in client.claimed:
                    self._writers.pop(space, None)
                self._closed_stats.add(client.stats)
                log.debug("%s: retired: %s", client.name, client.stats)
                self._share_limit()

    def stats(self) -> EngineStats:
        """Totals over live and finished clients (a fresh object)."""
        total = EngineStats()
        with self._lock:
            total.add(self._closed_stats)
            live = list(self.clients)
        for c in live:
            total.add(c.stats)
        return total

    def resident_bytes(self) -> int:
        """Bytes the pager installed in its live clients' memory and no event dropped since."""
        with self._lock:
            live = list(self.clients)
        return sum(c.resident_bytes for c in live)

    def close(self) -> None:
        for c in list(self.clients):
            c.close()
        self.source.close()
