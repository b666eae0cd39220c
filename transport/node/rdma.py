"""The memory node's RDMA service (`RdmaServer`, ``ssi-pager memnode --rdma``) over the C data
path (`transport.rdma_c`); the protocol is described in `transport.rdma`.

Threads: one accept thread and one thread per connection; every wait is one C call with a
deadline and the GIL released, so the node's asyncio TCP service never stalls on RDMA. Bounds:
`max_conns` connections (more are rejected at connect), `handshake_timeout` seconds from
connect to authentication (then the connection is closed), `io_timeout` per completion. A
client that disconnects ends its wait at once (-ECONNRESET) and its connection (QP, CQ, MRs,
PD) is freed. Every request gets a reply: a store error, an I/O error or any bug in answering
is an ERROR frame (``IO_ERROR``), never silence. Address spaces are opened on the node's
event loop thread, where the TCP service opens them, so the two never race in
`PageStore.open`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno as E
import logging
import os
import threading
import time
from typing import Any

from transport.errors import (
    ConnectionLost,
    ProtocolError,
    StoreCorruptError,
    StoreError,
    TransportError,
)
from transport.node.server import MAX_OPEN_PER_CONNECTION
from transport.rdma import IO_TIMEOUT, RDMA_PORT_OFFSET
from transport.rdma_c.conn import RdmaConn, RdmaListener, load, rdma_devices
from transport.wire import (
    DEFAULT_MAX_SPACE_BYTES,
    HEADER,
    HEADER_SIZE,
    MAX_DATA,
    NONCE_SIZE,
    PAGE_SHIFT,
    PAGE_SIZE,
    ErrorCode,
    Fetch,
    Hello,
    Open,
    Ping,
    ServerSession,
    StatsRequest,
    Store,
    T,
    encode_control,
    encode_error,
    pack_header,
)

log = logging.getLogger(__name__)

ACCEPT_POLL = 0.5  # the accept thread looks at the stop flag this often (seconds)
IDLE_POLL = 1.0  # so does each connection thread while its client is idle


class RdmaServer:
    """The memory node's RDMA listener, sharing the node's `PageStore`."""

    def __init__(self, store: Any, token: bytes | None, host: str, tcp_port: int, *,
                 window: int = MAX_DATA, max_conns: int = 64, handshake_timeout: float = 5.0,
                 io_timeout: float = IO_TIMEOUT,
                 max_space_bytes: int = DEFAULT_MAX_SPACE_BYTES,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        load()
        rdma_devices()  # RdmaUnavailable, saying why, on a host without RDMA
        if window < MAX_DATA or window % PAGE_SIZE:
            raise ValueError(f"RDMA window of {window} bytes: use a multiple of {PAGE_SIZE} "
                             f"of at least {MAX_DATA}")
        self.store = store
        self.token = token
        self.host = host
        self.port = tcp_port + RDMA_PORT_OFFSET
        self.window = window
        self.max_conns = max_conns
        self.handshake_timeout = handshake_timeout
        self.io_timeout = io_timeout
        self.max_space_bytes = max_space_bytes
        self.loop = loop
        self.rejected = 0  # connect requests refused at the connection limit
        self.status = "not started"
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a connection came or went
        self._conns: set[threading.Thread] = set()
        self._listener: RdmaListener | None = None
        self._thread: threading.Thread | None = None

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._conns)

    def wait_for_connections(self, n: int, timeout: float) -> bool:
        """Wait until exactly ``n`` connections are open; False at the deadline."""
        with self._changed:
            return self._changed.wait_for(lambda: len(self._conns) == n, timeout)

    def start(self) -> threading.Thread:
        """Listen (RdmaUnavailable when that fails) and start the accept thread."""
        self._listener = RdmaListener(self.host, self.port)
        self._thread = threading.Thread(target=self._accept_loop, daemon=True,
                                        name="rdma-accept")
        self.status = "listening"
        self._thread.start()
        return self._thread

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                conn = self._listener.accept(ACCEPT_POLL, self.window,
                                             self._admit, self.io_timeout,
                                             min(self.handshake_timeout, self.io_timeout))
            except TransportError as exc:  # one bad connect request: log it, go on
                if exc.errno == E.EBUSY:
                    log.warning("RDMA connection refused: %d connections open (the limit)",
                                self.max_conns)
                else:
                    log.warning("RDMA connect request failed: %s", exc)
                continue
            except Exception:
                log.exception("RDMA accept loop failed; RDMA is no longer served")
                self.status = "failed"
                return
            if conn is None:
                continue
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True,
                                 name="rdma-conn")
            with self._changed:
                self._conns.add(t)
                t.start()
                self._changed.notify_all()

    def _admit(self) -> bool:
        """Asked as a connect request arrives: below the connection limit?"""
        if self.connections < self.max_conns:
            return True
        self.rejected += 1
        return False

    def _serve(self, conn: RdmaConn) -> None:
        session = ServerSession(token=self.token, challenge=os.urandom(NONCE_SIZE),
                                node="memnode-rdma", max_space_bytes=self.max_space_bytes)
        deadline = time.monotonic() + self.handshake_timeout
        spaces: dict[str, Any] = {}
        try:
            while not self._stop.is_set():
                if not session.authenticated and time.monotonic() >= deadline:
                    log.info("RDMA client did not authenticate within %.0f s: closed",
                             self.handshake_timeout)
                    return
                wait = IDLE_POLL if session.authenticated else \
                    min(IDLE_POLL, max(0.001, deadline - time.monotonic()))
                try:
                    msg = conn.recv(wait)
                except TransportError as exc:
                    if exc.errno == E.ETIMEDOUT:
                        continue
                    raise
                if not self._handle(conn, session, spaces, msg):
                    return
        except ConnectionLost:
            log.info("RDMA client disconnected")
        except Exception as exc:
            log.info("RDMA connection ended: %s", exc)
        finally:
            conn.close()  # QP, CQ, channels, MRs, PD
            with self._changed:
                self._conns.discard(threading.current_thread())
                self._changed.notify_all()

    def _handle(self, conn: RdmaConn, session: ServerSession, spaces: dict[str, Any],
                msg: bytes) -> bool:
        """Answer one message; False when the connection must close."""
        try:
            session.receive_data(self._unstage(conn, msg))
            while True:
                ev = session.next_event()
                if ev is None:
                    return True
                conn.send(self._answer(conn, session, spaces, ev))
        except ProtocolError as exc:
            conn.send(encode_error(exc.request_id, exc.code, str(exc)))
            return not exc.fatal

    def _unstage(self, conn: RdmaConn, msg: bytes) -> bytes:
        """A staged STORE (pages RDMA-written into buffer 1) as the plain STORE frame the
        session parses; the byte count is checked against the buffer."""
        if len(msg) < HEADER_SIZE:
            return msg
        fields = HEADER.unpack_from(msg)
        ftype, flags, req, length, n = fields[2], fields[3], fields[4], fields[7], fields[8]
        staged = load().lib.SSIP_R_STAGED
        if ftype != T.STORE or not flags & staged:
            return msg
        if length or not 0 < n <= min(self.window, MAX_DATA) or n % PAGE_SIZE:
            raise ProtocolError(f"staged STORE of {n} bytes (payload {length}): use whole "
                                f"pages, at most {min(self.window, MAX_DATA)} bytes, no "
                                f"payload", ErrorCode.TOO_LARGE, request_id=req)
        header = HEADER.pack(fields[0], fields[1], ftype, flags & ~staged, req, fields[5],
                             fields[6], n, 0)
        return header + bytes(conn.buffer(1)[:n])

    def _answer(self, conn: RdmaConn, session: ServerSession, spaces: dict[str, Any],
                ev: Any) -> bytes:
        req = ev.request_id
        try:
            if isinstance(ev, Fetch):
                space = spaces.get(ev.space) or self._open_space(ev.space, spaces)
                mask, _n = space.read_compact(ev.gpa, ev.length >> PAGE_SHIFT, conn.buffer(0))
                return pack_header(T.DATA, req, gpa=ev.gpa, arg=mask)
            if isinstance(ev, Store):
                space = spaces.get(ev.space) or self._open_space(ev.space, spaces)
                space.write(ev.gpa, ev.data)
                return pack_header(T.STORED, req, gpa=ev.gpa)
            if isinstance(ev, Hello):
                # no RDMA keys before authentication
                return session.welcome(req, store=self.store.store_id)
            if isinstance(ev, Open):
                refused = session.open_refused(ev.space, MAX_OPEN_PER_CONNECTION)
                if refused:
                    return encode_error(req, ErrorCode.TOO_LARGE, refused)
                space = self._open_space(ev.space, spaces)
                return session.opened(req, ev.space, generation=space.generation)
            if isinstance(ev, Ping):
                room = load().lib.SSIP_R_MSG - HEADER_SIZE
                if ev.reply_bytes > room:  # a PONG is one message: answer, do not fail
                    return encode_error(req, ErrorCode.TOO_LARGE, f"PING asks {ev.reply_bytes} "
                                        f"bytes; over RDMA at most {room}")
                return pack_header(T.PONG, req, length=ev.reply_bytes) + bytes(ev.reply_bytes)
            if isinstance(ev, StatsRequest):  # only after authentication (the session's rule)
                return encode_control(T.STATS_REPLY, req, {
                    "rdma": conn.keys(), "spaces": sorted(spaces), "node": session.node})
            return session.auth_ok(req)
        except StoreCorruptError as exc:
            log.error("RDMA request %d: %s", req, exc)
            return encode_error(req, ErrorCode.CORRUPT, str(exc))
        except (StoreError, OSError) as exc:
            log.warning("RDMA request %d failed: %s", req, exc)
            return encode_error(req, ErrorCode.IO_ERROR, f"memory node store error: {exc}")
        except Exception as exc:  # answer, never leave a client waiting
            log.exception("RDMA request %d failed", req)
            return encode_error(req, ErrorCode.IO_ERROR, f"memory node error: "
                                f"{type(exc).__name__}: {exc}")

    def _open_space(self, name: str, spaces: dict[str, Any]) -> Any:
        """The store's space ``name``, opened on the event loop thread when there is one."""
        if self.loop is None:
            with self._lock:
                space = self.store.open(name)
        else:
            fut: concurrent.futures.Future[Any] = concurrent.futures.Future()

            def run() -> None:
                try:
                    fut.set_result(self.store.open(name))
                except BaseException as exc:
                    fut.set_exception(exc)

            self.loop.call_soon_threadsafe(run)
            space = fut.result(timeout=self.io_timeout)
        spaces[name] = space
        return space

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, end every connection (each frees its resources), then the
        listener; waits at most about ``timeout`` seconds."""
        self._stop.set()
        end = time.monotonic() + timeout
        if self._thread is not None:
            self._thread.join(max(0.0, end - time.monotonic()))
        with self._lock:
            conns = list(self._conns)
        for t in conns:
            t.join(max(0.0, end - time.monotonic()))
        if self._listener is not None and (self._thread is None or
                                           not self._thread.is_alive()):
            self._listener.close()
        self.status = "stopped"
