"""The memory node's TCP listener (the protocol lives in `transport.node.server`)."""

from __future__ import annotations

import asyncio
import errno as errno_mod
import ssl
from collections.abc import Callable

from transport.errors import NoFreePortError, TransportError

PORT_RANGE = range(50051, 50101)  # auto-selected when no port is given


async def start_server(factory: Callable[[], asyncio.BaseProtocol], host: str,
                       port: int | None, *, tls: ssl.SSLContext | None = None
                       ) -> tuple[asyncio.Server, int]:
    """Listen on host:port, or on the first free port of 50051-50100 when port is None;
    ``tls``: every connection runs TLS with that context."""
    loop = asyncio.get_running_loop()
    candidates = list(PORT_RANGE) if port is None else [port]
    last: OSError | None = None
    for p in candidates:
        try:
            server = await loop.create_server(factory, host, p, reuse_address=True, backlog=128,
                                             ssl=tls)
        except OSError as exc:
            if exc.errno != errno_mod.EADDRINUSE or port is not None:
                raise TransportError(f"cannot listen on {host}:{p}: {exc.strerror}; pick "
                                     f"another --listen address", errno=exc.errno) from exc
            last = exc
            continue
        bound = server.sockets[0].getsockname()[1]
        return server, bound
    raise NoFreePortError(f"ports {PORT_RANGE.start}-{PORT_RANGE.stop - 1} on {host} are all "
                          f"taken: pass --listen {host}:PORT with a free port",
                          errno=last.errno if last else None)
