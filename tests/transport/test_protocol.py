"""The sans-IO protocol core, driven with bytes only (no sockets)."""

from __future__ import annotations

import pytest

from transport.errors import AuthError, ProtocolError
from transport.wire import (
    HEADER_SIZE,
    MAX_DATA,
    ClientHandshake,
    ErrorCode,
    Fetch,
    FrameReader,
    Open,
    ReplyReader,
    ServerSession,
    Store,
    T,
    data_length,
    encode_control,
    pack_header,
    reply_from_frame,
    zero_mask_runs,
)

TOKEN = b"0123456789abcdef0123456789abcdef"
PAGE = 4096


def drive(server: ServerSession, client: ClientHandshake) -> list[object]:
    """Run the handshake through bytes; returns the server events seen."""
    events: list[object] = []
    out = client.start()
    replies = FrameReader()
    while not client.done:
        server.receive_data(out)
        srv_bytes = b""
        while (ev := server.next_event()) is not None:
            events.append(ev)
            if isinstance(ev, Open):
                srv_bytes += server.opened(ev.request_id, ev.space)
            elif type(ev).__name__ == "Hello":
                srv_bytes += server.welcome(ev.request_id)
            else:
                srv_bytes += server.auth_ok(ev.request_id)
        replies.receive_data(srv_bytes)
        out = b""
        while (frame := replies.next_frame()) is not None:
            out += client.receive(reply_from_frame(frame))
    return events


def test_handshake_with_mutual_auth():
    server = ServerSession(token=TOKEN, challenge=b"c" * 32)
    client = ClientHandshake(TOKEN, "vm1", nonce=b"n" * 32)
    events = drive(server, client)
    assert [type(e).__name__ for e in events] == ["Hello", "Auth", "Open"]
    assert server.authenticated and client.space == 1


def test_wrong_token_is_fatal_auth_failure():
    server = ServerSession(token=TOKEN, challenge=b"c" * 32)
    client = ClientHandshake(b"x" * 32, "vm1", nonce=b"n" * 32)
    with pytest.raises(ProtocolError) as info:
        drive(server, client)
    assert info.value.code == ErrorCode.AUTH_FAILED and info.value.fatal


def test_client_rejects_node_without_the_token():
    # a node that does not know the token cannot forge AUTH_OK
    client = ClientHandshake(TOKEN, "vm1", nonce=b"n" * 32)
    client.start()
    welcome = FrameReader()
    welcome.receive_data(encode_control(T.WELCOME, 1, {"version": 1, "auth": True,
                                                       "challenge": b"c" * 32}))
    client.receive(reply_from_frame(welcome.next_frame()))
    fake = FrameReader()
    fake.receive_data(encode_control(T.AUTH_OK, 2, {"mac": b"\0" * 32}))
    with pytest.raises(AuthError, match="prove"):
        client.receive(reply_from_frame(fake.next_frame()))


def ready_session() -> ServerSession:
    server = ServerSession(token=None, challenge=b"c" * 32)
    drive(server, ClientHandshake(None, "vm1", nonce=b"n" * 32))
    return server


def test_requests_are_validated():
    s = ready_session()
    s.receive_data(pack_header(T.FETCH, 7, space=1, gpa=8192, arg=2 * PAGE))
    ev = s.next_event()
    assert ev == Fetch(7, "vm1", 8192, 2 * PAGE, 0)
    s.receive_data(pack_header(T.STORE, 8, space=1, gpa=0, length=PAGE) + b"p" * PAGE)
    ev = s.next_event()
    assert isinstance(ev, Store) and bytes(ev.data) == b"p" * PAGE
    for frame, code in [
        (pack_header(T.FETCH, 9, space=1, gpa=1, arg=PAGE), ErrorCode.MISALIGNED),
        (pack_header(T.FETCH, 9, space=1, gpa=0, arg=100), ErrorCode.MISALIGNED),
        (pack_header(T.FETCH, 9, space=1, gpa=0, arg=0), ErrorCode.MISALIGNED),
        (pack_header(T.FETCH, 9, space=2, gpa=0, arg=PAGE), ErrorCode.NO_SUCH_SPACE),
        (pack_header(T.FETCH, 9, space=1, gpa=1 << 41, arg=PAGE), ErrorCode.OUT_OF_RANGE),
        (pack_header(T.FETCH, 9, space=1, arg=PAGE, flags=0x80), ErrorCode.BAD_FRAME),
        (pack_header(T.DATA, 9, length=0), ErrorCode.BAD_MESSAGE),
        (pack_header(200, 9, length=3) + b"abc", ErrorCode.UNKNOWN_TYPE),
    ]:
        s.receive_data(frame)
        with pytest.raises(ProtocolError) as info:
            s.next_event()
        assert info.value.code == code and not info.value.fatal and info.value.request_id == 9
    # still in sync afterwards
    s.receive_data(pack_header(T.PING, 10))
    assert s.next_event().request_id == 10


@pytest.mark.parametrize("frame,code", [
    (b"XXXX" + bytes(28), ErrorCode.BAD_FRAME),
    (pack_header(T.STORE, 1, space=1, length=MAX_DATA + 1), ErrorCode.TOO_LARGE),
    (pack_header(T.OPEN, 1, length=1 << 20), ErrorCode.TOO_LARGE),
    (b"SSIP\x09" + bytes(27), ErrorCode.VERSION),
])
def test_fatal_frames(frame, code):
    s = ready_session()
    s.receive_data(frame)
    with pytest.raises(ProtocolError) as info:
        s.next_event()
    assert info.value.code == code and info.value.fatal
    assert s.next_event() is None  # nothing more is parsed from a broken stream


def test_partial_frames_need_data():
    s = ready_session()
    frame = pack_header(T.STORE, 3, space=1, length=PAGE) + b"q" * PAGE
    for i in range(0, len(frame) - 1, 1000):
        s.receive_data(frame[i:i + 1000])
        if i + 1000 < len(frame):
            assert s.next_event() is None
    assert isinstance(s.next_event(), Store)


def test_zero_mask_runs_and_lengths():
    assert zero_mask_runs(4, 0) == [(0, 4)]
    assert zero_mask_runs(4, 0b1111) == []
    assert zero_mask_runs(6, 0b010010) == [(0, 1), (2, 2), (5, 1)]
    assert data_length(6, 0b010010) == 4 * PAGE
    assert data_length(32, 0xFFFFFFFF) == 0


def test_reply_reader_scatters_pages_into_caller_buffer():
    r = ReplyReader()
    into = bytearray(b"\xee" * 4 * PAGE)
    r.expect_data(5, memoryview(into))
    mask = 0b0101  # pages 0 and 2 are zero: only 1 and 3 travel
    wire = pack_header(T.DATA, 5, length=2 * PAGE, arg=mask) + b"A" * PAGE + b"B" * PAGE
    wire += pack_header(T.STORED, 6) + pack_header(T.PONG, 7, length=10) + b"0" * 10
    pos = 0
    while pos < len(wire):  # feed in awkward pieces
        buf = r.get_buffer()
        n = min(len(buf), 777, len(wire) - pos)
        buf[:n] = wire[pos:pos + n]
        r.buffer_updated(n)
        pos += n
    replies = [r.next_reply() for _ in range(3)]
    assert [(x.type, x.request_id) for x in replies] == [(T.DATA, 5), (T.STORED, 6),
                                                          (T.PONG, 7)]
    assert replies[0].arg == mask
    assert into[:PAGE] == b"\xee" * PAGE and into[PAGE:2 * PAGE] == b"A" * PAGE
    assert into[3 * PAGE:] == b"B" * PAGE


def test_reply_reader_rejects_inconsistent_data():
    r = ReplyReader()
    r.expect_data(5, memoryview(bytearray(2 * PAGE)))
    buf = r.get_buffer()
    buf[:HEADER_SIZE] = pack_header(T.DATA, 5, length=PAGE, arg=0)  # says 0 zero pages
    with pytest.raises(ProtocolError):
        r.buffer_updated(HEADER_SIZE)
