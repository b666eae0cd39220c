"""`bench vm` cases for working sets and many-pass guests (run by `pager.vm.bench`).

  vm_many_pass_baseline / vm_many_pass_pager_local / vm_many_pass_pager_hugetlb
        a guest that makes many passes over a working set much smaller than its RAM, under
        plain QEMU (anonymous RAM: transparent huge pages), with all RAM behind the pager
        (shared memfd, 4 KiB pages), and behind the pager on 2 MiB pages (`vm --hugetlb`,
        skipped with the reason when the hugetlb pool cannot be reserved); ratio goal <= 1.10.
        Once every page is resident the pager does nothing, so what remains between the first
        two is the page size: the TLB reach of 4 KiB pages against huge pages.
  vm_resume_ws_lazy / vm_resume_ws_prefetch / vm_resume_ws_full_load
        suspend after pass 1, resume: on demand; on demand with the working set the pager
        recorded (serve --ws-window) replayed ahead of faults; all stored RAM loaded before
        `cont`. Each reports ``first_s`` (resume start to the guest's first output),
        ``done_s`` (to the workload done: QEMU's exit), ``faults`` (faults the pager served
        for the resumed guest) and ``fault_mean_us`` (their mean service time), medians of
        --repeat runs, the three modes interleaved run by run.
Goals (issue 12): prefetch done_s <= lazy done_s / 2, faults <= lazy faults / 10, first_s no
later than lazy.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import re
import statistics
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from pager.errors import VmError
from tuning.errors import HugePagesError
from tuning.hugepages import pages_for, reserved

log = logging.getLogger(__name__)

METRICS_URL = re.compile(r"metrics: (http://\S+)")
FAULTS_RE = re.compile(r'^ssi_pager_faults_total\{kind="missing",outcome="(\w+)"\} (\S+)$',
                       re.M)
DURATION_SUM_RE = re.compile(r"^ssi_pager_fault_duration_seconds_sum (\S+)$", re.M)
DURATION_COUNT_RE = re.compile(r"^ssi_pager_fault_duration_seconds_count (\S+)$", re.M)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--many-work-mib", type=int, default=64,
                        help="working set of the many-pass guest (default 64, RAM --mem-mib)")
    parser.add_argument("--many-passes", type=int, default=16,
                        help="passes of the many-pass guest (default 16)")
    parser.add_argument("--ws-work-mib", type=int, default=256,
                        help="workload of the working-set resume cases (default 256, RAM "
                             "--resume-mem-mib)")
    parser.add_argument("--ws-window", type=float, default=60.0,
                        help="serve --ws-window of the prefetch case (default 60 s)")
    parser.add_argument("--scatter-work-mib", type=int, default=256,
                        help="workload of the scattered-touch resume cases (default 256)")
    parser.add_argument("--no-ws", action="store_true",
                        help="skip the many-pass and working-set cases")
    parser.add_argument("--ws-only", action="store_true",
                        help="run only the many-pass and working-set cases")


def fault_counters(url: str) -> tuple[float, float, float]:
    """(missing faults served, fault service seconds summed, faults timed) of the pager at
    metrics ``url`` so far."""
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    faults = sum(float(v) for _o, v in FAULTS_RE.findall(text))
    m_sum, m_count = DURATION_SUM_RE.search(text), DURATION_COUNT_RE.search(text)
    return (faults, float(m_sum.group(1)) if m_sum else 0.0,
            float(m_count.group(1)) if m_count else 0.0)


def metrics_url(logf: Path, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = METRICS_URL.search(logf.read_text(errors="replace")) if logf.exists() else None
        if m:
            return m.group(1)
        time.sleep(0.05)
    raise VmError(f"the pager printed no metrics URL in {logf}")


def run(args: argparse.Namespace, gb: ModuleType, work: Path, token: Path, reps: int) -> None:
    """Both groups of cases, with pager.vm.bench's services and runs."""
    if args.no_ws:
        return
    from pager.vm import bench  # it runs us: imported when both are loaded

    many_pass(args, gb, work, token, reps, bench)
    guest = dataclasses.replace(gb.build(args.resume_mem_mib, args.ws_work_mib, args.passes),
                                wait=True)
    resume_ws(args, guest, gb.expected_checksums(args.ws_work_mib, args.passes), "ws", work,
              token, reps, bench)
    scatter = dataclasses.replace(gb.build(args.resume_mem_mib, args.scatter_work_mib,
                                           args.passes), scatter=True, wait=True)
    resume_ws(args, scatter, gb.expected_checksums(args.scatter_work_mib, args.passes, True),
              "scatter", work, token, reps, bench)


def many_pass(args: argparse.Namespace, gb: ModuleType, work: Path, token: Path, reps: int,
              bench: ModuleType) -> None:
    guest = gb.build(args.mem_mib, args.many_work_mib, args.many_passes)
    expected = gb.expected_checksums(args.many_work_mib, args.many_passes)
    argv = guest.qemu_args()
    base: list[float] = []
    walls: list[float] = []
    huge: list[float] = []
    why = ""
    (work / "many").mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(reserved(pages_for(args.mem_mib << 20, 2 << 20) + 2))
        except HugePagesError as exc:
            why = str(exc)
        endpoint, sock = stack.enter_context(
            bench.services(work / "many", token, pager_args=args.pager_arg))
        a = bench.vm_args(endpoint, token, sock)
        ah = bench.vm_args(endpoint, token, sock, hugetlb=True)
        for i in range(reps):  # interleaved: host load drifts
            wall, out = bench.run_plain(argv)
            bench.check(out, expected, "many-pass baseline")
            base.append(wall)
            wall, out = bench.run_paged(a, argv, f"bench-many-{i}")
            bench.check(out, expected, "many-pass guest under the pager")
            walls.append(wall)
            if not why:
                wall, out = bench.run_paged(ah, argv, f"bench-many-huge-{i}")
                bench.check(out, expected, "many-pass guest on huge pages under the pager")
                huge.append(wall)
    b, w = statistics.median(base), statistics.median(walls)
    bench.emit({"name": "vm_many_pass_baseline", "wall_s": round(b, 3), "ratio": 1.0,
                "runs": base, "mem_mib": args.mem_mib, "work_mib": args.many_work_mib,
                "passes": args.many_passes})
    bench.emit({"name": "vm_many_pass_pager_local", "wall_s": round(w, 3),
                "ratio": round(w / b, 3), "runs": walls, "goal_ratio_max": 1.10})
    if why:
        bench.emit({"name": "vm_many_pass_pager_hugetlb", "skipped": why})
    else:
        h = statistics.median(huge)
        bench.emit({"name": "vm_many_pass_pager_hugetlb", "wall_s": round(h, 3),
                    "ratio": round(h / b, 3), "runs": huge, "goal_ratio_max": 1.10})


def _marker(mark: list[tuple[float, float, float]], url: str) -> Callable[[], None]:
    """Appends the pager's fault counters to ``mark`` when called (just before a resume)."""
    return lambda: mark.append(fault_counters(url))


def resume_ws(args: argparse.Namespace, guest: Any, expected: list[str], case: str, work: Path,
              token: Path, reps: int, bench: ModuleType) -> None:
    """The lazy, prefetch and full-load resume cases ``vm_resume_{case}_*`` of ``guest``."""
    modes: dict[str, tuple[list[str], bool]] = {
        "lazy": ([], False),
        "prefetch": (["--ws-window", str(args.ws_window)], False),
        "full_load": ([], True),
    }
    rows: dict[str, dict[str, list[float]]] = {}
    with contextlib.ExitStack() as stack:
        served: dict[str, tuple[argparse.Namespace, str]] = {}
        for mode, (extra, _eager) in modes.items():
            d = work / f"{case}-{mode}"
            d.mkdir(parents=True, exist_ok=True)
            pager_args = [*args.pager_arg, "--metrics", "127.0.0.1:0", *extra]
            endpoint, sock = stack.enter_context(
                bench.services(d, token, pager_args=pager_args))
            served[mode] = (bench.vm_args(endpoint, token, sock), metrics_url(d / "pager.log"))
        for i in range(reps):  # the modes interleaved: host load drifts over minutes
            for mode, (_extra, eager) in modes.items():
                a, url = served[mode]
                times: dict[str, float] = {}
                mark: list[tuple[float, float, float]] = []
                _, out = bench.resume_lazy(a, guest, f"bench-{case}-{mode}-{i}", eager=eager,
                                           times=times, before_resume=_marker(mark, url))
                bench.check(out, expected, f"{mode} resume")
                faults, lat_sum, lat_count = (
                    x - y for x, y in zip(fault_counters(url), mark[0], strict=True))
                row = rows.setdefault(mode, {"first_s": [], "done_s": [], "faults": [],
                                             "fault_mean_us": []})
                row["first_s"].append(times["first_s"])
                row["done_s"].append(times["done_s"])
                row["faults"].append(faults)
                row["fault_mean_us"].append(round(1e6 * lat_sum / max(lat_count, 1), 1))
    lazy = {k: statistics.median(v) for k, v in rows["lazy"].items()}
    for mode, row in rows.items():
        med = {k: statistics.median(v) for k, v in row.items()}
        out = {"name": f"vm_resume_{case}_{mode}", **{k: round(v, 3) for k, v in med.items()},
               "runs": row, "mem_mib": guest.mem_mib, "work_mib": guest.work_mib}
        if mode != "lazy":
            out["done_speedup_vs_lazy"] = round(lazy["done_s"] / max(med["done_s"], 1e-9), 2)
            out["fault_ratio_vs_lazy"] = round(med["faults"] / max(lazy["faults"], 1), 3)
        if mode == "prefetch":
            out["goals"] = {"done_speedup_vs_lazy_min": 2.0, "fault_ratio_vs_lazy_max": 0.1,
                            "first_s_max": round(lazy["first_s"], 3)}
        bench.emit(out)
