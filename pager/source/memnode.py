"""Memory nodes as a page source: pages named by ``(space, gpa)``, placed on nodes by a
placement function, carried by the lanes of the transport selected for each node.

Selection happens once per node: `MemnodeSource.connect` through a
`transport.manager.TransportManager` (which measures the node and prints the tier line), or,
for a source used without it (tests, tools, suspend), on the first lane opened, through
`transport.factory.create_transport`. Either way the selected transport opens the lanes
(``PageTransport.open_lane``): RDMA lanes prove themselves first, and any RDMA failure gives a
TCP lane with the one warning line (`transport.lane.open_lane_or_tcp`); from then on that
node's lanes are TCP.

Placement: ``placement(space, gpa) -> node id``. One node today (`single_node`); a cluster
replaces it by a function over the live node set (rendezvous hashing of extents, say) without
touching the lanes.

Suspend and other one-off transfers use a lane like a fault thread does::

    with MemnodeSource(endpoint, token, space).open_lane() as lane:
        lane.store_from(space, gpa, buf)      # returns after the node's ack
        mask = lane.fetch_into(space, gpa, buf)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from pager.errors import ConfigError, HandoffError
from pager.source.base import Lane, PageSource, close_lanes
from transport.wire import DEFAULT_MAX_SPACE_BYTES, PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from pager.core.region import Region
    from transport.base import PageTransport
    from transport.lane import BlockingLane
    from transport.manager import PeerInfo, TransportManager

log = logging.getLogger(__name__)

DEFAULT_NODE = "memnode"  # the node id of a source built from one endpoint

Placement = Callable[[str, int], str]  # (space, gpa) -> node id


def single_node(node_id: str) -> Placement:
    """Every page on ``node_id``."""
    def place(space: str, gpa: int) -> str:
        return node_id
    return place


class MemnodeSource(PageSource):
    """Memory nodes: ``endpoint`` "HOST:PORT" (node id `DEFAULT_NODE`) or a mapping node id
    -> endpoint with a ``placement``; ``space`` is the default address space; ``prefer`` is
    the transport choice ("auto", "rdma", "tcp")."""

    def __init__(self, endpoint: str | Mapping[str, str], token: bytes | None, space: str, *,
                 prefer: str = "auto", placement: Placement | None = None,
                 compress: tuple[str, ...] | None = None) -> None:
        self.nodes = ({DEFAULT_NODE: endpoint} if isinstance(endpoint, str)
                      else dict(endpoint))
        if not self.nodes:
            raise ConfigError("a memory-node source needs at least one node (--memnode "
                              "HOST:PORT)")
        if placement is None:
            if len(self.nodes) > 1:
                raise ConfigError(f"{len(self.nodes)} memory nodes need a placement function "
                                  f"(space, gpa) -> node id")
            placement = single_node(next(iter(self.nodes)))
        self.placement = placement
        self.token = token
        self.space = space
        self.prefer = prefer
        self.transports: dict[str, PageTransport] = {}  # node id -> selected transport
        self.lane_kinds: dict[str, str] = {}  # node id -> kind of the lanes carrying faults
        self.tiers: dict[str, str] = {}  # node id -> measured tier ("Standard", ...)
        self.slow: dict[str, bool] = {}  # node id -> its path is ~1 Gbps or slower
        # node id -> the node is on this host (its route goes through "lo"): no wire to save
        self.local: dict[str, bool] = {}
        # codecs of bulk lanes: None = by the node's measured tier (`codecs_for`)
        self.compress = compress
        self._lock = threading.Lock()
        # the nodes' address space limit (what they serve, as a file source's file size)
        self.max_space_bytes = DEFAULT_MAX_SPACE_BYTES

    def check_region(self, region: Region) -> None:
        """A region whose bytes lie beyond the nodes' address space limit is refused, as a
        file source refuses one beyond its file."""
        end = region.offset + region.size
        if region.offset < 0 or end > self.max_space_bytes:
            raise HandoffError(
                f"region {region.base:#x}+{region.size:#x} at offset {region.offset:#x} of "
                f"space {region.space or self.space} ends at {end:#x}, beyond the memory "
                f"nodes' address space limit of {self.max_space_bytes:#x} bytes; send "
                "regions inside it (or raise the nodes' --max-space-gib)")

    @property
    def endpoint(self) -> str:
        """The first node's endpoint (what a one-node source is shown as)."""
        return next(iter(self.nodes.values()))

    def describe(self) -> str:
        where = " ".join(self.nodes.values())
        return f"memnode {where} space {self.space}"

    def only_node(self) -> str | None:
        """The node every page is on (a one-node source: placement is not asked), or None
        when placement spreads them."""
        return next(iter(self.nodes)) if len(self.nodes) == 1 else None

    async def connect(self, manager: TransportManager) -> dict[str, PeerInfo]:
        """Select every node's transport through ``manager`` (which measures each node and
        prints its tier line); nodes it cannot reach yet raise, and are selected on first
        use instead."""
        infos = {}
        for node_id, endpoint in self.nodes.items():
            info = await manager.connect_peer(node_id, endpoint)
            self.record_peer(node_id, manager.transport(node_id), info)
            infos[node_id] = info
        return infos

    def record_peer(self, node_id: str, transport: PageTransport, info: PeerInfo) -> None:
        """What a transport manager selected and measured for ``node_id``: its transport, the
        kind of its fault lanes, its tier, and whether it is on this host (the interface the
        manager found its route through), and whether its path is ~1 Gbps or slower."""
        from transport.manager import slow_link

        with self._lock:
            self.transports[node_id] = transport
            self.lane_kinds[node_id] = info.transport
            self.tiers[node_id] = info.tier.value
            self.slow[node_id] = slow_link(info.interface, info.link_mbps, info.bandwidth_gbps)
            if info.interface is not None:
                self.local[node_id] = info.interface == "lo"

    def lane_kind(self, node_id: str) -> str | None:
        """"tcp" or "rdma": the kind of lane that carries ``node_id``'s faults (None before
        the node's transport is selected)."""
        kind = self.lane_kinds.get(node_id)
        if kind is None and node_id in self.transports:
            kind = self.transports[node_id].name
        return kind

    def _transport(self, node_id: str) -> PageTransport:
        with self._lock:
            t = self.transports.get(node_id)
            if t is None:
                t = self.transports[node_id] = self._select(node_id)
            return t

    def _select(self, node_id: str) -> PageTransport:
        from transport.factory import create_transport
        from transport.tcp import run

        async def select() -> PageTransport:
            t = await create_transport(self.nodes[node_id], self.token, space=self.space,
                                       node_id=node_id, prefer=self.prefer)
            await t.close()  # its lanes own their connections; this loop ends here
            return t

        return run(select())

    def codecs_for(self, node_id: str) -> tuple[str, ...]:
        """Compression a bulk lane to ``node_id`` offers: the source's choice, else every
        codec installed when the link to the node is slow enough for it to pay: its measured
        tier (measured here with a few pings when no transport manager did) is Standard or
        Basic, or the transport manager found the path ~1 Gbps or slower (the interface's
        speed, or the bandwidth it measured: the path it warns about). A node on this
        host never gets it, whatever its round trips measured: there is no wire to save, and
        a busy host's pings (CPU contention, not the link) would otherwise turn compression
        on, which also takes write-back off its C path (a compressing lane is Python's)."""
        from transport.wire.codec import CODECS, pays_on

        if self.compress is not None:
            return self.compress
        if self._is_local(node_id):
            return ()
        tier = self.tiers.get(node_id)
        if tier is None:
            from transport.base import TransportTier
            from transport.lane import open_lane_or_tcp

            with open_lane_or_tcp(self._transport(node_id), node_id, self.space) as probe:
                rtt = min(probe.ping() for _ in range(5))  # the link's floor, not the load
            tier = self.tiers[node_id] = TransportTier.from_latency(rtt).value
        return CODECS if pays_on(tier) or self.slow.get(node_id, False) else ()

    def _is_local(self, node_id: str) -> bool:
        """Whether ``node_id``'s endpoint is on this host (routed through "lo"); asked once."""
        local = self.local.get(node_id)
        if local is None:
            from transport.errors import TransportError
            from transport.manager import route_interface
            from transport.tcp import parse_endpoint

            try:
                host: str | None = parse_endpoint(self.nodes[node_id])[0]
            except TransportError:
                host = None
            local = self.local[node_id] = host is not None and route_interface(host) == "lo"
        return local

    def open_node_lane(self, node_id: str, space: str | None = None, *,
                       bulk: bool = False) -> BlockingLane:
        """A blocking lane to ``space`` on ``node_id``, of the node's selected kind.
        ``bulk``: no fault waits on it; over TCP it offers compression (`codecs_for`)."""
        from transport.lane import open_lane_or_tcp

        if node_id not in self.nodes:
            raise ConfigError(f"placement named memory node {node_id!r}, which this source "
                              f"does not have (nodes: {', '.join(self.nodes)})")
        t = self._transport(node_id)
        if bulk and t.name == "tcp" and (codecs := self.codecs_for(node_id)):
            return t.open_lane(node_id, space or self.space, compress=codecs)  # type: ignore[call-arg]
        lane = open_lane_or_tcp(t, node_id, space or self.space)
        if lane.kind != t.name:  # the selected kind failed: this node's lanes are TCP now
            self._fall_back(node_id, t)
        self.lane_kinds[node_id] = lane.kind
        return lane

    def _fall_back(self, node_id: str, failed: PageTransport) -> None:
        from transport.tcp import TcpTransport

        tcp = TcpTransport(self.token, self.space, node=failed.node)
        tcp.endpoints[node_id] = self.nodes[node_id]  # lanes need no asyncio connection
        with self._lock:
            if self.transports.get(node_id) is failed:
                self.transports[node_id] = tcp

    def open_lane(self, bulk: bool = False) -> MemnodeLane:
        return MemnodeLane(self, bulk)


class MemnodeLane(Lane):
    """One thread's lanes to the source's nodes, one per (node, address space), opened on
    first use."""

    c_capable = True

    def __init__(self, src: MemnodeSource, bulk: bool = False) -> None:
        self.src = src
        self.bulk = bulk
        self.only = src.only_node()
        self.lanes: dict[tuple[str, str], BlockingLane] = {}

    def _lane(self, node_id: str, space: str) -> BlockingLane:
        lane = self.lanes.get((node_id, space))
        if lane is None:
            lane = self.lanes[node_id, space] = self.src.open_node_lane(node_id, space,
                                                                        bulk=self.bulk)
        return lane

    def c_endpoint(self, space: str | None
                   ) -> tuple[int, str, int] | tuple[int, str, int, Any] | None:
        if self.only is None:  # pages of one region on several nodes: Python's loop
            return None
        return self._lane(self.only, space or self.src.space).c_endpoint()

    def _runs(self, space: str, gpa: int, n: int) -> list[tuple[str, int, int]]:
        """(node id, first byte, end byte) runs of ``n`` bytes at ``gpa`` by placement."""
        if self.only is not None:
            return [(self.only, 0, n)]
        runs: list[tuple[str, int, int]] = []
        for off in range(0, n, PAGE_SIZE):
            node_id = self.src.placement(space, gpa + off)
            if runs and runs[-1][0] == node_id:
                runs[-1] = (node_id, runs[-1][1], off + PAGE_SIZE)
            else:
                runs.append((node_id, off, off + PAGE_SIZE))
        return runs

    def fetch_into(self, space: str | None, gpa: int, buf: memoryview) -> int:
        name = space or self.src.space
        only = self.only
        if only is not None:  # the fault path of a one-node source: no placement, no split
            lane = self.lanes.get((only, name)) or self._lane(only, name)
            return lane.fetch_into(gpa, buf)
        mask = 0
        view = memoryview(buf)
        for node_id, start, end in self._runs(name, gpa, len(view)):
            part = view if (start, end) == (0, len(view)) else view[start:end]
            mask |= self._lane(node_id, name).fetch_into(gpa + start, part) << (
                start >> PAGE_SHIFT)
        return mask

    def store_from(self, space: str | None, gpa: int, buf: bytes | memoryview) -> None:
        name = space or self.src.space
        view = memoryview(buf)
        for node_id, start, end in self._runs(name, gpa, len(view)):
            self._lane(node_id, name).store_from(gpa + start, view[start:end])

    def reset(self) -> None:
        close_lanes(self.lanes)
