"""Sets of disjoint half-open integer intervals, merged on insert (``IntervalSet``).

The pager keeps every client's resident set in one (host addresses, a chunk per fault) and the
ranges a guest REMOVE'd in others. Faults arrive in any order, so a resident set can hold as
many intervals as the guest has chunks resident: hundreds of thousands for a guest of a few
GiB faulting at random. A single sorted list would move half of them on every insert or
removal in the middle (18-25 µs at 200k intervals, on the fault thread); here the intervals are
kept in sorted blocks of at most ``2 * block`` entries, so an update moves one block's
entries and the short lists of block bounds, whatever the set's size.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

BLOCK = 256  # intervals per block after a split (a block splits above twice this)


class IntervalSet:
    """Disjoint half-open integer intervals, merged on insert (touching ones too)."""

    __slots__ = ("_block", "_blocks", "_count", "_firsts", "_lasts", "_total")

    def __init__(self, block: int = BLOCK) -> None:
        if block < 1:
            raise ValueError(f"block of {block} intervals: must be >= 1")
        self._block = block
        self._blocks: list[tuple[list[int], list[int]]] = []  # (starts, ends) each, sorted
        self._firsts: list[int] = []  # each block's first start
        self._lasts: list[int] = []  # each block's last end
        self._count = 0
        self._total = 0

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """The intervals in order, as they are now (a snapshot: the set may change meanwhile)."""
        return iter([iv for starts, ends in list(self._blocks)
                     for iv in zip(list(starts), list(ends), strict=True)])

    def copy(self) -> IntervalSet:
        c = IntervalSet(self._block)
        c._blocks = [(list(s), list(e)) for s, e in self._blocks]
        c._firsts, c._lasts = list(self._firsts), list(self._lasts)
        c._count, c._total = self._count, self._total
        return c

    def add(self, start: int, end: int) -> None:
        if start >= end:
            return
        if self._blocks:  # the common cases first: at the end (a sequential stream)
            starts, ends = self._blocks[-1]
            last = ends[-1]
            if start > last:  # after every interval
                starts.append(start)
                ends.append(end)
                self._lasts[-1] = end
                self._count += 1
                self._total += end - start
                if len(starts) > 2 * self._block:
                    self._settle(len(self._blocks) - 1)
                return
            if start >= starts[-1]:  # touching or inside the last interval
                if end > last:
                    ends[-1] = end
                    self._lasts[-1] = end
                    self._total += end - last
                return
        b0 = bisect.bisect_left(self._lasts, start)  # first block reaching start
        b1 = bisect.bisect_right(self._firsts, end) - 1  # last block starting by end
        if b0 > b1:  # touches nothing: a new interval between blocks b1 and b0
            if not self._blocks:
                self._blocks.append(([start], [end]))
                self._firsts.append(start)
                self._lasts.append(end)
            elif b1 >= 0:  # at the end of the block before it
                starts, ends = self._blocks[b1]
                starts.append(start)
                ends.append(end)
                self._lasts[b1] = end
                self._settle(b1)
            else:  # before everything
                starts, ends = self._blocks[0]
                starts.insert(0, start)
                ends.insert(0, end)
                self._firsts[0] = start
                self._settle(0)
            self._count += 1
            self._total += end - start
            return
        starts, ends = self._gather(b0, b1)
        i = bisect.bisect_left(ends, start)  # first interval ending at/after start
        j = bisect.bisect_right(starts, end)  # first interval starting after end
        if i < j:
            start = min(start, starts[i])
            end = max(end, ends[j - 1])
        self._total += (end - start) - (sum(ends[i:j]) - sum(starts[i:j]))
        self._count += 1 - (j - i)
        starts[i:j] = [start]
        ends[i:j] = [end]
        self._scatter(b0, b1, starts, ends)

    def discard(self, start: int, end: int) -> None:
        if start >= end:
            return
        b0 = bisect.bisect_right(self._lasts, start)  # first block reaching past start
        b1 = bisect.bisect_left(self._firsts, end) - 1  # last block starting before end
        if b0 > b1:
            return
        starts, ends = self._gather(b0, b1)
        i = bisect.bisect_right(ends, start)
        j = bisect.bisect_left(starts, end)
        if i >= j:
            return
        keep_s: list[int] = []
        keep_e: list[int] = []
        if starts[i] < start:
            keep_s.append(starts[i])
            keep_e.append(start)
        if ends[j - 1] > end:
            keep_s.append(end)
            keep_e.append(ends[j - 1])
        self._total += (sum(keep_e) - sum(keep_s)) - (sum(ends[i:j]) - sum(starts[i:j]))
        self._count += len(keep_s) - (j - i)
        starts[i:j] = keep_s
        ends[i:j] = keep_e
        self._scatter(b0, b1, starts, ends)

    def find(self, x: int) -> tuple[int, int] | None:
        """The interval containing ``x``."""
        b = bisect.bisect_right(self._firsts, x) - 1
        if b < 0:
            return None
        starts, ends = self._blocks[b]
        i = bisect.bisect_right(starts, x) - 1
        if i >= 0 and x < ends[i]:
            return starts[i], ends[i]
        return None

    def total(self) -> int:
        """Integers covered (kept as the set changes: any thread may read it at any time)."""
        return self._total

    def overlaps(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of the set inside ``[start, end)``."""
        out = []
        b = bisect.bisect_right(self._lasts, start)
        while b < len(self._blocks) and self._firsts[b] < end:
            starts, ends = self._blocks[b]
            i = bisect.bisect_right(ends, start)
            while i < len(starts) and starts[i] < end:
                out.append((max(start, starts[i]), min(end, ends[i])))
                i += 1
            b += 1
        return out

    # -- blocks ------------------------------------------------------------------------------
    def _gather(self, b0: int, b1: int) -> tuple[list[int], list[int]]:
        """Blocks ``b0..b1`` as one pair of lists (the block itself when there is one)."""
        if b0 == b1:
            return self._blocks[b0]
        starts: list[int] = []
        ends: list[int] = []
        for s, e in self._blocks[b0:b1 + 1]:
            starts += s
            ends += e
        return starts, ends

    def _scatter(self, b0: int, b1: int, starts: list[int], ends: list[int]) -> None:
        """Put ``starts``/``ends`` back in place of blocks ``b0..b1``, split in blocks of
        ``block`` intervals when longer than twice that; nothing where they are empty."""
        if b0 == b1 and 0 < len(starts) <= 2 * self._block:
            self._blocks[b0] = (starts, ends)
            self._firsts[b0], self._lasts[b0] = starts[0], ends[-1]
            self._settle(b0)
            return
        # blocks of near equal size, none above twice the block size
        m = -(-len(starts) // self._block) if len(starts) > 2 * self._block else 1
        n = max(1, -(-len(starts) // m))
        blocks = [(starts[k:k + n], ends[k:k + n]) for k in range(0, len(starts), n)]
        self._blocks[b0:b1 + 1] = blocks
        self._firsts[b0:b1 + 1] = [s[0] for s, _ in blocks]
        self._lasts[b0:b1 + 1] = [e[-1] for _, e in blocks]
        if blocks:
            self._settle(b0)

    def _settle(self, b: int) -> None:
        """Block ``b`` changed: split it if it grew past twice the block size, merge it into
        its successor if it shrank below a quarter (so blocks never dwindle to many tiny ones)."""
        starts, ends = self._blocks[b]
        if len(starts) > 2 * self._block:
            half = len(starts) // 2
            self._blocks[b:b + 1] = [(starts[:half], ends[:half]), (starts[half:], ends[half:])]
            self._firsts[b:b + 1] = [starts[0], starts[half]]
            self._lasts[b:b + 1] = [ends[half - 1], ends[-1]]
        elif len(starts) < self._block // 4 and b + 1 < len(self._blocks):
            nxt_s, nxt_e = self._blocks[b + 1]
            merged = (starts + nxt_s, ends + nxt_e)
            self._blocks[b:b + 2] = [merged]
            self._firsts[b:b + 2] = [merged[0][0]]
            self._lasts[b:b + 2] = [merged[1][-1]]
            if len(merged[0]) > 2 * self._block:
                self._settle(b)
