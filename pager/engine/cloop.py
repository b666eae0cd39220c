"""Glue between a client's fault thread and the C fault loop (``pager.uffd.faultloop``).

``CLoopMixin`` (part of ``ClientPager``) decides whether a client may use the C loop, gives it
the region table (with each region's page size), the sockets and the slow ranges, folds its
counters into the client's stats and its residency ring into the client state whenever it
returns, and drops the lane's connections after a failed fetch (Python then serves the fault
with its retries).
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

from pager.core.region import PAGE_SIZE
from pager.engine.stats import LATENCY_BUCKETS_US
from pager.source import Lane
from pager.uffd.binding import RawEvents
from pager.uffd.faultloop import MAX_FETCH, PROTO_RAW, PROTO_SSIP, FaultLoop
from transport.errors import TransportError

if TYPE_CHECKING:
    from pager.engine.client import ClientPager

log = logging.getLogger(__name__)


class CLoopMixin:
    """The C fast path of ``ClientPager`` (see the package docstring)."""

    def _c_loop(self: ClientPager, raw: RawEvents, lane: Lane) -> FaultLoop | None:
        """The C loop for this client, or None where the Python loop serves every fault."""
        eng = self.engine
        if not eng.c_loop or not lane.c_capable or self.parent is not None \
                or eng.readahead_active:
            return None
        cl = FaultLoop(self.uffd.fileno(), [self._efd], raw, max(eng.chunk_size, PAGE_SIZE),
                       LATENCY_BUCKETS_US, poll_us=eng.poll_us)
        if self.state.farmem is not None:
            # C serves missing faults, write-protected and within the room under the limit;
            # write-protect faults and the units the evictor works on are Python's
            cl.set_farmem()
            self.c_farmem = cl
        return cl

    def _c_prepare(self: ClientPager, cl: FaultLoop, lane: Lane) -> bool:
        """Give C the current region table, sockets and slow ranges; False: Python's turn."""
        fm = self.state.farmem
        if fm is not None:
            cl.set_budget(fm.limit - fm.bytes)  # read without the lock: the evictor only lowers it
        if not self._c_dirty:
            return True
        now = time.monotonic()
        if now < self._c_retry_at:
            return False
        state = self.state
        table = []
        slow: list[tuple[int, int]] = []
        try:
            for r in state.regions:
                # a huge page up to MAX_FETCH (2 MiB) is fetched by C in pipelined frames;
                # larger ones are Python's
                ep = lane.c_endpoint(r.space) if r.page_size <= MAX_FETCH else None
                sock, proto, space, tls = (-1, 0, 0, None) if ep is None else (
                    ep[0], PROTO_RAW if ep[1] == "raw" else PROTO_SSIP, ep[2],
                    ep[3] if len(ep) > 3 else None)  # a TLS lane's C session
                table.append((r.base, r.size, r.offset, r.page_size, sock, proto, space, tls))
                removed = state.removed.get(r.space)
                if removed is not None:
                    slow += [(r.addr_of(s), r.addr_of(e))
                             for s, e in removed.overlaps(r.offset, r.offset + r.size)]
        except (TransportError, OSError) as exc:
            log.debug("%s: C loop waits for the source: %s", self.name, exc)
            self._c_retry_at = now + 1.0
            return False
        cs = self.engine.chunk_size
        slow += [(base + i * cs, base + (i + 1) * cs) for base, i in state.inflight]
        if not (cl.set_regions(table) and cl.set_slow(slow)):
            self._c_retry_at = now + 1.0  # too many regions / removed ranges for C
            return False
        self._c_dirty = False
        return True

    def _c_fold(self: ClientPager, cl: FaultLoop) -> None:
        """What C installed (residency) and its counters, into the state and the stats."""
        got = cl.take_stats()
        self.installer.drain(cl.log)  # after take_stats: its install counters are taken
        fm = self.state.farmem
        if fm is not None:
            dirty = cl.take_dirty()
            with self.fm_lock:
                for start in dirty:  # installed writable for a write fault: dirty at once
                    fm.on_write(start, fm.units[start].length if start in fm.units else fm.unit)
                excess = fm.excess()
            if excess > 0:
                self.evictor.kick()
        if got is None:
            return
        counters, buckets = got
        st = self.stats
        for name, v in counters.items():
            if v:
                setattr(st, name, getattr(st, name) + v)
        st.c_faults += counters["served_fetch"] + counters["served_dup"]
        lb = st.latency_buckets
        for i, v in enumerate(buckets):
            if v:
                lb[i] += v

    def _c_fetch_failed(self: ClientPager, lane: Lane, err: int) -> None:
        """A fetch from C failed: drop the connections; Python serves the fault, retrying."""
        self.stats.fetch_errors += 1
        log.debug("%s: C loop fetch failed (%s); Python path retries",
                  self.name, os.strerror(err) if err else "?")
        lane.reset()
        self._c_dirty = True
