"""Fuzzing the decoders with hypothesis: generated and mutated frames, >= 10,000 of them
(each test counts the frames it fed itself, so the total holds whatever runs with it).

Properties: the server session and the client reply reader only ever return events /
NEED_DATA or raise ProtocolError (never another exception, never a hang); every event they
let through satisfies the protocol's bounds; after a fatal error nothing more is parsed.

Every byte comes from hypothesis (payloads from a drawn seed), runs are derandomized (the same
examples on every run and machine) and the health checks are on.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from transport.errors import ProtocolError
from transport.wire import (
    CONTROL_TYPES,
    MAX_CONTROL,
    MAX_DATA,
    PAGE_SIZE,
    ClientHandshake,
    Fetch,
    FrameReader,
    Open,
    ReplyReader,
    ServerSession,
    Store,
    T,
    encode_control,
    pack_header,
    reply_from_frame,
    valid_space_name,
)

TYPES = [int(t) for t in T] + [0, 16, 99, 255]


@st.composite
def frames(draw) -> bytes:
    """A frame that is valid-ish, then maybe mutated (bit flips, truncation, splicing)."""
    ftype = draw(st.sampled_from(TYPES))
    kind = draw(st.integers(0, 3))
    if kind == 0 and ftype in (T.OPEN, T.HELLO, T.AUTH):
        obj = draw(st.dictionaries(st.sampled_from(["space", "versions", "nonce", "mac", "x"]),
                                   st.one_of(st.text(max_size=70), st.binary(max_size=40),
                                             st.integers(-2**63, 2**64 - 1),
                                             st.lists(st.integers(0, 3))),
                                   max_size=4))
        raw = encode_control(ftype, draw(st.integers(0, 2**32 - 1)), obj)
    else:
        length = draw(st.sampled_from([0, 1, PAGE_SIZE, 2 * PAGE_SIZE, MAX_DATA, MAX_DATA + 1,
                                       MAX_CONTROL + 1, 2**32 - 1]))
        raw = pack_header(
            ftype, draw(st.integers(0, 2**32 - 1)), space=draw(st.integers(0, 3)),
            gpa=draw(st.sampled_from([0, 4096, 4095, 1 << 40, 2**64 - 4096])),
            length=length, arg=draw(st.sampled_from([0, 4096, 8192, 100, MAX_DATA,
                                                     MAX_DATA + 4096, 2**32 - 1])),
            flags=draw(st.sampled_from([0, 1, 2, 0xFFFF])))
        size = min(length, draw(st.integers(0, 3 * PAGE_SIZE)))
        # a drawn seed, not st.binary: hypothesis would shrink 12 KiB payloads byte by byte
        raw += random.Random(draw(st.integers(0, 2**32 - 1))).randbytes(size)
    data = bytearray(raw)
    for _ in range(draw(st.integers(0, 3))):  # bit flips
        if data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
    if draw(st.booleans()):
        data = data[:draw(st.integers(0, len(data)))]
    return bytes(data)


def fuzzed(examples: int):
    """Settings of one property: reproducible (derandomize), health checks on."""
    return settings(max_examples=examples, deadline=None, database=None, derandomize=True)


def authenticated_session() -> ServerSession:
    s = ServerSession(token=None, challenge=b"c" * 32)
    hs = ClientHandshake(None, "vm1", nonce=b"n" * 32)
    s.receive_data(hs.start())
    s.receive_data(encode_control(T.OPEN, 3, {"space": "vm1"}))
    s.next_event()
    s.opened(s.next_event().request_id, "vm1")
    return s


def drain(next_item: Callable[[], Any], limit: int) -> tuple[list[Any], bool]:
    """Everything ``next_item()`` yields until NEED_DATA, and whether it stopped on a fatal
    error. Errors must carry a code; after a fatal one nothing more comes out."""
    items: list[Any] = []
    for _ in range(limit):
        try:
            item = next_item()
        except ProtocolError as exc:
            assert exc.code > 0
            if exc.fatal:
                assert next_item() is None, "parsed after a fatal error"
                return items, True
            continue
        if item is None:
            return items, False
        items.append(item)
    raise AssertionError("decoder loops without consuming input")


def check_server(session: ServerSession, stream: bytes, chunk: int) -> None:
    for i in range(0, len(stream), chunk):
        session.receive_data(stream[i:i + chunk])
        events, fatal = drain(session.next_event, 10_000)
        for ev in events:
            if isinstance(ev, Fetch):
                assert ev.gpa % PAGE_SIZE == 0 and 0 < ev.length <= MAX_DATA
                assert ev.length % PAGE_SIZE == 0 and ev.space == "vm1"
            elif isinstance(ev, Store):
                assert ev.gpa % PAGE_SIZE == 0 and 0 < len(ev.data) <= MAX_DATA
            elif isinstance(ev, Open):
                assert valid_space_name(ev.space)
        if fatal:
            return


def test_server_decoder_survives_anything():
    seen = [0]

    @fuzzed(2500)
    @given(st.lists(frames(), min_size=1, max_size=6), st.integers(1, 5000), st.booleans())
    def prop(batch, chunk, handshaken):
        seen[0] += len(batch)
        session = authenticated_session() if handshaken else ServerSession(
            token=b"t" * 32, challenge=b"c" * 32)
        check_server(session, b"".join(batch), chunk)

    prop()
    assert seen[0] >= 5000, f"only {seen[0]} frames fuzzed"


def test_client_reply_reader_survives_anything():
    seen = [0]

    @fuzzed(1500)
    @given(st.lists(frames(), min_size=1, max_size=6), st.integers(1, 5000))
    def prop(batch, chunk):
        seen[0] += len(batch)
        r = ReplyReader()
        for req in range(8):
            r.expect_data(req, memoryview(bytearray(2 * PAGE_SIZE)))
        stream = b"".join(batch)
        pos = 0
        try:
            while pos < len(stream):
                buf = r.get_buffer()
                assert len(buf) > 0
                n = min(len(buf), chunk, len(stream) - pos)
                buf[:n] = stream[pos:pos + n]
                r.buffer_updated(n)
                pos += n
        except ProtocolError as exc:
            assert exc.fatal
        while (reply := r.next_reply()) is not None:
            assert reply.type in (T.WELCOME, T.AUTH_OK, T.OPENED, T.DATA, T.STORED, T.PONG,
                                  T.STATS_REPLY, T.ERROR)

    prop()
    assert seen[0] >= 3000, f"only {seen[0]} frames fuzzed"


def check_frame(frame: Any) -> None:
    """What the frame reader lets through is well framed and within the protocol's bounds,
    and its reply decoding never raises (errors are kept in the reply)."""
    assert frame.type in TYPES[:len(T)]
    assert len(frame.payload) == frame.length
    assert frame.length <= (MAX_CONTROL if frame.type in CONTROL_TYPES else MAX_DATA)
    reply = reply_from_frame(frame)
    assert (reply.type, reply.request_id, reply.space, reply.arg, reply.length) == (
        frame.type, frame.request_id, frame.space, frame.arg, frame.length)
    if frame.type == T.ERROR:
        assert isinstance(reply.error, Exception)
    elif frame.type in CONTROL_TYPES:
        assert (reply.obj is None) != (reply.error is None)
        assert reply.obj is None or isinstance(reply.obj, dict)
        assert reply.error is None or isinstance(reply.error, ProtocolError)
    else:
        assert reply.obj is None and reply.error is None


def test_frame_reader_then_reply_decoding():
    seen = [0]
    decoded = [0]

    @fuzzed(1000)
    @given(st.lists(frames(), min_size=1, max_size=6))
    def prop(batch):
        seen[0] += len(batch)
        reader = FrameReader()
        reader.receive_data(b"".join(batch))

        def next_frame() -> Any:
            frame = reader.next_frame()
            # frames are views into the reader's buffer: check each before the next is read
            if frame is not None:
                check_frame(frame)
                decoded[0] += 1
            return frame

        drain(next_frame, 100)

    prop()
    assert seen[0] >= 2000, f"only {seen[0]} frames fuzzed"
    assert decoded[0] >= 20, f"only {decoded[0]} frames got through the reader to be decoded"
