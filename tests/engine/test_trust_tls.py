"""A pager serves guests from a memory node over TLS 1.3 (issue 14): `memnode --tls` and
`serve --tls` with one cluster CA; every fault is served, right, by the Python paths (the C
lanes read raw sockets). Real processes, real uffd."""

from __future__ import annotations

import shutil

from enginekit import Proc, run_workload

from pager.source import MemnodeSource
from pager.tools.workload import DataSet
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
