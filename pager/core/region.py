"""Regions: a client's host virtual address ranges and where their bytes live in an address space.

A ``Region`` maps ``[base, base + size)`` in the client's address space to
``[offset, offset + size)`` in a page source's address space (a memory node "space", or a
snapshot file where the offset is the file position, as Firecracker does). Chunks are aligned to
the region *base*, not to the host address: a memfd-backed RAM block may be only 4 KiB aligned,
and the gpa on the wire must stay chunk aligned for the memory node.

``RegionTable`` is the per-client lookup (sorted, bisect) and follows the layout events the kernel
reports: UNMAP drops a range, REMAP moves one (``mremap``), both possibly splitting a region.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

from pager.errors import HandoffError

PAGE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class Region:
    """``size`` bytes at host address ``base`` backed by bytes at ``offset`` of ``space``."""

    base: int
    size: int
    offset: int
    page_size: int = PAGE_SIZE
    space: str | None = None  # None: the pager's default space
    memfd: bool = False  # the client passed the memfd backing this region

    @property
    def end(self) -> int:
        return self.base + self.size

    def contains(self, addr: int) -> bool:
        return self.base <= addr < self.base + self.size

    def gpa(self, addr: int) -> int:
        """Offset in the source's space of host address ``addr``."""
        return self.offset + (addr - self.base)

    def addr_of(self, gpa: int) -> int:
        """Host address of space offset ``gpa`` (inverse of :meth:`gpa`)."""
        return self.base + (gpa - self.offset)

    def chunk_bytes(self, chunk_size: int) -> int:
        """This region's chunk size for ``chunk_size``: rounded up to a multiple of the page
        size (one page at least)."""
        ps = self.page_size
        return max(ps, -(-chunk_size // ps) * ps)

    def chunk(self, addr: int, chunk_size: int) -> tuple[int, int]:
        """The chunk holding ``addr``: (host start, length), aligned to the region base and
        clipped to the region (`chunk_bytes` long before the clip)."""
        chunk_size = self.chunk_bytes(chunk_size)
        start = self.base + (addr - self.base) // chunk_size * chunk_size
        return start, min(chunk_size, self.end - start)

    def page(self, addr: int) -> int:
        """Start of the page holding ``addr`` (aligned to the region base)."""
        return self.base + (addr - self.base) // self.page_size * self.page_size

    def clip(self, start: int, end: int) -> tuple[int, int] | None:
        """``[start, end)`` intersected with this region, or None if they do not meet."""
        s, e = max(start, self.base), min(end, self.end)
        return (s, e) if s < e else None

    def sub(self, start: int, end: int) -> Region:
        """The part ``[start, end)`` of this region as a region of its own."""
        return replace(self, base=start, size=end - start, offset=self.gpa(start))

    def validate(self) -> None:
        """Raise HandoffError if this region cannot be served."""
        ps = self.page_size
        if ps < PAGE_SIZE or ps & (ps - 1):
            raise HandoffError(f"region at {self.base:#x}: page size {ps} is not a power of two "
                               f">= {PAGE_SIZE}; send page_size in bytes")
        if self.size <= 0:
            raise HandoffError(f"region at {self.base:#x} is empty (size {self.size}); "
                               "send only regions with a positive size")
        if self.base % ps or self.size % ps or self.offset % ps:
            raise HandoffError(
                f"region base={self.base:#x} size={self.size:#x} offset={self.offset:#x} "
                f"is not aligned to its page size {ps}; align base, size and offset")
        if self.base < 0 or self.offset < 0 or self.end > 1 << 64:
            raise HandoffError(f"region at {self.base:#x}: address or offset out of range")


class RegionTable:
    """A client's regions, sorted by base, non-overlapping; lookup by host address."""

    def __init__(self, regions: Iterable[Region] = ()) -> None:
        self._regions: list[Region] = []
        self._bases: list[int] = []
        for r in regions:
            self.add(r)

    def __iter__(self) -> Iterator[Region]:
        return iter(self._regions)

    def __len__(self) -> int:
        return len(self._regions)

    def copy(self) -> RegionTable:
        return RegionTable(self._regions)

    def add(self, region: Region) -> None:
        region.validate()
        i = bisect.bisect_right(self._bases, region.base)
        prev = self._regions[i - 1] if i else None
        nxt = self._regions[i] if i < len(self._regions) else None
        if (prev and prev.end > region.base) or (nxt and region.end > nxt.base):
            other = prev if prev and prev.end > region.base else nxt
            raise HandoffError(
                f"region {region.base:#x}+{region.size:#x} overlaps region "
                f"{other.base:#x}+{other.size:#x}; send non-overlapping regions")
        self._regions.insert(i, region)
        self._bases.insert(i, region.base)

    def find(self, addr: int) -> Region | None:
        i = bisect.bisect_right(self._bases, addr) - 1
        if i >= 0:
            r = self._regions[i]
            if addr < r.end:
                return r
        return None

    def overlapping(self, start: int, end: int) -> list[Region]:
        i = max(0, bisect.bisect_right(self._bases, start) - 1)
        out = []
        for r in self._regions[i:]:
            if r.base >= end:
                break
            if r.end > start:
                out.append(r)
        return out

    def remove_range(self, start: int, end: int) -> list[Region]:
        """Drop ``[start, end)`` (munmap), splitting regions; returns the parts removed."""
        cut: list[Region] = []
        for r in self.overlapping(start, end):
            i = self._regions.index(r)
            del self._regions[i]
            del self._bases[i]
            s, e = r.clip(start, end)  # type: ignore[misc]
            cut.append(r.sub(s, e))
            for part in ((r.base, s), (e, r.end)):
                if part[0] < part[1]:
                    self.add(r.sub(*part))
        return cut

    def move(self, old: int, new: int, length: int) -> None:
        """Follow ``mremap(old, length) -> new``: the bytes keep their space offsets."""
        moved = self.remove_range(old, old + length)
        # a destination that overlapped a registered range was unmapped by mremap first
        self.remove_range(new, new + length)
        for part in moved:
            self.add(replace(part, base=new + (part.base - old)))
