"""Two hosts in network namespaces joined by veth, with a ~1 Gbit tbf limit on the link:
the manager warns about the slow link and the pages keep flowing correctly."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.netns import popen_in, run_in, two_hosts, unavailable

pytestmark = [pytest.mark.netns]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def netns_ok():
    reason = unavailable()
    if reason:
        pytest.skip(reason)


def start_node_in(ns: str, ip: str, tmp_path: Path) -> tuple[subprocess.Popen[str], str]:
    proc = popen_in(ns, [sys.executable, "-m", "pager.cli", "memnode", "--listen", ip,
                         "--store", str(tmp_path / "store"), "--token-file",
                         str(tmp_path / "token")], stderr=subprocess.PIPE, text=True,
                    cwd=ROOT)
    assert proc.stderr is not None
    for line in proc.stderr:
        m = re.search(r"listening on (\S+)", line)
        if m:
            return proc, m.group(1)
    proc.kill()
    raise AssertionError("memnode in namespace did not start")


@pytest.mark.slow
def test_slow_link_warned_and_work_continues(netns_ok, tmp_path):
    with two_hosts(rate="1gbit") as (ns_a, _ip_a, ns_b, ip_b):
        node, endpoint = start_node_in(ns_b, ip_b, tmp_path)
        try:
            assert endpoint.startswith(ip_b + ":")
            out = run_in(ns_a, [sys.executable, "-m", "tests.transport.netns_client", endpoint,
                                str(tmp_path / "token")], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
        finally:
            node.terminate()
            node.wait(10)
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["content_ok"]
        assert result["interface"] == "ssipg-a"
        assert result["gbps"] < 1.3  # the tbf limit holds
        assert re.search(r"transport: tcp to node-b \(10\.77\.0\.2:\d+\) tier=\w+ expected "
                         r"latency ~\d+ µs", out.stderr), out.stderr
        assert "1 Gbps network detected" in out.stderr
        assert "consider upgrading to 10G" in out.stderr
        assert "tip: RDMA" in out.stderr
        assert out.stderr.count("using TCP, not RDMA") == 1
    assert ns_a not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                      text=True).stdout


@pytest.mark.slow
def test_fast_link_no_warning(netns_ok, tmp_path):
    # the same path without the limit: no slow-link warning (ratio check within one run)
    with two_hosts() as (ns_a, _ip_a, ns_b, ip_b):
        node, endpoint = start_node_in(ns_b, ip_b, tmp_path)
        try:
            out = run_in(ns_a, [sys.executable, "-m", "tests.transport.netns_client", endpoint,
                                str(tmp_path / "token")], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
        finally:
            node.terminate()
            node.wait(10)
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["content_ok"]
        if result["gbps"] >= 2.5:
            assert "network detected" not in out.stderr
        else:  # a loaded machine can make the unshaped path look slow; say so, do not fail
            pytest.skip(f"unshaped veth measured only {result['gbps']:.2f} Gbit/s here")
