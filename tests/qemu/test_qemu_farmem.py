"""Far memory with a real QEMU guest (tests/qemu, marked qemu): a 512 MiB guest under a
128 MiB resident limit runs its workload over 384 MiB and prints the uninterrupted run's
checksums; `status` during the run shows the limit held and real written-back bytes."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pagerkit import Pager, metrics_pager
from vmkit import VmRun

from pager.vm.bench import guest_builder

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

MIB = 1 << 20
LIMIT_MIB, MEM_MIB, WORK_MIB, PASSES = 128, 512, 384, 2
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def limited_pager(tmp_path: Path, memnode: str, token: Path) -> Iterator[Pager]:
    with metrics_pager(tmp_path, memnode, token, ("--max-resident", f"{LIMIT_MIB}M")) as p:
        yield p


def status(p: Pager) -> dict:
    hostport = p.metrics_url.removeprefix("http://").removesuffix("/metrics")
    r = subprocess.run([sys.executable, "-m", "pager.cli", "status", "--json", "--pager",
                        hostport, "--interval", "0"], capture_output=True, text=True, cwd=ROOT,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["pager"]


def test_guest_larger_than_its_limit_finishes_with_the_right_checksums(
        guest, checksums, runtime, limited_pager, memnode, token):
    g = dataclasses.replace(guest, mem_mib=MEM_MIB, work_mib=WORK_MIB, passes=PASSES,
                            wait=True)
    expected = guest_builder().expected_checksums(WORK_MIB, PASSES)
    common = ["--memnode", memnode, "--token-file", str(token), "--pager",
              str(limited_pager.socket)]
    with VmRun(*common, "--name", "far", "--", *g.qemu_args()) as run:
        run.read_until("pass 1 waiting")  # 384 MiB written once: most of it is on the node
        p = status(limited_pager)
        [guest_st] = p["guests"]
        assert guest_st["limit_bytes"] == LIMIT_MIB * MIB
        assert 0 < guest_st["resident_bytes"] <= LIMIT_MIB * MIB
        assert p["evictions"] > 0
        run.send("go")
        res = run.finish()
    assert res.returncode == 0, res.stderr[-2000:]
    assert checksums(res.stdout) == expected
    m = limited_pager.metrics()
    assert m["ssi_pager_written_back_bytes_total"] >= (WORK_MIB - LIMIT_MIB) * MIB


def test_suspend_under_a_limit_writes_only_what_the_node_lacks(
        guest, checksums, runtime, limited_pager, memnode, token):
    """Suspended after pass 1 (384 MiB written, at most 128 MiB resident), the guest's RAM
    write is at most the resident part; resumed lazily, it ends with the right checksums."""
    from test_qemu_vm import release, run_and_suspend

    g = dataclasses.replace(guest, mem_mib=MEM_MIB, work_mib=WORK_MIB, passes=PASSES,
                            wait=True)
    expected = guest_builder().expected_checksums(WORK_MIB, PASSES)
    common = ["--memnode", memnode, "--token-file", str(token), "--pager",
              str(limited_pager.socket), "--max-resident", f"{LIMIT_MIB}M"]
    res1 = run_and_suspend([*common, "--name", "farsus", "--", *g.qemu_args()], "farsus",
                           "pass 1 waiting")
    assert checksums(res1.stdout) == expected[:1]
    saved = json.loads((runtime / "farsus" / "vm.json").read_text())
    assert 0 < saved["stored_bytes"] <= LIMIT_MIB * MIB  # not the 384 MiB the guest wrote
    with VmRun("resume", "farsus", "--pager", str(limited_pager.socket), "--",
               *g.qemu_args()) as second:
        second.status_until("resumed")
        release(second, 1, g.passes)
        res = second.finish()
    assert res.returncode == 0, res.stderr[-2000:]
    assert checksums(res1.stdout) + checksums(res.stdout) == expected
