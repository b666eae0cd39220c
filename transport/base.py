"""The transport interface: `PageTransport`, its performance tiers, and sync wrappers.

The four operations of the SSI-HV design — ``fetch_page``, ``send_page``, ``measure_latency``,
``performance_tier`` — plus batched ``fetch_pages`` / ``send_pages``. Methods are coroutines;
`SyncTransport` runs a transport on a private event-loop thread for scripts.

Tier boundaries. The published ranges overlap (Medium 100-300 µs, Standard 200-500 µs), so
ssi-pager uses these half-open intervals of the *median 4 KiB round trip*:

    HighPerformance     rtt <  100 µs      (RDMA, or a fast local TCP link)
    MediumPerformance   100 <= rtt < 200 µs
    Standard            200 <= rtt < 500 µs
    Basic               rtt >= 500 µs

Hysteresis (`TierTracker`): a peer's first measurement sets its tier; it moves to another tier
only after `TIER_CONFIRM` consecutive measurements all lie outside its current interval by
more than `TIER_MARGIN` (relative), and then to the tier of their median. A link whose round
trip sits on a bound (loopback here: 86-292 µs around 100 and 200) keeps the tier it has.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import statistics
import threading
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from transport.errors import TransportError
from transport.wire import PAGE_SIZE

if TYPE_CHECKING:
    from transport.lane import BlockingLane

_R = TypeVar("_R")


class TransportTier(enum.Enum):
    HighPerformance = "HighPerformance"
    MediumPerformance = "MediumPerformance"
    Standard = "Standard"
    Basic = "Basic"

    @classmethod
    def from_latency(cls, rtt_s: float) -> TransportTier:
        us = rtt_s * 1e6
        for bound, tier in TIER_BOUNDS_US:
            if us < bound:
                return tier
        return cls.Basic


# upper bound (exclusive, µs) -> tier; see the module docstring
TIER_BOUNDS_US: tuple[tuple[float, TransportTier], ...] = (
    (100.0, TransportTier.HighPerformance),
    (200.0, TransportTier.MediumPerformance),
    (500.0, TransportTier.Standard),
)


TIER_MARGIN = 0.25  # a sample must be this far (relative) beyond its tier's bound to count
TIER_CONFIRM = 3  # consecutive such samples before the tier changes


def tier_interval_us(tier: TransportTier) -> tuple[float, float]:
    """The half-open interval [low, high) of round trips (µs) of ``tier``."""
    low = 0.0
    for bound, t in TIER_BOUNDS_US:
        if t is tier:
            return low, bound
        low = bound
    return low, float("inf")


class TierTracker:
    """One peer's tier with hysteresis (see the module docstring); feed it measured medians."""

    def __init__(self, margin: float = TIER_MARGIN, confirm: int = TIER_CONFIRM) -> None:
        if margin < 0 or confirm < 1:
            raise TransportError(f"TierTracker needs margin >= 0 and confirm >= 1, not "
                             f"{margin}, {confirm}")
        self.margin = margin
        self.confirm = confirm
        self.tier: TransportTier | None = None
        self._outside: list[float] = []  # consecutive samples beyond the current interval

    def update(self, rtt_s: float) -> TransportTier:
        """Take one measurement (seconds); returns the tier now in force."""
        if self.tier is None:
            self.tier = TransportTier.from_latency(rtt_s)
            return self.tier
        low, high = tier_interval_us(self.tier)
        us = rtt_s * 1e6
        if low * (1 - self.margin) <= us < high * (1 + self.margin):
            self._outside.clear()
            return self.tier
        self._outside.append(rtt_s)
        if len(self._outside) >= self.confirm:
            self.tier = TransportTier.from_latency(statistics.median(self._outside))
            self._outside.clear()
        return self.tier


class Pages(NamedTuple):
    """Result of `PageTransport.fetch_pages`: the bytes (zero pages zero-filled) and the zero
    mask (bit i set = page i was never written on the node)."""

    data: memoryview
    zero_mask: int


def check_pages(gpa: int, nbytes: int, what: str = "request") -> None:
    if gpa % PAGE_SIZE or nbytes % PAGE_SIZE or not nbytes:
        raise TransportError(f"{what} of {nbytes} bytes at {gpa:#x}: gpa and length must be "
                             f"non-zero multiples of {PAGE_SIZE}")


def page_view(data: Any, gpa: int, what: str) -> memoryview:
    """A flat byte view of a page buffer, checked for alignment (no copy)."""
    view = data if type(data) is memoryview else memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    n = len(view)
    if (gpa | n) & (PAGE_SIZE - 1) or not n:
        check_pages(gpa, n, what)  # raises with the message
    return view


_V = TypeVar("_V")


def lookup_peer(peers: dict[str, _V], node_id: str) -> _V:
    try:
        return peers[node_id]
    except KeyError:
        raise TransportError(f"unknown memory node {node_id!r}: connect_peer() it "
                             f"first") from None


class PageTransport(abc.ABC):
    """Moves pages of one address space between this host and memory nodes (by node id)."""

    name = "?"  # "tcp" | "rdma"
    token: bytes | None = None  # the cluster token lanes authenticate with
    node: str = "pager"  # this node's name in handshakes

    def __init__(self) -> None:
        self.latency: dict[str, float] = {}  # node id -> last measured median RTT (s)
        self.tiers: dict[str, TierTracker] = {}  # node id -> its tier, with hysteresis
        self.endpoints: dict[str, str] = {}  # kept after close(): lanes are opened from it

    @abc.abstractmethod
    async def connect_peer(self, node_id: str, endpoint: str) -> None:
        """Connect (and authenticate) to the memory node ``node_id`` at ``endpoint``."""

    @abc.abstractmethod
    async def fetch_pages(self, gpa: int, count: int, node_id: str,
                          into: Any = None, *, urgent: bool | None = None) -> Pages:
        """Fetch ``count`` pages from ``gpa``; into ``into`` (a writable buffer) if given.

        ``urgent`` (default: True for a fault-sized fetch, False for bulk) keeps the request
        on the urgent lane, which never queues behind background transfers.
        """

    @abc.abstractmethod
    async def send_pages(self, gpa: int, data: Any, node_id: str) -> None:
        """Store pages at ``gpa``; returns once the node has written them."""

    @abc.abstractmethod
    async def ping(self, node_id: str) -> float:
        """One round trip to the node (seconds)."""

    @abc.abstractmethod
    async def measure_bandwidth(self, node_id: str, nbytes: int = 16 << 20) -> float:
        """Node-to-here throughput in bytes/s with many requests in flight."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    def open_lane(self, node_id: str, space: str) -> BlockingLane:
        """A blocking lane of this transport's kind to ``space`` on ``node_id`` (connected,
        and proven where the kind needs it; see `transport.lane`). Blocking: call it from a
        worker thread. Lanes own their connections: they outlive ``close()``."""
        raise TransportError(f"the {self.name} transport has no blocking lanes")

    async def fetch_page(self, gpa: int, node_id: str) -> bytes:
        return bytes((await self.fetch_pages(gpa, 1, node_id, urgent=True)).data)

    async def send_page(self, gpa: int, data: Any, node_id: str) -> None:
        if len(memoryview(data).cast("B")) != PAGE_SIZE:
            raise TransportError(f"send_page takes exactly {PAGE_SIZE} bytes")
        await self.send_pages(gpa, data, node_id)

    async def measure_latency(self, node_id: str, samples: int = 9) -> float:
        """Median round trip of ``samples`` pings (seconds); remembered for the tier."""
        rtts = [await self.ping(node_id) for _ in range(max(1, samples))]
        self.latency[node_id] = statistics.median(rtts)
        self.tiers.setdefault(node_id, TierTracker()).update(self.latency[node_id])
        return self.latency[node_id]

    def performance_tier(self, node_id: str | None = None) -> TransportTier:
        """Tier of ``node_id`` (or of the slowest peer) from its measured latencies, with
        hysteresis (`TierTracker`)."""
        if node_id is not None:
            tiers = [t.tier for n, t in self.tiers.items() if n == node_id]
        else:
            tiers = [t.tier for t in self.tiers.values()]
        known = [t for t in tiers if t is not None]
        if not known:
            raise TransportError("no latency measured yet: call measure_latency(node_id) first")
        order = list(TransportTier)
        return max(known, key=order.index)

    async def __aenter__(self) -> PageTransport:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class SyncTransport:
    """Blocking wrappers around a `PageTransport`, for scripts: the transport lives on a
    private event loop in a daemon thread; each call waits for its coroutine."""

    def __init__(self, transport: PageTransport) -> None:
        self.transport = transport
        from transport.loop import new_event_loop

        self._loop = new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="ssi-transport")
        self._thread.start()

    def _call(self, coro: Coroutine[Any, Any, _R], timeout: float | None = 60.0) -> _R:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def connect_peer(self, node_id: str, endpoint: str) -> None:
        self._call(self.transport.connect_peer(node_id, endpoint))

    def fetch_page(self, gpa: int, node_id: str) -> bytes:
        return self._call(self.transport.fetch_page(gpa, node_id))

    def fetch_pages(self, gpa: int, count: int, node_id: str, into: Any = None) -> Pages:
        return self._call(self.transport.fetch_pages(gpa, count, node_id, into))

    def send_page(self, gpa: int, data: Any, node_id: str) -> None:
        self._call(self.transport.send_page(gpa, data, node_id))

    def send_pages(self, gpa: int, data: Any, node_id: str) -> None:
        self._call(self.transport.send_pages(gpa, data, node_id))

    def measure_latency(self, node_id: str, samples: int = 9) -> float:
        return self._call(self.transport.measure_latency(node_id, samples))

    def performance_tier(self, node_id: str | None = None) -> TransportTier:
        return self.transport.performance_tier(node_id)

    def close(self) -> None:
        if self._loop.is_running():
            self._call(self.transport.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> SyncTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
