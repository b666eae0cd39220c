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

from pager.source.placement import home
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
        # partition the space's home mid-run: it serves every read until then
        eps = [n.endpoint for n in nodes]
        victim = eps.index(home("default", eps))
        cut(hs[victim][2])
        wait_or_fail(t, 120)
        assert c.check(data) == []
        pager.wait_for(rf"memory node {eps[victim]} failed")
        c.close()


def test_bulk_lanes_compress_over_a_1gbit_link(tmp_path):
    """A node behind a 1 Gbit `tc tbf` link (round trips still fast: no tier says slow): the
    transport manager measures the path's bandwidth, warns, and bulk lanes compress; fault
    lanes stay raw. Pages round-trip byte for byte."""
    from pager.service.serve import announce_source
    from pager.source.memnode import DEFAULT_NODE, MemnodeSource
    from transport.tcp import run
    from transport.token import load_token
    from transport.wire.codec import CODECS

    with ns_cluster(1, tmp_path, ROOT) as (hs, nodes, token_file):
        ns = hs[0][0]
        dev = subprocess.run(["ip", "-n", ns, "-o", "link", "show", "type", "veth"],
                             capture_output=True, text=True, check=True).stdout.split(":")[1]
        dev = dev.strip().split("@")[0]
        subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root",
                        "tbf", "rate", "1gbit", "burst", "256kb", "latency", "50ms"],
                       check=True, capture_output=True)
        src = MemnodeSource(nodes[0].endpoint, load_token(token_file), "vm1")
        try:
            run(announce_source(src))
            assert src.slow[DEFAULT_NODE], "the 1 Gbit path was not found slow"
            data = bytes(range(256)) * 16 * 256  # 1 MiB that compresses
            bulk = src.open_node_lane(DEFAULT_NODE, bulk=True)
            fault = src.open_node_lane(DEFAULT_NODE)
            try:
                assert bulk.channel.codec in CODECS and fault.channel.codec is None
                bulk.store_from(0, data)
                back = bytearray(len(data))
                assert bulk.fetch_into(0, back) == 0 and bytes(back) == data
                assert fault.fetch_into(0, back) == 0 and bytes(back) == data
            finally:
                bulk.close()
                fault.close()
        finally:
            src.close()
