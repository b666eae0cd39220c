"""Glue between a client's fault thread and the C fault loop (``pager.uffd.faultloop``).

``CLoopMixin`` (part of ``ClientPager``) decides whether a client may use the C loop, gives it
the routing table (each region's page size and lane, or each of its extents' lanes: a
cluster's), the sockets and the slow ranges (removed, read ahead in flight, each readahead
stream's next chunk), folds its counters into the client's stats and its residency ring into
the client state whenever it returns, and tells the lane which connection failed a fetch
(Python then serves the fault with its retries, a cluster failing over).
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

from pager.core.region import PAGE_SIZE
from pager.engine.stats import LATENCY_BUCKETS_US
from pager.source import CRoutes, Lane
from pager.uffd.binding import RawEvents
from pager.uffd.faultloop import MAX_FETCH, MAX_WATCH, PROTO_RAW, PROTO_SSIP, FaultLoop
from transport.errors import TransportError

if TYPE_CHECKING:
    from pager.engine.client import ClientPager

log = logging.getLogger(__name__)


class CLoopMixin:
    """The C fast path of ``ClientPager`` (see the package docstring)."""

    def _c_loop(self: ClientPager, raw: RawEvents, lane: Lane) -> FaultLoop | None:
        """The C loop for this client, or None where the Python loop serves every fault."""
        eng = self.engine
        if not eng.c_loop or not lane.c_capable or self.parent is not None:
            return None
        cl = FaultLoop(self.uffd.fileno(), [self._efd], raw, max(eng.chunk_size, PAGE_SIZE),
                       LATENCY_BUCKETS_US, poll_us=eng.poll_us)
        ra = self.state.readahead
        if ra.active:
            # C serves every fault but one on the chunk after one it served lately: the
            # detector sees a stream from its second fault, random faults never leave C
            cl.set_watch(min(ra.max_streams, MAX_WATCH))
        self._cl = cl
        if self.state.farmem is not None:
            # C serves missing faults, write-protected and within the room under the limit,
            # and write-protect faults (marked dirty at the next fold); faults on the units the
            # evictor works on are Python's
            cl.set_farmem()
            with self.fm_lock:  # a batch already in progress: its units are not C's
                cl.set_victims(self.evictor.batch)
                self.c_farmem = cl
        return cl

    def _c_prepare(self: ClientPager, cl: FaultLoop, lane: Lane) -> bool:
        """Give C the current region table, sockets and slow ranges; False: Python's turn."""
        if self.fenced is not None:  # Python poisons what it would fetch
            return False
        fm = self.state.farmem
        if fm is not None:
            cl.set_budget(fm.limit - fm.bytes)  # read without the lock: the evictor only lowers it
        if not self._c_dirty and not cl.route_stale():
            return True
        now = time.monotonic()
        if now < self._c_retry_at:
            return False
        state = self.state
        table: list[tuple[int, int, int, int, int | list[int]]] = []
        slow: list[tuple[int, int]] = []
        routes = CRoutes()
        word = lane.c_generation()
        gen = None if word is None else (word, word[0])  # read before the table is built
        try:
            for r in state.regions:
                # a huge page up to MAX_FETCH (2 MiB) is fetched by C in pipelined frames;
                # larger ones are Python's
                route = (lane.c_route(r.space, r.offset, r.size, routes)
                         if r.page_size <= MAX_FETCH else -1)
                table.append((r.base, r.size, r.offset, r.page_size, route))
                removed = state.removed.get(r.space)
                if removed is not None:
                    slow += [(r.addr_of(s), r.addr_of(e))
                             for s, e in removed.overlaps(r.offset, r.offset + r.size)]
        except (TransportError, OSError) as exc:
            log.debug("%s: C loop waits for the source: %s", self.name, exc)
            self._c_retry_at = now + 1.0
            return False
        lanes = [(ep[0], PROTO_RAW if ep[1] == "raw" else PROTO_SSIP, ep[2],
                  ep[3] if len(ep) > 3 else None)  # a TLS lane's C session
                 for ep in routes.endpoints]
        cs = self.engine.chunk_size
        slow += [(base + i * cs, base + (i + 1) * cs) for base, i in state.inflight]
        # each stream's next chunk: its fault goes on to the detector
        slow += [(base + i * cs, base + (i + 1) * cs) for base, i in
                 state.readahead.watch(self.stats.faults)]
        if not (cl.set_regions(table, lanes, ext_shift=routes.ext_shift, route_gen=gen)
                and cl.set_slow(slow)):
            self._c_retry_at = now + 1.0  # too many regions / removed ranges for C
            return False
        self._c_dirty = False
        return True

    def _c_fold(self: ClientPager, cl: FaultLoop) -> None:
        """What C installed (residency) and its counters, into the state and the stats."""
        got = cl.take_stats()
        # after take_stats: its install counters are taken; a replay running follows faults
        self.installer.drain(cl.log, None if self.replay_done.is_set() else self._pf_seen)
        fm = self.state.farmem
        if fm is not None:
            dirty = cl.take_dirty()
            with self.fm_lock:
                for start in dirty:  # installed writable for a write fault: dirty at once
                    fm.on_write(start, fm.units[start].length if start in fm.units else fm.unit)
                # un-protected by C for a write (after the residency above: C may have
                # installed the unit in this call); units not resident are older than an
                # eviction
                later, self.c_wp_later = self.c_wp_later, []
                for start in later + cl.take_wp_dirty():
                    fm.written(start)
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
        st.c_faults += counters["served_fetch"] + counters["served_dup"] + counters["wp_dirty"]
        st.served_unprotect += counters["wp_dirty"]
        st.c_wp_dirty += counters["wp_dirty"]
        lb = st.latency_buckets
        for i, v in enumerate(buckets):
            if v:
                lb[i] += v

    def _c_fetch_failed(self: ClientPager, cl: FaultLoop, lane: Lane, err: int) -> None:
        """A fetch from C failed: the lane drops what broke (a cluster marks that node down);
        Python serves the fault, retrying or failing over."""
        self.stats.fetch_errors += 1
        log.debug("%s: C loop fetch failed (%s); Python path retries",
                  self.name, os.strerror(err) if err else "?")
        lane.c_failed(cl.failed_lane(), err)
        self._c_dirty = True
