"""The pager's side of a connection, sans-IO: request ids, the handshake, reply parsing, and
the reconnect policy (deadlines and backoff computed from an injected clock).

The shells (`transport.tcp.blocking`, `transport.tcp.client`, `transport.rdma`) move bytes
and arm the timers this module tells them to; they build and parse no frames themselves.

A client holding a token refuses a node that does not ask for it: a WELCOME without auth is
an `AuthError`, never a silently unauthenticated session (a rogue node could serve any
pages). Authentication failures are permanent: `retryable` says no, and no shell retries them.
"""

from __future__ import annotations

import errno
import hmac
from dataclasses import dataclass
from typing import Any

from transport.errors import (
    AuthError,
    ConnectError,
    ConnectionLost,
    ProtocolError,
    RemoteError,
    StoreIdentityError,
)
from transport.wire import codec
from transport.wire.frames import (
    CONTROL_TYPES,
    DEFAULT_MAX_SPACE_BYTES,
    FAULT_LANE,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_CONTROL,
    MAX_DATA,
    NONCE_SIZE,
    PAGE_SHIFT,
    SUPPORTED_VERSIONS,
    VERSION,
    ErrorCode,
    Flag,
    Frame,
    T,
    check_space_name,
    client_proof,
    data_length,
    decode_control,
    encode_control,
    error_from_frame,
    pack_header,
    pack_header_into,
    server_proof,
    type_name,
    zero_mask_runs,
)

_REPLY_TYPES = frozenset({T.WELCOME, T.AUTH_OK, T.OPENED, T.DATA, T.STORED, T.PONG,
                          T.STATS_REPLY, T.ERROR})
_DATA = int(T.DATA)
COMPRESSED = int(Flag.COMPRESSED)


# --- replies ---------------------------------------------------------------------------------

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
    flags: int = 0  # Flag.COMPRESSED: a DATA payload to `unpack_data`
    gpa: int = 0  # OPENED: the space's generation on the node's store


def parse_reply_header(header: Any, peer: str = "memory node") -> Reply:
    """The `Reply` a 32-byte header announces; a header no node may send is fatal."""
    magic, version, ftype, flags, req, space, gpa, length, arg = HEADER.unpack_from(header)
    if magic != MAGIC or version not in SUPPORTED_VERSIONS:
        raise ProtocolError(f"{peer} sent a corrupt frame header", ErrorCode.BAD_FRAME,
                            fatal=True)
    limit = MAX_CONTROL if ftype in CONTROL_TYPES else MAX_DATA
    if length > limit:
        raise ProtocolError(f"{peer} sent an oversized frame ({length} bytes)",
                            ErrorCode.TOO_LARGE, fatal=True)
    if ftype not in _REPLY_TYPES:
        raise ProtocolError(f"{peer} sent a {type_name(ftype)} frame, which is not a reply",
                            ErrorCode.UNKNOWN_TYPE, fatal=True)
    return Reply(ftype, req, space, arg, length, flags=flags, gpa=gpa)


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
                                   frame.length, gpa=frame.gpa), frame.payload)


def expect_reply(reply: Reply, ftype: int, request_id: int | None = None) -> Reply:
    """``reply`` if it answers ``request_id`` with ``ftype``; raises its error otherwise."""
    if reply.error is not None:
        raise reply.error
    if reply.type != ftype or (request_id is not None and reply.request_id != request_id):
        raise ProtocolError(f"expected {type_name(ftype)} for request {request_id}, got "
                            f"{type_name(reply.type)} for request {reply.request_id}",
                            ErrorCode.BAD_MESSAGE, fatal=True)
    return reply


def full_data(header: Any, request_id: int, nbytes: int) -> bool:
    """The hot case of a fault: ``header`` is the DATA answering ``request_id`` with all
    ``nbytes`` on the wire (zero mask 0). Anything else goes through `parse_reply_header`."""
    magic, version, ftype, _f, rid, _s, _g, length, mask = HEADER.unpack_from(header)
    return (ftype == _DATA and rid == request_id and not mask and length == nbytes
            and magic == MAGIC and version == VERSION)


def check_data(reply: Reply, request_id: int, npages: int) -> None:
    """Raise unless ``reply`` is the DATA answering a FETCH (``request_id``) of ``npages``."""
    if reply.type == T.DATA and reply.request_id == request_id and (
            reply.length == data_length(npages, reply.arg) if not reply.flags & COMPRESSED
            else 0 < reply.length < data_length(npages, reply.arg)):
        return
    raise ProtocolError(f"memory node answered request {request_id} with "
                        f"{type_name(reply.type)} id {reply.request_id} length {reply.length}",
                        ErrorCode.BAD_FRAME, fatal=True)


def unpack_data(codec_name: str | None, reply: Reply, payload: memoryview,
                into: memoryview) -> None:
    """A compressed DATA ``payload`` (checked by `check_data`) into ``into``, each page at
    its place (zero-mask pages left as they are)."""
    raw = codec.decompress(codec_name, payload, data_length(len(into) >> PAGE_SHIFT,
                                                            reply.arg), reply.request_id)
    pos = 0
    for seg in data_segments(into, reply.arg):
        seg[:] = raw[pos:pos + len(seg)]
        pos += len(seg)


def pack_store(codec_name: str | None, data: memoryview) -> tuple[int, int, Any]:
    """(flags, arg, payload) of a STORE of ``data``: compressed with the connection's codec
    when that pays (`codec.compress`), else raw."""
    if codec_name is not None:
        packed = codec.compress(codec_name, data)
        if packed is not None:
            return COMPRESSED, len(data), packed
    return 0, 0, data


def data_segments(into: memoryview, zero_mask: int) -> list[memoryview]:
    """Where the pages of a DATA reply go in ``into``, in wire order (zero pages skipped)."""
    return [into[i << PAGE_SHIFT:(i + n) << PAGE_SHIFT]
            for i, n in zero_mask_runs(len(into) >> PAGE_SHIFT, zero_mask)]


def spread_pages(view: memoryview, zero_mask: int, length: int) -> None:
    """Pages received packed at the front of ``view``: move each run to its place."""
    pos = length
    for first, count in reversed(zero_mask_runs(len(view) >> PAGE_SHIFT, zero_mask)):
        size = count << PAGE_SHIFT
        pos -= size
        dst = first << PAGE_SHIFT
        if dst != pos:
            view[dst:dst + size] = bytes(view[pos:pos + size])


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
        self._unpack: memoryview | None = None  # where a compressed DATA's pages go
        self.codec: str | None = None  # the connection's compression (set after handshake)
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
        cur = self._current = parse_reply_header(self._hdr)
        self._have = 0
        if cur.type == T.DATA:
            into = self._dest.pop(cur.request_id, None)
            if into is None:
                raise ProtocolError(f"DATA for unknown request {cur.request_id}",
                                    ErrorCode.BAD_FRAME, fatal=True)
            check_data(cur, cur.request_id, len(into) >> PAGE_SHIFT)
            if cur.flags & COMPRESSED:  # into the scratch buffer, unpacked in _finish
                self._unpack = into
                self._target = self._scratch_view[:cur.length]
                return
            segs = data_segments(into, cur.arg)
            segs.reverse()
            self._segments = segs
            self._target = segs.pop() if segs else into[:0]
        else:
            self._target = self._scratch_view[:cur.length]

    def _finish(self) -> None:
        cur = self._current
        assert cur is not None
        if self._unpack is not None:
            into, self._unpack = self._unpack, None
            unpack_data(self.codec, cur, self._target, into)
        elif cur.type in CONTROL_TYPES:
            decode_reply_body(cur, self._target)
            if cur.type == T.ERROR:
                self._dest.pop(cur.request_id, None)
        self.replies.append(cur)
        self._current = None
        self._target = self._hdr_view
        self._have = 0

    def next_reply(self) -> Reply | None:
        return self.replies.pop(0) if self.replies else None


# --- retry policy ----------------------------------------------------------------------------

def timed_out(exc: BaseException) -> bool:
    """A socket timeout (SO_RCVTIMEO/SO_SNDTIMEO): the node is alive but did not answer."""
    return isinstance(exc, TimeoutError | BlockingIOError) or (
        isinstance(exc, OSError) and exc.errno == errno.EAGAIN)


def retryable(exc: BaseException) -> bool:
    """A lost or refused connection is transient; authentication and protocol errors, a
    node's error answer and a timeout are not (retrying cannot change them, or would only
    make a waiting fault wait longer)."""
    if isinstance(exc, AuthError | ProtocolError | RemoteError) or timed_out(exc):
        return False
    return isinstance(exc, ConnectionLost | ConnectError | OSError)


class Backoff:
    """Deadline and exponential backoff for one operation, from an injected clock.

    ``Backoff(now, retry_for)``; after each failed attempt ``delay(now, exc)`` gives the seconds
    to wait before the next one, or None: give up and raise ``exc``.
    """

    def __init__(self, now: float, retry_for: float, *, first: float = 0.01,
                 cap: float = 0.5) -> None:
        self.deadline = now + retry_for
        self._next = first
        self.cap = cap

    def delay(self, now: float, exc: BaseException) -> float | None:
        if not retryable(exc) or now >= self.deadline:
            return None
        delay = min(self._next, self.deadline - now)
        self._next = min(self._next * 2, self.cap)
        return delay


# --- store identity --------------------------------------------------------------------------

MISSED_STORES = "missed-stores"  # a recorded "store id": the node missed stores while down


class StoreIdentities:
    """What a pager saw of each (node endpoint, space): the node's store id (WELCOME "store")
    and the space's generation (OPENED ``gpa``). The first OPENED is remembered; any later one
    that differs (the node restarted on an empty or another store directory, or the space's
    files were deleted) is refused with `StoreIdentityError`: its pages would be wrong (zeros
    for what the pager wrote). `expect` seeds what an earlier writer recorded (a cluster's
    record in etcd), so a pager that never saw the old store still refuses a new one. `forget`
    after a deliberate move (a repair that refilled the space on a new store)."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str], tuple[str, int]] = {}
        self._origin: dict[tuple[str, str], str] = {}  # who recorded an expected identity

    def check(self, node: str, space: str, store_id: str, generation: int) -> None:
        seen = self._seen.setdefault((node, space), (store_id, generation))
        if seen != (store_id, generation):
            origin = self._origin.get((node, space), "this pager")
            if seen[0] == MISSED_STORES:  # its store stands: only this space is behind
                exc = StoreIdentityError(
                    f"memory node {node} missed stores to space {space} while it was down "
                    f"({origin}): its copy is out of date, so it is refilled before it "
                    f"serves that space", 0)
                exc.missed = True
                raise exc
            raise StoreIdentityError(
                f"memory node {node} holds space {space} in store {store_id or '?'} generation "
                f"{generation:#x}, but {origin} wrote it to store {seen[0] or '?'} generation "
                f"{seen[1]:#x}: the node was restarted on an empty or another store directory "
                f"(or the space's files were deleted), so its pages would be wrong. Restart the "
                f"node on its own --store, or restore the space from a replica; refused", 0)

    def expect(self, node: str, space: str, store_id: str, generation: int,
               origin: str) -> None:
        """Refuse any other identity of ``space`` on ``node`` than this one, which
        ``origin`` (words for the error) recorded; what this process saw itself stays."""
        if (node, space) not in self._seen:
            self._seen[node, space] = (store_id, generation)
            self._origin[node, space] = origin

    def forget(self, node: str, space: str | None = None) -> None:
        for key in [k for k in self._seen if k[0] == node and space in (None, k[1])]:
            del self._seen[key]
            self._origin.pop(key, None)

    def get(self, node: str, space: str) -> tuple[str, int] | None:
        return self._seen.get((node, space))


IDENTITIES = StoreIdentities()  # this process's memory, shared by every shell's sessions


# --- the session -----------------------------------------------------------------------------

class ClientSession:
    """One connection as a pager sees it: request ids, the handshake, request headers.

    ``start()`` gives the HELLO; feed every handshake reply to ``receive(reply)``, which returns
    bytes to send (possibly empty) until ``done``; then ``space`` is the handle to use and
    ``pack_request_into``/``request`` build requests with fresh ids. ``endpoint`` only names
    the node in error messages; ``nonce`` is injected (os.urandom(32) in production).
    """

    def __init__(self, token: bytes | None, space: str, *, node: str = "client",
                 nonce: bytes, lane: str = "", endpoint: str = "",
                 epoch: int | None = None, compress: tuple[str, ...] = (),
                 identity_key: str = "",
                 identities: StoreIdentities | None = IDENTITIES) -> None:
        check_space_name(space)
        if compress and lane == FAULT_LANE:
            raise ValueError("a fault lane never compresses (the C loops serve it raw)")
        self.compress = compress  # codecs offered in HELLO (`codec`), preferred first
        self.codec: str | None = None  # the one the node picked in WELCOME
        self.epoch = epoch  # the space owner's epoch sent in OPEN (fencing), or None
        self.token = token
        self.space_name = space
        self.node = node
        self.nonce = nonce
        self.lane = lane
        self.endpoint = endpoint
        # the node as the identity memory knows it (its TCP endpoint), None: not checked
        self.identity_key = identity_key or endpoint
        self.identities = identities
        self.store_id = ""  # WELCOME "store" (nodes before store ids send none)
        self.generation = 0  # OPENED gpa: the space's generation on that store
        self.done = False
        self.space = 0
        self.version = 0
        self.peer_node = "?"
        self.max_space_bytes = DEFAULT_MAX_SPACE_BYTES
        self._challenge = b""
        self._req = 0
        self._waiting = 0  # request id of the handshake step in flight

    @property
    def awaiting(self) -> int:
        """Request id of the handshake step whose reply `receive` expects next."""
        return self._waiting

    def next_id(self) -> int:
        """A fresh request id (u32, never 0)."""
        self._req = (self._req + 1) & 0xFFFFFFFF or 1
        return self._req

    def pack_request_into(self, buf: Any, offset: int, ftype: int, *, gpa: int = 0,
                          length: int = 0, arg: int = 0, flags: int = 0) -> int:
        """Write one request header at ``buf[offset:]``; returns its request id."""
        req = self._req = (self._req + 1) & 0xFFFFFFFF or 1
        pack_header_into(buf, offset, ftype, req, space=self.space, gpa=gpa, length=length,
                         arg=arg, flags=flags)
        return req

    def request(self, ftype: int, *, gpa: int = 0, length: int = 0, arg: int = 0,
                flags: int = 0) -> tuple[int, bytes]:
        """(request id, header) of one request."""
        req = self.next_id()
        return req, pack_header(ftype, req, space=self.space, gpa=gpa, length=length, arg=arg,
                                flags=flags)

    def fetch_into(self, buf: Any, offset: int, gpa: int, nbytes: int) -> int:
        """A fault's FETCH header (URGENT) at ``buf[offset:]``; returns its request id."""
        return self.pack_request_into(buf, offset, T.FETCH, gpa=gpa, arg=nbytes,
                                      flags=Flag.URGENT)

    def _control(self, ftype: int, obj: dict[str, Any]) -> bytes:
        self._waiting = self.next_id()
        return encode_control(ftype, self._waiting, obj)

    def start(self) -> bytes:
        hello: dict[str, Any] = {"versions": list(SUPPORTED_VERSIONS), "node": self.node}
        if self.lane:  # nodes that do not know the key ignore it
            hello["lane"] = self.lane
        if self.compress:  # so do they "compress": such a node never compresses
            hello["compress"] = list(self.compress)
        return self._control(T.HELLO, hello)

    def _where(self) -> str:
        return f"memory node {self.endpoint}" if self.endpoint else "the memory node"

    def receive(self, frame: Reply) -> bytes:
        if isinstance(frame.error, AuthError):
            raise AuthError(f"{self._where()}: {frame.error}; authentication failures are "
                            f"permanent, not retried", frame.error.code,
                            frame.error.request_id) from frame.error
        if frame.error is not None:
            raise frame.error
        if frame.request_id != self._waiting:
            raise ProtocolError(f"{self._where()} answered request {frame.request_id} during "
                                f"the handshake, expected {self._waiting}",
                                ErrorCode.BAD_MESSAGE, fatal=True)
        obj = frame.obj or {}
        if frame.type == T.WELCOME:
            return self._on_welcome(obj)
        if frame.type == T.AUTH_OK:
            mac = obj.get("mac")
            if self.token is None or not self._challenge:
                raise ProtocolError(f"{self._where()} sent AUTH_OK before AUTH",
                                    ErrorCode.BAD_MESSAGE, fatal=True)
            if not isinstance(mac, bytes) or not hmac.compare_digest(
                    mac, server_proof(self.token, self._challenge, self.nonce)):
                raise AuthError(f"{self._where()} could not prove it holds the cluster token: "
                                f"it is not the node you meant, or its token differs")
            return self._open()
        if frame.type == T.OPENED:
            self.generation = frame.gpa
            if self.identities is not None and self.identity_key:
                self.identities.check(self.identity_key, self.space_name, self.store_id,
                                      self.generation)
            self.space = frame.space
            self.done = True
            return b""
        raise ProtocolError(f"unexpected {type_name(frame.type)} during the handshake",
                            ErrorCode.BAD_MESSAGE, fatal=True)

    def _on_welcome(self, obj: dict[str, Any]) -> bytes:
        self.version = int(obj.get("version", 0))
        if self.version not in SUPPORTED_VERSIONS:
            raise ProtocolError(f"{self._where()} chose protocol version {self.version}, "
                                f"which this client does not speak", ErrorCode.VERSION,
                                fatal=True)
        self.peer_node = str(obj.get("node", "?"))
        self.store_id = str(obj.get("store", ""))[:64]
        self.max_space_bytes = int(obj.get("max_space_bytes", DEFAULT_MAX_SPACE_BYTES))
        picked = obj.get("compress")
        if picked is not None and picked not in self.compress:
            raise ProtocolError(f"{self._where()} chose compression {picked!r}, which this "
                                f"client did not offer", ErrorCode.BAD_MESSAGE, fatal=True)
        self.codec = picked
        if not obj.get("auth"):
            if self.token is not None:
                raise AuthError(f"{self._where()} does not authenticate (it runs with "
                                f"--insecure-no-auth, or it is not your node): refused, "
                                f"since this pager holds a cluster token. Start the node "
                                f"with --token-file (the same token as the pager's)")
            return self._open()
        if self.token is None:
            raise AuthError(f"{self._where()} requires the cluster token: pass --token-file "
                            f"(copy the node's token file, 0600)")
        challenge = obj.get("challenge")
        if not isinstance(challenge, bytes) or len(challenge) != NONCE_SIZE:
            raise ProtocolError("malformed WELCOME challenge", ErrorCode.BAD_MESSAGE,
                                fatal=True)
        self._challenge = challenge
        return self._control(T.AUTH, {
            "nonce": self.nonce, "mac": client_proof(self.token, challenge, self.nonce)})

    def _open(self) -> bytes:
        msg: dict[str, Any] = {"space": self.space_name}
        if self.epoch is not None:
            msg["epoch"] = self.epoch
        return self._control(T.OPEN, msg)


ClientHandshake = ClientSession  # the handshake is the session's first phase
