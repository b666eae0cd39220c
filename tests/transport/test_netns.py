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


def shaper_stats(ns: str, dev: str) -> list[dict[str, object]]:
    """``tc -s qdisc`` of ``dev`` in ``ns`` (JSON): what the link's qdiscs did."""
    out = run_in(ns, ["tc", "-s", "-j", "qdisc", "show", "dev", dev], capture_output=True,
                 text=True, timeout=30, check=True)
    return json.loads(out.stdout)


def client_across_link(tmp_path: Path, rate: str | None
                       ) -> tuple[dict[str, object], str, list[dict[str, object]]]:
    """Memory node in namespace B, `netns_client` in A; returns (its JSON, its stderr, the
    qdisc statistics of B's end of the link, which carries the pages to A)."""
    with two_hosts(rate=rate) as (ns_a, _ip_a, ns_b, ip_b):
        node, endpoint = start_memnode(tmp_path, ip_b, ["ip", "netns", "exec", ns_b])
        try:
            assert endpoint.startswith(ip_b + ":")
            out = run_in(ns_a, [sys.executable, "-m", "tests.transport.netns_client", endpoint,
                                str(tmp_path / "token")], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
            qdiscs = shaper_stats(ns_b, "ssipg-b")
        finally:
            node.terminate()
            node.wait(10)
    assert out.returncode == 0, out.stderr
    assert ns_a not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                      text=True).stdout  # removed again
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr, qdiscs


def measured_warning(err: str) -> float | None:
    """The bandwidth quoted by the slow-link warning, None without one."""
    m = re.search(r"1 Gbps network detected \(path to node-b: ([\d.]+) Gbit/s measured\)", err)
    return float(m.group(1)) if m else None


@pytest.mark.slow
def test_slow_link_warned_and_work_continues(netns_ok, tmp_path):
    result, err, qdiscs = client_across_link(tmp_path, "1gbit")
    assert result["content_ok"]
    assert result["interface"] == "ssipg-a"
    # the tbf limit held: the shaper on the node's side queued or delayed the page stream
    (tbf,) = [q for q in qdiscs if q["kind"] == "tbf"]
    assert tbf["bytes"] > 4 << 20 and tbf["overlimits"] > 0, tbf
    assert re.search(r"transport: tcp to node-b \(10\.77\.0\.2:\d+\) tier=\w+ expected "
                     r"latency ~\d+ µs", err), err
    # the warning quotes the bandwidth the manager measured on this very link
    assert measured_warning(err) == pytest.approx(result["gbps"], abs=0.01), err
    assert "consider upgrading to 10G" in err
    assert "tip: RDMA" in err
    assert err.count("using TCP, not RDMA") == 1


@pytest.mark.slow
def test_fast_link_no_warning(netns_ok, tmp_path):
    """The same path without the limit: no shaper, and the warning follows the product's rule
    (below SLOW_MEASURED_GBPS measured) on what was measured; a loaded machine can make the
    unshaped veth measure slow, in which case the warning must say so with that figure."""
    from transport.manager import SLOW_MEASURED_GBPS
    result, err, qdiscs = client_across_link(tmp_path, None)
    assert result["content_ok"]
    assert not [q for q in qdiscs if q["kind"] in ("tbf", "netem")], qdiscs
    assert "Gbps network detected on ssipg-a" not in err  # veth's link speed is not slow
    if result["gbps"] >= SLOW_MEASURED_GBPS:
        assert "network detected" not in err, err
    else:
        assert measured_warning(err) == pytest.approx(result["gbps"], abs=0.01), err
