"""A memory node as a page source: one authenticated connection per (lane, address space).

The engine's hot path uses ``transport.tcp.BlockingChannel`` (blocking, one request at a time,
servable from C); the asyncio transport is the control plane.
"""

from __future__ import annotations

import logging

from pager.source.base import Lane, PageSource

log = logging.getLogger(__name__)


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
            lane.store_from(space, gpa, data)
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

    def store_from(self, space: str | None, gpa: int, data: bytes | memoryview) -> None:
        self._channel(space).store(gpa, data)

    def reset(self) -> None:
        for ch in self.channels.values():
            try:
                ch.close()
            except Exception:
                log.debug("closing a channel failed", exc_info=True)
        self.channels.clear()
