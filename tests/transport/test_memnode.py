"""The memory node as a real process on loopback, driven by real sockets."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
import threading
import time

import pytest

from tests.transport.rawclient import RawClient
from transport.errors import (
    AuthError,
    ConnectError,
    ConnectionLost,
    RemoteError,
    TokenError,
)
from transport.tcp import BlockingChannel
from transport.token import load_token
from transport.wire import (
    HEADER_SIZE,
    MAX_DATA,
    ErrorCode,
    T,
    encode_control,
    pack_header,
)

PAGE = 4096


def pattern(seed: int, n: int) -> bytes:
    """Distinct, checkable page contents (every page differs)."""
    fill = (bytes(range(256)) * 16)[:PAGE - 8]
    return b"".join(seed.to_bytes(4, "little") + i.to_bytes(4, "little") + fill
                    for i in range(n))


def assert_good_client(node) -> None:
    """A fresh authenticated client is served correctly."""
    with BlockingChannel.connect(node.endpoint, node.token, "probe") as ch:
        data = os.urandom(2 * PAGE)
        ch.store(8 * PAGE, data)
        buf = bytearray(4 * PAGE)
        mask = ch.fetch_into(6 * PAGE, buf)
        assert mask == 0b0011
        assert bytes(buf[2 * PAGE:]) == data


def test_round_trip_with_zero_mask(memnode):
    with BlockingChannel.connect(memnode.endpoint, memnode.token, "vm1") as ch:
        buf = bytearray(16 * PAGE)
        assert ch.fetch_into(0, buf) == 0xFFFF  # nothing written yet: all zero, no bytes
        pages = pattern(1, 3)
        ch.store(5 * PAGE, pages)
        ch.store(15 * PAGE, pages[:PAGE])
        buf[:] = b"\xaa" * len(buf)
        mask = ch.fetch_into(0, buf)
        assert mask == 0xFFFF & ~(0b111 << 5) & ~(1 << 15)
        assert bytes(buf[5 * PAGE:8 * PAGE]) == pages
        assert bytes(buf[15 * PAGE:]) == pages[:PAGE]
        # (bytes of zero pages are unspecified: the engine uses UFFDIO_ZEROPAGE for them)
        # a buffer larger than one frame is split and pipelined
        big = bytearray(300 * PAGE)
        data = os.urandom(len(big))
        ch.store(1 << 20, data)
        assert ch.fetch_into(1 << 20, big) == 0
        assert bytes(big) == data
        # spaces are separate
    with BlockingChannel.connect(memnode.endpoint, memnode.token, "vm2") as ch2:
        assert ch2.fetch_into(5 * PAGE, bytearray(PAGE)) == 1


def test_concurrent_pipelined_clients_content_checked(memnode):
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            with BlockingChannel.connect(memnode.endpoint, memnode.token,
                                         f"vm{k % 2}") as ch:
                base = k * (4 << 20)
                data = pattern(k, 256)  # 1 MiB
                ch.store(base, data)
                for _ in range(5):
                    buf = bytearray(len(data))
                    assert ch.fetch_into(base, buf) == 0
                    assert bytes(buf) == data
                    one = bytearray(PAGE)
                    assert ch.fetch_into(base + 77 * PAGE, one) == 0
                    assert bytes(one) == data[77 * PAGE:78 * PAGE]
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    stats = RawClient(memnode.endpoint).handshake(memnode.token)
    stats.send(pack_header(T.STATS, 9))
    r = stats.reply()
    assert r is not None and r.type == T.STATS_REPLY and r.obj is not None
    assert r.obj["requests"]["store"]["ok"] >= 6 * 8
    assert r.obj["spaces"]["vm0"]["pages"] == 3 * 256
    assert r.obj["stored_bytes"] == 6 * 256 * PAGE


def test_wrong_token_refused_then_good_client_served(memnode, tmp_path):
    with pytest.raises(AuthError, match="token"):
        BlockingChannel.connect(memnode.endpoint, b"not-the-token-0123456789", "vm1")
    with pytest.raises(AuthError, match="requires the cluster token"):
        BlockingChannel.connect(memnode.endpoint, None, "vm1")
    assert_good_client(memnode)


def test_unauthenticated_requests_refused(memnode):
    c = RawClient(memnode.endpoint)
    c.send(encode_control(T.HELLO, 1, {"versions": [1], "node": "x"}))
    welcome = c.reply()
    assert welcome is not None and welcome.type == T.WELCOME and welcome.obj["auth"] is True
    c.send(pack_header(T.FETCH, 2, space=1, arg=PAGE))
    err = c.reply()
    assert err is not None and err.type == T.ERROR and err.arg == ErrorCode.AUTH_REQUIRED
    assert c.at_eof()
    # a FETCH before anything, too
    c = RawClient(memnode.endpoint)
    c.send(pack_header(T.FETCH, 2, space=1, arg=PAGE))
    err = c.reply()
    assert err is not None and err.type == T.ERROR
    assert c.at_eof()
    assert_good_client(memnode)


def test_version_negotiation(memnode):
    c = RawClient(memnode.endpoint)
    c.send(encode_control(T.HELLO, 1, {"versions": [1, 7, 9], "node": "future"}))
    r = c.reply()
    assert r is not None and r.type == T.WELCOME and r.obj["version"] == 1
    c = RawClient(memnode.endpoint)
    c.send(encode_control(T.HELLO, 1, {"versions": [7, 9], "node": "future"}))
    r = c.reply()
    assert r is not None and r.arg == ErrorCode.VERSION and "upgrade" in str(r.error)
    assert c.at_eof()


def test_insecure_mode_warns_and_serves_without_token(node_factory, tmp_path):
    node = node_factory("--insecure-no-auth", store=tmp_path / "s2",
                        token_file=tmp_path / "unused")
    assert any("insecure" in line for line in node.stderr_lines)
    assert not (tmp_path / "unused").exists()
    with BlockingChannel.connect(node.endpoint, None, "vm1") as ch:
        ch.store(0, b"z" * PAGE)
        buf = bytearray(PAGE)
        assert ch.fetch_into(0, buf) == 0 and buf == b"z" * PAGE


def test_token_created_private_and_checked(memnode):
    st = os.stat(memnode.token_file)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(memnode.token_file.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(memnode.store).st_mode) == 0o700
    assert len(memnode.token) >= 32
    os.chmod(memnode.token_file, 0o644)
    with pytest.raises(TokenError, match="chmod 600"):
        load_token(memnode.token_file)


def test_a_token_path_that_is_no_token_file_is_named(tmp_path):
    """A directory (0700 or 0755) and a symbolic link: refused with the path and what to do,
    never a bare errno or a chmod that would not help."""
    for mode in (0o700, 0o755):
        d = tmp_path / f"dir{mode:o}"
        d.mkdir(mode=mode)
        with pytest.raises(TokenError, match=rf"{d} is not a regular file: pass --token-file"):
            load_token(d)
    real = tmp_path / "token"
    real.write_bytes(os.urandom(16).hex().encode())
    real.chmod(0o600)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(TokenError, match="symbolic link, and links are refused"):
        load_token(tmp_path / "link")
    assert len(load_token(real)) == 32


BAD_FRAMES = {
    # name: (bytes after an authenticated handshake, fatal?, expected error code)
    "garbage": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + os.urandom(64), True,
                ErrorCode.BAD_FRAME),
    "oversized": (pack_header(T.STORE, 5, space=1, length=1 << 30), True,
                  ErrorCode.TOO_LARGE),
    "unknown_type": (pack_header(99, 5, length=8) + b"12345678", False,
                     ErrorCode.UNKNOWN_TYPE),
    "misaligned": (pack_header(T.FETCH, 5, space=1, gpa=100, arg=PAGE), False,
                   ErrorCode.MISALIGNED),
    "out_of_range": (pack_header(T.FETCH, 5, space=1, gpa=1 << 50, arg=PAGE), False,
                     ErrorCode.OUT_OF_RANGE),
    "too_long_fetch": (pack_header(T.FETCH, 5, space=1, arg=2 * MAX_DATA), False,
                       ErrorCode.TOO_LARGE),
    "unknown_space": (pack_header(T.FETCH, 5, space=42, arg=PAGE), False,
                      ErrorCode.NO_SUCH_SPACE),
    "bad_msgpack": (pack_header(T.OPEN, 5, length=4) + b"\xc1\xc1\xc1\xc1", False,
                    ErrorCode.BAD_MESSAGE),
    "bad_space_name": (encode_control(T.OPEN, 5, {"space": "../etc"}), False,
                       ErrorCode.BAD_MESSAGE),
}


@pytest.mark.parametrize("name", sorted(BAD_FRAMES))
def test_bad_frames_answered_and_others_served(memnode, name):
    data, fatal, code = BAD_FRAMES[name]
    c = RawClient(memnode.endpoint).handshake(memnode.token)
    other = BlockingChannel.connect(memnode.endpoint, memnode.token, "other")
    c.send(data)
    err = c.reply()
    assert err is not None and err.type == T.ERROR and err.arg == code, err
    assert str(err.error)
    if fatal:
        assert c.at_eof()
    else:  # the same connection goes on
        c.send(pack_header(T.PING, 6))
        pong = c.reply()
        assert pong is not None and pong.type == T.PONG and pong.request_id == 6
    # a connection opened before keeps working, and new ones are served
    assert other.fetch_into(0, bytearray(PAGE)) == 1
    other.close()
    assert_good_client(memnode)


def test_truncated_frame_then_close(memnode):
    c = RawClient(memnode.endpoint).handshake(memnode.token)
    c.send(pack_header(T.STORE, 5, space=c.space, length=PAGE) + b"x" * 1000)
    c.sock.shutdown(socket.SHUT_WR)
    assert c.at_eof()  # nothing acknowledged, connection closed
    with BlockingChannel.connect(memnode.endpoint, memnode.token, "raw") as ch:
        assert ch.fetch_into(0, bytearray(PAGE)) == 1  # the partial store wrote nothing
    assert_good_client(memnode)


def test_half_closed_client_gets_its_replies(memnode):
    c = RawClient(memnode.endpoint).handshake(memnode.token)
    frames = pack_header(T.STORE, 10, space=c.space, length=PAGE) + b"h" * PAGE
    frames += b"".join(pack_header(T.FETCH, 11 + i, space=c.space, arg=PAGE)
                       for i in range(20))
    c.send(frames)
    c.sock.shutdown(socket.SHUT_WR)
    replies = []
    while (r := c.reply()) is not None:
        replies.append(r)
    assert [r.type for r in replies] == [T.STORED] + [T.DATA] * 20
    assert [r.request_id for r in replies] == list(range(10, 31))
    assert_good_client(memnode)


@pytest.mark.parametrize("half_close", [False, True])
def test_store_acks_batched_stay_in_request_order(memnode, half_close):
    """STORED replies of one read are sent in one write (transport/node/server.py): among
    fetches and pings, more stores than one loop turn takes, every reply still comes in
    request order, and each fetch sees the stores before it."""
    c = RawClient(memnode.endpoint).handshake(memnode.token)

    def store(req: int, page: int) -> bytes:
        return pack_header(T.STORE, req, space=c.space, gpa=page * PAGE,
                           length=PAGE) + bytes([page + 1]) * PAGE

    frames = store(1, 0) + store(2, 1)
    frames += pack_header(T.FETCH, 3, space=c.space, arg=2 * PAGE)
    frames += store(4, 2) + pack_header(T.FETCH, 5, space=c.space, gpa=2 * PAGE, arg=2 * PAGE)
    frames += pack_header(T.PING, 6)
    frames += b"".join(store(7 + i, 4 + i) for i in range(9))
    frames += pack_header(T.FETCH, 16, space=c.space, gpa=4 * PAGE, arg=12 * PAGE)
    c.send(frames)
    if half_close:
        c.sock.shutdown(socket.SHUT_WR)
    replies = [c.reply() for _ in range(16)]
    assert [r.request_id for r in replies] == list(range(1, 17))
    kinds = [r.type for r in replies]
    assert kinds == ([T.STORED] * 2 + [T.DATA, T.STORED, T.DATA, T.PONG] + [T.STORED] * 9
                     + [T.DATA])
    assert replies[2].arg == 0  # pages 0 and 1 stored before the fetch
    assert replies[4].arg == 0b10  # page 2 stored, page 3 never
    assert replies[15].arg == 0b111000000000  # pages 4-12 stored, 13-15 never
    if half_close:
        assert c.at_eof()
    c.close()
    assert_good_client(memnode)


def unread_by_node(client: socket.socket, node_port: int) -> int:
    """Bytes ``client`` sent that the node has not read: the client's send queue (SIOCOUTQ)
    plus the node's socket receive queue (from ss)."""
    import fcntl
    import struct
    import subprocess
    import termios
    outq = struct.unpack("i", fcntl.ioctl(client.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
    cport = client.getsockname()[1]
    out = subprocess.run(["ss", "-tnH", "state", "established",
                          f"( sport = :{node_port} and dport = :{cport} )"],
                         capture_output=True, text=True, timeout=10, check=True).stdout.split()
    assert out, f"no node-side socket for client port {cport}"
    return outq + int(out[0])


def test_slow_and_stalled_clients_do_not_block_others(memnode):
    slow = RawClient(memnode.endpoint).handshake(memnode.token)
    stalled = RawClient(memnode.endpoint).handshake(memnode.token)
    node_port = int(memnode.endpoint.rsplit(":", 1)[1])
    # the stalled client floods requests and never reads: the node must stop reading it
    # instead of queueing replies without bound, and keep serving everyone else
    stalled.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.sock.setblocking(False)
    one = pack_header(T.PING, 1, arg=MAX_DATA)
    flood = one * 600_000  # 19 MB of requests asking 78 GB of replies
    sent, read_by_node, stable = 0, -1, 0
    deadline = time.monotonic() + 120  # a hang guard only: the loop ends on the node's state
    while stable < 3:
        assert time.monotonic() < deadline, f"node read {read_by_node} of {sent} bytes"
        with contextlib.suppress(BlockingIOError):
            while sent < len(flood):
                sent += stalled.sock.send(flood[sent:])
        assert sent < len(flood), "node kept reading a client that never reads its replies"
        assert_good_client(memnode)  # the node's loop ran (and serves others meanwhile)
        now = sent - unread_by_node(stalled.sock, node_port)
        stable = stable + 1 if now == read_by_node else 0
        read_by_node = now
    # it stopped reading: what it read is bounded, far below what the client wanted to send
    assert 0 < read_by_node < len(flood) // 4, read_by_node
    # the slow client dribbles a request byte by byte while a good client is served
    req = pack_header(T.FETCH, 77, space=slow.space, arg=PAGE)
    for i, b in enumerate(req):
        slow.send(bytes([b]))
        if i == HEADER_SIZE // 2:
            assert_good_client(memnode)
        time.sleep(0.005)
    r = slow.reply()
    assert r is not None and r.type == T.DATA and r.request_id == 77 and r.arg == 1
    stalled.close()
    assert_good_client(memnode)


def test_handshake_timeout_closes_idle_unauthenticated(node_factory, tmp_path):
    # idle connections that never authenticate are closed; covered with a short timeout
    # through the in-process server (the CLI default is 10 s)
    import asyncio

    from transport.node.server import MemoryNode
    from transport.node.store import PageStore

    async def main() -> float:
        node = MemoryNode(PageStore(tmp_path / "st"), token=b"t" * 32, port=0,
                          handshake_timeout=0.3)
        await node.start()
        reader, _writer = await asyncio.open_connection("127.0.0.1", node.port)
        # closed by the node (the wait is a hang guard), and counted as a handshake timeout
        assert await asyncio.wait_for(reader.read(), 60) == b""
        assert node.stats()["requests"]["handshake"]["timeout"] == 1
        await node.close()

    asyncio.run(main())


def test_kill9_and_restart_keeps_every_acked_page(node_factory, tmp_path):
    node = node_factory()
    acked: dict[int, bytes] = {}
    pending: list[tuple[int, bytes]] = []  # the store in flight at the kill: may have landed
    stop = threading.Event()
    enough = threading.Event()  # set once 60 pages are acknowledged
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            ch = BlockingChannel.connect(node.endpoint, node.token, "vm9", retry_for=0)
            i = 0
            while not stop.is_set():
                gpa = (i * 7919 % 4096) * PAGE
                data = os.urandom(PAGE) if i % 3 else os.urandom(4 * PAGE)
                pending[:] = [(gpa + k * PAGE, data[k * PAGE:(k + 1) * PAGE])
                              for k in range(len(data) // PAGE)]
                ch.store(gpa, data)  # returns only after the node wrote it
                for k in range(len(data) // PAGE):
                    acked[gpa + k * PAGE] = data[k * PAGE:(k + 1) * PAGE]
                if len(acked) >= 60:
                    enough.set()
                i += 1
        except Exception as exc:
            if not stop.is_set():
                errors.append(exc)

    t = threading.Thread(target=writer)
    t.start()
    assert enough.wait(60), f"only {len(acked)} pages acknowledged: {errors}"
    node.kill9()  # while the writer is mid-flight
    stop.set()
    t.join(30)
    assert not t.is_alive()
    # the writer saw the connection die (or, if stop won the race, nothing at all)
    assert len(errors) <= 1 and all(isinstance(e, ConnectionLost | ConnectError)
                                    for e in errors), errors
    assert len(acked) >= 60
    node2 = node_factory()  # same store and token
    assert any("pages in 1 spaces" in line for line in node2.stderr_lines)
    with BlockingChannel.connect(node2.endpoint, node2.token, "vm9") as ch:
        buf = bytearray(PAGE)
        maybe = dict(pending)
        for gpa, data in acked.items():
            assert ch.fetch_into(gpa, buf) == 0, hex(gpa)
            assert buf == data or buf == maybe.get(gpa), hex(gpa)
        # never-written pages still answer zero after the restart
        assert ch.fetch_into(8192 * PAGE, buf) == 1


def test_port_auto_selection_skips_taken_ports(node_factory, tmp_path):
    # every other test node binds port 0; here the first ports of the range are held
    taken = []
    for port in range(50051, 50054):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
            taken.append(s)
        except OSError:
            s.close()  # someone else holds it: still "taken"
    try:
        node = node_factory("--listen", "127.0.0.1", store=tmp_path / "s3")
        port = int(node.endpoint.rsplit(":", 1)[1])
        assert 50054 <= port <= 50100  # the held ports skipped, still within the range
    finally:
        for s in taken:
            s.close()


def test_remote_error_names_the_problem(memnode):
    with BlockingChannel.connect(memnode.endpoint, memnode.token, "vm1") as ch:
        with pytest.raises(RemoteError, match="OUT_OF_RANGE"):
            ch.fetch_into(1 << 50, bytearray(PAGE))
        # the channel stays usable after a refused request
        assert ch.fetch_into(0, bytearray(PAGE)) == 1


def test_metrics_endpoint_reports_requests(node_factory, tmp_path):
    import re
    import urllib.request

    node = node_factory("--metrics", "127.0.0.1:0", store=tmp_path / "m")
    url = next(m.group(1) for line in node.stderr_lines
               if (m := re.search(r"metrics: (http://\S+)", line)))
    with BlockingChannel.connect(node.endpoint, node.token, "vm1") as ch:
        ch.store(0, b"q" * 2 * PAGE)
        for _ in range(7):
            ch.fetch_into(0, bytearray(PAGE))
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    assert re.search(r'ssi_memnode_requests_total\{op="fetch",result="ok"\} 7\.0', text), text
    assert re.search(r"ssi_memnode_stored_pages 2\.0", text), text


def test_blocking_channel_reconnects_after_node_restart(node_factory, tmp_path):
    node = node_factory(store=tmp_path / "rs")
    port = node.endpoint.rsplit(":", 1)[1]
    ch = BlockingChannel.connect(node.endpoint, node.token, "vm1", retry_for=15)
    ch.store(0, b"k" * PAGE)
    node.kill9()
    node_factory("--listen", f"127.0.0.1:{port}", store=tmp_path / "rs")
    buf = bytearray(PAGE)
    assert ch.fetch_into(0, buf) == 0 and buf == b"k" * PAGE  # reconnected by itself
    ch.close()


def test_idle_handshakes_are_bounded_and_real_clients_get_in(tmp_path):
    # 80 connections that never authenticate: only the newest 64 are kept open (the
    # oldest are closed), and an authenticating client is served meanwhile
    import asyncio

    from transport.node.server import MemoryNode
    from transport.node.store import PageStore
    from transport.token import ensure_token

    token = ensure_token(tmp_path / "token")

    async def main() -> None:
        node = MemoryNode(PageStore(tmp_path / "st"), token=token, port=0)
        await node.start()
        conns = [await asyncio.open_connection("127.0.0.1", node.port) for _ in range(80)]
        closed = 0
        for reader, _w in conns[:16]:
            closed += await asyncio.wait_for(reader.read(), 5) == b""
        assert closed == 16
        assert len(node.handshaking) == 64
        assert node.stats()["requests"]["handshake"]["evicted"] == 16
        ch = await asyncio.to_thread(BlockingChannel.connect, node.endpoint, token, "vm1")
        assert await asyncio.to_thread(ch.fetch_into, 0, bytearray(PAGE)) == 1
        ch.close()
        for _r, w in conns:
            w.close()
        await node.close()

    asyncio.run(main())


@pytest.mark.skipif(shutil.which("strace") is None,
                    reason="strace missing: it shows the node's fdatasync calls")
@pytest.mark.parametrize("fsync", [False, True])
def test_fsync_flag_syncs_each_store_before_acknowledging(node_factory, tmp_path, fsync):
    """--fsync: an fdatasync per acknowledged store (seen by strace on the real process);
    without it, none (a killed node still loses nothing: the kill -9 test)."""
    trace = tmp_path / "strace.log"
    node = node_factory(*(["--fsync"] if fsync else []), store=tmp_path / "fs",
                        prefix=["strace", "-f", "-qq", "-e", "trace=fdatasync,fsync,pwrite64",
                                "-o", str(trace)])
    with BlockingChannel.connect(node.endpoint, node.token, "vm1") as ch:
        for i in range(5):
            ch.store(i * 8 * PAGE, pattern(i, 2))
        buf = bytearray(2 * PAGE)
        assert ch.fetch_into(4 * 8 * PAGE, buf) == 0 and bytes(buf) == pattern(4, 2)
    node.stop()  # the trace is complete once the node and strace exited
    lines = trace.read_text().splitlines()
    syncs = [line for line in lines if "fdatasync(" in line]
    assert sum("pwrite64(" in line for line in lines) >= 5  # the trace saw the stores
    assert (len(syncs) >= 5) if fsync else (syncs == []), syncs


def test_max_space_gib_bounds_every_space(node_factory, tmp_path):
    node = node_factory("--max-space-gib", "1", store=tmp_path / "ms")
    with BlockingChannel.connect(node.endpoint, node.token, "vm1") as ch:
        last = (1 << 30) - PAGE
        ch.store(last, b"e" * PAGE)  # the last page inside 1 GiB
        buf = bytearray(PAGE)
        assert ch.fetch_into(last, buf) == 0 and buf == b"e" * PAGE
        with pytest.raises(RemoteError, match="OUT_OF_RANGE"):
            ch.fetch_into(1 << 30, buf)
        with pytest.raises(RemoteError, match="OUT_OF_RANGE"):
            ch.store(1 << 30, b"f" * PAGE)
        with pytest.raises(RemoteError, match="OUT_OF_RANGE"):
            ch.fetch_into(last, bytearray(2 * PAGE))  # straddling the limit
    # the default is far larger: the same page number is fine
    other = node_factory(store=tmp_path / "ms2")
    with BlockingChannel.connect(other.endpoint, other.token, "vm1") as ch:
        assert ch.fetch_into(1 << 30, bytearray(PAGE)) == 1
