"""A guest's working set recorded while it runs and replayed when it resumes (marked qemu):
the pager records the pages the guest faulted in (serve --ws-window), stores them with the
guest's space on the memory node when QEMU exits at suspend, and the resumed guest gets them
ahead of demand: the checksums are those of an uninterrupted run, the replay installed pages,
and the resumed guest took fewer faults than the same resume without a record."""

from __future__ import annotations

import dataclasses

import pytest
from pagerkit import metrics_pager
from test_qemu_vm import release, run_and_suspend
from vmkit import VmRun

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

FAULTS = 'ssi_pager_faults_total{kind="missing",outcome="fetched"}'
PREFETCHED = "ssi_pager_prefetched_bytes_total"


def _suspend_then_resume(g, p, memnode, token, name: str) -> tuple[list[str], dict, dict]:
    """Run ``g`` to its first wait, suspend, resume to the end: (checksums, metrics before
    and after the resume)."""
    common = ["--memnode", memnode, "--token-file", str(token), "--pager", str(p.socket)]
    first = run_and_suspend([*common, "--name", name, "--", *g.qemu_args()], name,
                            "pass 1 waiting")
    m0 = p.metrics()
    with VmRun("resume", name, "--pager", str(p.socket), "--", *g.qemu_args()) as second:
        second.status_until("resumed")
        release(second, 1, g.passes)
        res = second.finish()
    assert res.returncode == 0, res.stderr[-2000:]
    return first.stdout + res.stdout, m0, p.metrics()


WORK_MIB, PASSES = 24, 2


@pytest.fixture(scope="module")
def ws_guest(guest):
    """A waiting guest whose working set (boot and a 24 MiB workload) is well under half its
    256 MiB (recorded sets above ``--ws-max-fraction`` are not stored)."""
    return dataclasses.replace(guest, mem_mib=256, work_mib=WORK_MIB, passes=PASSES, wait=True)


@pytest.fixture(scope="module")
def ws_expected() -> list[str]:
    from pager.vm.bench import guest_builder
    return guest_builder().expected_checksums(WORK_MIB, PASSES)


def test_working_set_replayed_on_resume(ws_guest, ws_expected, checksums, runtime, memnode,
                                        token, tmp_path):
    g, small_expected = ws_guest, ws_expected
    with metrics_pager(tmp_path / "ws", memnode, token, ["--ws-window", "600"]) as p:
        out, m0, m1 = _suspend_then_resume(g, p, memnode, token, "wsvm")
        assert checksums(out) == small_expected
        prefetched = m1.get(PREFETCHED, 0) - m0.get(PREFETCHED, 0)
        # the workload's pages at least (rewritten before the suspend)
        assert prefetched >= WORK_MIB << 20, f"only {prefetched} bytes replayed"
        with_ws = m1.get(FAULTS, 0) - m0.get(FAULTS, 0)
    with metrics_pager(tmp_path / "lazy", memnode, token) as p:
        out, m0, m1 = _suspend_then_resume(g, p, memnode, token, "lazyvm")
        assert checksums(out) == small_expected
        assert m1.get(PREFETCHED, 0) == 0
        lazy = m1.get(FAULTS, 0) - m0.get(FAULTS, 0)
    # fewer faults: the replayed pages were installed ahead of the guest (how many fewer
    # depends on how far the replay got before the guest touched them; `bench vm` measures it)
    assert with_ws < lazy, f"{with_ws} faults with the replay, {lazy} without"
