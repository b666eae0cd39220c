"""`TransportManager`: the pager's view of its memory nodes.

On `connect_peer` it picks the transport (`create_transport`; the lanes of that transport carry
the faults), measures the round trip (median of several pings) and the bandwidth, derives the
tier (with hysteresis, `transport.base.TierTracker`) and announces it once per peer on stderr,
e.g.::

    transport: tcp to node1 (127.0.0.1:50051) tier=HighPerformance expected latency ~40 µs

Slow hardware gives warnings, never errors: the link speed from
``/sys/class/net/IFACE/speed`` where the kernel knows it, the measured bandwidth otherwise
("1 Gbps network detected - consider upgrading to 10G"), and a tip about RDMA when TCP is
in use on a slow path. Peers on loopback get no link warnings.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transport.base import Pages, PageTransport, TierTracker, TransportTier, lookup_peer
from transport.factory import create_transport
from transport.lane import warn_once
from transport.tcp import parse_endpoint

log = logging.getLogger(__name__)

FAST_LINK_MBPS = 10_000  # below this a link is "slow" (the design's 10G recommendation)
SLOW_MEASURED_GBPS = 2.5  # measured throughput below this: a ~1 Gbps class path
RDMA_TIP = ("transport: tip: RDMA (InfiniBand/RoCE) serves a page in a few µs: install "
            "rdma-core and ibverbs-providers with an RDMA NIC, then start the memory node with "
            "--rdma")


@dataclass
class PeerInfo:
    node_id: str
    endpoint: str
    transport: str
    rtt_s: float
    bandwidth_gbps: float
    tier: TransportTier
    interface: str | None
    link_mbps: int | None
    warnings: list[str]


def route_interface(host: str) -> str | None:
    """The network interface the kernel routes ``host`` through (None if unknown)."""
    try:
        out = subprocess.run(["ip", "-o", "route", "get", host], capture_output=True,
                             text=True, timeout=5, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    words = out.split()
    return words[words.index("dev") + 1] if "dev" in words[:-1] else None


def link_speed_mbps(interface: str, sysfs: Path = Path("/sys/class/net")) -> int | None:
    """The interface's speed in Mb/s from sysfs, None where the kernel does not know it
    (loopback, tunnels, some virtual NICs report -1 or EINVAL)."""
    try:
        value = int((sysfs / interface / "speed").read_text().strip())
    except (OSError, ValueError):
        return None
    return value if value > 0 else None


def slow_link(interface: str | None, link_mbps: int | None, bandwidth_gbps: float) -> bool:
    """Whether a peer's path is of the ~1 Gbps class: its interface's speed where the kernel
    knows it, else the measured bandwidth (never a peer on this host). A slow link is warned
    about, and bulk lanes compress on it (`pager.source.memnode.MemnodeSource.codecs_for`)."""
    if interface == "lo":
        return False
    if link_mbps is not None and link_mbps < FAST_LINK_MBPS:
        return True
    return bandwidth_gbps < SLOW_MEASURED_GBPS


def slow_link_warnings(node_id: str, interface: str | None, link_mbps: int | None,
                       bandwidth_gbps: float) -> list[str]:
    """The warning lines for this peer's path (empty when it is fast or local)."""
    if not slow_link(interface, link_mbps, bandwidth_gbps):
        return []
    if link_mbps is not None and link_mbps < FAST_LINK_MBPS:
        return [f"transport: warning: {link_mbps / 1000:g} Gbps network detected on "
                f"{interface} to {node_id} - consider upgrading to 10G"]
    return [f"transport: warning: 1 Gbps network detected (path to {node_id}: "
            f"{bandwidth_gbps:.2f} Gbit/s measured) - consider upgrading to 10G"]


class TransportManager:
    """Connections from this node (``node_id``) to memory nodes, one transport per peer."""

    def __init__(self, node_id: str, token: bytes | None = None, *, space: str = "default",
                 prefer: str = "auto", bandwidth_probe_bytes: int = 8 << 20,
                 latency_samples: int = 9,
                 upgrade: Callable[[], PageTransport] | None = None) -> None:
        self.node_id = node_id
        self.token = token
        self.space = space
        self.prefer = prefer
        self.bandwidth_probe_bytes = bandwidth_probe_bytes
        self.latency_samples = latency_samples
        self.upgrade = upgrade  # the transport tried before TCP (create_transport's default)
        self.transports: dict[str, PageTransport] = {}
        self.peers: dict[str, PeerInfo] = {}
        self.tiers: dict[str, TierTracker] = {}
        self._tip_shown = False

    async def connect_peer(self, node_id: str, endpoint: str) -> PeerInfo:
        """Select the transport to ``node_id`` (`create_transport`: its lanes carry the
        faults), measure it and announce it on the first connect. A transport other than TCP
        whose measurement fails in any way is replaced by TCP (with the one warning line).
        The tier keeps hysteresis across reconnects (`TierTracker`): one noisy measurement
        never flips it."""
        t = await create_transport(endpoint, self.token, space=self.space, node_id=node_id,
                                   prefer=self.prefer, node=self.node_id, upgrade=self.upgrade)
        try:
            rtt, bw = await self._measure(t, node_id)
        except Exception as exc:
            await t.close()
            if t.name == "tcp" or self.prefer == "rdma":
                raise
            log.debug("measuring %s over %s failed", node_id, t.name, exc_info=True)
            warn_once(f"transport: using TCP, not {t.name.upper()}: measuring {node_id} over "
                      f"{t.name} failed ({type(exc).__name__}: {exc})")
            t = await create_transport(endpoint, self.token, space=self.space,
                                       node_id=node_id, prefer="tcp", node=self.node_id)
            rtt, bw = await self._measure(t, node_id)
        old = self.transports.pop(node_id, None)
        if old is not None:
            await old.close()
        self.transports[node_id] = t
        tier = self.tiers.setdefault(node_id, TierTracker()).update(rtt)
        host, _port = parse_endpoint(endpoint)
        iface = await asyncio.to_thread(route_interface, host)
        speed = link_speed_mbps(iface) if iface else None
        info = PeerInfo(node_id, endpoint, t.name, rtt, bw, tier, iface, speed,
                        slow_link_warnings(node_id, iface, speed, bw))
        first = node_id not in self.peers
        self.peers[node_id] = info
        if first:
            self._announce(info)
        return info

    async def _measure(self, t: PageTransport, node_id: str) -> tuple[float, float]:
        """(median round trip in s, bandwidth in Gbit/s) of ``t`` to ``node_id``."""
        rtt = await t.measure_latency(node_id, self.latency_samples)
        bw = await t.measure_bandwidth(node_id, self.bandwidth_probe_bytes) * 8 / 1e9
        return rtt, bw

    def _announce(self, info: PeerInfo) -> None:
        line = (f"transport: {info.transport} to {info.node_id} ({info.endpoint}) "
                f"tier={info.tier.value} expected latency ~{info.rtt_s * 1e6:.0f} µs")
        print(line, file=sys.stderr)
        log.info("%s; bandwidth %.2f Gbit/s via %s (link %s Mb/s)", line, info.bandwidth_gbps,
                 info.interface, info.link_mbps)
        for w in info.warnings:
            print(w, file=sys.stderr)
        if info.transport == "tcp" and (info.warnings or info.tier is not
                                        TransportTier.HighPerformance) and not self._tip_shown:
            self._tip_shown = True
            print(RDMA_TIP, file=sys.stderr)

    def transport(self, node_id: str) -> PageTransport:
        return lookup_peer(self.transports, node_id)

    async def fetch_page(self, gpa: int, node_id: str) -> bytes:
        return await self.transport(node_id).fetch_page(gpa, node_id)

    async def fetch_pages(self, gpa: int, count: int, node_id: str, into: Any = None, *,
                          urgent: bool | None = None) -> Pages:
        return await self.transport(node_id).fetch_pages(gpa, count, node_id, into,
                                                         urgent=urgent)

    async def send_page(self, gpa: int, data: Any, node_id: str) -> None:
        await self.transport(node_id).send_page(gpa, data, node_id)

    async def send_pages(self, gpa: int, data: Any, node_id: str) -> None:
        await self.transport(node_id).send_pages(gpa, data, node_id)

    def performance_tier(self, node_id: str) -> TransportTier:
        """The peer's tier with hysteresis over all its measurements (reconnects included)."""
        return lookup_peer(self.peers, node_id).tier

    async def close(self) -> None:
        for t in self.transports.values():
            await t.close()
        self.transports.clear()
