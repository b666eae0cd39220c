"""`ssi-pager check` and `ssi-pager bench uffd` as commands (output shape, not timings)."""

from __future__ import annotations

import json
import subprocess
import sys

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


def test_bench_uffd_json_lines():
    proc = ssi_pager("bench", "uffd", "--json", "--mib", "4", "--section-mib", "1",
                     "--refpager", "", "--cpu", "-1")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(x) for x in proc.stdout.splitlines()]
    names = [x["name"] for x in lines]
    assert names == ["uffd_copy_4k", "uffd_zeropage_4k", "uffd_copy_64k", "uffd_zeropage_64k",
                     "uffd_fault_4k", "uffd_fault_64k"]
    for x in lines:
        assert x["p50_us"] > 0 and x["p99_us"] >= x["p50_us"] and x["gbps"] > 0
    assert lines[4]["faults"] == 4 * 256
