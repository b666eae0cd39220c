"""A page the node cannot vouch for fails its fault loudly, never read as zeros or wrong
bytes (issue 14 item 6): a node restarted on an empty store is refused by the store identity
the pager remembered, a flipped byte on the node's disk is answered CORRUPT; the client gets
SIGBUS and the pager's log says why."""

from __future__ import annotations

import signal

from enginekit import Proc, memnode_args, run_workload

from pager.tools.workload import DataSet

MIB = 1 << 20


def test_node_back_on_an_empty_store_fails_faults_not_zeros(memnode, run_pager, tmp_path):
    memnode.seed(DataSet(4 * MIB))
    proc, sock = run_pager(*memnode_args(memnode), "--fetch-timeout", "3600",
                           "--readahead", "0")
    memnode.proc.stop()
    node = Proc(["memnode", "--listen", memnode.endpoint, "--store", str(tmp_path / "empty"),
                 "--token-file", str(memnode.token_file)], tmp_path / "memnode-empty.log")
    try:
        node.wait_for(r"listening on (\S+)")
        rc, err = run_workload(sock, 4, "faults waited for a node with the wrong store")
        assert rc == -signal.SIGBUS, (rc, err[-500:])
        log = proc.log.read_text()
        assert "restarted on an empty or another store" in log and "SIGBUS" in log, \
            log[-2000:]
        assert memnode.endpoint in log
    finally:
        node.stop()


def test_a_corrupt_page_fails_its_fault_not_served(memnode, run_pager):
    memnode.seed(DataSet(4 * MIB))
    with open(memnode.store / "default.pages", "r+b") as f:  # a flipped byte on the disk
        f.seek(MIB + 123)
        b = f.read(1)
        f.seek(MIB + 123)
        f.write(bytes([b[0] ^ 1]))
    proc, sock = run_pager(*memnode_args(memnode), "--fetch-timeout", "3600",
                           "--readahead", "0")
    rc, err = run_workload(sock, 4, "faults waited for a node answering CORRUPT")
    assert rc == -signal.SIGBUS, (rc, err[-500:])
    log = proc.log.read_text()
    assert "CORRUPT" in log and "fails its checksum" in log and "SIGBUS" in log, log[-2000:]
