"""Far memory, the fault thread's side (``FarMemMixin``, part of ``ClientPager``) and the
checks and setup of a client under a resident limit; the evictor is ``pager.engine.evict``.

Missing faults install their unit write-protected (a write miss: writable and dirty at once),
within the room under the limit (waiting for the evictor when there is none), never in a unit
being evicted (the evictor's wake makes the thread fault again). A write-protect fault the C
loop hands back marks the unit dirty and clears its protection here, unless it is being
evicted or no longer resident.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from pager.core.farmem import FarMemory
from pager.core.region import Region
from pager.core.state import Fetch
from pager.errors import ConfigError, HandoffError
from pager.uffd.errors import UffdError
from pager.uffd.mman import data_ranges

if TYPE_CHECKING:
    from pager.engine.client import ClientPager
    from pager.source import Lane, PageSource
    from pager.uffd.binding import Userfaultfd

log = logging.getLogger(__name__)


class FarMemMixin:
    """The fault thread's side of far memory, part of ``ClientPager``."""

    def _fm_unit(self: ClientPager, addr: int) -> tuple[int, int] | None:
        r = self.state.regions.find(addr)
        return None if r is None else r.chunk(addr, self.engine.chunk_size)

    def _fm_fetch(self: ClientPager, f: Fetch, lane: Lane | None, zero: bool = False) -> bool:
        """A missing fault's unit fetched (or zero filled) and installed, write-protected; False
        if it is being evicted (the evictor's wake makes the thread fault again)."""
        fm = self.state.farmem
        assert fm is not None
        unit = self._fm_unit(f.start)
        key = f.start if unit is None else unit[0]
        with self.fm_lock:
            if not fm.begin_fetch(key):
                self.stats.evict_waits += 1
                return False
            self._fm_room(fm, f.length)
        # a write fault: install the unit writable and dirty at once (saves the WP fault
        # that would follow); it is not picked before end_fetch, so nothing sees it clean
        write, self._write_miss = self._write_miss, False
        mode = self.installer.mode
        if write:
            self.installer.mode = 0
        try:
            if zero:
                self.installer.install(f.start, f.length, None, 0, (), f.region.page_size)
            else:
                self._fetch_and_install(f, lane)
        finally:
            self.installer.mode = mode
            with self.fm_lock:
                if write and key in fm.units:
                    fm.on_write(key, unit[1] if unit else f.length)
                fm.end_fetch(key)
        if fm.excess() > 0:
            self.evictor.kick()
        return True

    def _fm_room(self: ClientPager, fm: FarMemory, length: int) -> None:
        """Holding ``fm_lock``: wait until ``length`` more bytes fit under the limit (the
        evictor ran behind); past ``fetch_timeout`` go on, over the limit, and say so."""
        if not fm.full(length):
            return
        self.stats.full_waits += 1
        deadline = time.monotonic() + self.engine.fetch_timeout
        while fm.full(length) and not self._stop.is_set() and self.fenced is None:
            self.evictor.kick()
            if self.evictor.stalled:  # events to read first: serve this one over the limit
                return
            if time.monotonic() > deadline or not self.evictor._thread.is_alive():
                log.warning("%s: the evictor is behind (%d of %d bytes resident); serving "
                            "over the limit", self.name, fm.bytes, fm.limit)
                return
            self.fm_lock.wait(0.05)

    def _fm_write(self: ClientPager, addr: int) -> None:
        """A write-protect fault: mark the unit dirty and clear the protection, unless it is
        being evicted or no longer resident (then the wake / a missing fault serves it)."""
        fm = self.state.farmem
        assert fm is not None
        unit = self._fm_unit(addr)
        if unit is None:
            return
        start, length = unit
        with self.fm_lock:
            if self.state.resident.find(addr) is None:
                self.stats.wp_stale += 1
                self.uffd.wake(start, length)  # a fault from before an eviction: fault again
                return
            if not fm.on_write(start, length):
                self.stats.evict_waits += 1
                return
            self.uffd.writeprotect(start, length, protect=False)
        self.stats.wp_dirty += 1


def check_writable(source: PageSource) -> None:
    """Far memory writes dirty pages back: the source must take stores (a memory node)."""
    from pager.source import Lane
    lane = source.open_lane()
    try:
        if type(lane).store_from is Lane.store_from:
            raise ConfigError(f"a resident limit needs a source that takes write-backs; "
                              f"{source.describe()} is read-only: serve from a memory node "
                              "(--memnode HOST:PORT)")
    finally:
        lane.close()


def check_far_memory(regions: list[Region], memfd: int | None) -> None:
    """A client under a resident limit must hand over the memfd behind all of its RAM (each
    region's offset is its offset in that memfd, as the QEMU shim sends it)."""
    if memfd is None or not all(r.memfd for r in regions):
        raise HandoffError(
            "this pager keeps guests under a resident limit (--max-resident / "
            "--pager-max-resident), which needs guest RAM on a shared memfd handed over in the "
            "handshake (the pager reads and punches evicted pages there); this client's memory "
            "is anonymous (Firecracker today): serve it from a pager without a limit, or run "
            "the guest through `ssi-pager vm` (QEMU on a shared memfd)")


def register_wp(u: Userfaultfd, regions: list[Region]) -> None:
    """Register the client's regions again, with write-protect mode added (dirty tracking);
    the uffd's mm is the client's, so this works from the pager."""
    for r in regions:
        try:
            u.register(r.base, r.size, missing=True, wp=True, page_size=r.page_size)
        except UffdError as exc:
            raise HandoffError(f"cannot track dirty pages of region {r.base:#x}+{r.size:#x} "
                               f"(write-protect mode refused: {exc}); a resident limit needs "
                               "a kernel with userfaultfd write-protect on shmem "
                               "(CONFIG_PTE_MARKER_UFFD_WP, Linux 6.1+)") from exc


def rebuild_residency(client: ClientPager) -> int:
    """A (restarted) pager adopting a far-memory client: what the memfd holds is resident, and
    dirty (nothing proves the node has that copy). A unit found only partly there (the previous
    pager was killed inside the copy that installed it) has its missing pages installed from the
    node now: written back later as a whole, they would otherwise go as zeros over the node's
    copy. Returns the bytes found."""
    fm = client.state.farmem
    assert fm is not None and client.memfd is not None
    found = 0
    cs = client.engine.chunk_size
    partial: dict[int, tuple[Region, int, int]] = {}  # unit start -> (region, length, bytes)
    for r in client.state.regions:
        for off, n in data_ranges(client.memfd, r.offset + r.size, r.offset):
            a, end = r.addr_of(off), r.addr_of(off + n)
            client.state.resident.add(a, end)
            while a < end:
                start, length = r.chunk(a, cs)
                fm.installed(start, length, known=False)
                got = min(end, start + length) - a
                _, _, had = partial.get(start, (r, length, 0))
                partial[start] = (r, length, had + got)
                found += got
                a = start + length
    holes = [(r, start, length) for start, (r, length, got) in partial.items() if got < length]
    if holes:
        with client.engine.source.open_lane(bulk=True) as lane:
            for r, start, length in holes:
                client._fetch_and_install(client.state.fetch_of(r, start, length), lane)
        log.info("%s: %d units were partly in the memfd; their other pages were installed "
                 "from the node", client.name, len(holes))
    return found
