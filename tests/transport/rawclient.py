"""A deliberately low-level client for poking a memory node with arbitrary bytes."""

from __future__ import annotations

import os
import socket

from transport.tcp import parse_endpoint
from transport.wire import (
    NONCE_SIZE,
    ClientHandshake,
    FrameReader,
    Reply,
    reply_from_frame,
)


class RawClient:
    def __init__(self, endpoint: str, timeout: float = 10.0) -> None:
        host, port = parse_endpoint(endpoint)
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.reader = FrameReader()
        self.space = 0

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> Reply | None:
        """The next reply frame, or None at EOF."""
        while True:
            frame = self.reader.next_frame()
            if frame is not None:
                return reply_from_frame(frame)
            data = self.sock.recv(1 << 16)
            if not data:
                return None
            self.reader.receive_data(data)

    def handshake(self, token: bytes | None, space: str = "raw", lane: str = "") -> RawClient:
        hs = ClientHandshake(token, space, nonce=os.urandom(NONCE_SIZE), lane=lane)
        self.send(hs.start())
        while not hs.done:
            r = self.reply()
            assert r is not None, "node closed during handshake"
            out = hs.receive(r)
            if out:
                self.send(out)
        self.space = hs.space
        return self

    def at_eof(self) -> bool:
        """True if the node closed (after any pending replies)."""
        while True:
            r = self.reply()
            if r is None:
                return True

    def close(self) -> None:
        self.sock.close()
