"""Memory mappings at known addresses (anonymous, memfd/shmem, hugetlbfs) for the pager and tests.

``Mapping`` owns an mmap()ed range: ``address``, ``length``, ``view`` (a writable memoryview with
no copy; touching it from Python faults while holding the GIL, so only do that on resolved
memory), ``close()``.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

from pager.uffd._uffd_cffi import ffi, lib
from pager.uffd.errors import uffd_error

PROT_RW = lib.PROT_READ | lib.PROT_WRITE
MADV_DONTNEED: int = lib.MADV_DONTNEED
MADV_REMOVE: int = lib.MADV_REMOVE
MADV_NOHUGEPAGE: int = lib.MADV_NOHUGEPAGE
_MAX_ERRNO = 4095  # the kernel returns -1 .. -4095 as errors (an errno bound, not a page)
_ERR_LIMIT = (1 << 64) - _MAX_ERRNO - 1


def _check_addr(r: int, op: str) -> int:
    if r >= _ERR_LIMIT:
        raise uffd_error((1 << 64) - r, op)
    return r


SEEK_DATA, SEEK_HOLE = 3, 4


def data_ranges(fd: int, end: int, start: int = 0) -> Iterator[tuple[int, int]]:
    """(offset, length) of the allocated parts of ``[start, end)`` of a memfd (SEEK_DATA /
    SEEK_HOLE): the pages ever written and not punched since."""
    off = start
    while off < end:
        try:
            first = os.lseek(fd, off, SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after off
                return
            raise
        if first >= end:
            return
        last = min(os.lseek(fd, first, SEEK_HOLE), end)
        yield first, last - first
        off = last


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free ``[offset, offset+length)`` of a memfd (``fallocate(PUNCH_HOLE|KEEP_SIZE)``): the
    pages leave the page cache, every mapping of them faults again (no userfaultfd event)."""
    rc = lib.ssi_punch_hole(fd, offset, length)
    if rc < 0:
        raise uffd_error(-rc, "fallocate(PUNCH_HOLE)", f"memfd {fd} range {offset:#x}+{length:#x}")


class Mapping:
    """An mmap()ed range; unmapped by ``close()`` or when collected."""

    def __init__(self, address: int, length: int, fd: int = -1) -> None:
        self.address = address
        self.length = length
        self.fd = fd  # backing memfd (owned) or -1

    @classmethod
    def anonymous(cls, length: int, *, hugetlb: bool = False) -> Mapping:
        flags = lib.MAP_PRIVATE | lib.MAP_ANONYMOUS | lib.MAP_NORESERVE
        if hugetlb:
            flags |= lib.MAP_HUGETLB
        return cls(_check_addr(lib.ssi_mmap(0, length, PROT_RW, flags, -1, 0), "mmap"), length)

    @classmethod
    def memfd(cls, length: int, *, name: str = "ssi-pager", hugetlb: bool = False,
              fd: int | None = None, offset: int = 0, noreserve: bool = False) -> Mapping:
        """A shared mapping of a (new, or given and then owned) memfd of ``length`` bytes."""
        if fd is None:
            fd = lib.ssi_memfd_create(name.encode(), lib.MFD_CLOEXEC |
                                      (lib.MFD_HUGETLB if hugetlb else 0))
            if fd < 0:
                raise uffd_error(-fd, "memfd_create")
            try:
                os.ftruncate(fd, offset + length)
            except OSError as exc:
                os.close(fd)
                raise uffd_error(exc.errno or errno.EIO, "ftruncate(memfd)") from None
        flags = lib.MAP_SHARED | (lib.MAP_NORESERVE if noreserve else 0)
        r = lib.ssi_mmap(0, length, PROT_RW, flags, fd, offset)
        if r >= _ERR_LIMIT:
            os.close(fd)
        return cls(_check_addr(r, "mmap(memfd)"), length, fd)

    def map_again(self, offset: int = 0, length: int | None = None) -> Mapping:
        """A second shared mapping of the same memfd (the pager's view of guest RAM)."""
        if self.fd < 0:
            raise uffd_error(errno.EINVAL, "map_again", "only memfd mappings can be mapped again")
        length = self.length if length is None else length
        r = lib.ssi_mmap(0, length, PROT_RW, lib.MAP_SHARED, self.fd, offset)
        return Mapping(_check_addr(r, "mmap(memfd)"), length, os.dup(self.fd))

    @property
    def view(self) -> memoryview:
        return memoryview(ffi.buffer(ffi.cast("char *", self.address), self.length))

    def madvise(self, advice: int, offset: int = 0, length: int | None = None) -> None:
        rc = lib.ssi_madvise(self.address + offset,
                             self.length - offset if length is None else length, advice)
        if rc < 0:
            raise uffd_error(-rc, "madvise")

    def close(self) -> None:
        if self.address:
            lib.ssi_munmap(self.address, self.length)
            self.address = 0
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def forget(self) -> None:
        """The range was unmapped or moved by someone else: do not munmap it on close."""
        self.address = 0

    def __enter__(self) -> Mapping:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "address", 0) or getattr(self, "fd", -1) >= 0:
            self.close()
