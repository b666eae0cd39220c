"""`BlockingChannel`: the fault engine's hot path to a memory node, one blocking socket per
thread. A shell around `transport.wire.ClientSession`: the session builds every request and
checks every reply; the reconnect policy is `transport.wire.Backoff`."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any, TypeVar

from transport.base import page_view
from transport.errors import ConnectError, ConnectionLost, RemoteError, TransportError
from transport.tcp.endpoint import require_port, tune_socket
from transport.tls import client_tls, wrap_client
from transport.wire import (
    FAULT_LANE,
    HEADER_SIZE,
    MAX_CONTROL,
    MAX_DATA,
    NONCE_SIZE,
    PAGE_SHIFT,
    Backoff,
    ClientSession,
    Reply,
    T,
    check_data,
    data_segments,
    decode_reply_body,
    expect_reply,
    full_data,
    pack_store,
    parse_reply_header,
    spread_pages,
    timed_out,
    unpack_data,
)
from transport.wire.client import COMPRESSED

log = logging.getLogger(__name__)

_R = TypeVar("_R")
_ERROR = int(T.ERROR)
BULK_LANE = "bulk"  # HELLO "lane" of a connection that may compress (never served by C)


class BlockingChannel:
    """One authenticated blocking socket to a memory node, for one thread.

    Lean by design: requests are packed into a preallocated header buffer and replies are
    received with ``recv_into`` straight into the caller's buffer; no event loop, no per-call
    allocation beyond a memoryview. A broken connection is re-established (with backoff, for
    up to ``retry_for`` seconds) and the request retried: fetch and store are idempotent.
    An authentication failure is permanent and raised at once (`transport.errors.AuthError`).
    """

    def __init__(self, endpoint: str, token: bytes | None, space: str, *,
                 timeout: float = 10.0, retry_for: float = 5.0, node: str = "pager",
                 epoch: int | None = None, compress: Any = ()) -> None:
        from transport.wire.codec import check_offer

        self.endpoint = endpoint
        self.epoch = epoch
        # codecs to offer (`transport.wire.codec`): a bulk connection, never a fault lane
        self.compress = check_offer(compress)
        self.host, self.port = require_port(endpoint)
        self.token = token
        self.space_name = space
        self.timeout = timeout
        self.retry_for = retry_for
        self.node = node
        self.sock: Any = None  # a socket, or a `transport.tlsc.TlsSocket`
        self.tls = False  # the connection runs TLS (in C: `tls_session` for the C fault loop)
        self.space = 0
        self.session = self._new_session()
        self._label = f"memory node {endpoint}"
        self._out = bytearray(HEADER_SIZE * ((1 << 20) // MAX_DATA))  # 1 MiB worth of requests
        self._hdr = bytearray(HEADER_SIZE)
        self._hdr_view = memoryview(self._hdr)
        self._req_hdr = bytearray(HEADER_SIZE)
        self._scratch = bytearray(max(MAX_CONTROL, MAX_DATA))  # control, error, PONG
        self._scratch_view = memoryview(self._scratch)

    def _new_session(self) -> ClientSession:
        return ClientSession(self.token, self.space_name, node=self.node,
                             nonce=os.urandom(NONCE_SIZE),
                             lane=BULK_LANE if self.compress else FAULT_LANE,
                             endpoint=self.endpoint, epoch=self.epoch,
                             compress=self.compress)

    @property
    def codec(self) -> str | None:
        """The compression negotiated with the node (None: pages travel raw)."""
        return self.session.codec if self.session.done else None

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

    def tls_session(self) -> Any:
        """The connection's C TLS session (`transport.tlsc.TlsSession`, its ``handle`` for a C
        fault loop), or None (plaintext, or not connected)."""
        return self.sock.session if self.tls and self.sock is not None else None

    # connection
    def _connect(self) -> None:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except OSError as exc:
            raise ConnectError(f"cannot connect to {self._label}: {exc.strerror or exc}; is "
                               f"`ssi-pager memnode` running there?", errno=exc.errno) from exc
        tune_socket(sock)
        # blocking mode for the hot path (no poll per recv); SO_RCVTIMEO/SO_SNDTIMEO bound it
        sock.settimeout(None)
        tv = int(self.timeout).to_bytes(8, "little") + int(
            (self.timeout % 1) * 1e6).to_bytes(8, "little")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        ctx = client_tls()
        # TLS runs in C (transport.tlsc): its session is handed to the C fault loop with the fd
        self.sock = wrap_client(sock, ctx, self._label) if ctx is not None else sock
        self.tls = ctx is not None
        sock = self.sock
        hs = self.session = self._new_session()
        try:
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
                raise ConnectionLost(f"{self._label} closed the connection")
            got += n

    def _read_header(self) -> Reply:
        self._recv_exact(self._hdr_view)
        return parse_reply_header(self._hdr, self._label)

    def _read_reply(self) -> Reply:
        """A whole non-DATA frame (control, ack, error)."""
        reply = self._read_header()
        if reply.type == T.DATA:
            raise ConnectionLost(f"{self._label} sent DATA (request {reply.request_id}) "
                                 f"nobody asked for")
        payload = self._scratch_view[:reply.length]
        if reply.length:
            self._recv_exact(payload)
        return decode_reply_body(reply, payload)

    def _give_up(self, exc: BaseException) -> TransportError:
        """The exception to raise for a failure the policy does not retry."""
        if isinstance(exc, TransportError):
            return exc
        if timed_out(exc):
            return ConnectionLost(f"{self._label} did not answer within {self.timeout:g} s")
        return ConnectionLost(f"connection to {self._label} failed: {exc}",
                              errno=getattr(exc, "errno", None))

    def _retrying(self, op: Callable[[], _R], error: BaseException | None = None) -> _R:
        """``op()``, reconnecting as `Backoff` says after a transient failure. ``error``: the
        failure of an attempt the caller already made."""
        backoff: Backoff | None = None
        while True:
            if error is not None:
                if not isinstance(error, RemoteError):  # an error answer leaves it usable
                    self.close()
                now = time.monotonic()
                backoff = backoff or Backoff(now, self.retry_for)
                delay = backoff.delay(now, error)
                if delay is None:
                    exc = self._give_up(error)
                    raise exc from (None if exc is error else error)
                log.warning("%s: %s; reconnecting", self._label, error)
                time.sleep(delay)
            try:
                if self.sock is None:
                    self._connect()
                return op()
            except (TransportError, OSError) as exc:
                error = exc

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
            req = self.session.fetch_into(self._req_hdr, 0, gpa, n)
            try:
                sock.sendall(self._req_hdr)
                return self._recv_one(req, view)
            except (TransportError, OSError) as exc:
                return self._retrying(lambda: self._fetch(gpa, view, n), exc)
        return self._retrying(lambda: self._fetch(gpa, view, n))

    def _fetch(self, gpa: int, view: memoryview, n: int) -> int:
        sock = self.sock
        assert sock is not None
        if n <= MAX_DATA:
            req = self.session.fetch_into(self._req_hdr, 0, gpa, n)
            sock.sendall(self._req_hdr)
            return self._recv_one(req, view)
        # pipelined: send every request, then take the replies in order
        mask = 0
        pos = 0
        while pos < n:
            batch = min(n - pos, len(self._out) // HEADER_SIZE * MAX_DATA)
            parts = [(off, min(MAX_DATA, n - off)) for off in range(pos, pos + batch, MAX_DATA)]
            reqs = [self.session.fetch_into(self._out, k * HEADER_SIZE, gpa + off, size)
                    for k, (off, size) in enumerate(parts)]
            sock.sendall(memoryview(self._out)[:len(parts) * HEADER_SIZE])
            error: Exception | None = None
            for req, (off, size) in zip(reqs, parts, strict=True):
                try:
                    part = self._recv_data(req, view[off:off + size])
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
                raise ConnectionLost(f"{self._label} closed the connection")
            self._recv_exact(self._hdr_view[nb:])
            nb = HEADER_SIZE
        got = nb - HEADER_SIZE
        if full_data(self._hdr, req, len(view)):  # every page written: the usual case
            if got < len(view):
                self._recv_exact(view[got:])
            return 0
        reply = parse_reply_header(self._hdr, self._label)
        if reply.type == _ERROR and reply.request_id == req:
            payload = self._scratch_view[:reply.length]
            payload[:got] = view[:got]
            self._recv_exact(payload[got:])
            raise decode_reply_body(reply, payload).error  # type: ignore[misc]
        check_data(reply, req, len(view) >> PAGE_SHIFT)
        if reply.flags & COMPRESSED:
            payload = self._scratch_view[:reply.length]
            payload[:got] = view[:got]
            self._recv_exact(payload[got:])
            unpack_data(self.session.codec, reply, payload, view)
            return reply.arg
        if got < reply.length:
            self._recv_exact(view[got:reply.length])
        if reply.arg and reply.length:  # pages arrived packed at the front
            spread_pages(view, reply.arg, reply.length)
        return reply.arg

    def _recv_data(self, req: int, view: memoryview) -> int:
        reply = self._read_header()
        if reply.type == _ERROR and reply.request_id == req:
            payload = self._scratch_view[:reply.length]
            self._recv_exact(payload)
            raise decode_reply_body(reply, payload).error  # type: ignore[misc]
        check_data(reply, req, len(view) >> PAGE_SHIFT)
        if reply.flags & COMPRESSED:
            payload = self._scratch_view[:reply.length]
            self._recv_exact(payload)
            unpack_data(self.session.codec, reply, payload, view)
            return reply.arg
        for seg in data_segments(view, reply.arg):
            self._recv_exact(seg)
        return reply.arg

    def store(self, gpa: int, data: Any) -> None:
        """Write pages at ``gpa``; returns once the node has written them (pwrite)."""
        view = page_view(data, gpa, "store")
        self._retrying(lambda: self._store(gpa, view, len(view)))

    def _store(self, gpa: int, view: memoryview, n: int) -> None:
        sock = self.sock
        assert sock is not None
        reqs = []
        for off in range(0, n, MAX_DATA):
            flags, arg, chunk = pack_store(self.session.codec, view[off:off + min(MAX_DATA,
                                                                                   n - off)])
            part = len(chunk)
            req = self.session.pack_request_into(self._hdr, 0, T.STORE, gpa=gpa + off,
                                                 length=part, arg=arg, flags=flags)
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
            else:
                expect_reply(reply, T.STORED, req)
        if error is not None:
            raise error

    def ping(self, reply_bytes: int = 0) -> float:
        """Round trip of one PING (seconds)."""
        def op() -> float:
            assert self.sock is not None
            req = self.session.pack_request_into(self._out, 0, T.PING, arg=reply_bytes)
            t0 = time.perf_counter()
            self.sock.sendall(self._out[:HEADER_SIZE])
            expect_reply(self._read_reply(), T.PONG, req)
            return time.perf_counter() - t0
        return self._retrying(op)
