"""Working sets (pure, no I/O): the pages of an address space a guest touched in a bounded
window after it started or resumed, one bit per 4 KiB page of the space, and the plan that
replays them.

The record lives on the memory node beside the space it describes, in the space
``record_space(space)`` (``NAME.ws``): a header page (``HEADER``: magic, version, granule,
number of bits, pages set, when and over how long a window it was recorded) then the bitmap,
padded to whole pages. A resume of the space fetches the recorded pages ahead of demand in
batches of runs (``batches``); faults never wait for them.

Design facts: recording is bounded (a window in seconds after start/resume, and a cap on the
fraction of RAM) because an unbounded window records most of memory, and order-based readahead
does not predict a restored guest's faults while the set it touched does (stable across runs).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from pager.errors import ConfigError

GRANULE = 4096
MAGIC = b"SSI-WS01"
VERSION = 1
HEADER = struct.Struct("<8sIIQQdd")  # magic, version, granule, nbits, count, at, window_s
SUFFIX = ".ws"
MERGE_GAP = 16 * GRANULE  # runs closer than this are fetched as one (the gap comes along)


def record_space(space: str) -> str:
    """The memory-node space holding the working set of ``space``."""
    return space + SUFFIX


@dataclass(frozen=True)
class RecordInfo:
    nbits: int
    count: int
    recorded_at: float
    window_s: float

    @property
    def body_bytes(self) -> int:
        """Bytes of bitmap after the header page, padded to whole pages."""
        return -(-((self.nbits + 7) // 8) // GRANULE) * GRANULE


class WorkingSet:
    """A bitmap over the pages of one address space (bit p: page p, gpa p * GRANULE)."""

    def __init__(self, nbits: int) -> None:
        if nbits < 0:
            raise ConfigError(f"working set of {nbits} pages")
        self.nbits = nbits
        self.bits = bytearray((nbits + 7) // 8)

    def add(self, gpa: int, end: int) -> None:
        """Mark every page overlapping ``[gpa, end)`` (grows the bitmap as needed)."""
        first, last = gpa // GRANULE, -(-end // GRANULE)
        if last <= first:
            return
        if last > self.nbits:
            self.nbits = last
            self.bits.extend(bytes((last + 7) // 8 - len(self.bits)))
        bits = self.bits
        p = first
        while p < last and p & 7:
            bits[p >> 3] |= 1 << (p & 7)
            p += 1
        whole = (last - p) >> 3
        if whole:
            bits[p >> 3:(p >> 3) + whole] = b"\xff" * whole
            p += whole << 3
        while p < last:
            bits[p >> 3] |= 1 << (p & 7)
            p += 1

    def update(self, other: WorkingSet) -> None:
        if other.nbits > self.nbits:
            self.nbits = other.nbits
            self.bits.extend(bytes(len(other.bits) - len(self.bits)))
        for i, b in enumerate(other.bits):
            if b:
                self.bits[i] |= b

    @property
    def count(self) -> int:
        return sum(b.bit_count() for b in self.bits)

    def runs(self) -> Iterator[tuple[int, int]]:
        """``(gpa, length)`` of the maximal runs of set pages, in order."""
        start = -1
        bits = self.bits
        for i, b in enumerate(bits):
            if b == 0 or b == 0xFF:
                if (b == 0) == (start < 0):
                    continue  # no change: inside a gap, or inside a run
                p = i << 3
                if b:
                    start = p
                else:
                    yield start * GRANULE, (p - start) * GRANULE
                    start = -1
                continue
            for k in range(8):
                p = (i << 3) | k
                if b >> k & 1:
                    if start < 0:
                        start = p
                elif start >= 0:
                    yield start * GRANULE, (p - start) * GRANULE
                    start = -1
        if start >= 0:
            end = min(len(bits) << 3, max(self.nbits, start + 1))
            yield start * GRANULE, (end - start) * GRANULE

    def to_bytes(self, window_s: float) -> bytes:
        """The record: header page, then the bitmap padded to whole pages."""
        head = HEADER.pack(MAGIC, VERSION, GRANULE, self.nbits, self.count, time.time(),
                           window_s)
        body = bytes(self.bits)
        pad = -len(body) % GRANULE
        return head + bytes(GRANULE - len(head)) + body + bytes(pad)

    @classmethod
    def from_body(cls, info: RecordInfo, body: bytes | memoryview) -> WorkingSet:
        ws = cls(info.nbits)
        ws.bits[:] = bytes(body[:len(ws.bits)])
        return ws


def parse_header(page: bytes | memoryview) -> RecordInfo | None:
    """The record's header, or None when ``page`` holds no record (never written: zeros)."""
    magic, version, granule, nbits, count, at, window = HEADER.unpack_from(page)
    if magic != MAGIC:
        return None
    if version != VERSION or granule != GRANULE:
        raise ConfigError(f"working-set record version {version}, granule {granule}: this "
                          f"pager reads version {VERSION}, granule {GRANULE}; record it again "
                          f"(serve --ws-window)")
    return RecordInfo(nbits, count, at, window)


def merged(runs: Iterable[tuple[int, int]], gap: int = MERGE_GAP) -> Iterator[tuple[int, int]]:
    """Runs closer than ``gap`` joined (one fetch instead of two round trips)."""
    cur: list[int] | None = None
    for gpa, n in runs:
        if cur is not None and gpa - (cur[0] + cur[1]) <= gap:
            cur[1] = gpa + n - cur[0]
            continue
        if cur is not None:
            yield cur[0], cur[1]
        cur = [gpa, n]
    if cur is not None:
        yield cur[0], cur[1]


def batches(runs: Iterable[tuple[int, int, int]],
            batch: int) -> Iterator[list[tuple[int, int]]]:
    """``(gpa, length, page)`` runs (page-aligned) cut at page boundaries into batches of about
    ``batch`` bytes (at least one page each): each batch is fetched, installed without waking
    anyone, then woken once."""
    out: list[tuple[int, int]] = []
    size = 0
    for gpa, n, page in runs:
        while n:
            k = min(n, max(page, (batch - size) // page * page))
            out.append((gpa, k))
            size += k
            gpa += k
            n -= k
            if size >= batch:
                yield out
                out, size = [], 0
    if out:
        yield out
