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
def test_bench_faults_json_lines_and_ratios(refpager_dir):
    r = _run("bench", "faults", "--mib", "4", "--rss-gib", "0", "--only", "remote-4k-rand",
             "--repeat", "1", "--refpager", str(refpager_dir))
    assert r.returncode == 0, r.stderr[-2000:]
    lines = {x["name"]: x for x in map(json.loads, r.stdout.splitlines())}
    ours = lines["pager-remote-4k-rand"]
    assert ours["bad_pages"] == 0 and ours["p50_us"] > 0 and ours["gbps"] > 0
    assert ours["faults"] == 1024
    assert all(x["bad_pages"] == 0 for n, x in lines.items() if n.startswith("refpager-"))
    ratios = [x for n, x in lines.items() if n.startswith("ratio-")]
    assert "ratio-pager-remote-4k-rand-vs-refpager-remote-4k-rand" in lines
    assert len(ratios) >= 6
    for x in ratios:  # each ratio from both sides of this run, as the lines above print them
        a, b = x["name"].removeprefix("ratio-").split("-vs-")
        field = "p50_us" if x["metric"] == "p50" else "gbps"
        assert (x["ours"], x["reference"]) == (lines[a][field], lines[b][field]), x
        assert x["ratio"] == pytest.approx(x["ours"] / x["reference"], abs=0.0006), x


def test_bench_faults_refuses_a_missing_reference(tmp_path):
    r = _run("bench", "faults", "--mib", "4", "--rss-gib", "0", "--refpager", str(tmp_path))
    assert r.returncode == 1 and "refpager-remote" in r.stderr, r.stderr[-2000:]
    assert r.stdout == ""  # refused before any case ran
    r = _run("bench", "faults", "--mib", "4", "--rss-gib", "0", "--only", "remote-4k-rand",
             "--no-ref")
    assert r.returncode == 0, r.stderr[-2000:]
    assert [json.loads(x)["name"] for x in r.stdout.splitlines()] == ["pager-remote-4k-rand"]
