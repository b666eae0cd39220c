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
from array import array
from typing import Any

from pager.core.region import Region
from pager.errors import ConfigError
from pager.source.placement import EXTENT_SHIFT

log = logging.getLogger(__name__)


def close_lanes(lanes: dict[Any, Any]) -> None:
    """Close every lane of ``lanes`` (errors logged, not raised) and empty it."""
    for lane in lanes.values():
        try:
            lane.close()
        except Exception:
            log.debug("closing a lane failed", exc_info=True)
    lanes.clear()


# (socket fd, wire, space handle[, TLS session]) a C fault loop drives
Endpoint = tuple[int, str, int] | tuple[int, str, int, Any]


class CRoutes:
    """The C fault loop's routing table while a lane builds it: the connections the loop
    may fetch on (``endpoints``, each once) and the size of the extents a region's route
    may name one by one (``1 << ext_shift``)."""

    def __init__(self, ext_shift: int = EXTENT_SHIFT) -> None:
        self.endpoints: list[Endpoint] = []
        self.ext_shift = ext_shift
        self._index: dict[Endpoint, int] = {}

    def add(self, endpoint: Endpoint | None) -> int:
        """The index of ``endpoint`` in ``endpoints`` (-1 for None: Python serves)."""
        if endpoint is None:
            return -1
        k = self._index.get(endpoint)
        if k is None:
            k = self._index[endpoint] = len(self.endpoints)
            self.endpoints.append(endpoint)
        return k


class Lane(ABC):
    """One thread's connection to a source.

    ``c_capable`` lanes can hand the engine's C fault loop their connections:
    ``c_endpoint(space)`` -> ``(socket fd, wire, space handle)``, wire "ssip" (the memory
    node's FETCH) or "raw" (``{u64 offset, u32 length}`` -> raw bytes), connecting if needed
    (raises like ``fetch_into``); a TLS connection adds its C session as a fourth item (a
    `transport.tlsc.TlsSession`); None when that space cannot be served from C. A lane whose
    pages of one region live on several connections routes each extent itself
    (``c_route``), gives the generation word it bumps when that routing changes
    (``c_generation``) and learns of a fetch C could not complete (``c_failed``).
    """

    c_capable = False

    def c_endpoint(self, space: str | None) -> Endpoint | None:
        return None

    def c_route(self, space: str | None, gpa: int, size: int, routes: CRoutes
                ) -> int | list[int]:
        """Where C fetches ``size`` bytes of ``space`` at ``gpa``: the index in ``routes``
        of the connection serving all of it, or one index per extent (from the one holding
        ``gpa``); -1: Python serves. Raises like ``fetch_into``."""
        return routes.add(self.c_endpoint(space))

    def c_generation(self) -> array | None:
        """A one-word ``array('Q')`` bumped whenever ``c_route`` would answer otherwise (C
        hands faults to Python until the table is rebuilt); None: routing never changes."""
        return None

    def c_failed(self, fd: int, err: int) -> None:
        """C's fetch on connection ``fd`` failed with ``err`` (errno): drop what is broken;
        Python serves the fault next, with its own retries."""
        self.reset()

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
