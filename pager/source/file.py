"""A snapshot file as a page source (``file:PATH``): a region's ``offset`` is its position in
the file, as Firecracker uses it."""

from __future__ import annotations

import os

from pager.core.region import Region
from pager.errors import ConfigError, HandoffError
from pager.source.base import Lane, PageSource


class FileSource(PageSource):
    """A snapshot file; every region's bytes are at its ``offset`` in the file."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise ConfigError(f"cannot open snapshot file {path}: {exc.strerror}; pass an "
                              "existing readable file as --source file:PATH") from exc

    def describe(self) -> str:
        return f"file {self.path}"

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def check_region(self, region: Region) -> None:
        size = self.size()
        if region.offset + region.size > size:
            raise HandoffError(
                f"region {region.base:#x}+{region.size:#x} at file offset {region.offset:#x} "
                f"ends beyond the snapshot file {self.path} ({size} bytes); send regions "
                "inside the file")

    def open_lane(self, bulk: bool = False) -> Lane:
        return _FileLane(self.fd)

    def close(self) -> None:
        os.close(self.fd)


class _FileLane(Lane):
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fetch_into(self, space: str | None, gpa: int, buf: memoryview) -> int:
        got = os.preadv(self.fd, [buf], gpa)
        while got < len(buf):
            n = os.preadv(self.fd, [buf[got:]], gpa + got)
            if n == 0:
                raise OSError(5, f"snapshot file ends at {gpa + got:#x}, inside a region")
            got += n
        return 0
