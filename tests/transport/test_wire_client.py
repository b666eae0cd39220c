"""The pager's side of the wire, sans-IO: request ids come from the session, replies must
answer the request in flight, and reconnect deadlines come from the clock it is given."""

from __future__ import annotations

import subprocess
import sys

import pytest

from transport.errors import ConnectError, ConnectionLost, ProtocolError, RemoteError
from transport.wire import (
    HEADER,
    HEADER_SIZE,
    MAX_DATA,
    Backoff,
    ClientSession,
    FrameReader,
    ServerSession,
    T,
    encode_control,
    expect_reply,
    full_data,
    pack_header,
    parse_reply_header,
    reply_from_frame,
    retryable,
    spread_pages,
)

TOKEN = b"0123456789abcdef0123456789abcdef"
PAGE = 4096


def _frames(data: bytes) -> list:
    r = FrameReader()
    r.receive_data(data)
    out = []
    while (f := r.next_frame()) is not None:
        out.append(reply_from_frame(f))
    return out


def test_handshake_ids_come_from_the_session_counter():
    client = ClientSession(TOKEN, "vm1", nonce=b"n" * 32)
    server = ServerSession(token=TOKEN, challenge=b"c" * 32)
    ids = []
    out = client.start()
    while not client.done:
        ids.append(client.awaiting)
        server.receive_data(out)
        ev = server.next_event()
        reply = {"Hello": server.welcome, "Auth": server.auth_ok}.get(type(ev).__name__)
        data = reply(ev.request_id) if reply else server.opened(ev.request_id, ev.space)
        [r] = _frames(data)
        out = client.receive(r)
    assert ids == [1, 2, 3]
    # requests continue the same counter: no id is reserved or reused
    assert client.request(T.PING)[0] == 4
    buf = bytearray(HEADER_SIZE)
    req = client.fetch_into(buf, 0, 8 * PAGE, 2 * PAGE)
    assert req == 5
    fields = HEADER.unpack(buf)
    assert fields[2:] == (T.FETCH, 1, 5, client.space, 8 * PAGE, 0, 2 * PAGE)


def test_ids_wrap_without_zero():
    client = ClientSession(None, "vm1", nonce=b"n" * 32)
    client._req = 0xFFFFFFFF
    assert client.next_id() == 1


def test_reply_to_another_request_breaks_the_handshake():
    client = ClientSession(None, "vm1", nonce=b"n" * 32, endpoint="h:1")
    client.start()
    [stale] = _frames(encode_control(T.WELCOME, 99, {"version": 1, "auth": False}))
    with pytest.raises(ProtocolError, match=r"answered request 99.*expected 1") as info:
        client.receive(stale)
    assert info.value.fatal


def test_backoff_from_an_injected_clock():
    b = Backoff(100.0, 1.0, first=0.1, cap=0.3)
    lost = ConnectionLost("gone")
    assert [b.delay(t, lost) for t in (100.0, 100.1, 100.3)] == [0.1, 0.2, 0.3]
    assert b.delay(100.9, lost) == pytest.approx(0.1)  # never past the deadline
    assert b.delay(101.0, lost) is None


@pytest.mark.parametrize("exc,again", [
    (ConnectionLost("x"), True), (ConnectError("x"), True), (OSError(104, "reset"), True),
    (RemoteError("x", 5), False), (ProtocolError("x", 1, fatal=True), False),
    (TimeoutError(), False), (BlockingIOError(11, "again"), False),
])
def test_what_is_retried(exc, again):
    assert retryable(exc) is again


def test_reply_checks():
    hdr = pack_header(T.DATA, 7, length=2 * PAGE)
    assert full_data(hdr, 7, 2 * PAGE)
    assert not full_data(hdr, 8, 2 * PAGE)
    assert not full_data(pack_header(T.DATA, 7, length=PAGE, arg=1), 7, 2 * PAGE)
    with pytest.raises(ProtocolError, match="not a reply"):
        parse_reply_header(pack_header(T.FETCH, 7))
    with pytest.raises(ProtocolError, match="oversized"):
        parse_reply_header(pack_header(T.DATA, 7, length=MAX_DATA + PAGE))
    with pytest.raises(ProtocolError, match="expected STORED"):
        expect_reply(parse_reply_header(pack_header(T.PONG, 3)), T.STORED, 3)


def test_spread_pages_puts_packed_pages_in_place():
    view = memoryview(bytearray(b"A" * PAGE + b"B" * PAGE + b"\0" * 2 * PAGE))
    spread_pages(view, 0b0101, 2 * PAGE)  # pages 0 and 2 are zero: 1 and 3 came packed
    assert bytes(view[PAGE:2 * PAGE]) == b"A" * PAGE
    assert bytes(view[3 * PAGE:]) == b"B" * PAGE


def test_base_does_not_import_tcp():
    code = ("import sys, transport.base; "
            "assert 'transport.tcp' not in sys.modules, sorted(sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
