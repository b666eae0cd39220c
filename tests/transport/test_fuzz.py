"""Fuzzing the decoders with hypothesis: generated and mutated frames, >= 10,000 of them.

Properties: the server session and the client reply reader only ever return events /
NEED_DATA or raise ProtocolError (never another exception, never a hang); every event they
let through satisfies the protocol's bounds; after a fatal error nothing more is parsed.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from transport.errors import ProtocolError
from transport.wire import (
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

FRAMES_SEEN = [0]
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
        raw += os.urandom(min(length, draw(st.integers(0, 3 * PAGE_SIZE))))
    data = bytearray(raw)
    for _ in range(draw(st.integers(0, 3))):  # bit flips
        if data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
    if draw(st.booleans()):
        data = data[:draw(st.integers(0, len(data)))]
    return bytes(data)


def authenticated_session() -> ServerSession:
    s = ServerSession(token=None, challenge=b"c" * 32)
    hs = ClientHandshake(None, "vm1", nonce=b"n" * 32)
    s.receive_data(hs.start())
    s.receive_data(encode_control(T.OPEN, 3, {"space": "vm1"}))
    s.next_event()
    s.opened(s.next_event().request_id, "vm1")
    return s


def check_server(session: ServerSession, stream: bytes, chunk: int) -> None:
    for i in range(0, len(stream), chunk):
        session.receive_data(stream[i:i + chunk])
        for _ in range(10_000):
            try:
                ev = session.next_event()
            except ProtocolError as exc:
                assert exc.code > 0
                if exc.fatal:
                    assert session.next_event() is None
                    return
                continue
            if ev is None:
                break
            if isinstance(ev, Fetch):
                assert ev.gpa % PAGE_SIZE == 0 and 0 < ev.length <= MAX_DATA
                assert ev.length % PAGE_SIZE == 0 and ev.space == "vm1"
            elif isinstance(ev, Store):
                assert ev.gpa % PAGE_SIZE == 0 and 0 < len(ev.data) <= MAX_DATA
            elif isinstance(ev, Open):
                assert valid_space_name(ev.space)
        else:
            raise AssertionError("decoder loops without consuming input")


@settings(max_examples=2500, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(st.lists(frames(), min_size=1, max_size=6), st.integers(1, 5000), st.booleans())
def test_server_decoder_survives_anything(batch, chunk, handshaken):
    FRAMES_SEEN[0] += len(batch)
    session = authenticated_session() if handshaken else ServerSession(
        token=b"t" * 32, challenge=b"c" * 32)
    check_server(session, b"".join(batch), chunk)


@settings(max_examples=1500, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(st.lists(frames(), min_size=1, max_size=6), st.integers(1, 5000))
def test_client_reply_reader_survives_anything(batch, chunk):
    FRAMES_SEEN[0] += len(batch)
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


@settings(max_examples=1000, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(st.lists(frames(), min_size=1, max_size=6))
def test_frame_reader_then_reply_decoding(batch):
    FRAMES_SEEN[0] += len(batch)
    reader = FrameReader()
    reader.receive_data(b"".join(batch))
    for _ in range(100):
        try:
            frame = reader.next_frame()
        except ProtocolError as exc:
            if exc.fatal:
                break
            continue
        if frame is None:
            break
        reply_from_frame(frame)  # control decoding never raises


def test_enough_frames_were_fuzzed():
    # runs after the three properties above (file order)
    assert FRAMES_SEEN[0] >= 10_000, FRAMES_SEEN[0]
