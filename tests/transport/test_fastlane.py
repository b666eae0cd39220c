"""The memory node's C fault lane, as real processes: a pager's fault-lane connection
(BlockingChannel, HELLO "lane": "fault") is served FETCH frames by the C loop; everything else
goes back to the Python path and is answered exactly as there."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import threading
import time

import pytest

from tests.transport.rawclient import RawClient
from tests.transport.test_memnode import BAD_FRAMES, assert_good_client, pattern
from transport.errors import TransportError
from transport.node import fastlane
from transport.tcp import BlockingChannel, TcpTransport
from transport.wire import (
    FAULT_LANE,
    MAX_DATA,
    PAGE_SIZE,
    ErrorCode,
    Reply,
    T,
    pack_header,
)

PAGE = PAGE_SIZE



@pytest.fixture(autouse=True)
def _lane_built():
    """A broken build fails every test here; it must never turn them into skips."""
    assert fastlane.lib is not None, (
        f"the C fault lane did not load ({fastlane.MISSING}): run `python3 setup.py "
        f"build_ext --inplace` (or pip install -e .)")


def threads(node) -> int:
    return len(os.listdir(f"/proc/{node.proc.pid}/task"))


def wait_threads(node, want: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while (n := threads(node)) != want and time.monotonic() < deadline:
        time.sleep(0.01)
    return n


def stats(node) -> dict:
    c = RawClient(node.endpoint).handshake(node.token)
    c.send(pack_header(T.STATS, 77))
    r = c.reply()
    c.close()
    assert r is not None and r.type == T.STATS_REPLY, r
    return r.obj


def test_fault_lane_is_served_in_c_and_counted(node_factory, tmp_path):
    node = node_factory()
    base = threads(node)
    with BlockingChannel.connect(node.endpoint, node.token, "vm1") as ch:
        assert wait_threads(node, base + 1) == base + 1  # the lane's thread, idle in recv
        data = pattern(3, 8)
        ch.store(0, data)  # a STORE goes back to Python: the lane stays there ...
        assert wait_threads(node, base) == base
        buf = bytearray(16 * PAGE)
        assert ch.fetch_into(0, buf) == 0xFF00  # ... until the next FETCH
        assert wait_threads(node, base + 1) == base + 1
        for _ in range(50):
            assert ch.fetch_into(0, buf) == 0xFF00
            assert bytes(buf[:8 * PAGE]) == data
        st = stats(node)  # the C counters are in the node's stats while the lane runs
        assert st["requests"]["fetch"]["ok"] == 51
        assert st["spaces"]["vm1"]["fetched_pages"] == 51 * 16
        assert st["spaces"]["vm1"]["zero_pages"] == 51 * 8
        assert st["requests"]["store"]["ok"] == 1
    assert wait_threads(node, base) == base  # the lane ended with the connection
    st = stats(node)  # ... and its counters were folded into the node's
    assert st["spaces"]["vm1"]["fetched_pages"] == 51 * 16
    assert st["requests"]["fetch"]["ok"] == 51
    # the same client on a node without the C lane: no extra thread, same answers
    slow = node_factory("--no-fastlane", store=tmp_path / "store2")
    base = threads(slow)
    with BlockingChannel.connect(slow.endpoint, slow.token, "vm1") as ch:
        assert ch.fetch_into(0, bytearray(PAGE)) == 1
        # a round trip on another connection: the node's loop is past any handover to C it
        # would have made for this one (where the C lane exists its thread shows at once)
        assert stats(slow)["requests"]["fetch"]["ok"] == 1
        assert threads(slow) == base


def test_old_clients_without_lane_stay_in_python(memnode):
    base = threads(memnode)
    c = RawClient(memnode.endpoint).handshake(memnode.token, "vm1")  # no "lane" in HELLO
    c.send(pack_header(T.FETCH, 9, space=c.space, arg=PAGE))
    r = c.reply()
    assert r is not None and r.type == T.DATA and r.arg == 1
    assert stats(memnode)["requests"]["fetch"]["ok"] == 1  # the loop is past any handover
    assert threads(memnode) == base
    c.close()


def exchange(node, data: bytes, replies: int, *, shut: bool = False
             ) -> tuple[list[tuple[int, int, int, int]], tuple[int, int, int, int] | None]:
    """On a fresh fault-lane connection (in C after the handshake): one good FETCH, then
    ``data``; returns (type, request id, arg, length) of the next ``replies`` replies, and
    what comes after: the reply to a PING sent then (None: the node closed)."""
    c = RawClient(node.endpoint, timeout=5).handshake(node.token, "bad", lane=FAULT_LANE)
    c.send(pack_header(T.FETCH, 1, space=c.space, arg=PAGE))
    first = c.reply()
    assert first is not None and first.type == T.DATA and first.arg == 1
    c.send(data)
    if shut:
        c.sock.shutdown(socket.SHUT_WR)
    got: list[tuple[int, int, int, int]] = []
    for _ in range(replies):
        r: Reply | None = c.reply()
        if r is None:
            break
        got.append((r.type, r.request_id, r.arg, r.length))
    if not shut:
        with contextlib.suppress(OSError):
            c.send(pack_header(T.PING, 500))
    try:
        r = c.reply()
        after = None if r is None else (r.type, r.request_id, r.arg, r.length)
    except OSError:
        after = None
    c.close()
    return got, after


def fetch(req: int, **kw) -> bytes:
    return pack_header(T.FETCH, req, flags=1, **kw)


# name: bytes sent after a good FETCH on a fault lane, replies expected
LANE_CASES: dict[str, tuple[bytes, int]] = {
    **{f"bad_{name}": (data, 1) for name, (data, _fatal, _code) in BAD_FRAMES.items()},
    "bad_magic_after_good": (fetch(2, space=1, arg=PAGE) + b"XXXX" + bytes(28), 2),
    "bad_version": (fetch(2, space=1, arg=PAGE)[:4] + b"\x07" + fetch(2, space=1, arg=PAGE)[5:],
                    1),
    "fetch_with_payload": (pack_header(T.FETCH, 2, space=1, arg=PAGE, length=8) + b"8bytes..",
                           1),
    "unknown_flags": (pack_header(T.FETCH, 2, space=1, arg=PAGE, flags=0x80), 1),
    "empty_fetch": (fetch(2, space=1, arg=0), 1),
    "space_zero": (fetch(2, space=0, arg=PAGE), 1),
    "gpa_overflow": (fetch(2, space=1, gpa=(1 << 64) - PAGE, arg=2 * PAGE), 1),
    "pipelined_mix": (fetch(2, space=1, arg=PAGE) + fetch(3, space=1, gpa=1, arg=PAGE)
                      + fetch(4, space=1, arg=MAX_DATA) + pack_header(T.PING, 5, arg=16)
                      + fetch(6, space=1, arg=3 * PAGE), 5),
    "store_then_fetch": (pack_header(T.STORE, 2, space=1, gpa=PAGE, length=PAGE)
                         + b"s" * PAGE + fetch(3, space=1, arg=2 * PAGE), 2),
    "open_second_space": (pack_header(T.OPEN, 2, length=0), 1),
    "stats_request": (pack_header(T.STATS, 2), 1),
    "split_header": (fetch(2, space=1, arg=PAGE)[:13], 0),
}


@pytest.mark.parametrize("name", sorted(LANE_CASES))
def test_every_input_answered_as_the_python_path_does(node_factory, tmp_path, name):
    data, n = LANE_CASES[name]
    fast = node_factory(store=tmp_path / "fast")
    slow = node_factory("--no-fastlane", store=tmp_path / "slow")
    for shut in (False, True):
        got_fast = exchange(fast, data, n, shut=shut)
        got_slow = exchange(slow, data, n, shut=shut)
        if name == "stats_request":  # the counters differ; the reply's shape does not
            got_fast = ([r[:3] for r in got_fast[0]], got_fast[1])
            got_slow = ([r[:3] for r in got_slow[0]], got_slow[1])
        if shut:
            assert got_fast[1] is None, got_fast  # half-closed: answered, then closed
        assert got_fast == got_slow, (shut, got_fast, got_slow)
        assert len(got_fast[0]) == n, got_fast
    assert_good_client(fast)
    assert_good_client(slow)


def test_second_space_is_served_after_open(memnode):
    c = RawClient(memnode.endpoint).handshake(memnode.token, "one", lane=FAULT_LANE)
    from transport.wire import encode_control

    c.send(encode_control(T.OPEN, 2, {"space": "two"}))
    opened = c.reply()
    assert opened is not None and opened.type == T.OPENED and opened.space == 2
    with BlockingChannel.connect(memnode.endpoint, memnode.token, "two") as ch:
        ch.store(4 * PAGE, b"2" * PAGE)
    c.send(fetch(3, space=2, gpa=4 * PAGE, arg=PAGE) + fetch(4, space=1, gpa=4 * PAGE, arg=PAGE)
           + fetch(5, space=3, arg=PAGE))
    r3, r4, r5 = c.reply(), c.reply(), c.reply()
    assert (r3.type, r3.arg, r3.length) == (T.DATA, 0, PAGE)
    assert (r4.type, r4.arg, r4.length) == (T.DATA, 1, 0)
    assert (r5.type, r5.arg) == (T.ERROR, ErrorCode.NO_SUCH_SPACE)
    c.close()


def test_stores_are_never_served_as_zero_under_concurrency(memnode):
    """Writers store pages (acknowledged after pwrite) while fault lanes in C fetch them and
    bulk lanes (asyncio, Python) stream the same space: once a store is acknowledged, no
    fetch on any lane may report that page as zero or give other bytes."""
    npages = 512
    acked = [0] * npages  # generation acknowledged per page (0: never stored)
    lock = threading.Lock()
    errors: list[BaseException] = []
    stop = threading.Event()

    def content(page: int, gen: int) -> bytes:
        return (page.to_bytes(4, "little") + gen.to_bytes(4, "little")) * (PAGE // 8)

    def writer(k: int) -> None:
        try:
            with BlockingChannel.connect(memnode.endpoint, memnode.token, "cc") as ch:
                for gen in range(1, 4):
                    for page in range(k, npages, 2):
                        ch.store(page * PAGE, content(page, gen))
                        with lock:
                            acked[page] = gen
        except BaseException as exc:
            errors.append(exc)

    def check(page: int, mask_bit: int, got: bytes, floor: int) -> None:
        if floor == 0:
            return
        assert not mask_bit, f"page {page} acknowledged (gen {floor}) but served as zero"
        gen = int.from_bytes(got[4:8], "little")
        assert got == content(page, gen) and gen >= floor, (page, gen, floor)

    def reader(k: int) -> None:
        try:
            with BlockingChannel.connect(memnode.endpoint, memnode.token, "cc") as ch:
                buf = bytearray(8 * PAGE)
                i = k
                while not stop.is_set():
                    first = (i * 13) % (npages - 8)
                    with lock:
                        floors = acked[first:first + 8]
                    mask = ch.fetch_into(first * PAGE, buf)
                    for j in range(8):
                        check(first + j, mask >> j & 1, bytes(buf[j * PAGE:(j + 1) * PAGE]),
                              floors[j])
                    i += 1
        except BaseException as exc:
            errors.append(exc)

    def bulk() -> None:
        async def main() -> None:
            async with TcpTransport(memnode.token, "cc", bulk_connections=2) as t:
                await t.connect_peer("n", memnode.endpoint)
                while not stop.is_set():
                    with lock:
                        floors = list(acked)
                    got = await t.fetch_pages(0, npages, "n", urgent=False)
                    data = bytes(got.data)
                    for p in range(npages):
                        check(p, got.zero_mask >> p & 1, data[p * PAGE:(p + 1) * PAGE],
                              floors[p])
        try:
            asyncio.run(main())
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=writer, args=(k,)) for k in range(2)]
    others = [threading.Thread(target=reader, args=(k,)) for k in range(2)]
    others.append(threading.Thread(target=bulk))
    for t in workers + others:
        t.start()
    for t in workers:
        t.join(120)
    stop.set()
    for t in others:
        t.join(60)
    assert not errors, errors[:3]
    with BlockingChannel.connect(memnode.endpoint, memnode.token, "cc") as ch:
        buf = bytearray(npages * PAGE)
        assert ch.fetch_into(0, buf) == 0
        for p in range(npages):
            assert bytes(buf[p * PAGE:(p + 1) * PAGE]) == content(p, 3)


def test_kill9_and_restart_with_the_fault_lane(node_factory, tmp_path):
    node = node_factory()
    ch = BlockingChannel.connect(node.endpoint, node.token, "k9", retry_for=20)
    data = pattern(9, 64)
    ch.store(0, data)
    buf = bytearray(128 * PAGE)
    assert ch.fetch_into(0, buf) == ((1 << 128) - 1) & ~((1 << 64) - 1)
    node.kill9()
    port = node.endpoint.rsplit(":", 1)[1]
    node.args = ["--listen", f"127.0.0.1:{port}"]
    node.start()
    buf[:] = bytes(len(buf))
    # the channel reconnects to the restarted node, again on the C lane
    assert ch.fetch_into(0, buf) == ((1 << 128) - 1) & ~((1 << 64) - 1)
    assert bytes(buf[:64 * PAGE]) == data
    ch.store(64 * PAGE, data[:PAGE])
    assert ch.fetch_into(64 * PAGE, bytearray(2 * PAGE)) == 0b10
    ch.close()
    assert_good_client(node)


def test_switch_off_by_environment(monkeypatch):
    monkeypatch.setenv(fastlane.ENV_OFF, "1")
    assert not fastlane.enabled()
    assert fastlane.enabled(True)
    monkeypatch.setenv(fastlane.ENV_OFF, "0")
    assert fastlane.enabled()


def test_node_stops_cleanly_with_a_lane_in_c(memnode):
    base = threads(memnode)
    ch = BlockingChannel.connect(memnode.endpoint, memnode.token, "stop", retry_for=0)
    assert ch.fetch_into(0, bytearray(PAGE)) == 1
    assert wait_threads(memnode, base + 1) == base + 1
    memnode.proc.terminate()
    assert memnode.proc.wait(10) == 0
    with pytest.raises(TransportError):
        ch.fetch_into(0, bytearray(PAGE))
    ch.close()


def replies_until_close(node, data: bytes) -> list[tuple[int, int, int, int]]:
    """A fault lane (in C after its first FETCH) is sent ``data`` and half-closed; every
    reply until the node closes, as (type, request id, arg, length)."""
    c = RawClient(node.endpoint, timeout=10).handshake(node.token, "fz", lane=FAULT_LANE)
    c.send(fetch(1, space=c.space, gpa=1 << 39, arg=PAGE))
    first = c.reply()
    assert first is not None and (first.type, first.arg) == (T.DATA, 1)
    c.send(data)
    c.sock.shutdown(socket.SHUT_WR)
    out = []
    while (r := c.reply()) is not None:
        out.append((r.type, r.request_id, r.arg, r.length))
    c.close()
    return out


def random_stream(rnd: random.Random) -> bytes:
    """1-6 frames: good and bad FETCHes, stores, pings, flipped bytes, truncations."""
    frames = []
    for _ in range(rnd.randint(1, 6)):
        kind = rnd.random()
        good = rnd.random() < 0.6  # a valid FETCH, maybe with one bit flipped
        gpa = rnd.choice([0, PAGE, 5 * PAGE, 1 << 39] if good else
                         [100, (1 << 40) - PAGE, 1 << 41, 1 << 63])
        arg = rnd.choice([PAGE, 2 * PAGE, 7 * PAGE, MAX_DATA] if good else
                         [0, 100, MAX_DATA + PAGE, 2 * MAX_DATA])
        space = 1 if good else rnd.choice([0, 2, 7, 1])
        if kind < 0.5:
            frame = bytearray(fetch(rnd.randrange(1 << 32), space=space, gpa=gpa, arg=arg))
            if rnd.random() < 0.5:  # one flipped bit anywhere in the header
                frame[rnd.randrange(32)] ^= 1 << rnd.randrange(8)
            frames.append(bytes(frame))
        elif kind < 0.65:
            n = rnd.choice([PAGE, 2 * PAGE])
            frames.append(pack_header(T.STORE, rnd.randrange(1 << 32), space=space,
                                      gpa=rnd.choice([0, PAGE, 5 * PAGE]), length=n)
                          + rnd.randbytes(n))
        elif kind < 0.8:
            frames.append(pack_header(T.PING, rnd.randrange(1 << 32), arg=rnd.choice([0, 64])))
        elif kind < 0.9:
            frames.append(rnd.randbytes(rnd.randint(1, 40)))
        else:
            frames.append(fetch(rnd.randrange(1 << 32), space=1, arg=PAGE)[:rnd.randint(1, 31)])
    return b"".join(frames)


def test_random_streams_answered_as_the_python_path_does(node_factory, tmp_path):
    """Differential: 400 random streams on a C fault lane and on a node without it get the
    same replies, in the same order, then the same close."""
    fast = node_factory(store=tmp_path / "fast")
    slow = node_factory("--no-fastlane", store=tmp_path / "slow")
    rnd = random.Random(20261125)
    for i in range(400):
        data = random_stream(rnd)
        got_fast = replies_until_close(fast, data)
        got_slow = replies_until_close(slow, data)
        assert got_fast == got_slow, (i, data.hex(), got_fast, got_slow)
    assert_good_client(fast)
