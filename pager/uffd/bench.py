"""``ssi-pager bench uffd``: the binding's cost, beside the C reference pager's, in one run.

Lines (one JSON object each, on stdout):
  uffd_copy_4k / uffd_copy_64k / uffd_zeropage_4k / uffd_zeropage_64k
      one binding call (``Userfaultfd.copy`` / ``zeropage``) into untouched registered memory,
      timed around the Python call: ``p50_us``, ``p99_us`` per call, ``gbps`` = bytes / wall.
  uffd_fault_4k / uffd_fault_64k
      local fault resolution: a C toucher thread (no GIL) reads one word per page of --mib MiB
      in order; Python serves each fault (read_raw + one copy of the chunk): latency of each
      faulting access measured in C, ``gbps`` = region bytes / touch time.
  refpager_* (the C reference pager, pager.tools.refpager; --no-ref skips): the same figures from
      ``refpager-local --raw`` and ``refpager-local --mib N --chunk 4096|65536 --order seq
      --tcpu -1 --hcpu -1``, each run right after ours; our lines carry ``ref_p50_us``,
      ``ref_p99_us``, ``ref_gbps``, ``ratio_p50`` and ``ratio_gbps`` (ours / reference).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pager.tools import refpager
from pager.uffd.binding import PAGE_SIZE, RawEvents, Userfaultfd
from pager.uffd.mman import MADV_DONTNEED, MADV_NOHUGEPAGE, Mapping
from pager.uffd.toucher import Toucher, check_pattern, fill_pattern, percentile


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="JSON lines only (the default output is JSON lines too)")
    parser.add_argument("--mib", type=int, default=256, help="fault test region (MiB)")
    parser.add_argument("--section-mib", type=int, default=32,
                        help="bytes per ioctl-cost series (MiB)")
    refpager.add_arguments(parser)
    parser.add_argument("--cpu", type=int, default=0,
                        help="CPU for the ioctl-cost series (-1: unpinned), as the reference")


def _line(name: str, lat_ns: list[int], nbytes: int, wall_ns: int, **extra) -> dict:
    lat = sorted(lat_ns)
    out = {"name": name, "p50_us": round(percentile(lat, 50) / 1e3, 3),
           "p99_us": round(percentile(lat, 99) / 1e3, 3),
           "gbps": round(nbytes / wall_ns, 3) if wall_ns else 0.0, "n": len(lat)}
    out.update(extra)
    return out


def ioctl_costs(section: int) -> list[dict]:
    """Per-call cost of copy / zeropage at 4 KiB and 64 KiB into untouched registered memory."""
    lines = []
    src = Mapping.anonymous(section)
    fill_pattern((src.address, src.length), 1)
    region = Mapping.anonymous(section)
    region.madvise(MADV_NOHUGEPAGE)
    clock = time.perf_counter_ns
    try:
        with Userfaultfd() as u:
            u.register(region.address, region.length)
            for op_size in (PAGE_SIZE, 16 * PAGE_SIZE):
                label = f"{op_size // 1024}k"
                for kind in ("copy", "zeropage"):
                    region.madvise(MADV_DONTNEED)            # back to untouched
                    lat = []
                    append = lat.append
                    base, s = region.address, src.address
                    w0 = clock()
                    if kind == "copy":
                        copy = u.copy
                        for off in range(0, section, op_size):
                            t0 = clock()
                            copy(base + off, s + off, op_size)
                            append(clock() - t0)
                    else:
                        zero = u.zeropage
                        for off in range(0, section, op_size):
                            t0 = clock()
                            zero(base + off, op_size)
                            append(clock() - t0)
                    wall = clock() - w0
                    if kind == "copy" and check_pattern((base, section), 1) != -1:
                        raise RuntimeError("bench: copied content differs from the source")
                    lines.append(_line(f"uffd_{kind}_{label}", lat, section, wall,
                                       per_page_us=round(wall / 1e3 / (section // PAGE_SIZE), 3)))
    finally:
        region.close()
        src.close()
    return lines


def fault_latency(mib: int, chunk: int) -> dict:
    """A C thread faults through ``mib`` MiB in order; Python resolves each fault by chunk."""
    length = mib << 20
    src = Mapping.anonymous(length)
    fill_pattern((src.address, src.length), 3)
    region = Mapping.anonymous(length)
    region.madvise(MADV_NOHUGEPAGE)
    raw = RawEvents(64)
    words = raw.words
    mask = ~(chunk - 1)
    try:
        with Userfaultfd(features=["thread_id"]) as u:
            u.register(region.address, length)
            base, sbase = region.address, src.address
            copy, read_raw = u.copy, u.read_raw
            faults = 0
            t = Toucher(base, length, op="read", step=PAGE_SIZE).start()
            w0 = time.perf_counter_ns()
            while not t.finished:
                # poll, then read, in one C call: right after a resolution the next fault is
                # not raised yet, so a plain non-blocking read would mostly find nothing
                n = read_raw(raw, None, 0.05)
                for i in range(n):
                    addr = words[4 * i + 2]
                    start = base + ((addr - base) & mask)
                    copy(start, sbase + (start - base), chunk)
                faults += n
            result = t.join(10)
            wall = time.perf_counter_ns() - w0
        bad = check_pattern((region.address, length), 3)
        if bad != -1:
            raise RuntimeError(f"bench: page content wrong at offset {bad}")
        lat = [x for x in result.latencies_ns[::chunk // PAGE_SIZE]]   # the faulting accesses
        return _line(f"uffd_fault_{chunk // 1024}k", lat, length, wall, faults=faults)
    finally:
        region.close()
        src.close()


def _run_json(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300).stdout
    return json.loads(out.splitlines()[-1])


def refpager_raw(exe: str) -> list[dict]:
    """``refpager-local --raw``: the same ioctl series, from C."""
    raw = _run_json([exe, "--raw"])
    lines = []
    section = raw.get("section_mib", 32) << 20
    for label in ("4k", "64k"):
        for kind in ("copy", "zeropage"):
            st = raw[f"{kind}_{label}"]
            wall_ns = raw[f"{kind}_{label}_wall_per_op_us"] * st["n"] * 1e3
            lines.append({"name": f"refpager_{kind}_{label}", "p50_us": st["p50_us"],
                          "p99_us": st["p99_us"], "gbps": round(section / wall_ns, 3),
                          "n": st["n"]})
    return lines


def refpager_fault(exe: str, mib: int, chunk: int) -> dict:
    """``refpager-local --mib N --chunk C --order seq --tcpu -1 --hcpu -1`` (unpinned)."""
    loc = _run_json([exe, "--mib", str(mib), "--chunk", str(chunk), "--order", "seq",
                     "--tcpu", "-1", "--hcpu", "-1"])
    return {"name": f"refpager_fault_{chunk // 1024}k", "p50_us": loc["fault_lat"]["p50_us"],
            "p99_us": loc["fault_lat"]["p99_us"], "gbps": loc["gbps"],
            "n": loc["fault_lat"]["n"]}


def _compare(ours: dict, ref: dict) -> None:
    ours["ref_p50_us"], ours["ref_p99_us"], ours["ref_gbps"] = (ref["p50_us"], ref["p99_us"],
                                                                 ref["gbps"])
    ours["ratio_p50"] = round(ours["p50_us"] / ref["p50_us"], 2) if ref["p50_us"] else None
    ours["ratio_gbps"] = round(ours["gbps"] / ref["gbps"], 2) if ref["gbps"] else None


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="ssi-bench-ref-") as reftmp:
        # found (or built) first: a missing reference is an error before anything runs
        exe = None if args.no_ref else str(refpager.locate(args.refpager, Path(reftmp))
                                           / "refpager-local")
        return _run(args, exe)


def _run(args: argparse.Namespace, exe: str | None) -> int:
    """Each of our series runs right beside the reference's, so both see the same host load."""
    lines: list[dict] = []
    old_affinity = os.sched_getaffinity(0)
    print("bench uffd: ioctl costs ...", file=sys.stderr)
    if args.cpu >= 0:
        os.sched_setaffinity(0, {args.cpu})
    try:
        ours = ioctl_costs(args.section_mib << 20)
    finally:
        os.sched_setaffinity(0, old_affinity)
    refs = refpager_raw(exe) if exe else []
    by_name = {r["name"].removeprefix("refpager_"): r for r in refs}
    for line in ours:
        if line["name"].removeprefix("uffd_") in by_name:
            _compare(line, by_name[line["name"].removeprefix("uffd_")])
    lines += ours
    print(f"bench uffd: fault latency over {args.mib} MiB ...", file=sys.stderr)
    for chunk in (PAGE_SIZE, 16 * PAGE_SIZE):
        line = fault_latency(args.mib, chunk)
        if exe:
            ref = refpager_fault(exe, args.mib, chunk)
            _compare(line, ref)
            refs.append(ref)
        lines.append(line)
    for line in lines + refs:
        print(json.dumps(line), flush=True)
    return 0
