"""RDMA transport: the pager's side, a Python shell over the C data path `transport.rdma_c`.

Connection setup (rdma_cm), the waits on completions and the per-fault path (FETCH, DATA,
RDMA READ, scatter by zero mask; STORE by RDMA WRITE + staged STORE) are C (``lane.c``,
``verbs_setup.c``, ``verbs_data.c``), each call bounded by a deadline and run with the GIL
released. Python runs the handshake through the sans-IO `transport.wire.ClientSession`:

* HELLO -> WELCOME (no RDMA keys) -> AUTH -> AUTH_OK -> OPEN -> OPENED, as SEND/RECV messages;
* then STATS -> STATS_REPLY {"rdma": {read_addr, read_rkey, write_addr, write_rkey, size}}:
  the node's buffers for this connection. The node's session refuses STATS before
  authentication (and closes), so no unauthenticated peer ever learns an rkey; each
  connection has its own protection domain, so its rkeys are valid on its own QP only.
* fetch: FETCH header by SEND; the node reads the written pages (packed) into its buffer 0
  and SENDs a DATA header (``arg`` = zero mask); the pager RDMA READs them and scatters them.
* store: RDMA WRITE into the node's buffer 1, then a STORE header with flag
  `transport.rdma_c` ``SSIP_R_STAGED`` and ``arg`` = byte count; STORED after the pwrite.

The RDMA service (`transport.node.rdma.RdmaServer`) listens on the memory node's TCP port +
`RDMA_PORT_OFFSET`. `RdmaLane` is the blocking lane (`transport.lane.BlockingLane`);
``c_endpoint()`` is None (the C fault loop drives TCP lanes only). `RdmaTransport.open_lane`
hands out a lane only after a lane of this kind stored a page into `PROOF_SPACE` and read it
back unchanged; `create_transport` and `open_lane_or_tcp` turn any failure into TCP with the
one warning. What ran on the project's machine (no RDMA) and what needs hardware: see
transport/README.md.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from typing import Any

from transport.base import Pages, PageTransport, check_pages, lookup_peer, page_view
from transport.errors import ConnectError, ProtocolError, TransportError
from transport.lane import PROOF_SPACE, BlockingLane, prove_lane
from transport.rdma_c.conn import RdmaConn, backend, load, rdma_devices
from transport.wire import (
    MAX_DATA,
    NONCE_SIZE,
    PAGE_SIZE,
    ClientSession,
    ErrorCode,
    FrameReader,
    Reply,
    T,
    expect_reply,
    reply_from_frame,
)

__all__ = ["RDMA_PORT_OFFSET", "WINDOW_KEYS", "RdmaLane", "RdmaTransport", "backend",
           "load", "rdma_devices"]

RDMA_PORT_OFFSET = 1000
CONNECT_TIMEOUT = 5.0  # rdma_cm address/route resolution and connection establishment
IO_TIMEOUT = 10.0  # any one completion (a node's pwrite included)
WINDOW_KEYS = ("read_addr", "read_rkey", "write_addr", "write_rkey", "size")


def parse_reply(data: bytes, reader: FrameReader | None = None) -> Reply:
    """The one frame in an RDMA message (a message is exactly one frame)."""
    reader = reader or FrameReader(capacity=len(data) + 64)
    reader.receive_data(data)
    frame = reader.next_frame()
    if frame is None or reader.buffered():
        raise ProtocolError(f"RDMA message of {len(data)} bytes is not exactly one frame",
                            ErrorCode.BAD_FRAME, fatal=True)
    return reply_from_frame(frame)


def window_of(reply: Reply) -> dict[str, int]:
    """The node's RDMA buffers from its STATS_REPLY; ConnectError when missing or bad."""
    info = (reply.obj or {}).get("rdma")
    if not isinstance(info, dict) or not all(isinstance(info.get(k), int) for k in WINDOW_KEYS):
        raise ConnectError("memory node offered no RDMA buffers in its STATS_REPLY: it is "
                           "not an ssi-pager RDMA service")
    if info["size"] < MAX_DATA:
        raise ConnectError(f"memory node's RDMA buffer of {info['size']} bytes is below one "
                           f"frame ({MAX_DATA})")
    return {k: int(info[k]) for k in WINDOW_KEYS}


class RdmaLane(BlockingLane):
    """One RC connection to one address space of a memory node (blocking; one thread)."""

    kind = "rdma"

    def __init__(self, conn: RdmaConn, session: ClientSession, window: dict[str, int]) -> None:
        self.conn = conn
        self.session = session
        self.window = window
        self._again: tuple[str, bytes | None, str] | None = None  # (endpoint, token, node)
        self._closed = False

    @classmethod
    def connect(cls, endpoint: str, token: bytes | None, space: str, *, node: str = "pager",
                timeout: float = CONNECT_TIMEOUT) -> RdmaLane:
        """Connect, authenticate, open ``space``, learn the node's buffers; every failure
        is a `TransportError` (`ConnectError` unless authentication itself failed)."""
        from transport.tcp import parse_endpoint

        host, port = parse_endpoint(endpoint)
        if port is None:
            raise TransportError(f"endpoint {endpoint!r} has no port: use HOST:PORT")
        where = f"{host}:{port + RDMA_PORT_OFFSET}"
        conn = RdmaConn.connect(host, port + RDMA_PORT_OFFSET, window=MAX_DATA,
                                timeout=timeout)
        try:
            conn.timeout_ms = int(timeout * 1000)  # the handshake is bounded like the connect
            session = ClientSession(token, space, node=node, nonce=os.urandom(NONCE_SIZE),
                                    endpoint=where, identity_key=endpoint)
            out = session.start()
            while out:
                conn.send(out)
                out = session.receive(parse_reply(conn.recv()))
            req, stats = session.request(T.STATS)
            conn.send(stats)
            window = window_of(expect_reply(parse_reply(conn.recv()), T.STATS_REPLY, req))
            conn.timeout_ms = int(IO_TIMEOUT * 1000)
            lane = cls(conn, session, window)
            lane._again = (endpoint, token, node)
            return lane
        except BaseException as exc:
            conn.close()
            if isinstance(exc, TransportError) and not isinstance(exc, ProtocolError):
                raise
            if isinstance(exc, Exception):
                raise ConnectError(f"RDMA handshake with {where} failed: "
                                   f"{type(exc).__name__}: {exc}") from exc
            raise

    def _live(self) -> RdmaConn:
        """The connection, re-established after `reset` (a closed lane stays closed)."""
        if self.conn.ptr is None and not self._closed and self._again is not None:
            endpoint, token, node = self._again
            fresh = RdmaLane.connect(endpoint, token, self.session.space_name, node=node)
            self.conn, self.session, self.window = fresh.conn, fresh.session, fresh.window
        return self.conn

    def _raise_reply(self, frame: bytes) -> None:
        reply = parse_reply(frame)
        raise reply.error or ProtocolError(f"unexpected reply {reply.type}",
                                           ErrorCode.BAD_MESSAGE, fatal=True)

    def fetch_into(self, gpa: int, buf: Any) -> int:
        view = page_view(buf, gpa, "fetch")
        conn = self._live()
        w, mask = self.window, 0
        for off in range(0, len(view), MAX_DATA):
            part = view[off:off + MAX_DATA]
            zero, other = conn.fetch(self.session.next_id(), self.session.space,
                                          gpa + off, part, w["read_addr"], w["read_rkey"])
            if other is not None:
                self._raise_reply(other)
            mask |= zero << (off // PAGE_SIZE)
        return mask

    def store_from(self, gpa: int, buf: Any) -> None:
        view = page_view(buf, gpa, "store")
        conn = self._live()
        w = self.window
        for off in range(0, len(view), MAX_DATA):
            other = conn.store(self.session.next_id(), self.session.space, gpa + off,
                                    view[off:off + MAX_DATA], w["write_addr"], w["write_rkey"])
            if other is not None:
                self._raise_reply(other)

    def ping(self) -> float:
        t0 = time.perf_counter()
        conn = self._live()
        req, frame = self.session.request(T.PING)
        conn.send(frame)
        expect_reply(parse_reply(conn.recv()), T.PONG, req)
        return time.perf_counter() - t0

    def reset(self) -> None:
        """Drop the connection (its QP, CQ, MRs, PD); the next call connects again."""
        self.conn.close()

    def close(self) -> None:
        self._closed = True
        self.conn.close()


@dataclass
class _RdmaPeer:
    lane: RdmaLane
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class RdmaTransport(PageTransport):
    """`PageTransport` over RDMA (one RC connection per peer, requests serialised on it)."""

    name = "rdma"

    def __init__(self, token: bytes | None, space: str = "default", *,
                 node: str = "pager") -> None:
        super().__init__()
        rdma_devices()  # fail early with the reason
        self.token = token
        self.space = space
        self.node = node
        self._peers: dict[str, _RdmaPeer] = {}

    async def connect_peer(self, node_id: str, endpoint: str) -> None:
        lane = await asyncio.to_thread(RdmaLane.connect, endpoint, self.token, self.space,
                                       node=self.node)
        old = self._peers.pop(node_id, None)
        if old is not None:
            await asyncio.to_thread(old.lane.close)
        self._peers[node_id] = _RdmaPeer(lane)
        self.endpoints[node_id] = endpoint

    def open_lane(self, node_id: str, space: str) -> RdmaLane:
        """A proven lane: a page stored into `PROOF_SPACE` and read back through a lane of
        this kind, byte for byte, before the lane to ``space`` is handed out."""
        endpoint = lookup_peer(self.endpoints, node_id)
        with RdmaLane.connect(endpoint, self.token, PROOF_SPACE, node=self.node) as probe:
            prove_lane(probe)
        return RdmaLane.connect(endpoint, self.token, space, node=self.node)

    def _peer(self, node_id: str) -> _RdmaPeer:
        return lookup_peer(self._peers, node_id)

    async def fetch_pages(self, gpa: int, count: int, node_id: str, into: Any = None, *,
                          urgent: bool | None = None) -> Pages:
        check_pages(gpa, count * PAGE_SIZE)
        view = memoryview(into if into is not None else bytearray(count * PAGE_SIZE)).cast("B")
        view = view[:count * PAGE_SIZE]
        peer = self._peer(node_id)
        async with peer.lock:
            mask = await asyncio.to_thread(peer.lane.fetch_into, gpa, view)
        for i in range(count):
            if mask >> i & 1:
                view[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] = bytes(PAGE_SIZE)
        return Pages(view, mask)

    async def send_pages(self, gpa: int, data: Any, node_id: str) -> None:
        view = page_view(data, gpa, "send_pages")
        peer = self._peer(node_id)
        async with peer.lock:
            await asyncio.to_thread(peer.lane.store_from, gpa, view)

    async def ping(self, node_id: str) -> float:
        peer = self._peer(node_id)
        async with peer.lock:
            return await asyncio.to_thread(peer.lane.ping)

    async def measure_bandwidth(self, node_id: str, nbytes: int = 16 << 20) -> float:
        """RDMA READ bandwidth over written pages: one frame of random pages is stored in
        `PROOF_SPACE` first (never-written pages would be zero masks and move nothing)."""
        endpoint = lookup_peer(self.endpoints, node_id)
        return await asyncio.to_thread(self._bandwidth, endpoint, nbytes)

    def _bandwidth(self, endpoint: str, nbytes: int) -> float:
        buf = bytearray(os.urandom(MAX_DATA))
        rounds = max(1, nbytes // MAX_DATA)
        with RdmaLane.connect(endpoint, self.token, PROOF_SPACE, node=self.node) as lane:
            lane.store_from(0, buf)
            t0 = time.perf_counter()
            for _ in range(rounds):
                if lane.fetch_into(0, buf):
                    raise TransportError("RDMA bandwidth probe: stored pages read back as "
                                         "never written")
            return rounds * MAX_DATA / (time.perf_counter() - t0)

    async def close(self) -> None:
        for peer in self._peers.values():
            await asyncio.to_thread(peer.lane.close)
        self._peers.clear()
