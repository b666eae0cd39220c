"""A pager serves guests from a memory node over TLS 1.3 (issue 14): `memnode --tls` and
`serve --tls` with one cluster CA; every fault is served, right, and by the C lanes on both
sides (the pager's C fault loop, the node's C fault lane), with no page byte in clear on the
wire. Real processes, real uffd, real sockets."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import threading

import pytest
from enginekit import Memnode, Proc, run_workload, wait_or_fail, wait_until
from test_farmem import Guest, check_run

from pager.core.region import Region
from pager.engine import FaultEngine
from pager.source import MemnodeSource
from pager.tools.workload import Client, DataSet
from pager.uffd.rmw import Rmw
from transport.tcp import TcpTransport, parse_endpoint, run
from transport.tls import client_context, ensure_tls_dir, use_client_tls
from transport.token import load_token

MIB = 1 << 20


def test_pager_serves_faults_from_a_tls_node(run_pager, tmp_path):
    node_tls, pager_tls = tmp_path / "node-tls", tmp_path / "pager-tls"
    node = Proc(["memnode", "--listen", "127.0.0.1:0", "--store", str(tmp_path / "store"),
                 "--token-file", str(tmp_path / "token"), "--tls", "--tls-dir",
                 str(node_tls)], tmp_path / "memnode.log")
    try:
        endpoint = node.wait_for(r"listening on (\S+)")
        pager_tls.mkdir(mode=0o700)
        for name in ("ca.pem", "ca.key"):  # the operator's copy to the pager host
            shutil.copy(node_tls / name, pager_tls / name)
        token = load_token(tmp_path / "token")
        use_client_tls(client_context(ensure_tls_dir(pager_tls, who="test")))
        try:  # the guest's memory, uploaded over TLS
            lane = MemnodeSource(endpoint, token, "default").open_lane()
            try:
                for off, buf in DataSet(4 * MIB).chunks():
                    lane.store_from(None, off, buf)
            finally:
                lane.close()
        finally:
            use_client_tls(None)
        src = ["--memnode", endpoint, "--token-file", str(tmp_path / "token")]
        proc, sock = run_pager(*src, "--tls", "--tls-dir", str(pager_tls))
        rc, err = run_workload(sock, 4, "faults over TLS hung")
        assert rc == 0, err[-2000:]  # the workload checks every byte it reads
        assert "SIGBUS" not in proc.log.read_text()
    finally:
        node.stop()


TLS_RECORD_TYPES = (20, 21, 22, 23)  # change_cipher_spec, alert, handshake, application_data
TLS_RECORD_MAX = (1 << 14) + 256  # the largest record payload TLS 1.3 allows


def tls_records_only(stream: bytes) -> bool:
    """Whether ``stream`` (one direction of one connection) is TLS records from its first byte
    on, each with a record type, version 3.x and a legal length, up to a last one possibly cut
    short. A plaintext frame anywhere breaks the chain at once (a SSIP header starts with "S")."""
    i = 0
    while i + 5 <= len(stream):
        length = int.from_bytes(stream[i + 3:i + 5], "big")
        if (stream[i] not in TLS_RECORD_TYPES or stream[i + 1] != 3
                or length > TLS_RECORD_MAX):
            return False
        i += 5 + length
    return True


def test_the_record_check_tells_tls_from_a_plaintext_frame():
    record = bytes([23, 3, 3]) + (100).to_bytes(2, "big") + bytes(100)
    assert tls_records_only(record * 3 + record[:7])  # the last one cut short
    assert not tls_records_only(b"SSIP" + bytes(60))
    assert not tls_records_only(record + b"SSIP" + bytes(60))  # plaintext after a record
    assert not tls_records_only(bytes([23, 3, 3, 0x48, 0x01]) + bytes(64))  # too long


class Relay:
    """A TCP relay to ``target`` recording every byte that crosses it, both ways (``seen``:
    everything in arrival order; ``streams``: each direction of each connection)."""

    def __init__(self, target: str) -> None:
        self.target = parse_endpoint(target)
        self.seen = bytearray()
        self.streams: list[bytearray] = []
        self.lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        stream = bytearray()
        with self.lock:
            self.streams.append(stream)
        try:
            while data := a.recv(1 << 16):
                with self.lock:
                    self.seen += data
                    stream += data
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.server.accept()
            except OSError:
                return
            n = socket.create_connection(self.target)
            for s in (c, n):  # forward at once, as the lanes' own sockets do
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._pump, args=(c, n), daemon=True).start()
            threading.Thread(target=self._pump, args=(n, c), daemon=True).start()

    def only_tls(self) -> bool:
        """Both directions of every connection relayed were TLS records from the first byte."""
        with self.lock:
            streams = [bytes(x) for x in self.streams]
        return len(streams) >= 2 and all(tls_records_only(x) for x in streams)

    def close(self) -> None:
        self.server.close()


def tls_node(tmp_path) -> tuple[Memnode, Relay]:
    """A memory node with TLS, this process's client TLS signed by its CA, and a relay in
    front of the node (what crosses it is recorded)."""
    node_tls, pager_tls = tmp_path / "node-tls", tmp_path / "pager-tls"
    m = Memnode(tmp_path, "127.0.0.1:0", "--tls", "--tls-dir", str(node_tls))
    pager_tls.mkdir(mode=0o700)
    for name in ("ca.pem", "ca.key"):
        shutil.copy(node_tls / name, pager_tls / name)
    use_client_tls(client_context(ensure_tls_dir(pager_tls, who="test")))
    return m, Relay(m.endpoint)


@pytest.mark.parametrize("chunk", [64 * 1024, 256 * 1024], ids=["one-frame", "pipelined"])
def test_tls_faults_are_served_by_both_c_lanes_and_never_in_clear(tmp_path, chunk):
    m, relay = tls_node(tmp_path)
    engine = c = None
    try:
        data = DataSet(8 * MIB)
        m.seed(data)
        token = load_token(m.token_file)
        engine = FaultEngine(MemnodeSource(relay.endpoint, token, "default"),
                             chunk_size=chunk, readahead=0, c_loop=True)
        c = Client(8 * MIB)
        engine.add_client(os.dup(c.uffd.fileno()), [Region(c.base, c.size, c.offset)])
        t = c.touch(threads=2, order="rand")
        wait_or_fail(t)
        assert t.mismatches == 0
        assert c.check(data) == []  # every byte right
        # the C loop folds its counters in when it returns: wait until they cover the data
        wait_until(lambda: engine.stats().copied_bytes + engine.stats().zero_pages * 4096
                   >= data.size, "the engine's counters cover the data set")
        st = engine.stats()
        # the pager's C loop served the faults, through its TLS session
        assert st.c_faults > 0 and st.c_faults >= st.faults // 2, st.as_dict()
        assert st.failed_faults == 0

        async def node_stats() -> dict:
            tr = TcpTransport(token, "stats")
            try:
                await tr.connect_peer("n", m.endpoint)
                return await tr.stats("n")
            finally:
                await tr.close()

        ns = run(node_stats())
        # ... and the node's C lane answered them, through its TLS session
        assert ns["tls"] and ns["fastlane_fetches"] >= st.c_faults // 2, ns
    finally:
        use_client_tls(None)
        if c is not None:
            c.close(unmap=True)
        if engine is not None:
            engine.close()
        relay.close()
        m.proc.stop()
    with relay.lock:
        seen = bytes(relay.seen)
    sample = bytearray(4 * MIB)
    data.fill(sample, 0)
    assert len(seen) > 4 * MIB  # the guest's pages crossed the relay ...
    for off in range(0, 4 * MIB, MIB // 4):  # ... never in clear
        probe = bytes(sample[off + 1000:off + 1064])
        if probe != bytes(64):
            assert probe not in seen, off
    assert relay.only_tls()


def test_far_memory_over_tls_writes_back_from_c_through_the_session(tmp_path):
    """A guest under a resident limit on a TLS node: the evictor's write-back from C goes
    through the lane's TLS session (never the raw socket), every value matches the model."""
    m, relay = tls_node(tmp_path)
    engine = g = None
    limit = 2 * MIB
    try:
        token = load_token(m.token_file)
        # no compression (a relay's round trips can measure as a slow tier under load): this
        # test is about write-back from C, which never drives a compressing lane
        engine = FaultEngine(MemnodeSource(relay.endpoint, token, "default", compress=()),
                             chunk_size=16384, readahead=0, c_loop=True, max_resident=limit)
        g = Guest(engine, 4 * limit)
        w = Rmw(g.map.address, g.size // 4096, threads=2, ops=3000, write_pct=50, fill=True)
        for _ in range(2):
            w.run()
            check_run(engine, g, w, limit)
        assert w.check() == 0, f"page {w.first_bad} differs from the model"
        st = engine.stats()
        assert st.failed_faults == 0 and st.store_errors == 0, st.as_dict()
        assert st.c_written_back_bytes > 0, st.as_dict()  # batches written back from C
    finally:
        use_client_tls(None)
        if engine is not None:
            engine.close()
        if g is not None:
            g.close()
        relay.close()
        m.proc.stop()
    with relay.lock:
        seen = len(relay.seen)
    assert seen > limit and relay.only_tls()  # pages crossed, never in clear
