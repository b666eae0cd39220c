"""The lanes' TLS in C (``tlsc.c`` beside this file, on OpenSSL): Python side.

Every TLS session of a lane lives in C for its whole life, so the C loops can carry it:

* `TlsContext`: TLS 1.3, this host's certificate, the cluster CA, a peer certificate required
  (the files `transport.tls` manages);
* `TlsSocket`: a pager's blocking lane, its handshake and plaintext I/O on the socket; its
  session (``TlsSocket.session``, its ``handle``) goes to the pager's C fault loop with the fd;
* `TlsSession`: a memory node's connection on memory BIOs fed by its asyncio protocol, moved
  onto the socket while the node's C fault lane serves it (``to_fd``/``to_mem``).
"""

from __future__ import annotations

import errno as errno_mod
import logging
import os
import socket
import threading
from pathlib import Path
from typing import Any

from transport.errors import TlsError

log = logging.getLogger(__name__)

try:
    from transport.tlsc._tlsc_cffi import ffi, lib
except ImportError as _exc:  # not built: TLS lanes cannot run (said when one is asked for)
    ffi = lib = None
    MISSING = f"{type(_exc).__name__}: {_exc}"
else:
    MISSING = ""

WANT = -11  # tlsc.h's SSI_TLS_WANT
_CHUNK = 1 << 16
_contexts: dict[tuple[bool, str], TlsContext] = {}
_lock = threading.Lock()
_local = threading.local()


def _require() -> None:
    if lib is None:
        raise TlsError(f"the C TLS layer (transport.tlsc._tlsc_cffi) did not load ({MISSING}): "
                       "install libssl-dev and rebuild (`python3 setup.py build_ext --inplace` "
                       "or `pip install -e .`)")


class TlsContext:
    """An OpenSSL context of one side (server: a memory node) from a TLS directory."""

    def __init__(self, server: bool, d: Path) -> None:
        _require()
        from transport.tls import CA_CERT, CERT, KEY

        err = ffi.new("char[]", 512)
        ptr = lib.ssi_tls_ctx_new(int(server), str(d / CA_CERT).encode(),
                                  str(d / CERT).encode(), str(d / KEY).encode(), err, 512)
        if ptr == ffi.NULL:
            raise TlsError(f"cannot load TLS material from {d} ({CA_CERT}, {CERT}, {KEY}): "
                           f"{ffi.string(err).decode(errors='replace')}; run the memory node "
                           "once with --tls to make them, or copy them there")
        self.ptr = ffi.gc(ptr, lib.ssi_tls_ctx_free)
        self.server = server
        self.dir = d


def context(server: bool, d: str | os.PathLike[str]) -> TlsContext:
    """The process's context of that side for directory ``d`` (made once)."""
    key = (server, str(Path(d).resolve()))
    with _lock:
        ctx = _contexts.get(key)
        if ctx is None:
            ctx = _contexts[key] = TlsContext(server, Path(d))
        return ctx


class TlsSession:
    """One SSL session (on the socket ``fd``, or on memory BIOs when ``fd`` < 0)."""

    def __init__(self, ctx: TlsContext, fd: int = -1) -> None:
        ptr = lib.ssi_tls_new(ctx.ptr, fd)
        if ptr == ffi.NULL:
            raise TlsError("cannot make a TLS session (out of memory?)")
        self.ptr = ffi.gc(ptr, lib.ssi_tls_free)
        self.done = False

    @property
    def handle(self) -> int:
        """The SSL pointer, for a C loop (valid while this object lives)."""
        return int(ffi.cast("uintptr_t", self.ptr))

    def error(self) -> str:
        buf = ffi.new("char[]", 512)
        lib.ssi_tls_error(self.ptr, buf, 512)
        return ffi.string(buf).decode(errors="replace")

    def handshake(self) -> bool:
        """One step: True when done, False when it needs more bytes; `TlsError` if refused."""
        if not self.done:
            while (rc := lib.ssi_tls_handshake(self.ptr)) == -errno_mod.EINTR:
                pass  # a signal (its Python handler runs between the calls)
            if rc < 0 and rc != WANT:
                raise TlsError(self.error())
            self.done = rc == 1
        return self.done

    def read_into(self, view: Any) -> int | None:
        """Plaintext into ``view``: bytes read, 0 at the end of the stream, None when no
        whole record is there (or the socket timed out); OSError/`TlsError` on failure."""
        buf = ffi.from_buffer(view, require_writable=True)
        while (n := lib.ssi_tls_read(self.ptr, buf, len(view))) == -errno_mod.EINTR:
            pass  # a signal (its Python handler runs between the calls)
        return self._result(n)

    def _result(self, n: int) -> int | None:
        if n >= 0:
            return n
        if n == WANT:
            return None
        if n == -errno_mod.EPROTO:
            raise TlsError(self.error())
        raise OSError(-n, os.strerror(-n))

    def write(self, data: Any) -> int | None:
        """Encrypt all of ``data`` (to the socket, or the outgoing BIO): len, or None when the
        socket timed out."""
        mv = memoryview(data).cast("B")
        if not len(mv):
            return 0
        buf = ffi.from_buffer(mv)
        while (n := lib.ssi_tls_write(self.ptr, buf, len(mv))) == -errno_mod.EINTR:
            pass  # a signal (its Python handler runs between the calls)
        return self._result(n)

    def pending(self) -> int:
        return lib.ssi_tls_pending(self.ptr)

    # memory BIOs (a memory node's connection)
    def feed(self, data: Any) -> None:
        mv = memoryview(data).cast("B")
        if len(mv) and lib.ssi_tls_feed(self.ptr, ffi.from_buffer(mv), len(mv)) != len(mv):
            raise TlsError("cannot buffer received TLS bytes (out of memory?)")

    def drain(self) -> bytes:
        """Ciphertext to send (handshake records, encrypted replies)."""
        out = getattr(_local, "out", None)
        if out is None:  # one buffer per thread, not per connection
            out = _local.out = ffi.new("uint8_t[]", _CHUNK)
        parts = []
        while (n := lib.ssi_tls_drain(self.ptr, out, _CHUNK)) > 0:
            parts.append(bytes(ffi.buffer(out, n)))
        return b"".join(parts)

    def buffered(self) -> int:
        """Ciphertext held in the memory BIOs (received not decrypted, or not sent yet)."""
        return lib.ssi_tls_buffered(self.ptr)

    def to_fd(self, fd: int) -> bool:
        """Onto the socket ``fd`` (False, unchanged, while ciphertext is buffered)."""
        return lib.ssi_tls_to_fd(self.ptr, fd) == 0

    def to_mem(self) -> None:
        if lib.ssi_tls_to_mem(self.ptr) < 0:
            raise TlsError("cannot make TLS memory buffers (out of memory?)")


class TlsSocket:
    """A pager's blocking lane socket running TLS in C, with the calls `BlockingChannel`
    makes on a plain socket (``recv_into`` with flags, ``recvmsg_into``, ``sendmsg``)."""

    def __init__(self, sock: socket.socket, session: TlsSession, label: str) -> None:
        self.sock = sock
        self.session = session
        self.label = label

    @property
    def handle(self) -> int:
        return self.session.handle

    def _read(self, view: memoryview) -> int:
        try:
            n = self.session.read_into(view)
        except TlsError as exc:
            raise TlsError(f"TLS with {self.label} failed: {exc}; both sides need --tls and "
                           "certificates of the same cluster CA") from None
        if n is None:
            raise TimeoutError(errno_mod.EAGAIN, "timed out")
        return n

    def recv_into(self, view: Any, nbytes: int = 0, flags: int = 0) -> int:
        view = memoryview(view).cast("B")
        want = nbytes or len(view)
        got = self._read(view[:want])
        if flags & socket.MSG_WAITALL:
            while 0 < got < want and (n := self._read(view[got:want])):
                got += n
        return got

    def recvmsg_into(self, buffers: list[memoryview]) -> tuple[int, list, int, Any]:
        """Fills the first buffer only (never reads past what was asked)."""
        return self._read(memoryview(buffers[0]).cast("B")), [], 0, None

    def sendall(self, data: Any) -> None:
        try:
            n = self.session.write(data)
        except TlsError as exc:
            raise TlsError(f"TLS with {self.label} failed: {exc}") from None
        if n is None:
            raise TimeoutError(errno_mod.EAGAIN, "timed out")

    def sendmsg(self, buffers: list[Any]) -> int:
        total = 0
        for b in buffers:
            self.sendall(b)
            total += memoryview(b).nbytes
        return total

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()


def connect(sock: socket.socket, ctx: TlsContext, label: str) -> TlsSocket:
    """TLS over a connected blocking socket (its SO_RCVTIMEO/SO_SNDTIMEO bound the handshake).
    `TlsError` naming ``label`` when it is refused; the socket is closed then."""
    session = TlsSession(ctx, sock.fileno())
    try:
        if not session.handshake():
            raise TlsError("no answer in time")
    except TlsError as exc:
        sock.close()
        raise TlsError(f"TLS handshake with {label} failed: {exc}; both sides need --tls and "
                       "certificates of the same cluster CA") from None
    return TlsSocket(sock, session, label)
