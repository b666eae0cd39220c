"""`create_transport()`: RDMA when pyverbs and a device are there, else TCP with one warning.

Every way RDMA can be missing ends in the same place: a connected `TcpTransport` and a
single stderr line saying why RDMA is not used and how to get it.
"""

from __future__ import annotations

import logging
import sys

from transport.base import PageTransport
from transport.errors import RdmaUnavailable, TransportError
from transport.tcp import TcpTransport

log = logging.getLogger(__name__)

_warned = False


def rdma_unavailable_reason() -> str | None:
    """Why RDMA cannot be used here (None if it can): pyverbs missing, no device, ..."""
    try:
        from transport.rdma import rdma_devices

        rdma_devices()
    except RdmaUnavailable as exc:
        return str(exc)
    return None


def _warn_once(message: str) -> None:
    global _warned
    log.info("%s", message)
    if not _warned:
        _warned = True
        print(message, file=sys.stderr)


async def create_transport(endpoint: str, token: bytes | None = None, *,
                           space: str = "default", node_id: str = "node0",
                           prefer: str = "auto", node: str = "pager") -> PageTransport:
    """A transport connected to the memory node ``node_id`` at ``endpoint``.

    ``prefer``: "auto" (RDMA if possible, else TCP), "rdma" (fail without it), "tcp".
    """
    if prefer not in ("auto", "rdma", "tcp"):
        raise TransportError(f"unknown transport {prefer!r}: use auto, rdma or tcp")
    if prefer != "tcp":
        reason = rdma_unavailable_reason()
        if reason is None:
            from transport.rdma import RdmaTransport

            rdma = RdmaTransport(token, space, node=node)
            try:
                await rdma.connect_peer(node_id, endpoint)
                return rdma
            except TransportError as exc:
                await rdma.close()
                if prefer == "rdma":
                    raise
                reason = (f"RDMA connection to {endpoint} failed ({exc}); start the memory "
                          f"node with --rdma")
        elif prefer == "rdma":
            raise RdmaUnavailable(reason)
        _warn_once(f"transport: using TCP, not RDMA: {reason}")
    tcp = TcpTransport(token, space, node=node)
    await tcp.connect_peer(node_id, endpoint)
    return tcp
