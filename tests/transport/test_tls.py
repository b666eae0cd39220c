"""TLS 1.3 between pagers and memory nodes (issue 14): a node started with --tls makes the
cluster CA and its certificate on first start, serves only TLS peers holding a certificate
of that CA, and pages cross the wire encrypted (not in clear). Real node processes, real
sockets, real certificates."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading

import pytest

from transport.errors import TlsError, TransportError
from transport.tcp import BlockingChannel, TcpTransport, parse_endpoint, run
from transport.tls import client_context, ensure_tls_dir, use_client_tls

PAGE = 4096
MARK = b"SECRET-GUEST-PAGE-" * 227 + b"0123456789"  # one recognisable 4 KiB page


@pytest.fixture
def tls_node(node_factory, tmp_path):
    node = node_factory("--tls", "--tls-dir", str(tmp_path / "tls"))
    yield node, tmp_path / "tls"
    use_client_tls(None)


def test_first_start_makes_the_ca_and_a_certificate(tls_node):
    node, d = tls_node
    for name in ("ca.pem", "ca.key", "cert.pem", "key.pem"):
        assert (d / name).exists(), name
    assert (d / "ca.key").stat().st_mode & 0o077 == 0
    assert (d / "key.pem").stat().st_mode & 0o077 == 0
    assert any("TLS 1.3" in line for line in node.stderr_lines)


def test_pages_cross_encrypted_and_both_lanes_work(tls_node, tmp_path):
    node, d = tls_node
    pager_dir = tmp_path / "pager-tls"
    pager_dir.mkdir(mode=0o700)
    for name in ("ca.pem", "ca.key"):  # what an operator copies to a pager host
        shutil.copy(d / name, pager_dir / name)
    use_client_tls(client_context(ensure_tls_dir(pager_dir, name="pager", who="pager")))
    # a relay between pager and node records every byte on the wire
    seen = bytearray()
    relay = socket.create_server(("127.0.0.1", 0))
    host, port = parse_endpoint(node.endpoint)

    def pump(a: socket.socket, b: socket.socket) -> None:
        while data := a.recv(65536):
            seen.extend(data)
            b.sendall(data)
        b.shutdown(socket.SHUT_WR)

    def serve() -> None:
        c, _ = relay.accept()
        n = socket.create_connection((host, port))
        threading.Thread(target=pump, args=(n, c), daemon=True).start()
        pump(c, n)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    via = f"127.0.0.1:{relay.getsockname()[1]}"
    with BlockingChannel.connect(via, node.token, "vm") as ch:
        assert ch.tls
        ch.store(0, MARK)
        buf = bytearray(PAGE)
        assert ch.fetch_into(0, buf) == 0 and buf == MARK
    t.join(10)
    relay.close()
    assert len(seen) > 2 * PAGE and b"SECRET-GUEST-PAGE" not in seen and b"SSIP" not in seen

    async def bulk() -> bytes:  # the asyncio lanes (bulk transfers)
        tr = TcpTransport(node.token, "vm")
        try:
            await tr.connect_peer("n", node.endpoint)
            await tr.send_pages(PAGE, MARK * 4, "n")
            out = bytearray(5 * PAGE)
            await tr.fetch_pages(0, 5, "n", out)
            return bytes(out)
        finally:
            await tr.close()

    assert run(bulk()) == MARK * 5


def test_a_peer_without_a_cluster_certificate_is_refused(tls_node, tmp_path):
    node, _d = tls_node
    # plaintext to a TLS node: no session (the node never answers SSIP in clear)
    with pytest.raises(TransportError):
        BlockingChannel.connect(node.endpoint, node.token, "vm", retry_for=0, timeout=3)
    # TLS with a certificate of another CA: refused, permanently
    use_client_tls(client_context(ensure_tls_dir(tmp_path / "rogue", who="rogue")))
    with pytest.raises(TlsError, match=r"TLS handshake .* failed"):
        BlockingChannel.connect(node.endpoint, node.token, "vm", retry_for=5, timeout=3)


def test_memnode_with_a_ca_key_alone_refuses_to_start_clearly(tmp_path):
    d = tmp_path / "tls"
    d.mkdir(mode=0o700)
    (d / "ca.key").write_bytes(b"x")
    p = subprocess.run([sys.executable, "-m", "pager.cli", "memnode", "--listen",
                        "127.0.0.1:0", "--store", str(tmp_path / "s"), "--token-file",
                        str(tmp_path / "t"), "--tls", "--tls-dir", str(d)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    assert "ca.key without ca.pem" in p.stderr and "Traceback" not in p.stderr, p.stderr
