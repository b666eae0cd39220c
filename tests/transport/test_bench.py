"""`ssi-pager bench transport` runs end to end and prints the promised JSON lines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from transport.bench import REFPAGER_SRC

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_transport_json_lines(tmp_path):
    cmd = [sys.executable, "-m", "pager.cli", "bench", "transport", "--json", "--mib", "4",
           "--count", "300", "--seconds", "0.3", "--rounds", "1"]
    if not REFPAGER_SRC.exists():
        cmd.append("--no-ref")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    lines = {x["name"]: x for x in map(json.loads, out.stdout.splitlines())}
    for name in ("fetch_4k", "fetch_64k", "fetch_4k_zero", "pipelined"):
        assert lines[name]["p50_us"] > 0 and lines[name]["p99_us"] >= lines[name]["p50_us"]
    assert lines["pipelined"]["gbps"] > 0
    if REFPAGER_SRC.exists():
        assert lines["ref_remote_4k"]["verify_bad_pages"] == 0
        assert lines["ratio_fetch_4k_p50_vs_ref_fault_4k_p50"]["ratio"] > 0
        assert lines["ratio_pipelined_gbps_vs_ref_64k_gbps"]["ratio"] > 0
