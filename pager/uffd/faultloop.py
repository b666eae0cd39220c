"""Python side of the C fault loop (``ssi_pfl_run``, see csrc/faultloop.c).

``FaultLoop`` owns the C state of one client's loop: Python sets the routing table (the lanes
C may fetch on, each region's lane or per-extent lanes) and the slow ranges, calls ``run()``
from the client's fault thread (the GIL is released while C serves
faults), folds the loop's counters into its own statistics with ``take_stats()`` and drains
what C installed (residency and install counters) from ``log``, an ``InstallLog`` over the
loop's ring.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

from pager.uffd._uffd_cffi import ffi, lib
from pager.uffd.binding import RawEvents
from pager.uffd.install import WIRE_PAGE, InstallLog

IDLE: int = lib.SSI_PFL_IDLE
TIMEOUT_MS = 1000  # with no event, the loop returns IDLE after this long
MAX_MS = 50.0      # serving a stream of faults, it returns after this long
WAKE: int = lib.SSI_PFL_WAKE
EVENTS: int = lib.SSI_PFL_EVENTS
FETCH_ERROR: int = lib.SSI_PFL_FETCH_ERROR
READ_ERROR: int = lib.SSI_PFL_READ_ERROR
PROTO_SSIP: int = lib.SSI_PFL_PROTO_SSIP
PROTO_RAW: int = lib.SSI_PFL_PROTO_RAW
MAX_REGIONS: int = lib.SSI_PFL_MAX_REGIONS
MAX_SLOW: int = lib.SSI_PFL_MAX_SLOW
MAX_FETCH: int = lib.SSI_PFL_MAX_FETCH  # regions with larger pages are served by Python
MAX_EVICT: int = lib.SSI_PFL_MAX_EVICT
MAX_WATCH: int = lib.SSI_PFL_MAX_WATCH
MAX_LANES: int = lib.SSI_PFL_MAX_LANES
BY_EXTENT: int = lib.SSI_PFL_BY_EXTENT
MAX_VICTIMS: int = lib.SSI_PFL_MAX_VICTIMS
COUNTERS = ("faults", "faults_write", "served_fetch", "served_dup", "fetched_bytes",
            "faults_wp", "wp_dirty", "latency_sum_us", "latency_count")


def enabled_by_env() -> bool:
    """``SSI_PAGER_C_LOOP=0`` turns the C loop off (the Python path serves every fault)."""
    return os.environ.get("SSI_PAGER_C_LOOP", "1").strip().lower() not in ("0", "no", "off",
                                                                             "false")


class FaultLoop:
    """One client's C loop: uffd, interrupting fds, the event buffer and a chunk buffer."""

    def __init__(self, uffd_fd: int, wake_fds: Sequence[int], raw: RawEvents, chunk: int,
                 bucket_us: Sequence[int], *, timeout_ms: int = TIMEOUT_MS,
                 max_ms: float = MAX_MS, poll_us: int = 0) -> None:
        if len(bucket_us) != lib.SSI_PFL_NBUCKETS - 1:
            raise ValueError(f"{len(bucket_us)} latency bounds; the C loop has "
                             f"{lib.SSI_PFL_NBUCKETS - 1}")
        self._l = ffi.new("struct ssi_pfl *")
        # room for a whole huge page up to what C fetches (calloc'd: untouched until used)
        buf_size = max(chunk, lib.SSI_PFL_MAX_FETCH)
        self._buf = ffi.new("uint8_t[]", buf_size)
        self._raw = raw
        self._ext: list[Any] = []
        self._gen: Any = None
        self._tls: list[Any] = []  # the TLS sessions the lanes name (set_regions)
        # residency ring: two batches of chunks that each split into single pages (C returns
        # to be drained before reading a batch it might not have room for)
        worst = min(raw.max_events, lib.SSI_READ_MAX) * (2 * (chunk // WIRE_PAGE) + 2)
        self.log = InstallLog(2 * worst, ffi.addressof(self._l, "log"))
        lp = self._l
        lp.uffd = uffd_fd
        self.set_wake_fds(wake_fds)
        lp.chunk = chunk
        lp.events = raw.array
        lp.max_events = raw.max_events
        lp.buf = self._buf
        lp.buf_size = buf_size
        for i, b in enumerate(bucket_us):
            lp.bucket_us[i] = b
        self.set_limits(timeout_ms, max_ms)
        self.set_poll_us(poll_us)

    def set_poll_us(self, poll_us: int) -> None:
        """Adaptive polling: read the uffd without blocking for ``poll_us`` µs after the last
        event before blocking in poll() (0: always block). Only on a non-blocking uffd (a
        read on a blocking one would sleep where the loop means to spin)."""
        if poll_us < 0:
            raise ValueError(f"poll window {poll_us} µs is negative; pass 0 to turn polling off")
        spin = poll_us > 0 and not os.get_blocking(self._l.uffd)
        self._l.poll_ns = poll_us * 1000 if spin else 0

    def set_limits(self, timeout_ms: int, max_ms: float) -> None:
        """``timeout_ms``: how long the loop blocks with no event before it returns IDLE (0:
        it serves the events already waiting, spins its polling window, then returns);
        ``max_ms``: the longest it serves a stream of faults before it returns. A caller with
        other work (a replay batch) lowers both, so that work runs whenever no fault waits."""
        if timeout_ms < 0 or max_ms <= 0:
            raise ValueError(f"C loop timeout {timeout_ms} ms, longest run {max_ms} ms: the "
                             f"timeout must be >= 0 (0: return when no event waits) and the "
                             f"longest run > 0")
        self._l.timeout_ms = timeout_ms
        self._l.max_ns = int(max_ms * 1e6)

    def set_wake_fds(self, fds: Sequence[int]) -> None:
        fds = [fd for fd in fds if fd >= 0][:lib.SSI_PFL_MAX_WAKE]
        for i, fd in enumerate(fds):
            self._l.wake_fds[i] = fd
        self._l.nwake = len(fds)

    def set_regions(self, regions: Iterable[tuple[int, int, int, int, int | Sequence[int]]],
                    lanes: Sequence[tuple[Any, ...]] = (), *, ext_shift: int = 21,
                    route_gen: tuple[Any, int] | None = None) -> bool:
        """The routing table. ``lanes``: ``(sock, proto, space handle[, tls])`` per connection
        the loop may fetch on (tls: the socket's C TLS session, a `transport.tlsc.TlsSession`,
        kept alive here until the next call, so a lane closed meanwhile fails a read; None or
        absent: plaintext). ``regions``: ``(base, size, gpa, page_size, route)``, route the
        index in ``lanes`` serving the whole region (-1: Python serves it) or, per extent of
        ``1 << ext_shift`` bytes from the one holding ``gpa``, the index of its lane (-1:
        Python's). ``route_gen``: ``(word, seen)``, an ``array('Q')`` whose first word the source
        bumps when its routing changes and its value read before the table was built: while
        they differ, faults go to Python (until the table is set again).
        False if the table does not fit C's (then do not run the loop)."""
        regions = list(regions)
        if len(regions) > MAX_REGIONS or len(lanes) > MAX_LANES:
            return False
        lp = self._l
        sessions = []
        for i, (sock, proto, space, *tls) in enumerate(lanes):
            c = lp.lanes[i]
            c.sock, c.proto, c.space = sock, proto, space
            session = tls[0] if tls else None
            c.ssl = ffi.cast("void *", session.handle if session is not None else 0)
            sessions.append(session)
        self._tls = sessions
        lp.nlanes = len(lanes)
        keep = []
        for i, (base, size, gpa, page_size, route) in enumerate(regions):
            r = lp.regions[i]
            r.base, r.size, r.gpa, r.page_size = base, size, gpa, page_size
            if isinstance(route, int):
                r.lane, r.next, r.ext = route, 0, ffi.NULL
            else:
                ext = ffi.new("int16_t[]", list(route) or [-1])
                keep.append(ext)
                r.lane, r.next, r.ext = BY_EXTENT, len(route), ext
        lp.ext_shift = ext_shift
        self._ext = keep  # the extent tables live as long as the loop uses them
        if route_gen is None:
            self._gen = None
            lp.route_gen = ffi.NULL
        else:
            word, seen = route_gen
            self._gen = ffi.from_buffer("uint64_t[]", word)
            lp.route_gen = self._gen
            lp.route_gen_seen = seen
        lp.nregions = len(regions)
        return True

    def route_stale(self) -> bool:
        """Has the source's routing changed since ``set_regions`` (faults go to Python)?"""
        lp = self._l
        return self._gen is not None and self._gen[0] != lp.route_gen_seen

    def failed_lane(self) -> int:
        """After FETCH_ERROR: the socket of the lane whose fetch failed (-1: unknown)."""
        k = self._l.err_lane
        return self._l.lanes[k].sock if 0 <= k < self._l.nlanes else -1

    def set_slow(self, ranges: Iterable[tuple[int, int]]) -> bool:
        """Host ranges whose chunks Python serves (sorted and merged here). False if too many."""
        merged: list[list[int]] = []
        for s, e in sorted(ranges):
            if merged and s <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            elif s < e:
                merged.append([s, e])
        if len(merged) > MAX_SLOW:
            return False
        lp = self._l
        for i, (s, e) in enumerate(merged):
            lp.slow_start[i] = s
            lp.slow_end[i] = e
        lp.nslow = len(merged)
        return True

    # -- sequential streams (readahead) ---------------------------------------------------
    def set_watch(self, n: int) -> None:
        """Remember the chunk after each of the last ``n`` chunks the loop served and leave a
        fault there to Python (which detects sequential streams); 0 turns it off."""
        if not 0 <= n <= MAX_WATCH:
            raise ValueError(f"{n} watched chunks: the C loop holds 0 to {MAX_WATCH}")
        lp = self._l
        for k in range(MAX_WATCH):
            lp.watch[k] = 0
        lp.watch_next = 0
        lp.nwatch = n

    def watching(self, addr: int) -> bool:
        """Whether the loop served the chunk right before the one at ``addr`` lately."""
        lp = self._l
        w = lp.watch
        return any(w[k] == addr for k in range(lp.nwatch))

    # -- far memory (a client under a resident limit) -------------------------------------
    def set_farmem(self) -> None:
        """Install write-protected (a write fault: writable, reported by ``take_dirty``),
        within ``set_budget``, never in a range published with ``evicting``; resolve
        write-protect faults (reported by ``take_wp_dirty``) outside ``set_victims``."""
        self._l.farmem = 1
        self._l.budget = 0
        self._victims_buf = ffi.new("uint64_t[]", MAX_VICTIMS)
        self._wpd_buf = ffi.new("uint64_t[]", lib.SSI_PFL_MAX_WPD)
        self._evict_free = list(range(MAX_EVICT - 1, -1, -1))

    def set_budget(self, nbytes: int) -> None:
        """Bytes the loop may install before faults go back to Python (which waits for room)."""
        self._l.budget = max(0, nbytes)

    def take_dirty(self) -> list[int]:
        """Chunks installed writable for a write fault since the last call (dirty units)."""
        lp = self._l
        n = lp.ndirty
        out = list(lp.dirty[0:n]) if n else []
        lp.ndirty = 0
        return out

    def set_victims(self, starts: Sequence[int]) -> None:
        """From the evictor thread, before it write-protects a batch: the loop leaves write
        faults in these units (sorted starts) to Python until the next call (``[]`` after the
        batch's last wake). At most ``MAX_VICTIMS``."""
        n = len(starts)
        if n > MAX_VICTIMS:
            raise ValueError(f"{n} units in one eviction batch; the C loop holds {MAX_VICTIMS}")
        arr = self._victims_buf
        arr[0:n] = starts
        lib.ssi_pfl_set_victims(self._l, arr, n)

    def take_wp_dirty(self) -> list[int]:
        """Units whose protection the loop cleared for a write since the last call (dirty from
        that write on; some may have been evicted since: ignore those)."""
        n = lib.ssi_pfl_take_wp(self._l, self._wpd_buf, lib.SSI_PFL_MAX_WPD)
        return ffi.unpack(self._wpd_buf, n) if n else []

    def evicting(self, start: int, end: int) -> int | None:
        """From the evictor thread, before the punch: the loop leaves ``[start, end)`` alone
        until ``evicted(slot)``. None if every slot is taken (then do not evict that range)."""
        if not self._evict_free:
            return None
        k = self._evict_free.pop()
        self._l.evict_start[k] = start
        self._l.evict_end[k] = end  # published last: C reads end first
        return k

    def evicted(self, slot: int) -> None:
        """After the wake: the loop may serve faults in that range again."""
        self._l.evict_end[slot] = 0
        self._evict_free.append(slot)

    def run(self) -> tuple[int, int, int, int]:
        """Serve faults until something is Python's: ``(code, first, n, errno)``; after
        EVENTS / FETCH_ERROR, events ``first`` .. ``n`` of the buffer are still to handle."""
        lp = self._l
        code = lib.ssi_pfl_run(lp)
        return code, lp.first, lp.n, lp.err

    def take_stats(self) -> tuple[dict[str, int], list[int]] | None:
        """The loop's counters since the last call (and reset them); None if nothing happened.
        The install counters and residency are in ``log`` (``InstallLog``)."""
        st = self._l.stats
        if not st.faults and not st.fetched_bytes:
            return None
        out = {name: getattr(st, name) for name in COUNTERS}
        buckets = list(st.latency_buckets)
        ffi.memmove(ffi.addressof(st), bytes(ffi.sizeof("struct ssi_pfl_stats")),
                    ffi.sizeof("struct ssi_pfl_stats"))
        return out, buckets
