"""A real QEMU guest whose RAM lives on a cluster (etcd, three memory nodes, R=2): `vm --etcd`
runs it, `vm suspend` stores it on the cluster, `vm resume` (as on another host: the runtime
dir is gone) continues it with the uninterrupted run's checksums; once resumed, a store under
the first pager's epoch is refused by the nodes (fencing)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from test_qemu_vm import release, run_and_suspend
from vmkit import VmRun

sys.path.insert(0, str(Path(__file__).parents[1] / "engine"))  # the cluster test helpers
from clusterkit import Etcd, nodes

from pager.source.cluster import ClusterSource
from transport.errors import RemoteError
from transport.leases import Ownership
from transport.membership import EtcdMembership
from transport.token import load_token
from transport.wire import ErrorCode

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


@pytest.fixture
def cluster(tmp_path):
    etcd = Etcd(tmp_path)
    ns = nodes(tmp_path, 3, etcd.url)
    yield etcd, ns
    for n in ns:
        n.proc.stop()
    etcd.stop()


def test_guest_on_a_cluster_suspends_resumes_and_fences(waiting_guest, expected, checksums,
                                                        runtime, cluster):
    etcd, ns = cluster
    g = waiting_guest
    common = ["--etcd", etcd.url, "--replicas", "2", "--token-file", str(ns[0].token_file)]
    res1 = run_and_suspend([*common, "--name", "clu", "--", *g.qemu_args()], "clu",
                           "pass 1 waiting")
    before = res1.stdout
    assert checksums(before) == expected[:1]
    shutil.rmtree(runtime / "clu")  # resumed as on another host
    with VmRun("resume", "clu", *common, "--", *g.qemu_args()) as second:
        second.status_until("resumed")
        # the first pager owned the space under epoch 1; the resumed one took it over
        m = EtcdMembership(etcd.url)
        try:
            with pytest.raises(RemoteError) as refused:
                ClusterSource(m, load_token(ns[0].token_file), "clu", replicas=2,
                              prefer="tcp", owner=Ownership("clu", 1, "first-pager"))
        finally:
            m.close()
        assert refused.value.code == ErrorCode.STALE_EPOCH
        release(second, 1, g.passes)
        res = second.finish()
    assert res.returncode == 0, res.stderr[-2000:]
    assert checksums(before) + checksums(res.stdout) == expected
