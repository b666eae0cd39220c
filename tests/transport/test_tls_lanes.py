"""TLS on the C lanes (issue 14): a TLS node's fault lanes are served by its C lane with the
session's TLS running in C (`transport.tlsc`), a pager's TLS lane hands its session to a C
loop, and a peer of another CA is refused by either side with a message naming it. Real node
processes, real sockets, real certificates."""

from __future__ import annotations

import shutil

import pytest

from transport.errors import AuthError, TlsError, TransportError
from transport.tcp import BlockingChannel, TcpTransport, run
from transport.tls import client_context, client_tls, ensure_tls_dir, use_client_tls

PAGE = 4096


def start_tls_node(node_factory, tmp_path, *args: str):
    """A TLS node, and this process's lanes given a certificate of its cluster CA."""
    d = tmp_path / "tls"
    node = node_factory("--tls", "--tls-dir", str(d), *args)
    pager = tmp_path / "pager-tls"
    pager.mkdir(mode=0o700)
    for name in ("ca.pem", "ca.key"):  # what an operator copies to a pager host
        shutil.copy(d / name, pager / name)
    use_client_tls(client_context(ensure_tls_dir(pager, name="pager", who="pager")))
    return node


@pytest.fixture
def tls_node(node_factory, tmp_path):
    yield start_tls_node(node_factory, tmp_path)
    use_client_tls(None)


def node_stats(node) -> dict:
    async def get() -> dict:
        tr = TcpTransport(node.token, "stats")
        try:
            await tr.connect_peer("n", node.endpoint)
            return await tr.stats("n")
        finally:
            await tr.close()

    return run(get())


def test_tls_fault_lane_is_served_by_the_nodes_c_lane(tls_node):
    node = tls_node
    pages = b"".join(bytes([i + 1]) * PAGE for i in range(32))
    with BlockingChannel.connect(node.endpoint, node.token, "vm") as ch:
        assert ch.tls and ch.tls_session().handle != 0
        ch.store(0, pages)  # a STORE: answered by Python (the session on memory buffers)
        buf = bytearray(64 * PAGE)
        for _ in range(40):  # FETCHes: answered by C (the session on the socket) ...
            assert ch.fetch_into(0, buf) == 0xFFFFFFFF << 32
            assert bytes(buf[:32 * PAGE]) == pages
        ch.store(32 * PAGE, pages[:PAGE])  # ... back to Python, and to C again
        for _ in range(10):
            assert ch.fetch_into(32 * PAGE, buf[:PAGE]) == 0
            assert bytes(buf[:PAGE]) == pages[:PAGE]
        assert ch.ping() > 0
    st = node_stats(node)
    assert st["tls"] is True
    # 40 requests of two frames and 10 of one, every one answered right; all but the first
    # request after each STORE (the one that brings the lane back to C) answered in C
    assert st["requests"]["fetch"]["ok"] == 90
    assert st["fastlane_fetches"] >= 90 - 2 - 1, st


def test_pager_of_another_ca_is_refused_by_the_node(tls_node, tmp_path):
    node = tls_node
    cluster = client_tls()
    rogue = ensure_tls_dir(tmp_path / "rogue", name="rogue", who="rogue")
    # trusts the node (the cluster CA) but holds a certificate of its own CA
    (rogue / "ca.pem").unlink()
    shutil.copy(tmp_path / "tls" / "ca.pem", rogue / "ca.pem")
    use_client_tls(client_context(rogue))
    with pytest.raises(TlsError, match=r"TLS .*memory node .* failed: .*(certificate|unknown ca)"):
        BlockingChannel.connect(node.endpoint, node.token, "vm", retry_for=5, timeout=5)
    use_client_tls(cluster)
    st = node_stats(node)
    assert st["requests"]["handshake"]["tls_refused"] >= 1 and st["auth_failures"] >= 1, st
    err = node.stop()
    assert "TLS handshake failed" in err and "127.0.0.1:" in err and "cluster CA" in err, err
    assert "Traceback" not in err


def test_node_of_another_ca_and_plaintext_node_are_refused_by_the_pager(node_factory,
                                                                        tmp_path):
    other = node_factory("--tls", "--tls-dir", str(tmp_path / "other"))
    use_client_tls(client_context(ensure_tls_dir(tmp_path / "mine", who="pager")))
    try:
        with pytest.raises(TlsError, match=r"TLS handshake with memory node .* failed: .*"
                                           r"certificate verify failed"):
            BlockingChannel.connect(other.endpoint, other.token, "vm", retry_for=5, timeout=5)
        plain = node_factory(store=tmp_path / "plain")  # a TLS pager, a plaintext node
        with pytest.raises(TlsError, match=r"TLS handshake with memory node .* failed: .*"
                                           r"both sides need --tls"):
            BlockingChannel.connect(plain.endpoint, plain.token, "vm", retry_for=5, timeout=5)
    finally:
        use_client_tls(None)
    err = plain.stop()
    assert "this node runs without --tls" in err, err


def test_plaintext_peer_on_a_tls_node_is_refused_and_named(node_factory, tmp_path):
    node = node_factory("--tls", "--tls-dir", str(tmp_path / "tls"))
    with pytest.raises(AuthError, match=r"memory node .* requires TLS .*connect with --tls"):
        BlockingChannel.connect(node.endpoint, node.token, "vm", retry_for=5, timeout=5)
    err = node.stop()
    assert "sent SSIP in clear to this TLS node" in err and "--tls" in err, err


def test_random_ops_on_a_tls_fault_lane_move_between_c_and_python_right(tls_node):
    """Stores (Python), fetches of one frame and pipelined ones (C), pings: the session moves
    between the node's memory buffers and its socket on every turn, and every answer is the
    model's."""
    import random

    node = tls_node
    rnd = random.Random(14)
    npages = 256
    model: dict[int, bytes] = {}
    with BlockingChannel.connect(node.endpoint, node.token, "fz") as ch:
        for i in range(300):
            op = rnd.random()
            first = rnd.randrange(npages - 64)
            if op < 0.3:
                n = rnd.randint(1, 40)
                data = rnd.randbytes(n * PAGE)
                ch.store(first * PAGE, data)
                for k in range(n):
                    model[first + k] = data[k * PAGE:(k + 1) * PAGE]
            elif op < 0.95:
                n = rnd.choice((1, 2, 16, 32, 33, 64))
                buf = bytearray(n * PAGE)
                mask = ch.fetch_into(first * PAGE, buf)
                for k in range(n):
                    want = model.get(first + k)
                    assert bool(mask >> k & 1) == (want is None), (i, k)
                    if want is not None:
                        assert buf[k * PAGE:(k + 1) * PAGE] == want, (i, k)
            else:
                assert ch.ping(rnd.choice((0, 4096))) > 0
    st = node_stats(node)
    assert st["fastlane_fetches"] > 0 and st["requests"]["store"]["ok"] > 0


def test_tls_node_stops_cleanly_with_a_lane_in_c(tls_node):
    node = tls_node
    ch = BlockingChannel.connect(node.endpoint, node.token, "stop", retry_for=0)
    for _ in range(3):
        assert ch.fetch_into(0, bytearray(PAGE)) == 1
    assert node_stats(node)["fastlane_fetches"] >= 2  # the lane is in C, its session too
    node.proc.terminate()
    assert node.proc.wait(10) == 0
    with pytest.raises(TransportError):
        ch.fetch_into(0, bytearray(PAGE))
    ch.close()
    assert "Traceback" not in node.stop()


@pytest.mark.parametrize("poll_us", ["0", "500"])
def test_tls_c_lane_blocking_and_polling(node_factory, tmp_path, poll_us):
    """The node's C lane reads its TLS session blocking (--poll-us 0) and polling (decrypted
    bytes already buffered are taken before the socket is polled): the same answers."""
    node = start_tls_node(node_factory, tmp_path, "--poll-us", poll_us)
    try:
        page = bytes(range(256)) * 16
        with BlockingChannel.connect(node.endpoint, node.token, "p") as ch:
            ch.store(0, page * 3)
            buf = bytearray(40 * PAGE)  # two frames in one send: one read may decrypt both
            for _ in range(30):
                assert ch.fetch_into(0, buf) == (1 << 40) - 1 - 0b111
                assert bytes(buf[:3 * PAGE]) == page * 3
        assert node_stats(node)["fastlane_fetches"] >= 2 * 30 - 2
    finally:
        use_client_tls(None)
