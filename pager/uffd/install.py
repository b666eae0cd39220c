"""The page installer (``ssi_install``, csrc/install.c) for Python callers.

One implementation of "put these bytes at this address" serves both fault paths: the C fault
loop calls ``ssi_install`` directly, the Python path through :func:`install`. It does
UFFDIO_COPY of the written runs, UFFDIO_ZEROPAGE of the never-written ones (bit i of the zero
mask = wire page i, ``WIRE_PAGE`` bytes), finishes an EEXIST page by page and wakes the range,
and returns any other errno to the caller, whose policy it is (EAGAIN: defer and retry).

Every resident range lands in an :class:`InstallLog` as ``(address, length, how)``, ``how`` one
of ``HOW`` ("copy", "zero", "eexist"), with the install counters.
"""

from __future__ import annotations

import errno

from pager.uffd._uffd_cffi import ffi, lib
from pager.uffd.errors import UffdError, UffdRetry, uffd_error

WIRE_PAGE: int = lib.SSI_WIRE_PAGE  # the zero mask's granule: the wire page (SSIP_PAGE_SIZE)
HOW = {lib.SSI_RES_COPY: "copy", lib.SSI_RES_ZERO: "zero", lib.SSI_RES_EEXIST: "eexist"}
_COUNTERS = ("copied_bytes", "zero_pages", "eexist")


class InstallLog:
    """A ``struct ssi_install_log`` and its residency ring (``capacity`` entries).

    ``target``: an existing struct to manage (inside the C loop's state, which keeps it alive);
    default a new one."""

    def __init__(self, capacity: int = 64, target=None) -> None:
        self._log = target if target is not None else ffi.new("struct ssi_install_log *")
        self._res = ffi.NULL
        self._grow(capacity)

    @property
    def ptr(self):
        return self._log

    def _grow(self, capacity: int) -> None:
        self._res = ffi.new("struct ssi_res[]", capacity)
        self._log.res = self._res
        self._log.max_res = capacity
        self._log.nres = 0

    def reserve(self, length: int) -> None:
        """Room for one install of ``length`` bytes in the worst case (call when drained)."""
        need = 2 * (length // WIRE_PAGE) + 2
        if self._log.max_res < need:
            self._grow(need)

    def take(self) -> list[tuple[int, int, str]]:
        """The resident ranges logged since the last call (and forget them)."""
        g = self._log
        n = g.nres
        if not n:
            return []
        res = self._res
        out = [(res[i].addr, res[i].len, HOW[res[i].how]) for i in range(n)]
        g.nres = 0
        if g.lost:
            lost, g.lost = g.lost, 0
            raise RuntimeError(f"residency log overflow: {lost} bytes installed but not "
                               "recorded; reserve() before installing")
        return out

    def take_counters(self) -> dict[str, int]:
        """``copied_bytes``, ``zero_pages``, ``eexist`` since the last call (reset)."""
        g = self._log
        out = {name: getattr(g, name) for name in _COUNTERS}
        g.copied_bytes = g.zero_pages = g.eexist = 0
        return out


def _mask_words(mask: int, length: int):
    if not mask:
        return ffi.NULL
    nwords = -(-(length // WIRE_PAGE) // 64)
    return ffi.new("uint64_t[]", [(mask >> (64 * i)) & (2**64 - 1) for i in range(nwords)])


def install(uffd_fd: int, dst: int, src: int | None, length: int, zero_mask: int,
            page_size: int, log: InstallLog, mode: int = 0) -> None:
    """Install ``length`` bytes at ``dst`` from address ``src`` (None: zero pages).

    Raises ``UffdRetry`` (EAGAIN: a layout event is pending) or another ``UffdError``; what was
    installed before the error is in ``log`` either way."""
    rc = lib.ssi_install(uffd_fd, dst, ffi.NULL if src is None else ffi.cast("void *", src),
                         length, _mask_words(zero_mask, length), page_size, mode, log.ptr)
    if rc == 0:
        return
    op = "UFFDIO_ZEROPAGE" if src is None else "UFFDIO_COPY"
    if rc == -errno.EAGAIN:
        raise UffdRetry(errno.EAGAIN, f"{op} at {dst:#x}: a layout event is pending")
    where = f"range {dst:#x}+{length:#x} (page size {page_size})"
    exc: UffdError = uffd_error(-rc, op, where)
    raise exc
