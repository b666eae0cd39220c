"""Endpoints ("HOST:PORT") and socket options shared by every TCP shell."""

from __future__ import annotations

import contextlib
import socket

from transport.errors import TransportError

DEFAULT_HOST = "127.0.0.1"


def parse_endpoint(endpoint: str, *, default_port: int | None = None) -> tuple[str, int | None]:
    """"HOST:PORT", "[v6]:PORT", "HOST" (port None or default) -> (host, port)."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or (host.count(":") and not host.startswith("[")):
        host, port = endpoint, ""
    host = host.strip("[]") or DEFAULT_HOST
    if not port:
        return host, default_port
    try:
        value = int(port)
    except ValueError:
        raise TransportError(f"bad endpoint {endpoint!r}: expected HOST:PORT") from None
    if not 0 <= value < 65536:
        raise TransportError(f"bad port in endpoint {endpoint!r}")
    return host, value


def require_port(endpoint: str, what: str = "endpoint") -> tuple[str, int]:
    """(host, port) of an endpoint that must name its port."""
    host, port = parse_endpoint(endpoint)
    if port is None:
        raise TransportError(f"{what} {endpoint!r} has no port: use HOST:PORT")
    return host, port


def tune_socket(sock: socket.socket) -> None:
    """Small page requests must not wait for Nagle."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
