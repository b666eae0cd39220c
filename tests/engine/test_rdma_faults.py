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

from pager.tools.workload import Client, DataSet

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
