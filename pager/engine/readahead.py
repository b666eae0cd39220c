"""The readahead lane of a client: sequential streams are fetched ahead on a second thread
and connection; the fault thread installs what landed only when no fault is waiting, so
readahead never delays a fault. ``ReadaheadMixin`` is part of ``ClientPager``.

Streams are detected per stream (``pager.core.readahead``) from the faults Python serves. The
C loop keeps serving every other fault: it leaves to Python only a fault on the chunk right
after one it served lately, on a stream's next chunk, or on a chunk in flight, so a random
fault stays in C (no hand-back, no round trip more) and a sequential stream reaches the
detector from its second fault on."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from pager.core.state import Fetch
from pager.uffd.buffers import address_of
from pager.uffd.errors import UffdRetry

if TYPE_CHECKING:
    from pager.engine.client import ClientPager

log = logging.getLogger(__name__)

RA_BATCH = 64 * 1024  # bytes per readahead fetch (the memory node streams these best)


class ReadaheadMixin:
    """Readahead for ``ClientPager``: request, fetch on the lane thread, install."""

    def _readahead(self: ClientPager, addr: int) -> None:
        """After a fault served by Python at ``addr``: feed the stream detector, request what
        it reads ahead."""
        if not self.state.readahead.active:
            return
        cl = self._cl
        todo = self.state.readahead_after(addr, cl.watching if cl is not None else None,
                                          self.stats.faults)
        self._c_dirty = True  # the streams' next chunks (and maybe chunks in flight) moved
        if not todo:
            return
        if self._ra_thread is None:
            self._ra_thread = threading.Thread(target=self._ra_run, name=f"ra-{self.name}",
                                               daemon=True)
            self._ra_thread.start()
        self.stats.readahead_chunks += len(todo)
        self.stats.inflight += len(todo)
        # consecutive chunks travel as one fetch and one install (fewer round trips/ioctls)
        group: list[Fetch] = []
        size = 0
        for f in todo:
            if group and (f.start != group[-1].start + group[-1].length
                          or f.region is not group[0].region or size + f.length > RA_BATCH):
                self._ra_queue.put(group)
                group, size = [], 0
            group.append(f)
            size += f.length
        self._ra_queue.put(group)

    def _ra_run(self: ClientPager) -> None:
        """Readahead lane: fetch on its own connection; the fault thread installs."""
        lane = self.engine.source.open_lane()
        try:
            while True:
                group = self._ra_queue.get()
                if group is None or self._stop.is_set():
                    break
                first = group[0]
                total = sum(f.length for f in group)
                buf = memoryview(bytearray(total))
                try:
                    mask = lane.fetch_into(first.region.space, first.gpa, buf)
                    self.stats.fetched_bytes += total
                    self._ra_done.append((group, buf, mask, None))
                except Exception as exc:
                    lane.reset()
                    self._ra_done.append((group, None, 0, exc))
                self._kick()
        finally:
            lane.close()

    def _install_readahead(self: ClientPager, group: list[Fetch], buf: memoryview | None, mask: int,
                           exc: Exception | None) -> None:
        self._c_dirty = True
        self.stats.inflight -= len(group)
        waiters: list[int] = []
        for f in group:
            waiters += self.state.landed(f)
        first = group[0]
        whole = Fetch(first.region, first.start, sum(f.length for f in group), first.gpa)
        plan = self.state.install_plan(whole) if exc is None else None
        if plan is None:
            self.stats.readahead_wasted += len(group)
            if exc is not None:
                log.debug("%s: readahead %#x failed: %s", self.name, first.gpa, exc)
        else:
            _keep, addr = address_of(buf)  # keeps buf exported during the install
            try:
                self.installer.install(plan.start, plan.length, addr, mask, plan.removed,
                                       plan.region.page_size)
                self.stats.readahead_installed += len(group)
                end = plan.start + plan.length
                waiters = [a for a in waiters if not plan.start <= a < end
                           or any(s <= a < e for s, e in plan.removed)]
            except UffdRetry:
                self.stats.readahead_wasted += len(group)
        t0 = time.perf_counter_ns()
        for addr in waiters:  # not covered by what was installed: serve them now
            self._serve(addr, self._lane, t0)
