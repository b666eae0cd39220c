"""SSI-HV page transport: PageTransport over TCP (default) or RDMA (automatic upgrade).

Modules: `base` (interface, tiers), `lane` (blocking lanes: what a pager thread uses),
`wire` (the sans-IO wire format), `tcp` (shells: asyncio client, BlockingChannel, listener),
`loop` (uvloop), `rdma` (RDMA lanes over the C data path in `rdma_c`), `factory`
(`create_transport`), `manager` (`TransportManager`), `node` (the memory node, its store,
C fast lane and RDMA listener), `bench`.
"""

from __future__ import annotations

from typing import Any


async def create_transport(endpoint: str, token: bytes | None = None, **kw: Any) -> Any:
    """See `transport.factory.create_transport` (imported lazily)."""
    from transport.factory import create_transport as create

    return await create(endpoint, token, **kw)
