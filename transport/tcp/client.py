"""`TcpTransport`: the asyncio (uvloop) `PageTransport` over TCP. A shell: each connection
is a `transport.wire.ClientSession` (request ids, handshake) plus a `ReplyReader` (replies
straight into the callers' buffers); reconnects follow `transport.wire.Backoff`."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from transport.base import Pages, PageTransport, check_pages, lookup_peer, page_view
from transport.errors import (
    ConnectError,
    ConnectionLost,
    ProtocolError,
    TlsError,
    TransportError,
)
from transport.tcp.endpoint import require_port, tune_socket
from transport.tls import client_tls
from transport.wire import (
    MAX_DATA,
    NONCE_SIZE,
    PAGE_SHIFT,
    PAGE_SIZE,
    Backoff,
    ClientSession,
    Flag,
    Reply,
    ReplyReader,
    T,
    expect_reply,
    pack_store,
)

if TYPE_CHECKING:
    from transport.lane import TcpLane

log = logging.getLogger(__name__)

_R = TypeVar("_R")
_ZERO_PAGE = bytes(PAGE_SIZE)


class _Conn(asyncio.BufferedProtocol):
    """One authenticated connection: replies are received by a `ReplyReader` straight into
    the buffers the requests registered; futures resolve by request id."""

    def __init__(self, label: str, session: ClientSession) -> None:
        self.label = label
        self.session = session
        self.reader = ReplyReader()
        self.pending: dict[int, asyncio.Future[Reply]] = {}
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self._writable = asyncio.Event()
        self._writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            tune_socket(sock)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.reader.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        try:
            self.reader.buffer_updated(nbytes)
        except ProtocolError as exc:
            self._fail(ConnectionLost(f"{self.label}: {exc}"))
            assert self.transport is not None
            self.transport.abort()
            return
        replies = self.reader.replies
        while replies:
            reply = replies.pop(0)
            fut = self.pending.pop(reply.request_id, None)
            if fut is None:
                self._fail(ConnectionLost(f"{self.label} answered request "
                                          f"{reply.request_id}, which is not in flight"))
                assert self.transport is not None
                self.transport.abort()
                return
            if not fut.done():
                fut.set_result(reply)

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionLost(f"{self.label} closed the connection"
                                  + (f": {exc}" if exc else "")))
        self._writable.set()

    def _fail(self, exc: Exception) -> None:
        pending, self.pending = self.pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(exc)
        if not self.closed.done():
            self.closed.set_result(exc)

    @property
    def alive(self) -> bool:
        return not self.closed.done()

    def _expect(self, req: int) -> asyncio.Future[Reply]:
        if not self.alive:
            raise self.closed.result()
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self.pending[req] = fut
        return fut

    def submit(self, ftype: int, *, gpa: int = 0, length: int = 0, arg: int = 0,
               flags: int = 0, payload: Any = None, into: memoryview | None = None
               ) -> asyncio.Future[Reply]:
        """Write one request; the future resolves with its reply."""
        if not self.alive:
            raise self.closed.result()
        req, hdr = self.session.request(ftype, gpa=gpa, length=length, arg=arg, flags=flags)
        fut = self._expect(req)
        if into is not None:
            self.reader.expect_data(req, into)
        assert self.transport is not None
        if payload is None:
            self.transport.write(hdr)
        else:
            self.transport.writelines([hdr, payload])
        return fut

    async def handshake(self) -> None:
        hs = self.session
        assert self.transport is not None
        out = hs.start()
        while not hs.done:
            fut = self._expect(hs.awaiting)  # the request id of the step just built
            self.transport.write(out)
            out = hs.receive(await fut)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def _reply(fut: asyncio.Future[Reply], expect: int) -> Reply:
    return expect_reply(await fut, expect)


async def _all_replies(futs: list[asyncio.Future[Reply]], expect: int) -> None:
    """Wait for every reply (each future's outcome is retrieved, so a failed batch leaves no
    "exception was never retrieved" behind), then raise the first error if any."""
    results = await asyncio.gather(*(_reply(f, expect) for f in futs), return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r


class _Peer:
    """Connections to one memory node: an urgent lane (faults) and bulk lanes (background),
    each re-established with exponential backoff when lost."""

    def __init__(self, node_id: str, endpoint: str, transport: TcpTransport) -> None:
        self.node_id = node_id
        self.endpoint = endpoint
        self.host, self.port = require_port(endpoint, f"endpoint for {node_id}")
        self.t = transport
        self.lanes: list[_Conn | None] = [None] * (1 + transport.bulk_connections)
        self.locks = [asyncio.Lock() for _ in self.lanes]
        self._rr = 0

    async def _open(self, lane: int) -> _Conn:
        loop = asyncio.get_running_loop()
        label = f"memory node {self.node_id} ({self.endpoint})"
        t = self.t
        session = ClientSession(t.token, t.space, node=t.node, nonce=os.urandom(NONCE_SIZE),
                                endpoint=f"{self.node_id} ({self.endpoint})",
                                compress=t.compress if lane else (),  # bulk lanes only
                                identity_key=self.endpoint)
        try:
            _tr, conn = await asyncio.wait_for(loop.create_connection(
                lambda: _Conn(label, session), self.host, self.port, ssl=client_tls()), t.timeout)
        except ssl.SSLError as exc:
            raise TlsError(f"TLS handshake with {label} failed: {exc.reason or exc}; both "
                           "sides need --tls and certificates of the same cluster CA") from exc
        except (TimeoutError, OSError) as exc:
            raise ConnectError(f"cannot connect to {label}: {exc}; is `ssi-pager memnode` "
                               f"running there?", errno=getattr(exc, "errno", None)) from exc
        try:
            await asyncio.wait_for(conn.handshake(), t.timeout)
        except BaseException:
            conn.close()
            raise
        conn.reader.codec = session.codec
        return conn

    async def lane(self, urgent: bool) -> _Conn:
        if urgent:
            i = 0
        else:
            self._rr = self._rr % (len(self.lanes) - 1) + 1 if len(self.lanes) > 1 else 0
            i = self._rr
        conn = self.lanes[i]
        if conn is not None and conn.alive:
            return conn
        async with self.locks[i]:
            conn = self.lanes[i]
            if conn is not None and conn.alive:
                return conn
            loop = asyncio.get_running_loop()
            backoff = Backoff(loop.time(), self.t.retry_for, first=0.02, cap=1.0)
            while True:
                try:
                    conn = self.lanes[i] = await self._open(i)
                    return conn
                except ConnectError as exc:
                    delay = backoff.delay(loop.time(), exc)
                    if delay is None:
                        raise
                    log.warning("%s; retrying in %.2f s", exc, delay)
                    await asyncio.sleep(delay)

    def close(self) -> None:
        for conn in self.lanes:
            if conn is not None:
                conn.close()


class TcpTransport(PageTransport):
    """`PageTransport` over TCP (asyncio; uvloop when the loop is uvloop's).

    Per peer: one urgent connection for fault-sized fetches and ``bulk_connections`` for
    background transfers, so a fault never waits behind a bulk stream. Many requests are in
    flight per connection; replies land straight in the caller's buffer.
    """

    name = "tcp"

    def __init__(self, token: bytes | None, space: str = "default", *, node: str = "pager",
                 bulk_connections: int = 2, timeout: float = 10.0,
                 retry_for: float = 5.0) -> None:
        super().__init__()
        self.token = token
        self.space = space
        self.node = node
        self.bulk_connections = bulk_connections
        self.timeout = timeout
        self.retry_for = retry_for
        self.epochs: dict[str, int] = {}  # space -> the owner's epoch its lanes OPEN under
        # codecs the bulk connections offer (`transport.wire.codec`); the urgent one never
        self.compress: tuple[str, ...] = ()
        self.peers: dict[str, _Peer] = {}

    def _peer(self, node_id: str) -> _Peer:
        return lookup_peer(self.peers, node_id)

    async def connect_peer(self, node_id: str, endpoint: str) -> None:
        peer = _Peer(node_id, endpoint, self)
        await peer.lane(True)  # authenticate now: a wrong token fails here
        old = self.peers.get(node_id)
        if old is not None:
            old.close()
        self.peers[node_id] = peer
        self.endpoints[node_id] = endpoint

    async def _retry(self, node_id: str, op: Callable[[_Peer], Coroutine[Any, Any, _R]]) -> _R:
        peer = self._peer(node_id)
        loop = asyncio.get_running_loop()
        backoff = Backoff(loop.time(), self.retry_for, first=0.0)
        while True:
            try:
                return await op(peer)
            except ConnectionLost as exc:
                delay = backoff.delay(loop.time(), exc)
                if delay is None:
                    raise
                log.warning("%s; reconnecting", exc)
                await asyncio.sleep(delay)

    async def fetch_pages(self, gpa: int, count: int, node_id: str, into: Any = None, *,
                          urgent: bool | None = None) -> Pages:
        nbytes = count * PAGE_SIZE
        check_pages(gpa, nbytes)
        view = memoryview(into if into is not None else bytearray(nbytes)).cast("B")
        if len(view) < nbytes:
            raise TransportError(f"buffer of {len(view)} bytes is smaller than {count} pages")
        view = view[:nbytes]
        lane = count <= MAX_DATA // PAGE_SIZE if urgent is None else urgent

        async def op(peer: _Peer) -> int:
            conn = await peer.lane(lane)
            flags = Flag.URGENT if lane else 0
            futs = [(off, conn.submit(T.FETCH, gpa=gpa + off, arg=min(MAX_DATA, nbytes - off),
                                      flags=flags,
                                      into=view[off:off + min(MAX_DATA, nbytes - off)]))
                    for off in range(0, nbytes, MAX_DATA)]
            mask = 0
            for off, fut in futs:
                mask |= (await _reply(fut, T.DATA)).arg << (off >> PAGE_SHIFT)
            return mask

        mask = -1
        conn = self.peers[node_id].lanes[0] if lane and nbytes <= MAX_DATA and \
            node_id in self.peers else None
        if conn is not None and conn.alive:  # a fault-sized fetch on a live urgent lane
            try:
                reply = await conn.submit(T.FETCH, gpa=gpa, arg=nbytes, flags=Flag.URGENT,
                                          into=view)
            except ConnectionLost:
                pass  # the general path below reconnects and retries
            else:
                mask = expect_reply(reply, T.DATA).arg
        if mask < 0:
            mask = await self._retry(node_id, op)
        if mask:  # the node sent nothing for these: make the bytes true
            for i in range(count):
                if mask >> i & 1:
                    view[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] = _ZERO_PAGE
        return Pages(view, mask)

    async def send_pages(self, gpa: int, data: Any, node_id: str) -> None:
        view = page_view(data, gpa, "send_pages")

        async def op(peer: _Peer) -> None:
            conn = await peer.lane(False)
            futs = []
            for off in range(0, len(view), MAX_DATA):
                await conn._writable.wait()
                flags, arg, part = pack_store(conn.session.codec, view[off:off + MAX_DATA])
                futs.append(conn.submit(T.STORE, gpa=gpa + off, length=len(part), arg=arg,
                                        flags=flags, payload=part))
            await _all_replies(futs, T.STORED)

        await self._retry(node_id, op)

    async def ping(self, node_id: str, reply_bytes: int = 0, *, urgent: bool = True) -> float:
        async def op(peer: _Peer) -> float:
            conn = await peer.lane(urgent)
            t0 = time.perf_counter()
            await _reply(conn.submit(T.PING, arg=reply_bytes), T.PONG)
            return time.perf_counter() - t0

        return await self._retry(node_id, op)

    async def measure_bandwidth(self, node_id: str, nbytes: int = 16 << 20,
                                depth: int = 16) -> float:
        peer = self._peer(node_id)
        conns = [await peer.lane(False) for _ in range(max(1, self.bulk_connections))]
        n = max(1, nbytes // MAX_DATA)
        t0 = time.perf_counter()
        inflight: list[asyncio.Future[Reply]] = []
        for i in range(n):
            inflight.append(conns[i % len(conns)].submit(T.PING, arg=MAX_DATA))
            if len(inflight) >= depth * len(conns):
                await _reply(inflight.pop(0), T.PONG)
        await _all_replies(inflight, T.PONG)
        return n * MAX_DATA / (time.perf_counter() - t0)

    async def stats(self, node_id: str) -> dict[str, Any]:
        """The memory node's `MemoryNode.stats()`."""
        async def op(peer: _Peer) -> dict[str, Any]:
            conn = await peer.lane(True)
            return (await _reply(conn.submit(T.STATS), T.STATS_REPLY)).obj or {}

        return await self._retry(node_id, op)

    def open_lane(self, node_id: str, space: str, *, compress: tuple[str, ...] = ()
                  ) -> TcpLane:
        """``compress``: codecs to offer (a bulk lane; a fault lane never compresses)."""
        from transport.lane import TcpLane

        return TcpLane.connect(lookup_peer(self.endpoints, node_id), self.token, space,
                               node=self.node, timeout=self.timeout, retry_for=self.retry_for,
                               epoch=self.epochs.get(space), compress=compress)

    async def close(self) -> None:
        for peer in self.peers.values():
            peer.close()
        self.peers.clear()
        await asyncio.sleep(0)
