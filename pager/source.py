"""Page sources: where the bytes of a fault come from.

A ``PageSource`` is shared by the pager; each engine thread opens its own ``Lane`` (a lane is
blocking and single-threaded: a memory-node lane is one authenticated socket per address space).
``Lane.fetch_into(space, gpa, buf)`` fills ``buf`` and returns the zero mask (bit i set: page i
was never written; its bytes in ``buf`` are unspecified and the engine installs a zero page).

- ``MemnodeSource``: a memory node through ``transport.tcp.BlockingChannel`` (the engine's hot
  path; the asyncio transport is for the control plane).
- ``FileSource``: a snapshot file (``file:PATH``): a region's ``offset`` is its position in the
  file, as Firecracker uses it.

Errors: a lane raises ``transport.errors.TransportError`` (or ``OSError`` for files); the engine
retries with backoff after ``reset()`` — it never turns a failed fetch into zeros.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod

from pager.errors import ConfigError, HandoffError
from pager.region import Region

log = logging.getLogger(__name__)

class Lane(ABC):
    """One thread's connection to a source.

    ``c_capable`` lanes can hand the engine's C fault loop their connections:
    ``c_endpoint(space)`` -> ``(socket fd, wire, space handle)``, wire "ssip" (the memory
    node's FETCH) or "raw" (``{u64 offset, u32 length}`` -> raw bytes), connecting if needed
    (raises like ``fetch_into``); None when that space cannot be served from C.
    """

    c_capable = False

    def c_endpoint(self, space: str | None) -> tuple[int, str, int] | None:
        return None

    @abstractmethod
    def fetch_into(self, space: str | None, gpa: int, buf: memoryview) -> int: ...

    def reset(self) -> None:  # noqa: B027 - a lane without connections has nothing to drop
        """Drop connections after an error; the next fetch reconnects."""

    def close(self) -> None:
        self.reset()


class PageSource(ABC):
    """Where pages live; ``describe()`` is shown in status lines."""

    @abstractmethod
    def open_lane(self) -> Lane: ...

    @abstractmethod
    def describe(self) -> str: ...

    def check_region(self, region: Region) -> None:  # noqa: B027 - default: no bounds
        """Raise HandoffError if ``region`` lies outside what this source can serve."""

    def close(self) -> None:  # noqa: B027 - default: nothing held
        """Release what the source holds (files, connections)."""


class MemnodeSource(PageSource):
    """A memory node at ``endpoint`` ("HOST:PORT"); ``space`` is the default address space."""

    def __init__(self, endpoint: str, token: bytes | None, space: str,
                 connect_timeout: float = 5.0) -> None:
        self.endpoint = endpoint
        self.token = token
        self.space = space
        self.connect_timeout = connect_timeout

    def describe(self) -> str:
        return f"memnode {self.endpoint} space {self.space}"

    def open_lane(self) -> Lane:
        return _MemnodeLane(self)

    def store(self, gpa: int, data: bytes | memoryview, space: str | None = None) -> None:
        """Write pages to the node (seeding, write-back), acknowledged after pwrite."""
        lane = _MemnodeLane(self)
        try:
            lane.store(space, gpa, data)
        finally:
            lane.close()


class _MemnodeLane(Lane):
    def __init__(self, src: MemnodeSource) -> None:
        self.src = src
        self.channels: dict[str, object] = {}

    def _channel(self, space: str | None):
        name = space or self.src.space
        ch = self.channels.get(name)
        if ch is None:
            from transport.tcp import BlockingChannel
            ch = BlockingChannel.connect(self.src.endpoint, self.src.token, name)
            self.channels[name] = ch
        return ch

    c_capable = True

    def c_endpoint(self, space: str | None) -> tuple[int, str, int] | None:
        ch = self._channel(space)
        fd = ch.fileno()
        return None if fd < 0 else (fd, "ssip", ch.space)

    def fetch_into(self, space: str | None, gpa: int, buf: memoryview) -> int:
        # the channel pipelines requests larger than one FETCH frame itself
        return self._channel(space).fetch_into(gpa, buf)

    def store(self, space: str | None, gpa: int, data: bytes | memoryview) -> None:
        self._channel(space).store(gpa, data)

    def reset(self) -> None:
        for ch in self.channels.values():
            try:
                ch.close()
            except Exception:
                log.debug("closing a channel failed", exc_info=True)
        self.channels.clear()


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

    def open_lane(self) -> Lane:
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


def parse_source(memnode: str | None, source: str | None, *, token: bytes | None,
                 space: str) -> PageSource:
    """The source named on the command line (``--memnode HOST:PORT`` or ``--source file:P``)."""
    if bool(memnode) == bool(source):
        raise ConfigError("give exactly one of --memnode HOST:PORT or --source file:PATH")
    if source:
        if source.startswith("file:"):
            return FileSource(source[5:])
        if source.startswith("memnode:"):
            memnode = source[8:]
        else:
            raise ConfigError(f"unknown source {source!r}; use file:PATH or --memnode HOST:PORT")
    return MemnodeSource(memnode, token, space)  # type: ignore[arg-type]
