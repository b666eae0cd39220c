"""`create_transport()`: RDMA when the RDMA extension loads, a device is there and its lanes
prove themselves, else TCP with one warning.

Every way RDMA can be missing or fail ends in the same place: a connected `TcpTransport` and a
single stderr line saying why RDMA is not used and how to get it. "Fail" is any exception on
the way (errors that are not `TransportError`, a malformed WELCOME or STATS_REPLY, the lane proof of
`transport.lane.prove_lane`), so an untested path can never be a guest's only path.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from transport.base import PageTransport
from transport.errors import ConnectError, RdmaUnavailable, TransportError
from transport.lane import warn_once
from transport.tcp import TcpTransport

log = logging.getLogger(__name__)


def rdma_unavailable_reason() -> str | None:
    """Why RDMA cannot be used here (None if it can): extension missing, no device, ..."""
    try:
        from transport.rdma import rdma_devices

        rdma_devices()
    except RdmaUnavailable as exc:
        return str(exc)
    return None


async def _connect_proven(t: PageTransport, node_id: str, endpoint: str, space: str) -> None:
    """Connect ``t`` and open (and close) one lane: a lane kind that must prove itself does so
    here, before the transport is selected."""
    await t.connect_peer(node_id, endpoint)
    lane = await asyncio.to_thread(t.open_lane, node_id, space)
    await asyncio.to_thread(lane.close)


async def create_transport(endpoint: str, token: bytes | None = None, *,
                           space: str = "default", node_id: str = "node0",
                           prefer: str = "auto", node: str = "pager",
                           upgrade: Callable[[], PageTransport] | None = None
                           ) -> PageTransport:
    """A transport connected to the memory node ``node_id`` at ``endpoint``.

    ``prefer``: "auto" (RDMA if possible, else TCP), "rdma" (fail without it), "tcp".
    ``upgrade`` builds the transport tried before TCP (default: `RdmaTransport`, which raises
    `RdmaUnavailable` without the RDMA extension or a device); it is connected and one of its
    lanes is opened, so its lanes' proof runs before it is chosen.
    """
    if prefer not in ("auto", "rdma", "tcp"):
        raise TransportError(f"unknown transport {prefer!r}: use auto, rdma or tcp")
    from transport.tls import client_tls

    if client_tls() is not None:  # RDMA lanes carry no TLS
        if prefer == "rdma":
            raise TransportError("RDMA lanes carry no TLS: drop --tls or use TCP")
        prefer = "tcp"
    if prefer != "tcp":
        fast = await _upgraded(endpoint, token, space, node_id, node, prefer == "rdma",
                               upgrade)
        if isinstance(fast, PageTransport):
            return fast
        warn_once(f"transport: using TCP, not RDMA: {fast}")
    tcp = TcpTransport(token, space, node=node)
    await tcp.connect_peer(node_id, endpoint)
    return tcp


async def _upgraded(endpoint: str, token: bytes | None, space: str, node_id: str, node: str,
                    required: bool, upgrade: Callable[[], PageTransport] | None
                    ) -> PageTransport | str:
    """The faster transport, connected and proven, or why not (raises when ``required``)."""
    fast = None
    try:
        fast = upgrade() if upgrade is not None else _rdma(token, space, node)
        await _connect_proven(fast, node_id, endpoint, space)
        return fast
    except Exception as exc:  # any failure at all: TCP carries the faults
        if fast is not None:
            log.debug("%s to %s failed", fast.name, endpoint, exc_info=True)
            try:
                await fast.close()
            except Exception:
                log.debug("closing the failed %s transport", fast.name, exc_info=True)
        if required:
            if isinstance(exc, TransportError):
                raise
            raise ConnectError(f"RDMA to {endpoint} failed: {type(exc).__name__}: "
                               f"{exc}") from exc
        if isinstance(exc, RdmaUnavailable):
            return str(exc)
        what = fast.name.upper() if fast is not None else "RDMA setup"
        return (f"{what} connection to {endpoint} failed ({type(exc).__name__}: {exc}); "
                f"check the memory node runs with --rdma on an RDMA NIC's address")


def _rdma(token: bytes | None, space: str, node: str) -> PageTransport:
    from transport.rdma import RdmaTransport

    return RdmaTransport(token, space, node=node)
