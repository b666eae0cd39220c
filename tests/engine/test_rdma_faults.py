"""Guest page faults resolved through RDMA lanes, end to end with the real kernel: a memory
node serving RDMA, a pager whose selected transport is RDMA, clients faulting here.

This machine has no RDMA, so both processes run the loopback TEST DOUBLE of the verbs layer
(SSI_PAGER_RDMA_LOOPBACK=1, transport/rdma_c/loopback.c); everything above the verbs calls
(lane.c, the lane, the source, the engine, the node's RDMA service) is the production code.
"""

from __future__ import annotations

import re

import pytest
from enginekit import Memnode, Proc, memnode_args, wait_or_fail

from pager.tools.workload import Client, DataSet, Touch

MIB = 1 << 20


class RdmaMemnode(Memnode):
    def start(self, listen: str) -> None:
        self.proc = Proc(["memnode", "--listen", listen, "--store", str(self.store),
                          "--token-file", str(self.token_file), "--rdma"],
                         self.tmp / "memnode.log")
        self.endpoint = self.proc.wait_for(r"memnode: listening on (\S+)")


@pytest.fixture
def rdma_node(tmp_path, monkeypatch):
    monkeypatch.setenv("SSI_PAGER_RDMA_LOOPBACK", "1")  # inherited by the child processes
    m = RdmaMemnode(tmp_path)
    yield m
    m.proc.stop()


def test_faults_travel_over_rdma_lanes(rdma_node, run_pager, tmp_path):
    data = DataSet(8 * MIB, seed=5)
    rdma_node.seed(data)
    _, sock = run_pager(*memnode_args(rdma_node), "--chunk", "16K")
    c = Client(8 * MIB)
    c.handoff(sock)
    t = c.touch(op="read", order="rand", threads=2)
    wait_or_fail(t)
    assert c.check(data) == []
    c.close()
    log = (tmp_path / "pager.log").read_text()
    assert re.search(r"transport: rdma to \S+", log), log
    assert "not RDMA" not in log, log


def test_an_rdma_node_and_a_tcp_node_serve_one_space_together(rdma_node, run_pager, tmp_path):
    """A cluster of one RDMA node (the loopback double) and one TCP node, R=2: each node's
    transport is selected on its own, faults are served right, and with the RDMA node killed
    half way (whichever node the reads went to) every byte is still right."""
    import os
    import subprocess
    import sys

    from enginekit import ROOT, Memnode

    tcp_dir = tmp_path / "tcp"
    tcp_dir.mkdir()
    tcp_node = Memnode(tcp_dir)
    try:
        os.replace(tcp_dir / "token", tcp_dir / "own-token")  # one cluster token for both
        tcp_node.proc.stop()
        (tcp_dir / "token").write_bytes(rdma_node.token_file.read_bytes())
        (tcp_dir / "token").chmod(0o600)
        tcp_node.start(tcp_node.endpoint)
        data = DataSet(16 * MIB, seed=7)
        img = tmp_path / "mem.img"
        data.write_file(str(img))
        nodes = ["--memnode", rdma_node.endpoint, "--memnode", tcp_node.endpoint]
        r = subprocess.run([sys.executable, "-m", "pager.cli", "put", "--space", "default",
                            "--replicas", "2", "--token-file", str(rdma_node.token_file),
                            *nodes, str(img)], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        _, sock = run_pager(*nodes, "--replicas", "2", "--token-file",
                               str(rdma_node.token_file), "--chunk", "16K", "--readahead", "0")
        log = (tmp_path / "pager.log").read_text()
        assert re.search(rf"transport: rdma to \S*{re.escape(rdma_node.endpoint)}", log), log
        assert re.search(rf"transport: tcp to \S*{re.escape(tcp_node.endpoint)}", log), log
        c = Client(16 * MIB)
        c.handoff(sock)
        half = 8 * MIB
        wait_or_fail(Touch(c.base, half, threads=2, order="rand").start())
        rdma_node.proc.kill()  # the RDMA node dies: the rest comes from the TCP node
        wait_or_fail(Touch(c.base + half, half, origin=half, threads=2,
                           order="rand").start())
        assert c.check(data) == []
        c.close()
    finally:
        tcp_node.proc.stop()
