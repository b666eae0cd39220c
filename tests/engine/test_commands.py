"""The user-facing commands, run as a user would: `ssi-pager demo` and `ssi-pager bench faults`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from enginekit import ROOT


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pager.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_demo_runs_checks_and_summarises():
    r = _run("demo", "--mib", "16")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "demo: OK: 16 MiB" in r.stdout and "0 wrong pages" in r.stdout
    assert "zero pages" in r.stdout and "p50" in r.stdout and "GB/s" in r.stdout
    # the SSI-HV status lines and the progress bar
    assert "tier=" in r.stderr and "expected latency" in r.stderr
    assert "100.0%" in r.stderr


@pytest.mark.slow
def test_bench_faults_prints_json_lines():
    r = _run("bench", "faults", "--mib", "4", "--rss-gib", "0", "--only", "remote-4k-rand",
             "--refpager", "/nonexistent")
    assert r.returncode == 0, r.stderr[-2000:]
    lines = {x["name"]: x for x in map(json.loads, r.stdout.splitlines())}
    assert sorted(lines) == sorted(f"pager-remote-4k-rand{s}" for s in (
        "", "-nora", "-nora-nopoll", "-nora-busy", "-nora-nopoll-busy"))
    for x in lines.values():
        assert x["bad_pages"] == 0 and x["p50_us"] > 0 and x["gbps"] > 0, x
        assert x["faults"] == 1024
        # what the faults cost: CPU per million faults of pager and node, idle pager CPU
        assert x["pager_cpu_s_per_mfault"] >= 0 and x["node_cpu_s_per_mfault"] >= 0
        assert 0 <= x["pager_idle_cpu_pct"] < 10, x
    assert 0 < lines["pager-remote-4k-rand-nora-busy"]["busy_cpu_share"] <= 1.05
