"""Blocking lanes: what one pager thread needs from one memory node.

A `BlockingLane` is one connection to one address space of one memory node, used by one
thread at a time, with no event loop:

* ``fetch_into(gpa, buf)`` fills ``buf`` (whole pages) and returns the zero mask (bit i set:
  page i was never written; its bytes in ``buf`` are unspecified);
* ``store_from(gpa, buf)`` writes whole pages and returns after the node's acknowledgement;
* ``c_endpoint()`` is the raw endpoint a C fault loop drives, ``(fd, wire, space handle)``
  with wire "ssip" (a TLS lane adds its C session, a `transport.tlsc.TlsSession`: ``(fd,
  wire, space, session)``), or None when this lane cannot be driven from C (RDMA);
* ``ping()`` is one round trip (seconds); ``reset()`` drops the connection (the next call
  reconnects where the lane can), ``close()`` releases it.

Each `transport.base.PageTransport` opens lanes of its own kind (``open_lane(node_id,
space)``), so the transport `create_transport()` selected is the one that carries faults.
A lane of a kind that has not carried pages here before (RDMA) proves itself first:
`prove_lane` stores a random page into `PROOF_SPACE` and reads it back through a lane of that
kind, byte for byte. `open_lane_or_tcp` turns any failure of such a lane (its proof, its
connect, any exception) into a TCP lane and the one warning line. ``c_endpoint()`` of an
RDMA lane is None for now: the C fault loop drives TCP lanes only, and RDMA lanes are driven
from Python through the C data path (`transport.rdma_c`, GIL released).
"""

from __future__ import annotations

import abc
import logging
import os
import secrets
import sys
from typing import TYPE_CHECKING, Any

from transport.errors import TransportError
from transport.wire import PAGE_SIZE

if TYPE_CHECKING:
    from transport.base import PageTransport

log = logging.getLogger(__name__)

PROOF_SPACE = "ssi-pager.lane-proof"  # scratch address space a new lane kind proves itself in
PROOF_PAGES = 1 << 16  # the proof page is placed at random among this many (sparse) pages

_warned = False


class LaneProofError(TransportError):
    """A lane read back other bytes than it stored: it must not carry a guest's pages."""


class BlockingLane(abc.ABC):
    """One thread's blocking connection to one address space of one memory node."""

    kind = "?"  # "tcp" | "rdma": the transport whose lanes these are

    @abc.abstractmethod
    def fetch_into(self, gpa: int, buf: Any) -> int:
        """Fill ``buf`` with the pages at ``gpa``; returns the zero mask."""

    @abc.abstractmethod
    def store_from(self, gpa: int, buf: Any) -> None:
        """Write the pages in ``buf`` at ``gpa``; returns after the node's acknowledgement."""

    @abc.abstractmethod
    def ping(self) -> float:
        """One round trip to the node (seconds)."""

    def c_endpoint(self) -> tuple[int, str, int] | None:
        """``(fd, wire, space handle[, TLS session])`` for a C fault loop, or None (not
        drivable from C)."""
        return None

    def reset(self) -> None:  # noqa: B027 - default: the next call reconnects by itself
        """Drop the connection after an error; the next call reconnects."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> BlockingLane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TcpLane(BlockingLane):
    """A lane over `transport.tcp.BlockingChannel` (reconnects and retries by itself)."""

    kind = "tcp"

    def __init__(self, channel: Any) -> None:
        self.channel = channel

    @classmethod
    def connect(cls, endpoint: str, token: bytes | None, space: str, **kw: Any) -> TcpLane:
        from transport.tcp import BlockingChannel

        return cls(BlockingChannel.connect(endpoint, token, space, **kw))

    def fetch_into(self, gpa: int, buf: Any) -> int:
        return self.channel.fetch_into(gpa, buf)

    def store_from(self, gpa: int, buf: Any) -> None:
        self.channel.store(gpa, buf)

    def ping(self) -> float:
        return self.channel.ping()

    def c_endpoint(self) -> tuple[int, str, int] | tuple[int, str, int, Any] | None:
        fd = self.channel.fileno()
        if fd < 0 or self.channel.compress:  # a compressing lane is never driven from C
            return None
        if self.channel.tls:  # the C loop reads and writes through the C TLS session
            return (fd, "ssip", self.channel.space, self.channel.tls_session())
        return (fd, "ssip", self.channel.space)

    def reset(self) -> None:
        self.channel.close()

    def close(self) -> None:
        self.channel.close()


def prove_lane(lane: BlockingLane) -> None:
    """Store a random page at a random page of ``lane``'s address space (`PROOF_SPACE`), read
    it back through the lane and compare; `LaneProofError` when anything differs."""
    gpa = secrets.randbelow(PROOF_PAGES) * PAGE_SIZE
    page = os.urandom(PAGE_SIZE)
    lane.store_from(gpa, page)
    back = bytearray(PAGE_SIZE)
    mask = lane.fetch_into(gpa, back)
    if mask & 1:
        raise LaneProofError(f"{lane.kind} lane proof: the page stored at {gpa:#x} of "
                             f"{PROOF_SPACE} reads back as never written")
    if back != page:
        diff = next(i for i in range(PAGE_SIZE) if back[i] != page[i])
        raise LaneProofError(f"{lane.kind} lane proof: the page stored at {gpa:#x} of "
                             f"{PROOF_SPACE} reads back different from byte {diff}")


def warn_once(message: str) -> None:
    """The one stderr line saying a faster transport is not used and why (logged each time)."""
    global _warned
    log.info("%s", message)
    if not _warned:
        _warned = True
        print(message, file=sys.stderr)


def open_lane_or_tcp(transport: PageTransport, node_id: str, space: str) -> BlockingLane:
    """A lane of ``transport``'s kind to ``node_id``, or, if that fails in any way and the
    transport is not TCP, a TCP lane to the same node (with the one warning line).

    A TCP lane's own errors propagate (the engine retries them)."""
    if transport.name == "tcp":
        return transport.open_lane(node_id, space)
    try:
        return transport.open_lane(node_id, space)
    except Exception as exc:  # RDMA errors, a bad handshake, a failed proof, anything
        log.debug("%s lane to %s failed", transport.name, node_id, exc_info=True)
        warn_once(f"transport: using TCP, not {transport.name.upper()}: the {transport.name} "
                  f"lane to {node_id} failed ({type(exc).__name__}: {exc}); faults go over TCP")
    from transport.base import lookup_peer

    return TcpLane.connect(lookup_peer(transport.endpoints, node_id), transport.token, space,
                           node=transport.node)
