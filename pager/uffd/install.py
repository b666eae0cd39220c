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
from collections.abc import Callable

from pager.uffd._uffd_cffi import ffi, lib
from pager.uffd.errors import UffdError, UffdRetry, uffd_error

WIRE_PAGE: int = lib.SSI_WIRE_PAGE  # the zero mask's granule: the wire page (SSIP_PAGE_SIZE)
COPY_DONTWAKE: int = lib.UFFDIO_COPY_MODE_DONTWAKE  # install mode: wake nobody (UFFDIO_WAKE later)
HOW = {lib.SSI_RES_COPY: "copy", lib.SSI_RES_ZERO: "zero", lib.SSI_RES_EEXIST: "eexist"}
COPY_MODE_WP: int = lib.UFFDIO_COPY_MODE_WP  # install write-protected (far memory)
_COUNTERS = ("copied_bytes", "zero_pages", "eexist")


class InstallLog:
    """A ``struct ssi_install_log`` and its residency ring (``capacity`` entries).

    ``target``: an existing struct to manage (inside the C loop's state, which keeps it alive);
    default a new one."""

    def __init__(self, capacity: int = 64, target=None) -> None:
        self._log = target if target is not None else ffi.new("struct ssi_install_log *")
        # the struct's words: copied_bytes, zero_pages, eexist, lost, nres | max_res << 32, res
        self._head = memoryview(ffi.buffer(self._log)).cast("Q")
        self._grow(capacity)

    @property
    def ptr(self):
        return self._log

    def _grow(self, capacity: int) -> None:
        self._res = ffi.new("struct ssi_res[]", capacity)
        self._words = memoryview(ffi.buffer(self._res)).cast("Q")  # 3 words per entry
        self._log.res = self._res
        self._log.max_res = self.capacity = capacity
        self._log.nres = 0

    def reserve(self, length: int) -> None:
        """Room for one install of ``length`` bytes in the worst case (call when drained)."""
        need = 2 * (length // WIRE_PAGE) + 2
        if self.capacity < need:
            self._grow(need)

    def take(self) -> list[tuple[int, int, str]]:
        """The resident ranges logged since the last call (and forget them)."""
        h = self._head
        n = h[4] & 0xFFFF_FFFF
        if not n:
            return []
        h[4] = self.capacity << 32  # nres = 0
        if h[3]:
            lost, h[3] = h[3], 0
            raise RuntimeError(f"residency log overflow: {lost} bytes installed but not "
                               "recorded; reserve() before installing")
        w = self._words
        if n == 1:  # the common case: one chunk copied whole
            return [(w[0], w[1], HOW[w[2]])]
        v = w[:3 * n].tolist()
        return [(v[i], v[i + 1], HOW[v[i + 2]]) for i in range(0, 3 * n, 3)]

    def drain(self, on_installed: Callable[[int, int, str], None]) -> tuple[int, int, int]:
        """Hand every logged range to ``on_installed(addr, length, how)``, then
        :meth:`take_counts` (one call for the fault path)."""
        h = self._head
        n = h[4] & 0xFFFF_FFFF
        if n == 1 and not h[3]:  # the common case: one chunk copied whole
            h[4] = self.capacity << 32  # nres = 0
            w = self._words
            on_installed(w[0], w[1], HOW[w[2]])
        elif n:
            for addr, length, how in self.take():
                on_installed(addr, length, how)
        c, z, e = h[0], h[1], h[2]
        if c or z or e:
            h[0] = h[1] = h[2] = 0
        return c, z, e

    def take_counts(self) -> tuple[int, int, int]:
        """``(copied_bytes, zero_pages, eexist)`` since the last call (and reset them)."""
        h = self._head
        c, z, e = h[0], h[1], h[2]
        if c or z or e:
            h[0] = h[1] = h[2] = 0
        return c, z, e

    def take_counters(self) -> dict[str, int]:
        """:meth:`take_counts` by name."""
        return dict(zip(_COUNTERS, self.take_counts(), strict=True))


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
    rc = lib.ssi_install(uffd_fd, dst, src or 0, length,
                         _mask_words(zero_mask, length) if zero_mask else ffi.NULL,
                         page_size, mode, log.ptr)
    if rc:
        raise install_error(rc, dst, src, length, page_size)


def install_error(rc: int, dst: int, src: int | None, length: int,
                  page_size: int) -> UffdError:
    """The typed error for ``ssi_install``'s result ``rc`` (a negative errno)."""
    op = "UFFDIO_ZEROPAGE" if src is None else "UFFDIO_COPY"
    if rc == -errno.EAGAIN:
        return UffdRetry(errno.EAGAIN, f"{op} at {dst:#x}: a layout event is pending")
    return uffd_error(-rc, op, f"range {dst:#x}+{length:#x} (page size {page_size})")
