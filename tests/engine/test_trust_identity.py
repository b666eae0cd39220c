"""A memory node restarted on an empty store fails faults loudly instead of serving zeros
(issue 14 item 6): the pager remembers the store identity it saw for its space, refuses the
node's new one, and its client gets SIGBUS with the reason in the log."""

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
