"""TCP shells around `transport.wire`: `blocking` (`BlockingChannel`, the fault engine's hot
path), `client` (`TcpTransport`, asyncio), `server` (the memory node's listener), `endpoint`
(HOST:PORT parsing, socket options). No frame parsing, constants or retry policy here."""

from __future__ import annotations

from transport.errors import AuthError, ProtocolError
from transport.loop import new_event_loop, run
from transport.tcp.blocking import BlockingChannel
from transport.tcp.client import TcpTransport
from transport.tcp.endpoint import DEFAULT_HOST, parse_endpoint, require_port, tune_socket
from transport.tcp.server import PORT_RANGE, start_server
from transport.wire import ErrorCode

__all__ = ["DEFAULT_HOST", "PORT_RANGE", "AuthError", "BlockingChannel", "ErrorCode",
           "ProtocolError", "TcpTransport", "new_event_loop", "parse_endpoint", "require_port",
           "run", "start_server", "tune_socket"]
