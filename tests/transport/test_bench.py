"""`ssi-pager bench transport` runs end to end beside the C reference and prints the promised
JSON lines, its ratios computed from both sides of the same run (not the goals: timing here is
noise; the lead's quiet machine checks those)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pager.cli", "bench", "transport", "--json", "--mib", "4",
           "--count", "300", "--seconds", "0.3", "--rounds", "1", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.mark.slow
def test_bench_transport_json_lines_and_ratios(refpager_dir):
    out = bench("--refpager", str(refpager_dir))
    assert out.returncode == 0, out.stderr
    lines = {x["name"]: x for x in map(json.loads, out.stdout.splitlines())}
    for name in ("fetch_4k", "fetch_64k", "fetch_4k_zero", "pipelined"):
        assert lines[name]["p50_us"] > 0 and lines[name]["p99_us"] >= lines[name]["p50_us"]
    assert lines["pipelined"]["gbps"] > 0
    assert lines["ref_remote_4k"]["verify_bad_pages"] == 0
    assert lines["ref_remote_64k"]["verify_bad_pages"] == 0
    for ratio, ours, ref in (
            ("ratio_fetch_4k_p50_vs_ref_fault_4k_p50", ("fetch_4k", "p50_us"),
             ("ref_remote_4k", "p50_us")),
            ("ratio_fetch_4k_p50_vs_ref_fetch_4k_mean", ("fetch_4k", "p50_us"),
             ("ref_remote_4k", "fetch_mean_us")),
            ("ratio_fetch_4k_p50_vs_pyclient_on_ref_node", ("fetch_4k", "p50_us"),
             ("ref_node_pyclient_4k", "p50_us")),
            ("ratio_pipelined_gbps_vs_ref_64k_gbps", ("pipelined", "gbps"),
             ("ref_remote_64k", "gbps"))):
        want = lines[ours[0]][ours[1]] / lines[ref[0]][ref[1]]
        assert lines[ratio]["ratio"] == pytest.approx(want, rel=0.01, abs=0.002), ratio


def test_bench_transport_refuses_a_missing_reference(tmp_path):
    out = bench("--refpager", str(tmp_path), "--count", "10")
    assert out.returncode == 1
    assert f"--refpager {tmp_path}: refpager-local" in out.stderr and "make -C" in out.stderr


def test_bench_transport_tls_beside_plaintext():
    out = bench("--no-ref", "--tls")
    assert out.returncode == 0, out.stderr
    lines = {(x["name"], x["label"]): x for x in map(json.loads, out.stdout.splitlines())}
    for label in ("loopback", "loopback-tls"):  # the fault path: the pager's C loop served
        fault = lines["fault_4k", label]
        assert 0 < fault["c_faults"] <= fault["faults"], fault
    for name in ("fetch_4k", "fault_4k", "fetch_4k_async", "pipelined"):
        plain, tls = lines[name, "loopback"], lines[name, "loopback-tls"]
        assert tls["p50_us"] > 0 and plain["p50_us"] > 0
        cost = lines[f"tls_cost_{name}", "loopback-tls"]["ratio"]
        want = plain["gbps"] / tls["gbps"] if "gbps" in tls else tls["p50_us"] / plain["p50_us"]
        assert cost == pytest.approx(want, rel=0.01, abs=0.002), name
