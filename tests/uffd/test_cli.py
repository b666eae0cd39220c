"""`ssi-pager check` and `ssi-pager bench uffd` as commands (output shape, not timings)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pager.uffd import Feature


def ssi_pager(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pager.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_check_json_reports_probed_support():
    proc = ssi_pager("check", "--json")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["usable"] is True
    assert rep["access"]["syscall"]["ok"] is True
    assert set(rep["features"]) == {m.name.lower() for m in Feature}
    anon = rep["memory"]["anonymous"]
    assert anon["missing"]["ok"] and "copy" in anon["missing"]["ioctls"]
    assert anon["minor"]["ok"] is False          # minor faults need shmem or hugetlbfs
    shmem = rep["memory"]["shmem/memfd"]
    assert "continue" in shmem["minor"]["ioctls"]
    assert "hugetlbfs" in rep["memory"]        # probed or skipped, never a crash


def test_check_table():
    proc = ssi_pager("check")
    assert proc.returncode == 0, proc.stderr
    assert "userfaultfd on Linux" in proc.stdout
    assert "anonymous    missing" in proc.stdout


def test_bench_uffd_json_lines_and_ratios(refpager_dir):
    proc = ssi_pager("bench", "uffd", "--json", "--mib", "4", "--section-mib", "1",
                     "--refpager", str(refpager_dir), "--cpu", "-1")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(x) for x in proc.stdout.splitlines()]
    ours = [x for x in lines if x["name"].startswith("uffd_")]
    refs = {x["name"]: x for x in lines if x["name"].startswith("refpager_")}
    assert [x["name"] for x in ours] == ["uffd_copy_4k", "uffd_zeropage_4k", "uffd_copy_64k",
                                         "uffd_zeropage_64k", "uffd_fault_4k", "uffd_fault_64k"]
    for x in ours:
        assert x["p50_us"] > 0 and x["p99_us"] >= x["p50_us"] and x["gbps"] > 0
        # each of ours beside the reference's figure of the same run, and their ratio
        ref = refs["refpager_" + x["name"].removeprefix("uffd_")]
        assert (x["ref_p50_us"], x["ref_gbps"]) == (ref["p50_us"], ref["gbps"])
        assert x["ratio_p50"] == pytest.approx(x["p50_us"] / ref["p50_us"], abs=0.006)
        assert x["ratio_gbps"] == pytest.approx(x["gbps"] / ref["gbps"], abs=0.006)
    assert ours[4]["faults"] == 4 * 256


def test_bench_uffd_without_the_reference_says_so(tmp_path):
    proc = ssi_pager("bench", "uffd", "--json", "--mib", "1", "--section-mib", "1",
                     "--refpager", str(tmp_path), "--cpu", "-1")
    assert proc.returncode == 1 and "refpager-local" in proc.stderr, proc.stderr
    assert proc.stdout == ""  # refused before measuring anything
    proc = ssi_pager("bench", "uffd", "--json", "--mib", "1", "--section-mib", "1", "--no-ref",
                     "--cpu", "-1")
    assert proc.returncode == 0, proc.stderr
    assert all("ratio_p50" not in json.loads(x) for x in proc.stdout.splitlines())
