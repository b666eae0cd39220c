"""Three memory nodes in three network namespaces; one is partitioned (its link goes down:
no reset, only silence) while a client's faults are served: every byte right, no SIGBUS."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from clusterkit import wait_until
from enginekit import ROOT, wait_or_fail
from nskit import cut, ns_cluster

from pager.tools.workload import Client, DataSet

MIB = 1 << 20


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    return None if shutil.which("ip") else "iproute2 is not installed"


pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(_unavailable() is not None, reason=str(_unavailable()))]


def test_partitioned_node_costs_latency_not_bytes(tmp_path, run_pager):
    with ns_cluster(3, tmp_path, ROOT) as (hs, nodes, token_file):
        data = DataSet(32 * MIB)
        args = [a for n in nodes for a in ("--memnode", n.endpoint)]
        img = tmp_path / "mem.img"
        data.write_file(str(img))
        r = subprocess.run([sys.executable, "-m", "pager.cli", "put", "--space", "default",
                            "--token-file", str(token_file), *args, str(img)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        pager, sock = run_pager(*args, "--token-file", str(token_file), "--readahead", "0",
                                "--fetch-timeout", "60")
        c = Client(32 * MIB)
        c.handoff(sock)
        t = c.touch(op="read", order="rand", threads=2)
        wait_until(lambda: t.done > t.naccess // 4 or t.wait(0), 60, "a quarter done")
        cut(hs[1][2])  # partition the second node mid-run
        wait_or_fail(t, 120)
        assert c.check(data) == []
        pager.wait_for(rf"memory node {nodes[1].endpoint} failed")
        c.close()
