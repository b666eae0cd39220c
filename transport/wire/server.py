"""The memory node's side of a connection, sans-IO: bytes in, `ServerEvent`s out.

See `transport.wire.frames` for the frame format and the handshake. The node's shells
(`transport.node.server` over TCP, `transport.rdma`) feed bytes and send what the session and
`frames` build; they parse nothing themselves.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Any

from transport.errors import ProtocolError
from transport.wire import codec
from transport.wire.frames import (
    DEFAULT_MAX_SPACE_BYTES,
    FAULT_LANE,
    MAX_DATA,
    NEED_DATA,
    NONCE_SIZE,
    PAGE_SIZE,
    SUPPORTED_VERSIONS,
    VERSION,
    ErrorCode,
    Flag,
    Frame,
    FrameReader,
    T,
    check_space_name,
    choose_version,
    client_proof,
    decode_control,
    encode_control,
    pack_header,
    server_proof,
    type_name,
)

_FETCH = int(T.FETCH)

@dataclass(slots=True)
class Hello:
    request_id: int
    version: int
    node: str
    lane: str = ""  # "fault": a pager's fault thread (BlockingChannel), one fetch at a time


@dataclass(slots=True)
class Auth:
    request_id: int


@dataclass(slots=True)
class Open:
    request_id: int
    space: str
    epoch: int | None = None  # the owner's epoch (fencing), None: not fenced


@dataclass(slots=True)
class Fetch:
    request_id: int
    space: str
    gpa: int
    length: int
    flags: int


@dataclass(slots=True)
class Store:
    request_id: int
    space: str
    gpa: int
    data: memoryview  # valid until the next call on the session


@dataclass(slots=True)
class Ping:
    request_id: int
    reply_bytes: int


@dataclass(slots=True)
class StatsRequest:
    request_id: int


ServerEvent = Hello | Auth | Open | Fetch | Store | Ping | StatsRequest

_AWAIT_HELLO, _AWAIT_AUTH, _READY = "await-hello", "await-auth", "ready"
# state -> frame types a client may send in it; anything else before READY closes
_ALLOWED = {
    _AWAIT_HELLO: frozenset({T.HELLO}),
    _AWAIT_AUTH: frozenset({T.AUTH}),
    _READY: frozenset({T.OPEN, T.FETCH, T.STORE, T.PING, T.STATS}),
}

class ServerSession:
    """One client connection as the memory node sees it.

    Feed bytes (`receive_data` or `get_buffer`/`buffer_updated`), then drain `next_event()`,
    which returns a `ServerEvent`, NEED_DATA, or raises `ProtocolError` (send
    `encode_error(...)` for it; close if ``fatal``). Handshake replies come from the methods
    `welcome`, `auth_ok`, `opened`; page replies are built by the shell with `pack_header`.
    ``challenge`` is injected (os.urandom(32) in production) so tests are deterministic.
    """

    def __init__(self, *, token: bytes | None, challenge: bytes, node: str = "memnode",
                 max_space_bytes: int = DEFAULT_MAX_SPACE_BYTES) -> None:
        self.token = token
        self.challenge = challenge
        self.node = node
        self.max_space_bytes = max_space_bytes
        self.state = _AWAIT_HELLO
        self.version = VERSION
        self.peer_node = "?"
        self.lane = ""  # what the client said the connection is for (HELLO "lane")
        self.codec: str | None = None  # compression negotiated in HELLO/WELCOME (`codec`)
        self.spaces: list[str] = []  # handle - 1 -> name
        self.epochs: dict[str, int] = {}  # space -> epoch it was opened under (fenced)
        self._space_ids: dict[str, int] = {}
        self.reader = FrameReader()
        self._auth_frame: Frame | None = None

    # byte input
    def receive_data(self, data: bytes) -> None:
        self.reader.receive_data(data)

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        return self.reader.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self.reader.buffer_updated(nbytes)

    @property
    def authenticated(self) -> bool:
        return self.state == _READY

    def next_event(self) -> ServerEvent | None:
        reader = self.reader
        if reader._pos == reader._end and not reader._overflow:  # all consumed: quick out
            reader._pos = reader._end = 0
            return NEED_DATA
        frame = reader.next_frame()
        if frame is None:
            return NEED_DATA
        ftype = frame.type
        if ftype == _FETCH and self.state is _READY:  # the hot path; errors: _check_range
            gpa, length, handle = frame.gpa, frame.arg, frame.space
            if (0 < handle <= len(self.spaces) and not (gpa | length) & (PAGE_SIZE - 1)
                    and 0 < length <= MAX_DATA and gpa + length <= self.max_space_bytes):
                return Fetch(frame.request_id, self.spaces[handle - 1], gpa, length,
                             frame.flags)
        if ftype not in _ALLOWED[self.state]:
            if self.state != _READY:
                self.reader.closed = True
                code = ErrorCode.AUTH_REQUIRED if self.state == _AWAIT_AUTH else \
                    ErrorCode.BAD_MESSAGE
                raise ProtocolError(f"{type_name(ftype)} before the handshake finished: "
                                    f"send HELLO (and AUTH) first", code, fatal=True,
                                    request_id=frame.request_id)
            raise ProtocolError(f"{type_name(ftype)} is not a request a memory node serves",
                                ErrorCode.BAD_MESSAGE, request_id=frame.request_id)
        req = frame.request_id
        if ftype == T.FETCH:
            length = frame.arg
            space = self._check_range(frame, length)
            return Fetch(req, space, frame.gpa, length, frame.flags)
        if ftype == T.STORE:
            if frame.flags & Flag.COMPRESSED:
                space = self._check_range(frame, frame.arg)
                return Store(req, space, frame.gpa, memoryview(
                    codec.decompress(self.codec, frame.payload, frame.arg, req)))
            space = self._check_range(frame, frame.length)
            return Store(req, space, frame.gpa, frame.payload)
        if ftype == T.PING:
            if frame.arg > MAX_DATA:
                raise ProtocolError(f"PING asks {frame.arg} bytes, limit {MAX_DATA}",
                                    ErrorCode.TOO_LARGE, request_id=req)
            return Ping(req, frame.arg)
        if ftype == T.STATS:
            return StatsRequest(req)
        obj = decode_control(frame)
        if ftype == T.HELLO:
            return self._on_hello(req, obj)
        if ftype == T.AUTH:
            return self._on_auth(req, obj)
        epoch = obj.get("epoch")
        if epoch is not None and (type(epoch) is not int or not 0 <= epoch < 1 << 64):
            raise ProtocolError(f"OPEN epoch {epoch!r} is not an unsigned 64-bit integer",
                                ErrorCode.BAD_MESSAGE, request_id=req)
        return Open(req, check_space_name(obj.get("space"), req), epoch)

    def _check_range(self, frame: Frame, length: int) -> str:
        req = frame.request_id
        if not 0 < frame.space <= len(self.spaces):
            raise ProtocolError(f"unknown address space handle {frame.space}: OPEN it first",
                                ErrorCode.NO_SUCH_SPACE, request_id=req)
        if frame.gpa % PAGE_SIZE or length % PAGE_SIZE or not length:
            raise ProtocolError(f"gpa {frame.gpa:#x} / length {length} not 4 KiB aligned "
                                f"(or empty)", ErrorCode.MISALIGNED, request_id=req)
        if length > MAX_DATA:
            raise ProtocolError(f"request of {length} bytes exceeds {MAX_DATA}: split it",
                                ErrorCode.TOO_LARGE, request_id=req)
        if frame.gpa + length > self.max_space_bytes:
            raise ProtocolError(f"gpa {frame.gpa:#x}+{length} beyond the address space limit "
                                f"{self.max_space_bytes:#x}", ErrorCode.OUT_OF_RANGE,
                                request_id=req)
        return self.spaces[frame.space - 1]

    def _on_hello(self, req: int, obj: dict[str, Any]) -> Hello:
        version = choose_version(obj.get("versions"))
        if version is None:
            self.reader.closed = True
            raise ProtocolError(f"no common protocol version: peer offers "
                                f"{obj.get('versions')!r}, node speaks "
                                f"{list(SUPPORTED_VERSIONS)}; upgrade the older side",
                                ErrorCode.VERSION, fatal=True, request_id=req)
        self.version = version
        self.peer_node = str(obj.get("node", "?"))[:64]
        lane = obj.get("lane", "")
        self.lane = lane[:16] if isinstance(lane, str) else ""
        # a fault lane (served by the C loops) never compresses
        self.codec = None if self.lane == FAULT_LANE else codec.choose(obj.get("compress"))
        self.state = _AWAIT_AUTH if self.token is not None else _READY
        return Hello(req, version, self.peer_node, self.lane)

    def welcome(self, request_id: int, **extra: Any) -> bytes:
        return encode_control(T.WELCOME, request_id, {
            "version": self.version, "auth": self.token is not None,
            "challenge": self.challenge, "node": self.node,
            "max_space_bytes": self.max_space_bytes,
            **({"compress": self.codec} if self.codec else {}), **extra})

    def _on_auth(self, req: int, obj: dict[str, Any]) -> Auth:
        nonce, mac = obj.get("nonce"), obj.get("mac")
        assert self.token is not None
        if (not isinstance(nonce, bytes) or len(nonce) != NONCE_SIZE
                or not isinstance(mac, bytes)
                or not hmac.compare_digest(mac, client_proof(self.token, self.challenge,
                                                             nonce))):
            self.reader.closed = True
            raise ProtocolError("authentication failed: the client's cluster token differs "
                                "from this node's (copy the node's token file to the client)",
                                ErrorCode.AUTH_FAILED, fatal=True, request_id=req)
        self._nonce = nonce
        self.state = _READY
        return Auth(req)

    def auth_ok(self, request_id: int) -> bytes:
        assert self.token is not None
        return encode_control(T.AUTH_OK, request_id,
                              {"mac": server_proof(self.token, self.challenge, self._nonce)})

    def open_refused(self, name: str, limit: int) -> str | None:
        """Why opening ``name`` would pass this connection's ``limit`` of spaces, or None."""
        if name in self._space_ids or len(self.spaces) < limit:
            return None
        return (f"this connection already opened {len(self.spaces)} spaces, the node's limit "
                f"per connection: open space {name} on another connection")

    def opened(self, request_id: int, name: str, epoch: int | None = None,
               generation: int = 0) -> bytes:
        """OPENED: the handle, and in ``gpa`` the space's generation on this store."""
        if epoch is not None:
            self.epochs[name] = epoch
        handle = self._space_ids.get(name)
        if handle is None:
            self.spaces.append(name)
            handle = self._space_ids[name] = len(self.spaces)
        return pack_header(T.OPENED, request_id, space=handle, gpa=generation)


