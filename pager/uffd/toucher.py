"""Touch, fill or verify memory from C pthreads that do not hold the GIL.

A thread that faults on userfaultfd-registered memory sleeps until the fault is resolved; if it
held the GIL, no Python handler could run. ``Toucher`` starts C threads (in the binding's cffi
extension) that walk a range, recording the latency of the first access of each step in ns, so
Python can serve the faults meanwhile::

    t = Toucher(addr, length, op="verify", seed=7).start()
    while not t.finished:
        for ev in u.read_events(): ...      # resolve
    result = t.join()                       # mismatches, first_bad, latencies

``Background`` runs one blocking syscall (madvise, munmap, mremap, fork+read) on a C thread: the
kernel holds those callers until the uffd reader has read the matching event.

Content pattern: ``fill_pattern`` / ``check_pattern`` write and check a seeded 64-bit pattern that
depends on the byte offset in the address space, so a source and a checker agree on content.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from pager.uffd._uffd_cffi import ffi, lib
from pager.uffd.errors import uffd_error

OPS = {"read": lib.SSI_TOUCH_READ, "write": lib.SSI_TOUCH_WRITE, "fill": lib.SSI_TOUCH_FILL,
       "verify": lib.SSI_TOUCH_VERIFY}
ORDERS = {"seq": lib.SSI_ORDER_SEQ, "random": lib.SSI_ORDER_RANDOM}
PAGE_SIZE: int = os.sysconf("SC_PAGE_SIZE")

# started threads point into these C structs: keep them alive until joined, whatever the caller
# does with its Python objects
_running: set[object] = set()


def _ns(timeout: float | None) -> int:
    return -1 if timeout is None else int(timeout * 1e9)


def percentile(sorted_values: list[int], p: float) -> int:
    """Nearest-rank percentile of an already sorted list (0 for an empty one)."""
    if not sorted_values:
        return 0
    k = min(len(sorted_values) - 1, max(0, math.ceil(p / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


@dataclass(frozen=True)
class TouchResult:
    accesses: int
    mismatches: int          # steps whose content differed from the pattern (verify)
    first_bad: int           # byte offset (from the start) of the first bad word, or -1
    checksum: int
    latencies_ns: list[int]  # per access, in access order ([] when not recorded)

    def p(self, pct: float) -> int:
        """Latency percentile in ns."""
        return percentile(sorted(self.latencies_ns), pct)


class Toucher:
    """C threads touching [address, address+length) every ``step`` bytes.

    op: "read" (read a word), "write" (write the pattern word), "fill" (write the whole step
    with the pattern), "verify" (read, then check the whole step against the pattern).
    Latencies (ns, first access of each step, in access order) go to ``latency_buffer`` when
    given (any writable buffer of at least ``count`` 64-bit slots), else to an internal one.
    """

    def __init__(self, address: int, length: int, *, op: str = "read", step: int = PAGE_SIZE,
                 seed: int = 0, origin: int = 0, threads: int = 1, order: str = "seq",
                 cpu: int = -1, record: bool = True, latency_buffer=None) -> None:
        if op not in OPS or order not in ORDERS:
            raise ValueError(f"op must be one of {sorted(OPS)}, order one of {sorted(ORDERS)}")
        t = ffi.new("struct ssi_touch *")
        t.base, t.length, t.step, t.seed, t.origin = address, length, step, seed, origin
        t.op, t.order, t.nthreads, t.cpu = OPS[op], ORDERS[order], threads, cpu
        self._t = t
        self.count = (length + step - 1) // step
        if latency_buffer is not None:
            # the caller's writable buffer (array("Q"), numpy, mmap...): one u64 per access
            self._lat = ffi.from_buffer("uint64_t[]", latency_buffer, require_writable=True)
            if len(self._lat) < self.count:
                raise ValueError(f"latency_buffer holds {len(self._lat)} values; "
                                 f"{self.count} accesses need one each")
        elif record and self.count:
            self._lat = ffi.new("uint64_t[]", self.count)
        else:
            self._lat = ffi.NULL
        t.lat_ns = self._lat
        self._started = False
        self._joined = False

    def start(self) -> Toucher:
        rc = lib.ssi_touch_start(self._t)
        if rc < 0:
            raise uffd_error(-rc, "toucher start", "check step (multiple of 8), threads (1..64)")
        self._started = True
        _running.add(self)
        return self

    @property
    def finished(self) -> bool:
        return bool(self._t.finished)

    @property
    def done(self) -> int:
        """Accesses completed so far."""
        return int(self._t.done)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait (GIL released) until every thread is done; False on timeout."""
        if not self._started:
            raise RuntimeError("toucher not started")
        if lib.ssi_touch_wait(self._t, _ns(timeout)):
            self._joined = True
            _running.discard(self)
            return True
        return False

    def join(self, timeout: float | None = None) -> TouchResult:
        if not self.wait(timeout):
            raise TimeoutError(f"toucher still running after {timeout}s: {self.done} of "
                               f"{self.count} accesses done (unresolved faults?)")
        t = self._t
        lat = list(ffi.unpack(self._lat, self.count)) if self._lat != ffi.NULL else []
        return TouchResult(int(t.done), int(t.mismatches), int(t.first_bad), int(t.checksum),
                           lat)


class Background:
    """One blocking call on a C thread: ``Background.madvise(addr, n, MADV_DONTNEED).start()``."""

    def __init__(self, op: int, a: int = 0, b: int = 0, c: int = 0, d: int = 0) -> None:
        self._b = ffi.new("struct ssi_bg *")
        self._b.op, self._b.a, self._b.b, self._b.c, self._b.d = op, a, b, c, d
        self._started = False

    @classmethod
    def madvise(cls, addr: int, length: int, advice: int) -> Background:
        return cls(lib.SSI_BG_MADVISE, addr, length, advice)

    @classmethod
    def munmap(cls, addr: int, length: int) -> Background:
        return cls(lib.SSI_BG_MUNMAP, addr, length)

    @classmethod
    def mremap(cls, addr: int, old_len: int, new_len: int, new_addr: int = 0) -> Background:
        """mremap with MREMAP_MAYMOVE (and MREMAP_FIXED when new_addr); result = new address."""
        return cls(lib.SSI_BG_MREMAP, addr, old_len, new_len, new_addr)

    @classmethod
    def fork_read(cls, addr: int, expect: int) -> Background:
        """fork(); the child reads the byte at addr and exits 0 if it equals ``expect``."""
        return cls(lib.SSI_BG_FORK_READ, addr, expect)

    @classmethod
    def read(cls, addr: int) -> Background:
        """Read the byte at addr (result = its value)."""
        return cls(lib.SSI_BG_READ, addr)

    def start(self) -> Background:
        rc = lib.ssi_bg_start(self._b)
        if rc < 0:
            raise uffd_error(-rc, "background start")
        self._started = True
        _running.add(self)
        return self

    @property
    def finished(self) -> bool:
        return bool(self._b.finished)

    def wait(self, timeout: float | None = None) -> bool:
        if lib.ssi_bg_wait(self._b, _ns(timeout)):
            _running.discard(self)
            return True
        return False

    def result(self, timeout: float | None = None) -> int:
        """The call's return value (address, wait status, byte); raises UffdError on -errno."""
        if not self.wait(timeout):
            raise TimeoutError(f"background call still blocked after {timeout}s")
        r = int(self._b.result)
        if r < 0 and self._b.op != lib.SSI_BG_FORK_READ:
            raise uffd_error(-r, "background call")
        return r


def fill_pattern(buffer, seed: int, origin: int = 0) -> None:
    """Fill a writable buffer (or (address, length)) with the pattern for offset ``origin``."""
    if isinstance(buffer, tuple):
        lib.ssi_pattern_fill_at(buffer[0], buffer[1], seed, origin)
    else:
        b = ffi.from_buffer(buffer, require_writable=True)
        lib.ssi_pattern_fill(b, len(b), seed, origin)


def check_pattern(buffer, seed: int, origin: int = 0) -> int:
    """Byte offset of the first word differing from the pattern, or -1 if all match."""
    if isinstance(buffer, tuple):
        return int(lib.ssi_pattern_check_at(buffer[0], buffer[1], seed, origin))
    b = ffi.from_buffer(buffer)
    return int(lib.ssi_pattern_check(b, len(b), seed, origin))


def pattern_bytes(length: int, seed: int, origin: int = 0) -> bytearray:
    """``length`` bytes of pattern content starting at offset ``origin``."""
    buf = bytearray(length)
    fill_pattern(buf, seed, origin)
    return buf
