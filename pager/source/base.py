"""The interface every page source implements: ``PageSource`` (shared by the pager) and
``Lane`` (one thread's blocking connection to it).

Pages are named by ``(space, gpa)``: the address space (a guest's memory, by name; None means
the source's default) and the byte offset in it. ``Lane.fetch_into(space, gpa, buf)`` fills
``buf`` and returns the zero mask (bit i set: page i was never written; its bytes in ``buf``
are unspecified and the engine installs a zero page). ``Lane.store_from(space, gpa, buf)``
writes pages and returns once the source holds them (write-back, suspend, seeding).

Errors: a lane raises ``transport.errors.TransportError`` (or ``OSError`` for files); the engine
retries with backoff after ``reset()`` — it never turns a failed fetch into zeros.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Any

from pager.core.region import Region
from pager.errors import ConfigError

log = logging.getLogger(__name__)


def close_lanes(lanes: dict[Any, Any]) -> None:
    """Close every lane of ``lanes`` (errors logged, not raised) and empty it."""
    for lane in lanes.values():
        try:
            lane.close()
        except Exception:
            log.debug("closing a lane failed", exc_info=True)
    lanes.clear()


class Lane(ABC):
    """One thread's connection to a source.

    ``c_capable`` lanes can hand the engine's C fault loop their connections:
    ``c_endpoint(space)`` -> ``(socket fd, wire, space handle)``, wire "ssip" (the memory
    node's FETCH) or "raw" (``{u64 offset, u32 length}`` -> raw bytes), connecting if needed
    (raises like ``fetch_into``); a TLS connection adds its C session as a fourth item (a
    `transport.tlsc.TlsSession`); None when that space cannot be served from C.
    """

    c_capable = False

    def c_endpoint(self, space: str | None
                   ) -> tuple[int, str, int] | tuple[int, str, int, Any] | None:
        return None

    @abstractmethod
    def fetch_into(self, space: str | None, gpa: int, buf: memoryview) -> int: ...

    def store_from(self, space: str | None, gpa: int, buf: bytes | memoryview) -> None:
        """Write pages at ``gpa``; returns once the source holds them."""
        raise ConfigError(f"{type(self).__name__} is read-only: stores need a memory node "
                          "(--memnode HOST:PORT)")

    def reset(self) -> None:  # noqa: B027 - a lane without connections has nothing to drop
        """Drop connections after an error; the next fetch reconnects."""

    def close(self) -> None:
        self.reset()

    def __enter__(self) -> Lane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PageSource(ABC):
    """Where pages live; ``describe()`` is shown in status lines."""

    @abstractmethod
    def open_lane(self, bulk: bool = False) -> Lane:
        """A lane for one thread. ``bulk``: for transfers no fault waits on (write-back,
        suspend, repair, put/get): on a slow link its pages may travel compressed."""

    @abstractmethod
    def describe(self) -> str: ...

    def check_region(self, region: Region) -> None:  # noqa: B027 - default: no bounds
        """Raise HandoffError if ``region`` lies outside what this source can serve."""

    def close(self) -> None:  # noqa: B027 - default: nothing held
        """Release what the source holds (files, connections)."""
