"""A memory node that comes back with another token fails faults at once (issue 14 item 7):
authentication failures are permanent, so the engine does not wait ``--fetch-timeout`` for
a node that will never accept it; the client gets SIGBUS, and the log says why."""

from __future__ import annotations

import signal

from enginekit import Proc, memnode_args, run_workload

from pager.tools.workload import DataSet

MIB = 1 << 20


def test_node_back_with_another_token_fails_faults_without_waiting(memnode, run_pager,
                                                                    tmp_path):
    memnode.seed(DataSet(4 * MIB))
    # a fetch timeout far longer than this test may take: only a refusal ends the faults
    proc, sock = run_pager(*memnode_args(memnode), "--fetch-timeout", "3600",
                           "--readahead", "0")
    memnode.proc.stop()
    other = tmp_path / "other-token"
    other.write_bytes(b"another-cluster-token-0123456789abcdef")
    other.chmod(0o600)
    node = Proc(["memnode", "--listen", memnode.endpoint, "--store", str(memnode.store),
                 "--token-file", str(other)], tmp_path / "memnode-other.log")
    try:
        node.wait_for(r"listening on (\S+)")
        rc, err = run_workload(sock, 4, "faults waited for a node that refuses the token")
        assert rc == -signal.SIGBUS, (rc, err[-500:])
        log = proc.log.read_text()
        assert "authentication refused" in log and "SIGBUS" in log, log[-2000:]
        assert proc.p.poll() is None  # the pager itself keeps running
    finally:
        node.stop()
