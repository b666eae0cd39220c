"""The memory node: an asyncio (uvloop) TCP server holding guests' pages in a `PageStore`.

Each connection is a `NodeConnection` (BufferedProtocol): received bytes land in the sans-IO
`ServerSession`'s buffer, events come out, replies go back. Bad frames get an error frame
(and a close when the stream cannot be trusted); other connections are never affected.
A client that stops reading makes the node stop reading from it (write-side flow control),
so no client can make the node queue unbounded replies.

A pager's fault-lane connection (HELLO ``"lane": "fault"``) is served by the C loop of
`transport.node.fastlane` while it sends nothing but FETCH frames; anything else comes back here.

A TLS node (``tls=``) runs each connection's TLS in C (`transport.node.tlsconn`), and a fault
lane handed to C takes its TLS session along.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import threading
from collections import Counter
from typing import Any

from transport.errors import ProtocolError, StoreCorruptError, StoreError
from transport.node import fastlane
from transport.node.fence import Fences
from transport.node.store import PageStore
from transport.node.tlsconn import TlsConnection
from transport.tcp import start_server, tune_socket
from transport.tls import c_context
from transport.wire import (
    DEFAULT_MAX_SPACE_BYTES,
    FAULT_LANE,
    HEADER_SIZE,
    NONCE_SIZE,
    PAGE_SHIFT,
    ErrorCode,
    Fetch,
    Flag,
    Hello,
    Open,
    Ping,
    ServerSession,
    StatsRequest,
    Store,
    T,
    codec,
    encode_control,
    encode_error,
    pack_header,
    pack_header_into,
)

log = logging.getLogger(__name__)
_fastlane_enabled = fastlane.enabled

_ZEROS = bytes(1 << 17)  # PONG payloads for bandwidth probes
_DATA = int(T.DATA)
_COMPRESSED = int(Flag.COMPRESSED)
_URGENT = int(Flag.URGENT)
BULK_TURN = 4  # bulk page requests answered per event-loop turn and connection
_FETCH_OK = ("fetch", "ok")
MAX_OPEN_PER_CONNECTION = 64  # spaces one connection may open (a pager opens one or a few)


class NodeConnection(TlsConnection, asyncio.BufferedProtocol):
    def __init__(self, node: MemoryNode) -> None:
        self.node = node
        self.session = ServerSession(token=node.token, challenge=os.urandom(NONCE_SIZE),
                                     node=node.name, max_space_bytes=node.max_space_bytes)
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.paused = False  # the transport's write buffer is full
        self.reading_paused = False
        self.fault_lane = False  # HELLO said "lane": "fault" and the node serves those in C
        self.closing = False
        self.eof = False
        self._scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self.lane: fastlane.FastLane | None = None  # set for a fault lane served in C
        self.in_c = False  # the C loop owns the socket now
        # the last request answered here was a FETCH (or the handshake's OPEN): go back to C;
        # after anything else stay here until the next FETCH, so a stream of stores or pings
        # on a fault lane is not bounced between Python and C
        self.c_ready = False
        # BufferedProtocol: received bytes land straight in the session's frame buffer; with
        # TLS, ciphertext is decrypted into it (`TlsConnection`)
        self.get_buffer = self.session.reader.get_buffer
        self._tls_init(node.tls_c)

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            tune_socket(sock)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.node.connections.add(self)
        self.node.admit(self)
        self.node.counters["connections"] += 1
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.node.handshake_timeout, self._handshake_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if self.lane is not None:
            self.lane.stop()
            if not self.in_c:
                self.node.fold_lane(self.lane)
        if not self.in_c:  # else counted (and its C counters seen) until the C loop returned
            self.node.connections.discard(self)
        self.node.handshaking.pop(self, None)
        if self._timer:
            self._timer.cancel()

    def buffer_updated(self, nbytes: int) -> None:
        if self.tls is not None:
            self._tls_received(nbytes)
        else:
            self.session.reader.buffer_updated(nbytes)
        self._drain()

    def eof_received(self) -> bool:
        # half-closed client: answer everything it sent, then close (see _drain)
        self.eof = True
        self._drain()
        return True

    def pause_writing(self) -> None:
        self.paused = True
        self._flow()

    def resume_writing(self) -> None:
        self.paused = False
        self._drain()

    def _flow(self) -> None:
        """Stop reading while replies back up or the frame buffer is nearly full, so no
        client can make the node buffer without bound; resume when that clears."""
        if self.transport is None or self.closing or self.in_c:
            return
        stop = self.paused or self.session.reader.nearly_full()
        if stop != self.reading_paused:
            self.reading_paused = stop
            if stop:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def _handshake_timeout(self) -> None:
        if not self.session.authenticated and self.transport is not None:
            log.warning("memnode: %s did not finish the handshake in %.0f s; closing",
                        self.peer, self.node.handshake_timeout)
            self.node.count("handshake", "timeout")
            self._close()

    def _close(self) -> None:
        self.closing = True
        if self.lane is not None:
            self.lane.stop()
        if self.transport is not None:
            self.transport.close()

    # the C fault lane
    def _to_c(self) -> None:
        """Hand the socket to the C loop if this is an idle, authenticated fault lane."""
        session = self.session
        transport = self.transport
        if (self.closing or self.eof or self.paused or self.reading_paused
                or transport is None or not session.authenticated or session.reader.buffered()
                or transport.get_write_buffer_size()
                or (self.tls is not None and (self.tls.buffered() or self.tls.pending()))):
            return
        if self.lane is None:
            self.lane = fastlane.FastLane(session.max_space_bytes)
        names = session.spaces
        for name in names:  # a newer owner holds it: its fetches are refused in Python
            if self.stale_epoch(name) is not None:
                self.lane.fence(name)
        sock = transport.get_extra_info("socket")
        if not self.lane.can_serve(names) or sock is None:
            return
        try:
            spaces = [self.node.store.open(name) for name in names]
        except StoreError:
            return  # the Python path reports it on the next request
        transport.pause_reading()
        self.in_c = True
        loop = asyncio.get_running_loop()

        def done(rc: int) -> None:  # on the lane's thread
            with contextlib.suppress(RuntimeError):  # the loop is gone: the node stops
                loop.call_soon_threadsafe(self._from_c, rc)

        try:
            self.lane.start(sock.fileno(), list(names), spaces, done, tls=self.tls)
        except (OSError, RuntimeError) as exc:  # no thread or fd to spare: stay in Python
            log.warning("memnode: %s: fault lane stays in Python: %s", self.peer, exc)
            self.in_c = self.fault_lane = False
            transport.resume_reading()
            return
        log.debug("memnode: %s: fault lane served in C", self.peer)

    def _from_c(self, rc: int) -> None:
        """The C loop returned: take the connection back with its unconsumed bytes."""
        assert self.lane is not None
        leftover = self.lane.finish()
        self.in_c = False
        if self.closing:
            self.node.fold_lane(self.lane)
            if self.transport is None or self.transport.is_closing():
                self.node.connections.discard(self)
            return
        if rc == fastlane.ERROR:
            log.info("memnode: %s: connection failed: %s", self.peer,
                     os.strerror(self.lane.c.err))
            self._close()
            return
        if leftover:
            self.session.receive_data(leftover)
        if self.tls is not None:
            self._tls_pump()  # plaintext C decrypted and did not take (after the leftover)
        if rc == fastlane.EOF_:
            self.eof = True  # answer what is left, then close (as eof_received does)
        else:
            self.transport.resume_reading()  # type: ignore[union-attr]
        self._drain()

    # request handling
    def _drain(self) -> None:
        """Answer the buffered requests. Bulk (non-urgent) page requests are served
        `BULK_TURN` at a time, then the loop gets control back, so a fault's fetch on another
        connection never waits behind a whole bulk stream."""
        self._scheduled = False
        if self.in_c:
            return
        session = self.session
        send = self._send
        acks: list[bytes] = []  # STORED replies of this pass: one write for them all

        def flush() -> None:
            if acks:
                send(b"".join(acks))
                acks.clear()

        def write(reply: Any) -> None:  # any other reply: after the acks before it, in order
            flush()
            send(reply)

        budget = BULK_TURN
        while not self.closing and not self.paused:
            try:
                ev = session.next_event()
            except ProtocolError as exc:
                self.node.count("bad_frame", ErrorCode(exc.code).name.lower())
                if self.tls is None and not session.authenticated and "\\x16\\x03" in str(exc):
                    log.warning("memnode: %s speaks TLS but this node runs without --tls: "
                                "start both sides with --tls, or neither", self.peer)
                else:
                    log.info("memnode: %s: %s", self.peer, exc)
                write(encode_error(exc.request_id, exc.code, str(exc)))
                self.c_ready = False
                if exc.fatal:
                    self._close()
                    return
                continue
            if ev is None:
                if self.tls is not None and self._tls_pump():
                    continue  # decrypted bytes the frame buffer had no room for before
                if self.eof:
                    flush()
                    self._close()  # half-closed and all answered (close flushes replies)
                    return
                break
            if type(ev) is Fetch:
                write(self._fetch(ev))
                self.c_ready = True
                if ev.flags & _URGENT:
                    continue
            elif type(ev) is Store:
                acks.append(self._store(ev))
                self.c_ready = False
            else:
                write(self._control(ev))
                self.c_ready = type(ev) is Open
                continue
            budget -= 1
            if not budget:
                if not self._scheduled:
                    self._scheduled = True
                    asyncio.get_running_loop().call_soon(self._drain)
                break
        if not self.closing:
            flush()
        if self.paused or self.reading_paused or session.reader.nearly_full():
            self._flow()
        elif self.fault_lane and self.c_ready and not self.closing:
            self._to_c()

    def _fetch(self, ev: Fetch) -> Any:
        if (epoch := self.stale_epoch(ev.space)) is not None:
            return self._stale(ev.request_id, ev.space, epoch, "fetch")
        npages = ev.length >> PAGE_SHIFT
        store = self.node.store
        try:
            space = store.spaces.get(ev.space) or store.open(ev.space)
            reply = bytearray(HEADER_SIZE + ev.length)
            view = memoryview(reply)
            mask, nbytes = space.read_compact(ev.gpa, npages, view[HEADER_SIZE:])
        except StoreCorruptError as exc:
            self.node.count("fetch", "corrupt")
            log.error("memnode: %s: %s", self.peer, exc)
            return encode_error(ev.request_id, ErrorCode.CORRUPT, str(exc))
        except (OSError, StoreError) as exc:
            self.node.count("fetch", "error")
            return encode_error(ev.request_id, ErrorCode.IO_ERROR, f"read failed: {exc}")
        space.fetched_pages += npages
        if mask:
            space.zero_pages += mask.bit_count()
        self.node.requests[_FETCH_OK] += 1
        if self.session.codec is not None and nbytes:  # negotiated: send it compressed
            packed = codec.compress(self.session.codec, view[HEADER_SIZE:HEADER_SIZE + nbytes])
            if packed is not None:
                return pack_header(_DATA, ev.request_id, gpa=ev.gpa, length=len(packed),
                                   arg=mask, flags=_COMPRESSED) + packed
        pack_header_into(reply, 0, _DATA, ev.request_id, gpa=ev.gpa, length=nbytes, arg=mask)
        return view[:HEADER_SIZE + nbytes] if nbytes < ev.length else reply

    def _store(self, ev: Store) -> bytes:
        if (epoch := self.stale_epoch(ev.space)) is not None:
            return self._stale(ev.request_id, ev.space, epoch, "store")
        try:
            self.node.store.open(ev.space).write(ev.gpa, ev.data)
        except StoreError as exc:
            self.node.count("store", "error")
            return encode_error(ev.request_id, ErrorCode.IO_ERROR, str(exc))
        self.node.store.spaces[ev.space].stored_pages += len(ev.data) >> PAGE_SHIFT
        self.node.requests["store", "ok"] += 1
        return pack_header(T.STORED, ev.request_id, gpa=ev.gpa, arg=len(ev.data))

    def stale_epoch(self, space: str) -> int | None:
        """The epoch this connection opened ``space`` under, if a newer owner fenced it."""
        epoch = self.session.epochs.get(space)
        return epoch if self.node.fences.stale(space, epoch) else None

    def _stale(self, request_id: int, space: str, epoch: int, op: str) -> bytes:
        self.node.count(op, "stale_epoch")
        fence = self.node.fences.get(space)
        log.warning("memnode: %s: %s of space %s under epoch %d refused: fenced at %d",
                    self.peer, op, space, epoch, fence)
        return encode_error(request_id, ErrorCode.STALE_EPOCH,
                            f"space {space} is owned under epoch {fence}, this pager's epoch "
                            f"{epoch} is stale: another pager owns the guest now")

    def _control(self, ev: Any) -> bytes:
        session = self.session
        if type(ev) is Ping:
            self.node.count("ping", "ok")
            return pack_header(T.PONG, ev.request_id, length=ev.reply_bytes) + \
                _ZEROS[:ev.reply_bytes]
        if type(ev) is Open:
            refused = session.open_refused(ev.space, self.node.max_open_per_connection)
            if refused:
                self.node.count("open", "too_many")
                log.warning("memnode: %s: %s", self.peer, refused)
                return encode_error(ev.request_id, ErrorCode.TOO_LARGE, refused)
            fence = self.node.fences.get(ev.space)
            if ev.epoch is not None and not self.node.fences.admit(ev.space, ev.epoch):
                return self._stale(ev.request_id, ev.space, ev.epoch, "open")
            if ev.epoch is not None and ev.epoch > fence:
                self.node.fence_out(ev.space, ev.epoch)
            try:
                space = self.node.store.open(ev.space)
            except StoreError as exc:
                self.node.count("open", "error")
                return encode_error(ev.request_id, ErrorCode.IO_ERROR, str(exc))
            self.node.count("open", "ok")
            return session.opened(ev.request_id, ev.space, ev.epoch,
                                  generation=space.generation)
        if type(ev) is Hello:
            self.node.count("hello", "ok")
            self.fault_lane = ev.lane == FAULT_LANE and self.node.fastlane
            if self.node.token is None:  # insecure mode: ready after HELLO
                self.node.handshaking.pop(self, None)
            return session.welcome(ev.request_id, store=self.node.store.store_id)
        if type(ev) is StatsRequest:
            self.node.count("stats", "ok")
            return encode_control(T.STATS_REPLY, ev.request_id, self.node.stats())
        # Auth: the session verified the proof (a bad one raised ProtocolError)
        self.node.count("auth", "ok")
        if self._timer:
            self._timer.cancel()
        self.node.handshaking.pop(self, None)
        return session.auth_ok(ev.request_id)


class MemoryNode:
    """A memory node server. ``token=None`` disables authentication (insecure)."""

    def __init__(self, store: PageStore, *, token: bytes | None, host: str = "127.0.0.1",
                 port: int | None = None, name: str = "memnode",
                 max_space_bytes: int = DEFAULT_MAX_SPACE_BYTES,
                 handshake_timeout: float = 10.0, max_handshaking: int = 64,
                 fastlane: bool | None = None,
                 max_open_per_connection: int = MAX_OPEN_PER_CONNECTION,
                 tls: ssl.SSLContext | None = None) -> None:
        if max_space_bytes > store.max_space_bytes:
            raise StoreError(f"the node serves spaces of up to {max_space_bytes} bytes but its "
                             f"store's bitmaps cover {store.max_space_bytes}: pass "
                             f"PageStore(max_space_bytes=...) at least as large")
        self.store = store
        self.fences = Fences(store.root)
        self.token = token
        self.host = host
        self.port = port
        self.name = name
        self.max_space_bytes = max_space_bytes
        self.handshake_timeout = handshake_timeout
        self.max_open_per_connection = max_open_per_connection
        self.max_handshaking = max_handshaking
        # connections not authenticated yet, oldest first (each holds a frame buffer)
        self.handshaking: dict[NodeConnection, None] = {}
        self.connections: set[NodeConnection] = set()
        self.requests: Counter[tuple[str, str]] = Counter()
        self.counters: Counter[str] = Counter()
        self._server: asyncio.Server | None = None
        # fault lanes in C (None: unless $SSI_PAGER_NO_FASTLANE); False without the extension
        self.fastlane = _fastlane_enabled(fastlane)
        self.tls = tls  # every connection's session runs in C, C lanes included
        self.tls_c = None if tls is None else c_context(tls, server=True)
        self._lane_lock = threading.Lock()  # stats() may run on another thread (metrics)

    def admit(self, conn: NodeConnection) -> None:
        """Track an unauthenticated connection; past `max_handshaking` the oldest such one is
        closed, so idle or slow handshakes cannot pile up memory, and a real client (which
        authenticates within milliseconds) still gets in."""
        self.handshaking[conn] = None
        while len(self.handshaking) > self.max_handshaking:
            oldest = next(iter(self.handshaking))
            del self.handshaking[oldest]
            log.warning("memnode: %d connections still handshaking; closing the oldest (%s)",
                        len(self.handshaking) + 1, oldest.peer)
            self.count("handshake", "evicted")
            oldest._close()

    def fence_out(self, space: str, epoch: int) -> None:
        """``space`` is owned under ``epoch`` now: connections that opened it under an older
        one are refused every request on it from now on (STALE_EPOCH). A fault lane in C
        answers fetches without looking at epochs: it stops serving that space, whose
        FETCHes then come back to Python and are refused there. Their other spaces are
        served as before."""
        for conn in list(self.connections):
            if (old := conn.stale_epoch(space)) is not None:
                log.warning("memnode: %s: space %s opened under epoch %d is refused from now "
                            "on: a newer owner holds it (epoch %d)", conn.peer, space, old,
                            epoch)
                if conn.lane is not None:
                    conn.lane.fence(space)

    def count(self, op: str, result: str) -> None:
        self.requests[op, result] += 1
        if op in ("auth", "handshake") or result in ("auth_failed", "auth_required"):
            self.counters["auth_failures"] += result != "ok"

    async def start(self) -> str:
        """Bind and listen; returns the endpoint "HOST:PORT"."""
        def factory() -> NodeConnection:
            return NodeConnection(self)

        # plain sockets: a TLS node's connections run their TLS in C (NodeConnection)
        self._server, self.port = await start_server(factory, self.host, self.port)
        return self.endpoint

    @property
    def endpoint(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    async def serve_forever(self) -> None:
        assert self._server is not None
        await self._server.serve_forever()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for conn in list(self.connections):
                conn._close()
            for conn in list(self.connections):
                if conn.lane is not None:
                    conn.lane.join()
            await self._server.wait_closed()
            self._server = None

    def fold_lane(self, lane: fastlane.FastLane) -> None:
        """Move a closed connection's C counters into the node's (on the loop thread)."""
        fetches, per_space = lane.counters()
        with self._lane_lock:
            self.requests[_FETCH_OK] += fetches
            self.counters["fastlane_fetches"] += fetches
            for name, fetched, zero in per_space:
                space = self.store.spaces.get(name)
                if space is not None:
                    space.fetched_pages += fetched
                    space.zero_pages += zero
            lane.forget_counters()

    def stats(self) -> dict[str, Any]:
        """Requests by op and result, stored pages/bytes in total and per space."""
        with self._lane_lock:
            requests = Counter(self.requests)
            spaces = self.store.stats()
            in_c = self.counters["fastlane_fetches"]
            for conn in list(self.connections):
                if conn.lane is None:
                    continue
                fetches, per_space = conn.lane.counters()
                requests[_FETCH_OK] += fetches
                in_c += fetches
                for name, fetched, zero in per_space:
                    if name in spaces:
                        spaces[name]["fetched_pages"] += fetched
                        spaces[name]["zero_pages"] += zero
        by_op: dict[str, dict[str, int]] = {}
        for (op, result), n in sorted(requests.items()):
            by_op.setdefault(op, {})[result] = n
        return {
            "node": self.name,
            "endpoint": self.endpoint,
            "auth": self.token is not None,
            "tls": self.tls is not None,
            "fastlane_fetches": in_c,  # FETCH requests the C fault lane answered (in fetch ok)
            "connections_open": len(self.connections),
            "connections_total": self.counters["connections"],
            "auth_failures": self.counters["auth_failures"],
            "requests": by_op,
            "stored_pages": sum(s["pages"] for s in spaces.values()),
            "stored_bytes": sum(s["bytes"] for s in spaces.values()),
            "spaces": spaces,
        }

