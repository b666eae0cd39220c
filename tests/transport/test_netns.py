"""Two hosts in network namespaces joined by veth, with a ~1 Gbit tbf limit on the link:
the manager warns about the slow link and the pages keep flowing correctly."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.netns import run_in, two_hosts, unavailable
from transport.bench import start_memnode

pytestmark = [pytest.mark.netns]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def netns_ok():
    reason = unavailable()
    if reason:
        pytest.skip(reason)


def client_across_link(tmp_path: Path, rate: str | None) -> tuple[dict[str, object], str]:
    """Memory node in namespace B, `netns_client` in A; returns (its JSON, its stderr)."""
    with two_hosts(rate=rate) as (ns_a, _ip_a, ns_b, ip_b):
        node, endpoint = start_memnode(tmp_path, ip_b, ["ip", "netns", "exec", ns_b])
        try:
            assert endpoint.startswith(ip_b + ":")
            out = run_in(ns_a, [sys.executable, "-m", "tests.transport.netns_client", endpoint,
                                str(tmp_path / "token")], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
        finally:
            node.terminate()
            node.wait(10)
    assert out.returncode == 0, out.stderr
    assert ns_a not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                      text=True).stdout  # removed again
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


@pytest.mark.slow
def test_slow_link_warned_and_work_continues(netns_ok, tmp_path):
    result, err = client_across_link(tmp_path, "1gbit")
    assert result["content_ok"]
    assert result["interface"] == "ssipg-a"
    assert result["gbps"] < 1.3  # the tbf limit holds
    assert re.search(r"transport: tcp to node-b \(10\.77\.0\.2:\d+\) tier=\w+ expected "
                     r"latency ~\d+ µs", err), err
    assert "1 Gbps network detected" in err
    assert "consider upgrading to 10G" in err
    assert "tip: RDMA" in err
    assert err.count("using TCP, not RDMA") == 1


@pytest.mark.slow
def test_fast_link_no_warning(netns_ok, tmp_path):
    # the same path without the limit: no slow-link warning
    result, err = client_across_link(tmp_path, None)
    assert result["content_ok"]
    if result["gbps"] >= 2.5:
        assert "network detected" not in err
    else:  # a loaded machine can make the unshaped path look slow; say so, do not fail
        pytest.skip(f"unshaped veth measured only {result['gbps']:.2f} Gbit/s here")
