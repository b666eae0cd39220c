"""Eviction's I/O for a whole batch in C (``csrc/farmem.c``): the dirty stretches read from
the memfd and written to a memory node pipelined on one connection, the acked runs punched,
then woken; one call each (the GIL released), instead of several Python calls per unit.

``pager.engine.evict`` decides what to evict and in which order (write-protect, store, ack,
punch, forget, wake) and falls back to its Python lanes where this cannot be used."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pager.uffd._uffd_cffi import ffi, lib
from pager.uffd.errors import uffd_error

REPLY_TIMEOUT_MS = 10_000  # a node that does not ack a write-back within this: drop the link


class BatchIO:
    """Buffers for batches of up to ``max_bytes`` dirty bytes and ``max_runs`` runs."""

    def __init__(self, max_bytes: int, max_runs: int) -> None:
        if max_bytes <= 0 or max_runs <= 0:
            raise ValueError(f"batch of {max_bytes} bytes / {max_runs} runs: both must be > 0")
        self.max_bytes = max_bytes
        self.max_runs = max_runs
        self._buf = ffi.new("uint8_t[]", max_bytes)
        self._stores = ffi.new("struct ssi_fm_store[]", max_runs)
        self._a = ffi.new("uint64_t[]", max_runs)
        self._b = ffi.new("uint64_t[]", max_runs)
        self._failed = ffi.new("int *")
        self._err = ffi.new("int[]", max_runs)
        self._req = ffi.new("uint32_t *")

    def write_back(self, memfd: int, sock: int, space: int,
                   stretches: Sequence[tuple[int, int, int]], tls: Any = None) -> int:
        """Store ``(memfd offset, gpa, length)`` stretches on connection ``sock`` (space handle
        ``space``; ``tls``: its C TLS session, a `transport.tlsc.TlsSession`, or None) and
        wait for every ack: 0, or -errno (-EPROTO: the node refused one or replied out of
        step; drop the connection and let Python's lane retry)."""
        n = len(stretches)
        if n > self.max_runs or sum(s[2] for s in stretches) > self.max_bytes:
            raise ValueError(f"{n} stretches do not fit this batch's buffers")
        st = self._stores
        for i, (off, gpa, length) in enumerate(stretches):
            st[i].off, st[i].gpa, st[i].len = off, gpa, length
        ssl = ffi.cast("void *", tls.handle if tls is not None else 0)
        return lib.ssi_fm_write_back(memfd, sock, ssl, space, st, n, self._buf, self.max_bytes,
                                     self._req, REPLY_TIMEOUT_MS)

    def punch(self, memfd: int, ranges: Sequence[tuple[int, int]]) -> None:
        """``fallocate(PUNCH_HOLE|KEEP_SIZE)`` each ``(offset, length)``; raises naming the
        first range that failed (those before it are punched, those after it are not)."""
        n = self._fill(ranges)
        rc = lib.ssi_fm_punch(memfd, self._a, self._b, n, self._failed)
        if rc < 0:
            off, length = ranges[self._failed[0]]
            raise uffd_error(-rc, "fallocate(PUNCH_HOLE)",
                             f"memfd {memfd} range {off:#x}+{length:#x} (range "
                             f"{self._failed[0]} of {n})")

    def wake(self, uffd: int, ranges: Sequence[tuple[int, int]]) -> int:
        """``UFFDIO_WAKE`` each ``(address, length)``; how many failed (unmapped meanwhile)."""
        n = self._fill(ranges)
        return lib.ssi_fm_wake(uffd, self._a, self._b, n)

    def protect(self, uffd: int, ranges: Sequence[tuple[int, int]]) -> list[int]:
        """Write-protect each ``(address, length)``: the indexes of those that failed (a
        layout event pending: EAGAIN; unmapped meanwhile)."""
        n = self._fill(ranges)
        if not lib.ssi_fm_protect(uffd, self._a, self._b, n, self._err):
            return []
        return [i for i in range(n) if self._err[i]]

    def _fill(self, ranges: Sequence[tuple[int, int]]) -> int:
        n = len(ranges)
        if n > self.max_runs:
            raise ValueError(f"{n} ranges; this batch holds {self.max_runs}")
        a, b = self._a, self._b
        for i, (x, y) in enumerate(ranges):
            a[i], b[i] = x, y
        return n
