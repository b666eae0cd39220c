"""The far-memory workload (``csrc/rmw.c``) for tests and the bench: pthreads doing random
reads and read-modify-writes over pages, every value checked against a model kept outside the
paged memory. ``run()`` blocks with the GIL released (an in-process pager can serve)."""

from __future__ import annotations

from pager.uffd._uffd_cffi import ffi, lib
from pager.uffd.errors import uffd_error

MAX_THREADS: int = lib.SSI_RMW_MAX_THREADS


class Rmw:
    """``threads`` threads, ``ops`` operations each over ``npages`` pages at ``base``;
    ``write_pct`` percent read-modify-writes; skew: ``hot_ops`` percent of operations on the
    first ``hot_pages`` percent of the pages (0: uniform); ``fill``: writes fill the rest of
    the page with pseudo-random data from the page and its counter (checked too; otherwise
    pages are two words and zeros). The model survives runs."""

    def __init__(self, base: int, npages: int, *, page: int = 4096, threads: int = 2,
                 ops: int = 10_000, write_pct: int = 50, hot_pages: int = 20, hot_ops: int = 0,
                 seed: int = 1, fill: bool = False) -> None:
        if not 1 <= threads <= MAX_THREADS:
            raise ValueError(f"threads must be 1..{MAX_THREADS}, got {threads}")
        self._model = ffi.new("uint64_t[]", npages)
        w = self._w = ffi.new("struct ssi_rmw *")
        w.base, w.npages, w.page, w.ops, w.seed = base, npages, page, ops, seed
        w.nthreads, w.write_pct, w.hot_pages, w.hot_ops = threads, write_pct, hot_pages, hot_ops
        w.model = self._model
        w.fill = int(fill)
        w.first_bad = -1

    def set_mix(self, *, write_pct: int, hot_ops: int, hot_pages: int = 20) -> None:
        """Another operation mix for the next runs (the model stays)."""
        self._w.write_pct, self._w.hot_ops, self._w.hot_pages = write_pct, hot_ops, hot_pages

    def run(self, ops: int | None = None) -> None:
        if ops is not None:
            self._w.ops = ops
        self._w.seed += 1  # another sequence on every run
        rc = lib.ssi_rmw_run(self._w)
        if rc < 0:
            raise uffd_error(-rc, "ssi_rmw_run", "starting the workload threads")

    def check(self) -> int:
        """Pages whose content differs from the model now (0: all right)."""
        return int(lib.ssi_rmw_check(self._w))

    @property
    def errors(self) -> int:
        """Values that differed from the model during the runs."""
        return int(self._w.errors)

    @property
    def first_bad(self) -> int:
        return int(self._w.first_bad)

    @property
    def done(self) -> int:
        return int(self._w.done)

    def writes(self) -> int:
        """Read-modify-writes done so far (the model's sum)."""
        return sum(self._model[i] for i in range(self._w.npages))
