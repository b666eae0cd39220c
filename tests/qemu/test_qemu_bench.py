"""`ssi-pager bench vm` end to end on a small guest: every case runs and every guest run ends
with the uninterrupted run's checksums (the benchmark checks them and fails otherwise).
Figures are not asserted: they mean nothing on a shared test host."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

BENCH_TIMEOUT = 900
CASES = ["vm_baseline", "vm_pager_local", "vm_boot_baseline", "vm_boot_pager_local",
         "vm_resume_full_load_migration", "vm_resume_full_load_memnode", "vm_resume_lazy",
         "vm_many_pass_baseline", "vm_many_pass_pager_local", "vm_many_pass_pager_hugetlb"]
WS_CASES = [f"vm_resume_{case}_{mode}" for case in ("ws", "scatter")
            for mode in ("lazy", "prefetch", "full_load")]


def test_bench_vm_runs_every_case(guest, tmp_path):
    cmd = [sys.executable, "-m", "pager.cli", "bench", "vm", "--json", "--repeat", "1",
           "--mem-mib", "128", "--work-mib", "16", "--passes", "2", "--resume-mem-mib", "128",
           "--resume-work-mib", "16", "--no-netns", "--many-work-mib", "8", "--many-passes", "4",
           "--ws-work-mib", "16", "--scatter-work-mib", "16"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=BENCH_TIMEOUT,
                          env={**os.environ,
                               "SSI_PAGER_RUNTIME_DIR": str(tmp_path / "run")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["name"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert list(rows) == CASES + WS_CASES
    for name in WS_CASES:  # resume: first output, workload done, faults per resume
        row = rows.pop(name)
        assert 0 < row["first_s"] <= row["done_s"], row
        assert row["faults"] >= 0 and len(row["runs"]["done_s"]) == 1, row
    if "skipped" in rows["vm_many_pass_pager_hugetlb"]:  # no hugetlb pool on this host
        assert rows.pop("vm_many_pass_pager_hugetlb")["skipped"]
    for name, row in rows.items():
        assert row["wall_s"] > 0, name
        assert row["runs"] and all(t > 0 for t in row["runs"]), name
    assert rows["vm_resume_full_load_migration"]["state_bytes"] > 16 << 20, \
        "ordinary migration should carry the guest's RAM in its stream"
    assert {"ratio", "ratio_vs_migration", "goal_ratio_min"} <= set(rows["vm_resume_lazy"])
