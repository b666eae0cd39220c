"""TCP shells around `transport.wire.protocol`: the server listener, the blocking channel used
by the fault engine's hot thread, and the asyncio (uvloop) client transport.

No parsing here beyond moving bytes between sockets and the sans-IO objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno as errno_mod
import logging
import os
import socket
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from transport.base import Pages, PageTransport, check_pages, lookup_peer, page_view
from transport.errors import (
    AuthError,
    ConnectError,
    ConnectionLost,
    NoFreePortError,
    ProtocolError,
    RemoteError,
    TransportError,
)
from transport.wire.protocol import (
    FAULT_LANE,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_CONTROL,
    MAX_DATA,
    NONCE_SIZE,
    PAGE_SHIFT,
    PAGE_SIZE,
    VERSION,
    ClientHandshake,
    ErrorCode,
    Flag,
    Reply,
    ReplyReader,
    T,
    data_length,
    decode_reply_body,
    zero_mask_runs,
)

if TYPE_CHECKING:
    from transport.lane import TcpLane

log = logging.getLogger(__name__)

PORT_RANGE = range(50051, 50101)  # auto-selected when no port is given
DEFAULT_HOST = "127.0.0.1"
_R = TypeVar("_R")
_FETCH, _DATA, _ERROR, _URGENT = int(T.FETCH), int(T.DATA), int(T.ERROR), int(Flag.URGENT)


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


def run(coro: Coroutine[Any, Any, _R]) -> _R:
    """Run a coroutine on uvloop when available (it is a dependency), else asyncio."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a declared dependency
        return asyncio.run(coro)
    return uvloop.run(coro)


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def tune_socket(sock: socket.socket) -> None:
    """Small page requests must not wait for Nagle."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def start_server(factory: Callable[[], asyncio.BaseProtocol], host: str,
                       port: int | None) -> tuple[asyncio.Server, int]:
    """Listen on host:port, or on the first free port of 50051-50100 when port is None."""
    loop = asyncio.get_running_loop()
    candidates = list(PORT_RANGE) if port is None else [port]
    last: OSError | None = None
    for p in candidates:
        try:
            server = await loop.create_server(factory, host, p, reuse_address=True, backlog=128)
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


# --- blocking channel (the fault engine's hot path) ------------------------------------------

class BlockingChannel:
    """One authenticated blocking socket to a memory node, for one thread.

    Lean by design: requests are packed into a preallocated header buffer and replies are
    received with ``recv_into`` straight into the caller's buffer; no event loop, no per-call
    allocation beyond a memoryview. A broken connection is re-established (with backoff, for
    up to ``retry_for`` seconds) and the request retried: fetch and store are idempotent.
    """

    def __init__(self, endpoint: str, token: bytes | None, space: str, *,
                 timeout: float = 10.0, retry_for: float = 5.0, node: str = "pager") -> None:
        self.endpoint = endpoint
        self.host, port = parse_endpoint(endpoint)
        if port is None:
            raise TransportError(f"endpoint {endpoint!r} has no port: use HOST:PORT")
        self.port = port
        self.token = token
        self.space_name = space
        self.timeout = timeout
        self.retry_for = retry_for
        self.node = node
        self.sock: socket.socket | None = None
        self.space = 0
        self._req = 0
        self._out = bytearray(HEADER_SIZE * ((1 << 20) // MAX_DATA))  # 1 MiB worth of requests
        self._hdr = bytearray(HEADER_SIZE)
        self._hdr_view = memoryview(self._hdr)
        self._req_hdr = bytearray(HEADER_SIZE)
        self._scratch = bytearray(MAX_CONTROL)
        self._scratch_view = memoryview(self._scratch)

    @classmethod
    def connect(cls, endpoint: str, token: bytes | None, space: str, **kw: Any
                ) -> BlockingChannel:
        ch = cls(endpoint, token, space, **kw)
        ch._connect()
        return ch

    def __enter__(self) -> BlockingChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def fileno(self) -> int:
        return self.sock.fileno() if self.sock is not None else -1

    # connection
    def _connect(self) -> None:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except OSError as exc:
            raise ConnectError(f"cannot connect to memory node {self.endpoint}: "
                               f"{exc.strerror or exc}; is `ssi-pager memnode` running there?",
                               errno=exc.errno) from exc
        tune_socket(sock)
        # blocking mode for the hot path (no poll per recv); SO_RCVTIMEO/SO_SNDTIMEO bound it
        sock.settimeout(None)
        tv = int(self.timeout).to_bytes(8, "little") + int(
            (self.timeout % 1) * 1e6).to_bytes(8, "little")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        self.sock = sock
        try:
            hs = ClientHandshake(self.token, self.space_name, node=self.node,
                                 nonce=os.urandom(NONCE_SIZE), lane=FAULT_LANE)
            sock.sendall(hs.start())
            while not hs.done:
                out = hs.receive(self._read_reply())
                if out:
                    sock.sendall(out)
        except BaseException:
            self.close()
            raise
        self.space = hs.space

    def _recv_exact(self, view: memoryview) -> None:
        sock = self.sock
        assert sock is not None
        want = len(view)
        got = sock.recv_into(view, want, socket.MSG_WAITALL)
        while got < want:
            n = sock.recv_into(view[got:], want - got, socket.MSG_WAITALL)
            if n == 0:
                raise ConnectionLost(f"memory node {self.endpoint} closed the connection")
            got += n

    def _read_header(self) -> tuple[int, int, int, int, int]:
        self._recv_exact(self._hdr_view)
        return self._parse_header()

    def _parse_header(self) -> tuple[int, int, int, int, int]:
        magic, version, ftype, _f, req, space, _gpa, length, arg = HEADER.unpack_from(self._hdr)
        if magic != MAGIC or version != VERSION or length > max(MAX_DATA, MAX_CONTROL):
            raise ConnectionLost(f"memory node {self.endpoint} sent a corrupt frame header")
        return ftype, req, space, length, arg

    def _read_reply(self) -> Reply:
        """A whole non-DATA frame (control, ack, error)."""
        ftype, req, space, length, arg = self._read_header()
        if length > MAX_CONTROL:
            raise ConnectionLost(f"memory node {self.endpoint} sent an unexpected "
                                 f"{length}-byte frame of type {ftype}")
        payload = self._scratch_view[:length]
        if length:
            self._recv_exact(payload)
        return decode_reply_body(Reply(ftype, req, space, arg, length), payload)

    def _next_id(self) -> int:
        self._req = (self._req + 1) & 0xFFFFFFFF or 1
        return self._req

    def _failed(self, exc: BaseException) -> None:
        """Close after an I/O failure; raise if it was a timeout (no point retrying)."""
        self.close()
        if isinstance(exc, BlockingIOError | TimeoutError) or (
                isinstance(exc, OSError) and exc.errno == errno_mod.EAGAIN):
            raise ConnectionLost(f"memory node {self.endpoint} did not answer within "
                                 f"{self.timeout:g} s") from exc

    def _retrying(self, op: Callable[[], _R]) -> _R:
        deadline = None
        delay = 0.01
        while True:
            try:
                if self.sock is None:
                    self._connect()
                return op()
            except (ConnectionLost, ConnectError, OSError) as exc:
                self._failed(exc)
                now = time.monotonic()
                deadline = deadline or now + self.retry_for
                if now >= deadline:
                    if isinstance(exc, TransportError):
                        raise
                    raise ConnectionLost(f"connection to memory node {self.endpoint} failed: "
                                         f"{exc}", errno=exc.errno) from exc
                log.warning("memory node %s: %s; reconnecting", self.endpoint, exc)
                time.sleep(delay)
                delay = min(delay * 2, 0.5)

    # page operations
    def fetch_into(self, gpa: int, buf: Any) -> int:
        """Fill ``buf`` (len a multiple of 4096) with the pages from ``gpa``.

        Returns the zero mask: bit i set = page i was never written; the bytes of those
        pages in ``buf`` are unspecified (use UFFDIO_ZEROPAGE, or zero them).
        """
        view = page_view(buf, gpa, "fetch")
        n = len(view)
        sock = self.sock
        if sock is not None and n <= MAX_DATA:  # the hot case: one request, one reply
            req = self._req = (self._req + 1) & 0xFFFFFFFF or 1
            HEADER.pack_into(self._req_hdr, 0, MAGIC, VERSION, _FETCH, _URGENT, req,
                             self.space, gpa, 0, n)
            try:
                sock.sendall(self._req_hdr)
                return self._recv_one(req, view)
            except (ConnectionLost, OSError) as exc:
                self._failed(exc)  # a timeout raises; a lost connection is retried below
        return self._retrying(lambda: self._fetch(gpa, view, n))

    def _fetch(self, gpa: int, view: memoryview, n: int) -> int:
        sock = self.sock
        assert sock is not None
        if n <= MAX_DATA:
            req = self._next_id()
            HEADER.pack_into(self._req_hdr, 0, MAGIC, VERSION, _FETCH, _URGENT, req,
                             self.space, gpa, 0, n)
            sock.sendall(self._req_hdr)
            return self._recv_one(req, view)
        # pipelined: send every request, then take the replies in order
        mask = 0
        pos = 0
        while pos < n:
            batch = min(n - pos, len(self._out) // HEADER_SIZE * MAX_DATA)
            first = self._req + 1
            k = 0
            for off in range(pos, pos + batch, MAX_DATA):
                HEADER.pack_into(self._out, k * HEADER_SIZE, MAGIC, VERSION, T.FETCH,
                                 Flag.URGENT, self._next_id(), self.space, gpa + off, 0,
                                 min(MAX_DATA, n - off))
                k += 1
            sock.sendall(memoryview(self._out)[:k * HEADER_SIZE])
            error: Exception | None = None
            for i, off in enumerate(range(pos, pos + batch, MAX_DATA)):
                try:
                    part = self._recv_data((first + i) & 0xFFFFFFFF or 1,
                                           view[off:off + min(MAX_DATA, n - off)])
                except RemoteError as exc:
                    error = error or exc
                    continue
                mask |= part << (off >> PAGE_SHIFT)
            if error is not None:
                raise error
            pos += batch
        return mask

    def _recv_one(self, req: int, view: memoryview) -> int:
        """The reply to the only request in flight: header and pages in one recvmsg_into
        (header into its buffer, pages straight into the caller's), then whatever is left.
        Nothing but this reply can arrive, so over-reading is impossible."""
        sock = self.sock
        assert sock is not None
        nb = sock.recvmsg_into([self._hdr_view, view])[0]
        if nb < HEADER_SIZE:
            if nb == 0:
                raise ConnectionLost(f"memory node {self.endpoint} closed the connection")
            self._recv_exact(self._hdr_view[nb:])
            nb = HEADER_SIZE
        got = nb - HEADER_SIZE
        magic, version, ftype, _f, rid, _space, _gpa, length, mask = HEADER.unpack_from(
            self._hdr)
        if ftype == _DATA and rid == req and not mask and length == len(view) and \
                magic == MAGIC and version == VERSION:  # every page written: the usual case
            if got < length:
                self._recv_exact(view[got:length])
            return 0
        self._parse_header()  # validates
        if ftype == _ERROR and rid == req and length <= MAX_CONTROL:
            payload = self._scratch_view[:length]
            payload[:got] = view[:got]
            self._recv_exact(payload[got:])
            reply = decode_reply_body(Reply(ftype, rid, 0, mask, length), payload)
            assert reply.error is not None
            raise reply.error
        npages = len(view) >> PAGE_SHIFT
        if (ftype != _DATA or rid != req or length != data_length(npages, mask)
                or got > length):
            raise ConnectionLost(f"memory node {self.endpoint} answered request {req} with "
                                 f"frame type {ftype} id {rid} length {length}")
        if got < length:
            self._recv_exact(view[got:length])
        if mask and length:  # pages arrived packed: move each run to its place, last first
            pos = length
            for first, count in reversed(zero_mask_runs(npages, mask)):
                size = count << PAGE_SHIFT
                pos -= size
                dst = first << PAGE_SHIFT
                if dst != pos:
                    view[dst:dst + size] = bytes(view[pos:pos + size])
        return mask

    def _recv_data(self, req: int, view: memoryview) -> int:
        ftype, rid, _space, length, mask = self._read_header()
        if ftype == T.ERROR and rid == req:
            payload = self._scratch_view[:length]
            self._recv_exact(payload)
            reply = decode_reply_body(Reply(ftype, rid, 0, mask, length), payload)
            assert reply.error is not None
            raise reply.error
        npages = len(view) >> PAGE_SHIFT
        if ftype != T.DATA or rid != req or length != data_length(npages, mask):
            raise ConnectionLost(f"memory node {self.endpoint} answered request {req} with "
                                 f"frame type {ftype} id {rid} length {length}")
        if not mask:
            self._recv_exact(view)
        elif length:
            for first, count in zero_mask_runs(npages, mask):
                self._recv_exact(view[first << PAGE_SHIFT:(first + count) << PAGE_SHIFT])
        return mask

    def store(self, gpa: int, data: Any) -> None:
        """Write pages at ``gpa``; returns once the node has written them (pwrite)."""
        view = page_view(data, gpa, "store")
        self._retrying(lambda: self._store(gpa, view, len(view)))

    def _store(self, gpa: int, view: memoryview, n: int) -> None:
        sock = self.sock
        assert sock is not None
        reqs = []
        for off in range(0, n, MAX_DATA):
            part = min(MAX_DATA, n - off)
            req = self._next_id()
            HEADER.pack_into(self._hdr, 0, MAGIC, VERSION, T.STORE, 0, req, self.space,
                             gpa + off, part, 0)
            chunk = view[off:off + part]
            sent = sock.sendmsg([self._hdr, chunk])
            if sent < HEADER_SIZE:  # partial sends: finish both parts
                sock.sendall(self._hdr_view[sent:])
                sock.sendall(chunk)
            elif sent < HEADER_SIZE + part:
                sock.sendall(chunk[sent - HEADER_SIZE:])
            reqs.append(req)
        error: Exception | None = None
        for req in reqs:
            reply = self._read_reply()
            if reply.error is not None:
                error = error or reply.error
            elif reply.type != T.STORED or reply.request_id != req:
                raise ConnectionLost(f"memory node {self.endpoint} answered store {req} with "
                                     f"frame type {reply.type} id {reply.request_id}")
        if error is not None:
            raise error

    def ping(self, reply_bytes: int = 0) -> float:
        """Round trip of one PING (seconds)."""
        def op() -> float:
            assert self.sock is not None
            req = self._next_id()
            HEADER.pack_into(self._out, 0, MAGIC, VERSION, T.PING, 0, req, 0, 0, 0,
                             reply_bytes)
            t0 = time.perf_counter()
            self.sock.sendall(self._out[:HEADER_SIZE])
            reply = self._read_reply()
            if reply.error is not None:
                raise reply.error
            return time.perf_counter() - t0
        return self._retrying(op)


# --- asyncio client ----------------------------------------------------------------------------

class _Conn(asyncio.BufferedProtocol):
    """One authenticated connection: replies are received by a `ReplyReader` straight into
    the buffers the requests registered; futures resolve by request id."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.reader = ReplyReader()
        self.pending: dict[int, asyncio.Future[Reply]] = {}
        self.unsolicited: asyncio.Queue[Reply] = asyncio.Queue()
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self.space = 0
        self._req = 15  # ids 1-3 are the handshake's
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
                self.unsolicited.put_nowait(reply)
            elif not fut.done():
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
        self.unsolicited.put_nowait(Reply(T.ERROR, 0, error=exc))

    @property
    def alive(self) -> bool:
        return not self.closed.done()

    def next_id(self) -> int:
        self._req = (self._req + 1) & 0xFFFFFFFF or 16
        return self._req

    def submit(self, ftype: int, *, gpa: int = 0, length: int = 0, arg: int = 0,
               flags: int = 0, payload: Any = None, into: memoryview | None = None
               ) -> asyncio.Future[Reply]:
        """Write one request; the future resolves with its reply."""
        if not self.alive:
            raise self.closed.result()
        req = self.next_id()
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self.pending[req] = fut
        if into is not None:
            self.reader.expect_data(req, into)
        assert self.transport is not None
        hdr = HEADER.pack(MAGIC, VERSION, ftype, flags, req, self.space, gpa, length, arg)
        if payload is None:
            self.transport.write(hdr)
        else:
            self.transport.writelines([hdr, payload])
        return fut

    async def handshake(self, token: bytes | None, space: str, node: str) -> None:
        hs = ClientHandshake(token, space, node=node, nonce=os.urandom(NONCE_SIZE))
        assert self.transport is not None
        self.transport.write(hs.start())
        while not hs.done:
            out = hs.receive(await self.unsolicited.get())
            if out:
                self.transport.write(out)
        self.space = hs.space

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def _reply(fut: asyncio.Future[Reply], expect: int) -> Reply:
    reply = await fut
    if reply.error is not None:
        raise reply.error
    if reply.type != expect:
        raise ProtocolError(f"expected {T(expect).name}, got frame type {reply.type}",
                            ErrorCode.BAD_MESSAGE)
    return reply


class _Peer:
    """Connections to one memory node: an urgent lane (faults) and bulk lanes (background),
    each re-established with exponential backoff when lost."""

    def __init__(self, node_id: str, endpoint: str, transport: TcpTransport) -> None:
        self.node_id = node_id
        self.endpoint = endpoint
        self.host, port = parse_endpoint(endpoint)
        if port is None:
            raise TransportError(f"endpoint {endpoint!r} for {node_id} has no port: use "
                                 f"HOST:PORT")
        self.port = port
        self.t = transport
        self.lanes: list[_Conn | None] = [None] * (1 + transport.bulk_connections)
        self.locks = [asyncio.Lock() for _ in self.lanes]
        self._rr = 0

    async def _open(self, lane: int) -> _Conn:
        loop = asyncio.get_running_loop()
        label = f"memory node {self.node_id} ({self.endpoint})"
        try:
            _tr, conn = await asyncio.wait_for(loop.create_connection(
                lambda: _Conn(label), self.host, self.port), self.t.timeout)
        except (TimeoutError, OSError) as exc:
            raise ConnectError(f"cannot connect to {label}: {exc}; is `ssi-pager memnode` "
                               f"running there?", errno=getattr(exc, "errno", None)) from exc
        try:
            await asyncio.wait_for(conn.handshake(self.t.token, self.t.space, self.t.node),
                                   self.t.timeout)
        except BaseException:
            conn.close()
            raise
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
            delay, deadline = 0.02, time.monotonic() + self.t.retry_for
            while True:
                try:
                    conn = self.lanes[i] = await self._open(i)
                    return conn
                except ConnectError as exc:
                    if time.monotonic() + delay > deadline:
                        raise
                    log.warning("%s; retrying in %.2f s", exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 1.0)

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
        deadline = time.monotonic() + self.retry_for
        while True:
            try:
                return await op(peer)
            except ConnectionLost as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning("%s; reconnecting", exc)

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
                reply = await conn.submit(_FETCH, gpa=gpa, arg=nbytes, flags=_URGENT,
                                          into=view)
            except ConnectionLost:
                pass  # the general path below reconnects and retries
            else:
                if reply.error is not None:
                    raise reply.error
                if reply.type != _DATA:
                    raise ProtocolError(f"expected DATA, got frame type {reply.type}",
                                        ErrorCode.BAD_MESSAGE)
                mask = reply.arg
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
                part = view[off:off + MAX_DATA]
                futs.append(conn.submit(T.STORE, gpa=gpa + off, length=len(part),
                                        payload=part))
            for fut in futs:
                await _reply(fut, T.STORED)

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
        for fut in inflight:
            await _reply(fut, T.PONG)
        return n * MAX_DATA / (time.perf_counter() - t0)

    async def stats(self, node_id: str) -> dict[str, Any]:
        """The memory node's `MemoryNode.stats()`."""
        async def op(peer: _Peer) -> dict[str, Any]:
            conn = await peer.lane(True)
            return (await _reply(conn.submit(T.STATS), T.STATS_REPLY)).obj or {}

        return await self._retry(node_id, op)

    def open_lane(self, node_id: str, space: str) -> TcpLane:
        from transport.lane import TcpLane

        return TcpLane.connect(lookup_peer(self.endpoints, node_id), self.token, space,
                               node=self.node, timeout=self.timeout, retry_for=self.retry_for)

    async def close(self) -> None:
        for peer in self.peers.values():
            peer.close()
        self.peers.clear()
        await asyncio.sleep(0)


_ZERO_PAGE = bytes(PAGE_SIZE)

__all__ = ["AuthError", "BlockingChannel", "ErrorCode", "ProtocolError", "TcpTransport",
           "parse_endpoint", "run", "start_server"]
