"""SSIP frames: constants, header, encoding, and the `FrameReader` that splits a byte stream.

The wire format is defined here once; `server` (the memory node's session) and `client` (the
pager's session) build on it, `cheader` renders it as ``ssip_wire.h`` for C. No sockets here:
`transport.tcp`, `transport.rdma` and the C lanes are shells.

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
* Handshake: HELLO {"versions", "node"[, "lane"][, "compress"]} -> WELCOME {"version", "auth",
  "challenge", "node", "store"[, "compress"]}; if auth: AUTH {"nonce", "mac"} -> AUTH_OK
  {"mac"} (mutual HMAC-SHA256 over the cluster token, see `client_proof`/`server_proof`); then
  OPEN {"space"[, "epoch"]} -> OPENED (space handle; ``gpa`` = the space's generation on the
  node's store). Store identity: WELCOME's "store" (the store's random id) and the generation
  tell a pager whether the node still holds the store it wrote the space to
  (`client.StoreIdentities`). Fencing: an OPEN with ``"epoch"`` (the space owner's epoch, a
  u64) raises the space's fence to it; an OPEN, STORE or FETCH under an epoch below the fence
  gets STALE_EPOCH (a pager that lost its guest to a newer owner can never overwrite newer
  pages, nor read them).
  Handles opened without an epoch are not fenced.
  Anything but HELLO/AUTH before authentication closes the connection. ``"lane": "fault"``
  marks a pager's fault thread (one request at a time; the node may serve it from C); nodes
  that do not know the key ignore it. ``"compress"``: the codecs a non-fault connection
  offers; WELCOME names the one the node picked, and from then on a STORE or DATA payload may
  be compressed, flagged COMPRESSED (a STORE's raw length in ``arg``): see `codec`.

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

from transport.errors import (
    AuthError,
    CorruptPageError,
    ProtocolError,
    RemoteError,
    StaleEpochError,
)

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
    COMPRESSED = 2  # STORE/DATA payload compressed with the connection's codec (`codec`)


KNOWN_FLAGS = int(Flag.URGENT | Flag.COMPRESSED)
CONTROL_TYPES = frozenset({T.HELLO, T.WELCOME, T.AUTH, T.AUTH_OK, T.OPEN, T.STATS_REPLY,
                           T.ERROR})
PAGE_PAYLOAD_TYPES = frozenset({T.STORE, T.DATA, T.PONG})
_TYPE_VALUES = frozenset(int(t) for t in T)


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
    STALE_EPOCH = 12  # a store under an owner's epoch older than the space's fence
    CORRUPT = 13  # a written page fails its checksum or its page file is truncated


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


def pack_header_into(buf: Any, offset: int, ftype: int, request_id: int = 0, *,
                     space: int = 0, gpa: int = 0, length: int = 0, arg: int = 0,
                     flags: int = 0) -> None:
    """`pack_header` into ``buf[offset:]`` (a reply built in place before its payload)."""
    HEADER.pack_into(buf, offset, MAGIC, VERSION, ftype, flags, request_id, space, gpa,
                     length, arg)


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
        raise ProtocolError(f"malformed {type_name(frame.type)} message: {exc}",
                            ErrorCode.BAD_MESSAGE, request_id=frame.request_id) from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{type_name(frame.type)} message is not a map",
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
        return AuthError(f"authentication refused ({name}): {message}", code,
                         frame.request_id)
    if code == ErrorCode.CORRUPT:
        return CorruptPageError(f"memory node error {name}: {message}", code, frame.request_id)
    if code == ErrorCode.STALE_EPOCH:
        return StaleEpochError(f"memory node error {name}: {message}", code, frame.request_id)
    return RemoteError(f"memory node error {name}: {message}", code, frame.request_id)


def type_name(ftype: int) -> str:
    """A frame type's name for messages (unknown numbers too)."""
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
                    else f"{type_name(ftype)} must not carry a payload")
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




def valid_space_name(name: Any) -> bool:
    return (isinstance(name, str) and 0 < len(name) <= 64 and not name.startswith(".")
            and all(c.isascii() and (c.isalnum() or c in "-_.") for c in name))


def check_space_name(name: Any, request_id: int = 0) -> str:
    """``name`` if it is a valid address space name, else a (non-fatal) BAD_MESSAGE error."""
    if not valid_space_name(name):
        raise ProtocolError(f"bad address space name {name!r}: use 1-64 characters of "
                            f"letters, digits, '-', '_', '.'", ErrorCode.BAD_MESSAGE,
                            request_id=request_id)
    return name
