"""The fault engine's bookkeeping for one client, with no I/O (fed with plain events).

``ClientState`` answers "what must be done for a fault of this kind at this address" with an
action (fetch, zero fill, wait, unprotect, continue, or unknown) and keeps what that depends on:
the region table (following UNMAP / REMAP), the ranges a REMOVE dropped (zero on their next
fault, never fetched again), the readahead ranges in flight (a fault there waits for them
instead of fetching again), the faults deferred by EAGAIN, the sequential-stream detector that
asks for readahead, and the exact resident set (every chunk either fault path installed, as the
installer reports it; dropped on REMOVE / UNMAP, moved on REMAP). The fault thread
(pager.engine) does the syscalls and the fetches; tests drive this object directly.

Removed ranges are kept in *space offsets* (gpa), so they stay right when a range is mremap'ed;
the resident set is kept in host addresses (what the kernel maps), moved with the mapping.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from pager.core.farmem import FarMemory
from pager.core.intervals import IntervalSet
from pager.core.readahead import Readahead
from pager.core.region import PAGE_SIZE, Region, RegionTable

# fault kinds (the uffd page-fault flags): a missing page, a write to a write-protected page,
# a minor fault (the page is in the page cache but not mapped)
MISSING = "missing"
WP = "wp"
MINOR = "minor"
FAULT_KINDS = (MISSING, WP, MINOR)


@dataclass(slots=True)  # not frozen: frozen dataclasses cost ~1 us more to build per fault
class Fetch:
    """Fetch ``length`` bytes at ``gpa`` of the region's space and install them at ``start``
    (pages in ``removed`` are skipped: they are zero-filled only when faulted on)."""

    region: Region
    start: int
    length: int
    gpa: int
    removed: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True, slots=True)
class ZeroFill:
    """A REMOVE'd range: fill ``[start, start+length)`` with zero pages, fetch nothing."""

    region: Region
    start: int
    length: int


@dataclass(frozen=True, slots=True)
class Wait:
    """The chunk is being read ahead: the fault is resolved when that lands."""

    key: tuple[int, int]


@dataclass(frozen=True, slots=True)
class Unknown:
    """No region covers the address (a layout event we missed, or a bug): cannot serve."""

    address: int


@dataclass(frozen=True, slots=True)
class Unprotect:
    """A write to a write-protected page with no dirty tracking: clear the protection (which
    wakes the writer)."""

    region: Region
    start: int
    length: int


@dataclass(frozen=True, slots=True)
class Continue:
    """A minor fault: the page is in the page cache; map it (UFFDIO_CONTINUE)."""

    region: Region
    start: int
    length: int


Action = Fetch | ZeroFill | Wait | Unknown | Unprotect | Continue


@dataclass
class ClientState:
    """Per-client bookkeeping (one per uffd: a forked child gets a copy)."""

    regions: RegionTable
    chunk_size: int = 64 * 1024
    removed: dict[str | None, IntervalSet] = field(default_factory=dict)
    inflight: dict[tuple[int, int], list[int]] = field(default_factory=dict)
    deferred: list[tuple[int, str]] = field(default_factory=list)
    readahead: Readahead = field(default_factory=Readahead)
    resident: IntervalSet = field(default_factory=IntervalSet)
    farmem: FarMemory | None = None  # a resident limit: units, dirty bits, eviction order

    def fork(self) -> ClientState:
        """The state of a forked child: same layout, removed ranges and resident pages (the
        child shares them copy-on-write), nothing in flight."""
        return ClientState(regions=self.regions.copy(), chunk_size=self.chunk_size,
                           removed={k: v.copy() for k, v in self.removed.items()},
                           readahead=self.readahead.fresh(),
                           resident=self.resident.copy())

    # -- faults ------------------------------------------------------------------------------
    def on_fault(self, addr: int, kind: str = MISSING) -> Action:
        """The action for a fault of ``kind`` (``MISSING``, ``WP``, ``MINOR``) at ``addr``."""
        r = self.regions.find(addr)
        if r is None:
            return Unknown(addr)
        if kind != MISSING:
            page = r.page(addr)
            if kind == WP:
                return Unprotect(r, page, r.page_size)
            if kind == MINOR:
                return Continue(r, page, r.page_size)
            raise ValueError(f"fault kind {kind!r}: expected one of {FAULT_KINDS}")
        cs = self.chunk_size
        if r.page_size == PAGE_SIZE and not cs % PAGE_SIZE:  # the hot case, r.chunk() inlined
            start = addr - (addr - r.base) % cs
            length = min(cs, r.base + r.size - start)
        else:
            start, length = r.chunk(addr, cs)
        removed = self.removed.get(r.space)
        if removed is not None:
            page = r.page(addr)
            hit = removed.find(r.gpa(page))
            if hit is not None:
                s = max(start, r.addr_of(hit[0]))
                e = min(start + length, r.addr_of(hit[1]))
                return ZeroFill(r, s, e - s)
        if self.inflight:
            key = (r.base, (start - r.base) // self.chunk_size)
            waiters = self.inflight.get(key)
            if waiters is not None:
                waiters.append(addr)
                return Wait(key)
        return self.fetch_of(r, start, length)

    def fetch_of(self, r: Region, start: int, length: int) -> Fetch:
        """The fetch of ``[start, start+length)`` of region ``r`` (the REMOVE'd pages in it left
        out)."""
        gone: tuple[tuple[int, int], ...] = ()
        removed = self.removed.get(r.space)
        if removed is not None:
            gone = tuple((r.addr_of(s), r.addr_of(e))
                         for s, e in removed.overlaps(r.gpa(start), r.gpa(start + length)))
        return Fetch(r, start, length, r.gpa(start), gone)

    def readahead_after(self, addr: int, follows: Callable[[int], bool] | None = None,
                        clock: int = 0) -> list[Fetch]:
        """Chunks to read ahead after a fault at ``addr`` (marked in flight here).
        ``follows(chunk start)``: whether the chunk before was faulted on just before (the C
        loop served it, so the detector did not see it); ``clock``: faults so far."""
        r = self.regions.find(addr)
        cs = self.chunk_size
        if r is None or r.page_size > cs:  # huge pages: a fault fetches a whole page already
            return []
        nchunks = -(-r.size // cs)
        index = (addr - r.base) // cs
        after = follows is not None and follows(r.base + index * cs)
        out = []
        for i in self.readahead.on_fault(r.base, index, nchunks, after, clock):
            key = (r.base, i)
            if key in self.inflight:
                continue
            start = r.base + i * cs
            length = min(cs, r.end - start)
            removed = self.removed.get(r.space)
            if removed is not None and removed.overlaps(r.gpa(start), r.gpa(start + length)):
                continue  # balloon territory: never fetched again
            self.inflight[key] = []
            out.append(Fetch(r, start, length, r.gpa(start)))
        return out

    def landed(self, fetch: Fetch) -> list[int]:
        """A readahead chunk finished (installed or failed): its waiting fault addresses."""
        key = (fetch.region.base, (fetch.start - fetch.region.base) // self.chunk_size)
        return self.inflight.pop(key, [])

    def install_plan(self, fetch: Fetch) -> Fetch | None:
        """Re-check a readahead chunk against the layout now (it may have been unmapped,
        moved or removed while it was fetched): where to install it, or None to drop it."""
        r = self.regions.find(fetch.start)
        if r is None or r.space != fetch.region.space or r.gpa(fetch.start) != fetch.gpa:
            return None
        end = min(fetch.start + fetch.length, r.end)
        removed = self.removed.get(r.space)
        gone: tuple[tuple[int, int], ...] = ()
        if removed is not None:
            gone = tuple((r.addr_of(s), r.addr_of(e))
                         for s, e in removed.overlaps(fetch.gpa, r.gpa(end)))
        return Fetch(r, fetch.start, end - fetch.start, fetch.gpa, gone)

    def defer(self, addr: int, kind: str = MISSING) -> None:
        """A fault whose ioctl met EAGAIN (a layout event pending): served again later."""
        self.deferred.append((addr, kind))

    def take_deferred(self) -> list[tuple[int, str]]:
        d, self.deferred = self.deferred, []
        return d

    # -- residency ---------------------------------------------------------------------------
    def on_installed(self, addr: int, length: int, how: str) -> None:
        """``[addr, addr+length)`` is resident now (``how``: "copy", "zero" or "eexist": found
        present, installed by someone else)."""
        self.resident.add(addr, addr + length)
        fm = self.farmem
        if fm is not None:
            r = self.regions.find(addr)
            end = addr + length
            while r is not None and addr < end:
                start, n = r.chunk(addr, self.chunk_size)
                fm.installed(start, n, known=how != "eexist")
                addr = start + n

    @property
    def resident_bytes(self) -> int:
        return self.resident.total()

    # -- layout events ----------------------------------------------------------------------
    def on_remove(self, start: int, end: int) -> None:
        """madvise(DONTNEED/REMOVE): those pages read as zero from now on."""
        for r in self.regions.overlapping(start, end):
            s, e = r.clip(start, end)  # type: ignore[misc]
            self.removed.setdefault(r.space, IntervalSet()).add(r.gpa(s), r.gpa(e))
        self.resident.discard(start, end)
        if self.farmem is not None:
            self.farmem.forget(start, end, self._unit_starts(start, end))

    def _unit_starts(self, start: int, end: int) -> list[int] | None:
        """Where a far-memory unit inside ``[start, end)`` can start (each region's chunks
        there), or None when there are more of them than resident units (every unit is
        checked then)."""
        fm = self.farmem
        assert fm is not None
        spans = []
        count = 0
        for r in self.regions.overlapping(start, end):
            s, e = r.clip(start, end)  # type: ignore[misc]
            first, _ = r.chunk(s, self.chunk_size)
            spans.append(range(first, e, r.chunk_bytes(self.chunk_size)))
            count += len(spans[-1])
            if count >= len(fm.units):
                return None
        return [k for span in spans for k in span]

    def on_stored(self, start: int, end: int) -> None:
        """``[start, end)`` was written back to the node and dropped (far memory): fetch it
        again on the next fault, even where a REMOVE had made it zero."""
        for r in self.regions.overlapping(start, end):
            s, e = r.clip(start, end)  # type: ignore[misc]
            removed = self.removed.get(r.space)
            if removed is not None:
                removed.discard(r.gpa(s), r.gpa(e))

    def on_unmap(self, start: int, end: int) -> None:
        starts = self._unit_starts(start, end) if self.farmem is not None else None
        self.regions.remove_range(start, end)
        self.resident.discard(start, end)
        if self.farmem is not None:
            self.farmem.forget(start, end, starts)

    def on_remap(self, old: int, new: int, length: int) -> None:
        self.regions.move(old, new, length)
        moved = self.resident.overlaps(old, old + length)
        self.resident.discard(old, old + length)
        self.resident.discard(new, new + length)  # mremap unmapped what was there
        for s, e in moved:
            self.resident.add(new + (s - old), new + (e - old))
        if self.farmem is not None:
            self.farmem.move(old, new, length)


def segments(start: int, length: int,
             removed: tuple[tuple[int, int], ...] = ()) -> list[tuple[int, int]]:
    """The ``(start, length)`` parts of ``[start, start+length)`` outside the removed ranges,
    in address order (removed pages are zero-filled only when faulted on)."""
    out: list[tuple[int, int]] = []
    pos, end = start, start + length
    for s, e in sorted(removed):
        s, e = max(s, pos), min(e, end)
        if s >= e:
            continue
        if s > pos:
            out.append((pos, s - pos))
        pos = e
    if pos < end:
        out.append((pos, end - pos))
    return out
