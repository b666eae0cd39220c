"""A memory node connection's TLS, run in C (`transport.tlsc`) on memory buffers.

`TlsConnection` is part of `transport.node.server.NodeConnection`: with TLS, the ciphertext
the protocol receives lands in its own buffer and is fed to the connection's C session; the
plaintext is decrypted straight into the session's frame buffer (as much as fits: the rest
waits in the C session until the frames before it are answered), and every reply is encrypted
on its way out. The session is one a C fault lane can take along (`FastLane.start` moves it
onto the socket, `FastLane.finish` back here), so TLS connections get the C lane too.
"""

from __future__ import annotations

import contextlib
import logging
import struct
from typing import TYPE_CHECKING, Any

from transport.errors import TlsError
from transport.wire import MAGIC, ErrorCode, encode_error

if TYPE_CHECKING:
    from transport.node.server import NodeConnection

log = logging.getLogger(__name__)


class TlsConnection:
    """The TLS half of `NodeConnection` (see the module docstring)."""

    tls: Any = None  # the connection's `transport.tlsc.TlsSession`; None: plaintext

    def _tls_init(self: NodeConnection, ctx: Any) -> None:
        """TLS on ``ctx`` (a server `transport.tlsc.TlsContext`), or plaintext when None."""
        self._send = self._write_plain
        if ctx is None:
            return
        from transport.tlsc import TlsSession

        self.tls = TlsSession(ctx)
        self._cipher = bytearray(1 << 16)
        self.get_buffer = self._tls_get_buffer  # type: ignore[method-assign]
        self._send = self._write_tls

    def _tls_get_buffer(self: NodeConnection, sizehint: int = -1) -> memoryview:
        return memoryview(self._cipher)

    def _tls_received(self: NodeConnection, nbytes: int) -> None:
        """Ciphertext arrived in ``_cipher``: into the session, plaintext out of it. A peer
        that sends SSIP in clear instead of a TLS handshake is told, in clear, what to do."""
        data = memoryview(self._cipher)[:nbytes]
        if not self.tls.done and data[:4] == MAGIC and not self.closing:
            self.node.count("handshake", "tls_required")
            log.warning("memnode: %s sent SSIP in clear to this TLS node; a pager must connect "
                        "with --tls and a certificate of this node's cluster CA", self.peer)
            req = struct.unpack_from("<I", data, 8)[0] if nbytes >= 12 else 0
            self.transport.write(encode_error(  # type: ignore[union-attr]
                req, ErrorCode.AUTH_REQUIRED, "this memory node requires TLS (memnode --tls): "
                "connect with --tls and a certificate of its cluster CA (--tls-dir)"))
            self._close()
            return
        self.tls.feed(data)
        self._tls_pump()

    def _write_plain(self: NodeConnection, data: Any) -> None:
        self.transport.write(data)  # type: ignore[union-attr]

    def _write_tls(self: NodeConnection, data: Any) -> None:
        try:
            self.tls.write(data)
        except (TlsError, OSError) as exc:
            log.info("memnode: %s: TLS failed: %s", self.peer, exc)
            self._close()
            return
        self.transport.write(self.tls.drain())  # type: ignore[union-attr]

    def _tls_pump(self: NodeConnection) -> bool:
        """Advance the handshake, decrypt what fits into the frame buffer; True if plaintext
        arrived. A refused handshake or a broken stream closes the connection (logged)."""
        tls = self.tls
        if self.closing:
            return False
        try:
            if not tls.done:
                done = tls.handshake()
                out = tls.drain()
                if out:
                    self.transport.write(out)  # type: ignore[union-attr]
                if not done:
                    return False
                log.debug("memnode: %s: TLS 1.3 session established", self.peer)
            reader = self.session.reader
            got = False
            while not reader.nearly_full():
                view = reader.get_buffer()
                if not len(view):
                    break
                n = tls.read_into(view)
                if n is None:
                    break
                if n == 0:
                    self.eof = True  # the peer's close_notify: answer what is left, close
                    break
                reader.buffer_updated(n)
                got = True
            return got
        except (TlsError, OSError) as exc:
            stage = "handshake" if not tls.done else "stream"
            # a refused TLS handshake is an authentication failure (the peer's certificate)
            self.node.count(*(("handshake", "tls_refused") if not tls.done
                              else ("tls", "stream_failed")))
            log.warning("memnode: %s: TLS %s failed: %s; a pager must connect with --tls and "
                        "a certificate of this node's cluster CA", self.peer, stage, exc)
            with contextlib.suppress(Exception):  # the alert that tells the peer why
                self.transport.write(tls.drain())  # type: ignore[union-attr]
            self._close()
            return False
