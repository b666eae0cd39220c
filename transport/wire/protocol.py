"""The memory-node wire protocol, sans-IO: bytes in, typed events out; events in, bytes out.

No sockets here. `transport.tcp` (asyncio and blocking) and `transport.rdma` are thin shells.

Frame = fixed 32-byte little-endian header, then ``length`` payload bytes::

    magic "SSIP" | version u8 | type u8 | flags u16 | request id u32 | space u32 |
    gpa u64 | length u32 | arg u32

* Page payloads (STORE, DATA) are raw page bytes, never msgpack. Control messages (HELLO,
  WELCOME, AUTH, AUTH_OK, OPEN, STATS_REPLY, ERROR) carry one msgpack map.
* ``space`` is a per-connection handle for an address space (a guest's memory, named by a
  string) returned by OPEN/OPENED. ``gpa`` is the byte offset in that space, 4 KiB aligned.
* FETCH asks ``arg`` bytes (a multiple of 4 KiB, at most `MAX_PAGES` pages). The DATA reply
  has ``arg`` = zero mask (bit i set: page i was never written and is *not* on the wire) and
  carries only the other pages, in order. So a fresh guest costs 32 bytes per fetch, not 4 KiB.
* STORE carries ``length`` bytes of pages; STORED is sent only after the node wrote them.
* PING asks for ``arg`` payload bytes back in PONG (0 for an RTT probe, more for bandwidth).
* ERROR: ``arg`` = `ErrorCode`, payload {"code", "message"}; ``request id`` names the request.
* Handshake: HELLO {"versions", "node"[, "lane"]} -> WELCOME {"version", "auth", "challenge",
  "node"}; if auth: AUTH {"nonce", "mac"} -> AUTH_OK {"mac"} (mutual HMAC-SHA256 over the cluster
  token, see `client_proof`/`server_proof`); then OPEN {"space"} -> OPENED (space handle).
  Anything but HELLO/AUTH before authentication closes the connection. ``"lane": "fault"``
  marks a pager's fault thread (one request at a time; the node may serve it from C); nodes
  that do not know the key ignore it.

Bounds: a frame is at most ``HEADER.size + MAX_DATA`` bytes (control messages `MAX_CONTROL`).
A bad magic, unsupported header version or oversized length is *fatal* (the stream cannot be
re-synchronised: error frame, then close); a well-framed but wrong request (unknown type,
misaligned or out-of-range gpa, unknown space, bad msgpack) gets an error frame and the
connection goes on.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
from dataclasses import dataclass
from typing import Any

import msgpack

from transport.errors import AuthError, ProtocolError, RemoteError

MAGIC = b"SSIP"
VERSION = 1
SUPPORTED_VERSIONS: tuple[int, ...] = (1,)
HEADER = struct.Struct("<4sBBHIIQII")
HEADER_SIZE = HEADER.size  # 32
PAGE_SIZE = 4096
PAGE_SHIFT = 12
MAX_PAGES = 32  # pages per FETCH/STORE frame: the zero mask fits the u32 ``arg``
MAX_DATA = MAX_PAGES * PAGE_SIZE  # 128 KiB
MAX_CONTROL = 64 * 1024
MAX_FRAME = HEADER_SIZE + MAX_DATA
NONCE_SIZE = 32
DEFAULT_MAX_SPACE_BYTES = 1 << 40  # 1 TiB per address space unless the node says otherwise
FAULT_LANE = "fault"  # HELLO "lane" of a pager's fault thread (BlockingChannel)


class T(enum.IntEnum):
    """Frame types."""

    HELLO = 1
    WELCOME = 2
    AUTH = 3
    AUTH_OK = 4
    OPEN = 5
    OPENED = 6
    FETCH = 7
    DATA = 8
    STORE = 9
    STORED = 10
    PING = 11
    PONG = 12
    STATS = 13
    STATS_REPLY = 14
    ERROR = 15


class Flag(enum.IntFlag):
    URGENT = 1  # a fault waits on this fetch: the sender keeps it off bulk lanes


KNOWN_FLAGS = int(Flag.URGENT)
CONTROL_TYPES = frozenset({T.HELLO, T.WELCOME, T.AUTH, T.AUTH_OK, T.OPEN, T.STATS_REPLY,
                           T.ERROR})
PAGE_PAYLOAD_TYPES = frozenset({T.STORE, T.DATA, T.PONG})
_TYPE_VALUES = frozenset(int(t) for t in T)
_REPLY_TYPES = frozenset({T.WELCOME, T.AUTH_OK, T.OPENED, T.DATA, T.STORED, T.PONG,
                          T.STATS_REPLY, T.ERROR})


class ErrorCode(enum.IntEnum):
    BAD_FRAME = 1
    TOO_LARGE = 2
    UNKNOWN_TYPE = 3
    MISALIGNED = 4
    OUT_OF_RANGE = 5
    AUTH_REQUIRED = 6
    AUTH_FAILED = 7
    VERSION = 8
    NO_SUCH_SPACE = 9
    BAD_MESSAGE = 10
    IO_ERROR = 11


@dataclass(slots=True)
class Frame:
    """One decoded frame. ``payload`` is a view into the reader's buffer: valid only until the
    next call on that reader (copy it, or consume it, before asking for more)."""

    type: int
    flags: int
    request_id: int
    space: int
    gpa: int
    length: int
    arg: int
    payload: memoryview


# --- encoding --------------------------------------------------------------------------------

def pack_header(ftype: int, request_id: int = 0, *, space: int = 0, gpa: int = 0,
                length: int = 0, arg: int = 0, flags: int = 0) -> bytes:
    return HEADER.pack(MAGIC, VERSION, ftype, flags, request_id, space, gpa, length, arg)


def encode_control(ftype: int, request_id: int, obj: dict[str, Any]) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    if len(body) > MAX_CONTROL:
        raise ProtocolError(f"control message of {len(body)} bytes exceeds {MAX_CONTROL}",
                            ErrorCode.TOO_LARGE)
    return pack_header(ftype, request_id, length=len(body)) + body


def encode_error(request_id: int, code: int, message: str) -> bytes:
    body = msgpack.packb({"code": int(code), "message": message[:1000]}, use_bin_type=True)
    return pack_header(T.ERROR, request_id, length=len(body), arg=int(code)) + body


def decode_control(frame: Frame) -> dict[str, Any]:
    """msgpack map of a control frame; a malformed one is a non-fatal BAD_MESSAGE."""
    try:
        obj = msgpack.unpackb(bytes(frame.payload), raw=False, strict_map_key=True,
                              max_str_len=MAX_CONTROL, max_bin_len=MAX_CONTROL,
                              max_array_len=1024, max_map_len=256, max_ext_len=0)
    except Exception as exc:  # msgpack raises many types for garbage
        raise ProtocolError(f"malformed {_type_name(frame.type)} message: {exc}",
                            ErrorCode.BAD_MESSAGE, request_id=frame.request_id) from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{_type_name(frame.type)} message is not a map",
                            ErrorCode.BAD_MESSAGE, request_id=frame.request_id)
    return obj


def error_from_frame(frame: Frame) -> RemoteError:
    """The exception a client raises for an ERROR frame."""
    try:
        obj = decode_control(frame)
        message = str(obj.get("message", ""))
        code = int(obj.get("code", frame.arg))
    except (ProtocolError, TypeError, ValueError):
        message, code = "unreadable error message", frame.arg
    name = ErrorCode(code).name if code in ErrorCode._value2member_map_ else str(code)
    cls = AuthError if code in (ErrorCode.AUTH_FAILED, ErrorCode.AUTH_REQUIRED) else RemoteError
    if cls is AuthError:
        return AuthError(f"memory node refused authentication ({name}): {message}")
    return RemoteError(f"memory node error {name}: {message}", code, frame.request_id)


def _type_name(ftype: int) -> str:
    return T(ftype).name if ftype in _TYPE_VALUES else f"type {ftype}"


def zero_mask_runs(npages: int, zero_mask: int) -> list[tuple[int, int]]:
    """Runs ``(first_page, count)`` of pages *not* in ``zero_mask`` (those on the wire)."""
    runs: list[tuple[int, int]] = []
    i = 0
    while i < npages:
        if zero_mask >> i & 1:
            i += 1
            continue
        j = i
        while j < npages and not zero_mask >> j & 1:
            j += 1
        runs.append((i, j - i))
        i = j
    return runs


def data_length(npages: int, zero_mask: int) -> int:
    """Payload bytes of a DATA reply for ``npages`` pages with this zero mask."""
    full = (1 << npages) - 1
    return (npages - (zero_mask & full).bit_count()) * PAGE_SIZE


# --- auth ------------------------------------------------------------------------------------

def client_proof(token: bytes, challenge: bytes, nonce: bytes) -> bytes:
    return hmac.new(token, b"ssi-pager client v1" + challenge + nonce, hashlib.sha256).digest()


def server_proof(token: bytes, challenge: bytes, nonce: bytes) -> bytes:
    return hmac.new(token, b"ssi-pager server v1" + nonce + challenge, hashlib.sha256).digest()


def choose_version(offered: Any) -> int | None:
    """Highest version both sides speak, or None."""
    if not isinstance(offered, list | tuple):
        return None
    common = [v for v in offered if isinstance(v, int) and v in SUPPORTED_VERSIONS]
    return max(common) if common else None


# --- frame reader ----------------------------------------------------------------------------

NEED_DATA = None
_EMPTY = memoryview(b"")
_FETCH = int(T.FETCH)


class FrameReader:
    """Splits a byte stream into `Frame` objects, enforcing the header-level rules.

    Feed it with `receive_data(bytes)`, or zero-copy with `get_buffer()` + `buffer_updated(n)`
    (the asyncio BufferedProtocol shape). The buffer has a fixed capacity, so payload views
    handed out stay valid (until the next call) and nobody can make it grow.
    """

    def __init__(self, capacity: int = 2 * MAX_FRAME + MAX_CONTROL) -> None:
        self._buf = bytearray(capacity)
        self._view = memoryview(self._buf)
        self._pos = 0
        self._end = 0
        self._overflow = bytearray()
        self._skip = 0  # bytes of a rejected frame still to discard
        self.closed = False  # a fatal error happened: feed no more

    def _compact(self) -> None:
        if self._pos:
            n = self._end - self._pos
            self._buf[0:n] = self._buf[self._pos:self._end]
            self._pos, self._end = 0, n
        if self._overflow:
            take = min(len(self._buf) - self._end, len(self._overflow))
            self._buf[self._end:self._end + take] = self._overflow[:take]
            del self._overflow[:take]
            self._end += take

    def receive_data(self, data: bytes) -> None:
        self._overflow += data
        self._compact()

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        if self._end == len(self._buf) or self._pos > len(self._buf) // 2:
            self._compact()
        return self._view[self._end:]

    def buffer_updated(self, nbytes: int) -> None:
        self._end += nbytes

    def buffered(self) -> int:
        return self._end - self._pos + len(self._overflow)

    def nearly_full(self) -> bool:
        """Less than one maximal frame of room left: stop receiving until drained."""
        return self._end - self._pos + len(self._overflow) > len(self._buf) - MAX_FRAME

    def _refill(self) -> bool:
        """Discard a rejected payload, compact; True when a whole header is buffered."""
        if self.closed:
            return False
        if self._skip:
            n = min(self._skip, self._end - self._pos)
            self._pos += n
            self._skip -= n
            if self._skip:
                self._compact()
                return False
        if self._end - self._pos < HEADER_SIZE:
            if self._pos == self._end and not self._overflow:
                self._pos = self._end = 0  # all consumed: restart at the front, no copy
                return False
            self._compact()
            return self._end - self._pos >= HEADER_SIZE
        return True

    def next_frame(self) -> Frame | None:
        """The next complete frame, or NEED_DATA (None). Raises ProtocolError."""
        if (self._skip or self.closed or self._end - self._pos < HEADER_SIZE) and \
                not self._refill():
            return NEED_DATA
        magic, version, ftype, flags, req, space, gpa, length, arg = HEADER.unpack_from(
            self._buf, self._pos)
        if not length and magic == MAGIC and version == VERSION and ftype in _TYPE_VALUES \
                and not flags & ~KNOWN_FLAGS:  # the common header-only request (FETCH)
            self._pos += HEADER_SIZE
            return Frame(ftype, flags, req, space, gpa, 0, arg, _EMPTY)
        if magic != MAGIC:
            self.closed = True
            raise ProtocolError(f"bad magic {bytes(magic)!r}: not an ssi-pager peer",
                                ErrorCode.BAD_FRAME, fatal=True)
        if version not in SUPPORTED_VERSIONS:
            self.closed = True
            raise ProtocolError(f"frame version {version} unsupported (this node speaks "
                                f"{list(SUPPORTED_VERSIONS)}); upgrade the older side",
                                ErrorCode.VERSION, fatal=True, request_id=req)
        limit = MAX_CONTROL if ftype in CONTROL_TYPES else MAX_DATA
        if length > limit:
            self.closed = True
            raise ProtocolError(f"frame length {length} exceeds the limit {limit}",
                                ErrorCode.TOO_LARGE, fatal=True, request_id=req)
        total = HEADER_SIZE + length
        if ftype not in _TYPE_VALUES or (length and ftype not in CONTROL_TYPES
                                         and ftype not in PAGE_PAYLOAD_TYPES):
            # well framed but meaningless: discard the payload, report, carry on
            self._pos += HEADER_SIZE
            self._skip = length
            what = (f"unknown frame type {ftype}" if ftype not in _TYPE_VALUES
                    else f"{_type_name(ftype)} must not carry a payload")
            raise ProtocolError(what, ErrorCode.UNKNOWN_TYPE if ftype not in _TYPE_VALUES
                                else ErrorCode.BAD_FRAME, request_id=req)
        if self._end - self._pos < total:
            self._compact()
            if self._end - self._pos < total:
                return NEED_DATA
        start = self._pos + HEADER_SIZE
        self._pos += total
        if flags & ~KNOWN_FLAGS:
            raise ProtocolError(f"unknown flags {flags:#x}", ErrorCode.BAD_FRAME,
                                request_id=req)
        return Frame(ftype, flags, req, space, gpa, length, arg,
                     self._view[start:start + length])


# --- server session --------------------------------------------------------------------------

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


def valid_space_name(name: Any) -> bool:
    return (isinstance(name, str) and 0 < len(name) <= 64 and not name.startswith(".")
            and all(c.isascii() and (c.isalnum() or c in "-_.") for c in name))


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
        self.spaces: list[str] = []  # handle - 1 -> name
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
                raise ProtocolError(f"{_type_name(ftype)} before the handshake finished: "
                                    f"send HELLO (and AUTH) first", code, fatal=True,
                                    request_id=frame.request_id)
            raise ProtocolError(f"{_type_name(ftype)} is not a request a memory node serves",
                                ErrorCode.BAD_MESSAGE, request_id=frame.request_id)
        req = frame.request_id
        if ftype == T.FETCH:
            length = frame.arg
            space = self._check_range(frame, length)
            return Fetch(req, space, frame.gpa, length, frame.flags)
        if ftype == T.STORE:
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
        name = obj.get("space")
        if not valid_space_name(name):
            raise ProtocolError(f"bad address space name {name!r}: use 1-64 characters of "
                                f"letters, digits, '-', '_', '.'", ErrorCode.BAD_MESSAGE,
                                request_id=req)
        return Open(req, name)

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
        self.state = _AWAIT_AUTH if self.token is not None else _READY
        return Hello(req, version, self.peer_node, self.lane)

    def welcome(self, request_id: int, **extra: Any) -> bytes:
        return encode_control(T.WELCOME, request_id, {
            "version": self.version, "auth": self.token is not None,
            "challenge": self.challenge, "node": self.node,
            "max_space_bytes": self.max_space_bytes, **extra})

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

    def opened(self, request_id: int, name: str) -> bytes:
        handle = self._space_ids.get(name)
        if handle is None:
            self.spaces.append(name)
            handle = self._space_ids[name] = len(self.spaces)
        return pack_header(T.OPENED, request_id, space=handle)


# --- client handshake ------------------------------------------------------------------------

class ClientHandshake:
    """The client side of HELLO/WELCOME/AUTH/AUTH_OK/OPEN/OPENED, sans-IO.

    ``start()`` gives the first bytes; feed every frame to ``receive(frame)``, which returns
    bytes to send (possibly empty) until ``done``; then ``space`` is the handle to use.
    """

    def __init__(self, token: bytes | None, space: str, *, node: str = "client",
                 nonce: bytes, lane: str = "") -> None:
        if not valid_space_name(space):
            raise ProtocolError(f"bad address space name {space!r}: use 1-64 characters of "
                                f"letters, digits, '-', '_', '.'", ErrorCode.BAD_MESSAGE)
        self.token = token
        self.space_name = space
        self.node = node
        self.nonce = nonce
        self.lane = lane
        self.done = False
        self.space = 0
        self.version = 0
        self.peer_node = "?"
        self.max_space_bytes = DEFAULT_MAX_SPACE_BYTES
        self._challenge = b""

    def start(self) -> bytes:
        hello: dict[str, Any] = {"versions": list(SUPPORTED_VERSIONS), "node": self.node}
        if self.lane:  # nodes that do not know the key ignore it
            hello["lane"] = self.lane
        return encode_control(T.HELLO, 1, hello)

    def _open(self) -> bytes:
        return encode_control(T.OPEN, 3, {"space": self.space_name})

    def receive(self, frame: Reply) -> bytes:
        if frame.error is not None:
            raise frame.error
        obj = frame.obj or {}
        if frame.type == T.WELCOME:
            self.version = int(obj.get("version", 0))
            if self.version not in SUPPORTED_VERSIONS:
                raise ProtocolError(f"memory node chose protocol version {self.version}, "
                                    f"which this client does not speak", ErrorCode.VERSION,
                                    fatal=True)
            self.peer_node = str(obj.get("node", "?"))
            self.max_space_bytes = int(obj.get("max_space_bytes", DEFAULT_MAX_SPACE_BYTES))
            if not obj.get("auth"):
                return self._open()
            if self.token is None:
                raise AuthError("the memory node requires the cluster token: pass --token-file "
                                "(copy the node's token file, 0600)")
            challenge = obj.get("challenge")
            if not isinstance(challenge, bytes) or len(challenge) != NONCE_SIZE:
                raise ProtocolError("malformed WELCOME challenge", ErrorCode.BAD_MESSAGE,
                                    fatal=True)
            self._challenge = challenge
            return encode_control(T.AUTH, 2, {
                "nonce": self.nonce, "mac": client_proof(self.token, challenge, self.nonce)})
        if frame.type == T.AUTH_OK:
            mac = obj.get("mac")
            assert self.token is not None
            if not isinstance(mac, bytes) or not hmac.compare_digest(
                    mac, server_proof(self.token, self._challenge, self.nonce)):
                raise AuthError("the memory node could not prove it holds the cluster token: "
                                "it is not the node you meant, or its token differs")
            return self._open()
        if frame.type == T.OPENED:
            self.space = frame.space
            self.done = True
            return b""
        raise ProtocolError(f"unexpected {_type_name(frame.type)} during the handshake",
                            ErrorCode.BAD_MESSAGE, fatal=True)


# --- client reply reader (zero-copy into caller buffers) -------------------------------------

@dataclass(slots=True)
class Reply:
    """A reply frame as the client sees it. ``zero_mask`` for DATA; ``obj`` for control."""

    type: int
    request_id: int
    space: int = 0
    arg: int = 0
    length: int = 0
    obj: dict[str, Any] | None = None
    error: Exception | None = None


class ReplyReader:
    """Client-side receive state machine: DATA payloads go straight into the buffer that the
    caller registered with `expect_data(request_id, into)`; headers into a small fixed buffer.

    BufferedProtocol shape: ``get_buffer()`` says where the next bytes go, ``buffer_updated(n)``
    reports them, completed replies queue up for ``next_reply()``. Raises ProtocolError (fatal)
    on a broken stream.
    """

    def __init__(self) -> None:
        self._hdr = bytearray(HEADER_SIZE)
        self._hdr_view = memoryview(self._hdr)
        self._scratch = bytearray(max(MAX_CONTROL, MAX_DATA))
        self._scratch_view = memoryview(self._scratch)
        self._have = 0  # bytes of the current target filled
        self._target: memoryview = self._hdr_view
        self._segments: list[memoryview] = []
        self._current: Reply | None = None
        self._dest: dict[int, memoryview] = {}
        self.replies: list[Reply] = []

    def expect_data(self, request_id: int, into: memoryview) -> None:
        self._dest[request_id] = into

    def forget(self, request_id: int) -> None:
        self._dest.pop(request_id, None)

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        return self._target[self._have:]

    def buffer_updated(self, nbytes: int) -> None:
        self._have += nbytes
        while self._have >= len(self._target):  # the current target is full
            if self._target is self._hdr_view:
                self._on_header()  # sets the payload target (maybe empty)
            elif self._segments:
                self._target = self._segments.pop()
                self._have = 0
            else:
                self._finish()  # back to the header target, nothing in it yet

    def _on_header(self) -> None:
        magic, version, ftype, _flags, req, space, _gpa, length, arg = HEADER.unpack_from(
            self._hdr)
        if magic != MAGIC or version not in SUPPORTED_VERSIONS:
            raise ProtocolError("memory node sent a corrupt frame header", ErrorCode.BAD_FRAME,
                                fatal=True)
        limit = MAX_CONTROL if ftype in CONTROL_TYPES else MAX_DATA
        if length > limit:
            raise ProtocolError(f"memory node sent an oversized frame ({length} bytes)",
                                ErrorCode.TOO_LARGE, fatal=True)
        if ftype not in _REPLY_TYPES:
            raise ProtocolError(f"memory node sent a {_type_name(ftype)} frame, which is not "
                                f"a reply", ErrorCode.UNKNOWN_TYPE, fatal=True)
        self._current = Reply(ftype, req, space, arg, length)
        self._have = 0
        if ftype == T.DATA:
            into = self._dest.pop(req, None)
            if into is None:
                raise ProtocolError(f"DATA for unknown request {req}", ErrorCode.BAD_FRAME,
                                    fatal=True)
            npages = len(into) >> PAGE_SHIFT
            if length != data_length(npages, arg):
                raise ProtocolError(f"DATA of {length} bytes does not match its zero mask",
                                    ErrorCode.BAD_FRAME, fatal=True)
            segs = [into[i << PAGE_SHIFT:(i + n) << PAGE_SHIFT]
                    for i, n in zero_mask_runs(npages, arg)]
            segs.reverse()
            self._segments = segs
            self._target = segs.pop() if segs else into[:0]
        else:
            self._target = self._scratch_view[:length]

    def _finish(self) -> None:
        cur = self._current
        assert cur is not None
        if cur.type in CONTROL_TYPES:
            decode_reply_body(cur, self._target)
            if cur.type == T.ERROR:
                self._dest.pop(cur.request_id, None)
        self.replies.append(cur)
        self._current = None
        self._target = self._hdr_view
        self._have = 0

    def next_reply(self) -> Reply | None:
        return self.replies.pop(0) if self.replies else None


def decode_reply_body(reply: Reply, payload: memoryview) -> Reply:
    """Fill ``obj`` (control) or ``error`` (ERROR, malformed control) of a reply."""
    frame = Frame(reply.type, 0, reply.request_id, reply.space, 0, reply.length, reply.arg,
                  payload)
    if reply.type == T.ERROR:
        reply.error = error_from_frame(frame)
    elif reply.type in CONTROL_TYPES:
        try:
            reply.obj = decode_control(frame)
        except ProtocolError as exc:
            reply.error = exc
    return reply


def reply_from_frame(frame: Frame) -> Reply:
    return decode_reply_body(Reply(frame.type, frame.request_id, frame.space, frame.arg,
                                   frame.length), frame.payload)
