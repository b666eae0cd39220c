"""`ssi-pager bench farmem`: a guest larger than its memory, ssi-pager vs the kernel's own swap.

The workload is C (``pager.uffd.rmw``): ``--threads`` threads doing random reads and
read-modify-writes (``--write-pct``), uniform or skewed (90% of the operations on 20% of the
pages), over a working set of 1x, 2x and 4x the limit (``--limit``), each value checked
against a model. A page holds two words and zeros, which zram compresses to almost nothing;
``--fill`` makes writes fill the rest of each page with pseudo-random data from the page and
its counter (checked as well), as real guest memory does not compress so. Each case runs in
a child process, which first touches every page once (warm-up) and then times ``--ops``
operations per thread, under:

- ``resident``: anonymous memory, no limit (the ceiling);
- ``ssi-pager``: memory on a shared memfd handed to ``ssi-pager serve --max-resident LIMIT``
  with a memory node on loopback (and ``ssi-pager-fifo``, FIFO eviction, on the skewed
  workload over the limit: what the replacement policy gains);
- ``c-baseline``: the same scheme with nothing around it (``pager.uffd.fmbase``): a fault
  thread and an evictor in C in the workload's own process, the store an array in memory, FIFO;
  no node, no socket, no Python. What a userspace pager of this scheme can do on this host, and
  so what ``ssi-pager``'s node hop and Python cost; ``c-baseline-tcp``: the same with the store
  behind two TCP loopback connections served by threads of the process (a fetch lane, a store
  lane acked once per batch), the least a memory node on the same host costs;
  ``c-baseline-tcp-all-dirty``: that without dirty tracking (pages installed writable, every
  victim written back);
- ``zram``: anonymous memory in a memory cgroup v1 (``/sys/fs/cgroup/memory``) with the same
  limit, swapping to a zram device the bench creates (and removes). Needs root, the zram module
  and cgroup v1; otherwise skipped with the reason. A cgroup OOM kill is detected and the run
  tried again (three runs at most, ``attempts`` and ``oom_kills`` reported); if every run was
  killed, ``"oom_killed": true`` instead of a figure.

One JSON object per line: ``name``, ``ops_per_s``, ``ratio`` (ssi-pager / zram on the same case,
and each against resident), with details. Figures need a quiet machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from pager.service.serve import size_arg
from pager.tools.child import Child

PAGE = 4096
CGROUP_V1 = Path("/sys/fs/cgroup/memory")
ZRAM_CONTROL = Path("/sys/class/zram-control")
WORKLOADS = {"uniform": 0, "skewed": 90}  # percent of operations on the hot 20% of pages
CHILD_TIMEOUT = 1800
# the C baselines (pager.uffd.fmbase): case name -> (store behind TCP loopback, all dirty)
BASELINES = {"c-baseline": (False, False), "c-baseline-tcp": (True, False),
             "c-baseline-tcp-all-dirty": (True, True)}
ZRAM_ATTEMPTS = 3  # runs of a zram case the cgroup OOM-killed, at most


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="JSON lines (the only format)")
    parser.add_argument("--limit", type=size_arg, default=64 << 20,
                        help="resident limit (default 64M)")
    parser.add_argument("--ratios", default="1,2,4",
                        help="working sets as multiples of the limit (default 1,2,4)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ops", type=int, default=200_000, help="timed operations per thread")
    parser.add_argument("--write-pct", type=int, default=50)
    parser.add_argument("--chunk", type=size_arg, default=4096,
                        help="pager chunk (fetch and eviction unit; default 4K)")
    parser.add_argument("--fill", action="store_true",
                        help="writes fill the rest of each page with pseudo-random data (checked)"
                             " instead of zeros: memory that does not compress to nothing")
    parser.add_argument("--only", default="", help="run only cases whose name contains this")
    parser.add_argument("--no-zram", action="store_true", help="skip the kernel swap cases")
    parser.add_argument("--node-arg", action="append", default=[], metavar="ARG",
                        help="extra `ssi-pager memnode` argument (repeatable)")
    parser.add_argument("--pager-arg", action="append", default=[], metavar="ARG",
                        help="extra `ssi-pager serve` argument (repeatable)")
    # the workload child (internal)
    parser.add_argument("--child", choices=("anon", "memfd", *BASELINES),
                        help=argparse.SUPPRESS)
    parser.add_argument("--limit-bytes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--bytes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--hot-ops", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--socket", help=argparse.SUPPRESS)
    parser.add_argument("--cgroup", help=argparse.SUPPRESS)


def _emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def _status(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


# -- the workload child ----------------------------------------------------------------------
def child(args: argparse.Namespace) -> int:
    """Allocate (in the cgroup, or behind the pager), warm up, time the workload; one JSON
    line with ``ops_per_s`` and ``errors``."""
    from pager.tools.workload import Client
    from pager.uffd.buffers import address_of
    from pager.uffd.rmw import Rmw

    if args.cgroup:
        Path(args.cgroup, "cgroup.procs").write_text(str(os.getpid()))
    size = args.bytes
    client = baseline = None
    if args.child in BASELINES:
        from pager.uffd.fmbase import FarMemoryBaseline
        fd = os.memfd_create("farmem-baseline")
        os.ftruncate(fd, size)
        mem = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        _keep, base = address_of(mem)
        remote, all_dirty = BASELINES[args.child]
        baseline = FarMemoryBaseline(base, size // PAGE, fd, args.limit_bytes // PAGE,
                                     remote=remote, all_dirty=all_dirty)
    elif args.child == "memfd":
        fd = os.memfd_create("farmem-bench")
        os.ftruncate(fd, size)
        client = Client(size, memory=mmap.mmap(fd, size, flags=mmap.MAP_SHARED), memfd=fd)
        client.handoff(args.socket)
        base = client.base
    else:
        mem = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        _keep, base = address_of(mem)
    npages = size // PAGE
    w = Rmw(base, npages, threads=args.threads, write_pct=100, hot_ops=0, fill=args.fill)
    w.run(ops=max(1, npages // args.threads))  # warm-up: (almost) every page written once
    w.set_mix(write_pct=args.write_pct, hot_ops=args.hot_ops)
    t0 = time.perf_counter()
    w.run(ops=args.ops)
    dt = time.perf_counter() - t0
    out = {"ops_per_s": round(args.ops * args.threads / dt), "seconds": round(dt, 3),
           "errors": w.errors, "check": w.check()}
    if baseline is not None:  # after the check, which faults pages in through it
        out.update(baseline.stop())
    print(json.dumps(out), flush=True)
    return 0


def _run_child(mode: str, size: int, hot_ops: int, args: argparse.Namespace, *,
               socket: str | None = None, cgroup: Path | None = None) -> dict:
    cmd = [sys.executable, "-m", "pager.cli", "bench", "farmem", "--child", mode,
           "--bytes", str(size), "--hot-ops", str(hot_ops), "--threads", str(args.threads),
           "--ops", str(args.ops), "--write-pct", str(args.write_pct),
           "--limit-bytes", str(args.limit)]
    if args.fill:
        cmd.append("--fill")
    if socket:
        cmd += ["--socket", socket]
    if cgroup:
        cmd += ["--cgroup", str(cgroup)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT)
    if p.returncode != 0:
        return {"failed": f"exit {p.returncode}", "stderr": p.stderr[-500:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


# -- kernel swap: zram in a memory cgroup v1 -------------------------------------------------
def zram_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (zram device, swapon, memory cgroup)"
    if not (CGROUP_V1 / "memory.limit_in_bytes").exists():
        return f"no memory cgroup v1 at {CGROUP_V1}"
    if not ZRAM_CONTROL.exists():
        subprocess.run(["modprobe", "zram", "num_devices=0"], capture_output=True, check=False)
        if not ZRAM_CONTROL.exists():
            return "no zram module (modprobe zram failed)"
    return None


@contextlib.contextmanager
def zram_swap(size: int) -> Iterator[str]:
    """A zram swap device of ``size`` bytes, swapped on at the highest priority; removed on
    exit."""
    dev = int((ZRAM_CONTROL / "hot_add").read_text())
    name = f"/dev/zram{dev}"
    sysd = Path(f"/sys/block/zram{dev}")
    on = False
    try:
        with contextlib.suppress(OSError):
            (sysd / "comp_algorithm").write_text("lzo-rle")
        (sysd / "disksize").write_text(str(size))
        subprocess.run(["mkswap", name], capture_output=True, check=True)
        subprocess.run(["swapon", "-p", "32767", name], capture_output=True, check=True)
        on = True
        yield name
    finally:
        if on:
            subprocess.run(["swapoff", name], capture_output=True, check=False)
        with contextlib.suppress(OSError):
            (sysd / "reset").write_text("1")
        with contextlib.suppress(OSError):
            (ZRAM_CONTROL / "hot_remove").write_text(str(dev))


@contextlib.contextmanager
def memory_cgroup(limit: int) -> Iterator[Path]:
    cg = CGROUP_V1 / f"ssi-farmem-{os.getpid()}"
    cg.mkdir()
    try:
        (cg / "memory.limit_in_bytes").write_text(str(limit))
        with contextlib.suppress(OSError):
            (cg / "memory.swappiness").write_text("100")
        yield cg
    finally:
        deadline = time.monotonic() + 10
        while True:
            try:
                cg.rmdir()
                break
            except OSError:
                if time.monotonic() > deadline:
                    _status(f"could not remove {cg}; remove it by hand")
                    break
                time.sleep(0.1)


def oom_kills(cg: Path) -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in (cg / "memory.oom_control").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
    return 0


# -- cases ------------------------------------------------------------------------------------
def _ssi_case(size: int, hot_ops: int, args: argparse.Namespace, work: Path,
              policy: str = "clock") -> dict:
    token = work / "token"
    node = Child(["memnode", "--listen", "127.0.0.1:0", "--store", str(work / "store"),
                  "--token-file", str(token), *args.node_arg], work / "memnode.log")
    pager = None
    try:
        endpoint = node.wait_for(r"listening on (\S+)")
        sock = str(work / "pager.sock")
        pager = Child(["serve", "--socket", sock, "--memnode", endpoint, "--token-file",
                       str(token), "--max-resident", str(args.limit), "--chunk",
                       str(args.chunk), "--readahead", "0", "--evict-policy", policy,
                       *args.pager_arg],
                      work / "pager.log")
        pager.wait_for(r"pager: serving")
        return _run_child("memfd", size, hot_ops, args, socket=sock)
    finally:
        if pager is not None:
            pager.stop()
        node.stop()


def _zram_case(size: int, hot_ops: int, args: argparse.Namespace) -> dict:
    """The workload in a fresh cgroup on a fresh zram device; a run the cgroup OOM-killed
    (memory cgroup v1 does, now and then, under this load) is tried again, up to
    ``ZRAM_ATTEMPTS`` runs, all of them reported (``attempts``, ``oom_kills``)."""
    kills = 0
    for attempt in range(1, ZRAM_ATTEMPTS + 1):
        with zram_swap(2 * size) as _dev, memory_cgroup(args.limit) as cg:
            got = _run_child("anon", size, hot_ops, args, cgroup=cg)
            killed = oom_kills(cg)
        kills += killed
        got.update(attempts=attempt, oom_kills=kills)
        if not killed and "failed" not in got:
            return got
        if not killed:
            break  # failed for another reason: not one to try again
        _status(f"zram run {attempt} was OOM-killed by the memory cgroup"
                + ("; trying again" if attempt < ZRAM_ATTEMPTS else ""))
    got.setdefault("failed", "")
    got["oom_killed"] = bool(kills)
    return got


def run(args: argparse.Namespace) -> int:
    if args.child:
        return child(args)
    ratios = [int(x) for x in args.ratios.split(",") if x]
    why_not_zram = "--no-zram" if args.no_zram else zram_unavailable()
    if why_not_zram:
        _status(f"kernel swap cases skipped: {why_not_zram}")
    for wl, hot in WORKLOADS.items():
        for r in ratios:
            size = r * args.limit
            case = f"farmem-{wl}-{r}x"
            if args.only and args.only not in case:
                continue
            common = {"workload": wl, "working_set_bytes": size, "limit_bytes": args.limit,
                      "threads": args.threads, "write_pct": args.write_pct,
                      "fill": "random" if args.fill else "zeros"}
            got: dict[str, dict] = {}
            _status(f"{case}: resident")
            got["resident"] = _run_child("anon", size, hot, args)
            _status(f"{case}: ssi-pager")
            with tempfile.TemporaryDirectory(prefix="ssi-farmem-") as d:
                got["ssi-pager"] = _ssi_case(size, hot, args, Path(d))
            if hot and r > 1:  # the replacement policy against FIFO, where it matters
                _status(f"{case}: ssi-pager with FIFO eviction")
                with tempfile.TemporaryDirectory(prefix="ssi-farmem-") as d:
                    got["ssi-pager-fifo"] = _ssi_case(size, hot, args, Path(d), "fifo")
            for mode in BASELINES:
                _status(f"{case}: {mode}")
                got[mode] = _run_child(mode, size, hot, args)
            if not why_not_zram:
                _status(f"{case}: zram")
                try:
                    got["zram"] = _zram_case(size, hot, args)
                except (OSError, subprocess.CalledProcessError) as exc:
                    got["zram"] = {"failed": f"setting up zram/cgroup: {exc}"}
            else:
                got["zram"] = {"skipped": why_not_zram}
            for mode, res in got.items():
                _emit({"name": f"{case}-{mode}", "ops_per_s": res.get("ops_per_s"), **common,
                       **{k: v for k, v in res.items() if k != "ops_per_s"}})
            ops = {m: r.get("ops_per_s") for m, r in got.items()}
            for a, b in (("ssi-pager", "zram"), ("ssi-pager", "resident"), ("zram", "resident"),
                         ("ssi-pager", "ssi-pager-fifo"), ("c-baseline", "zram"),
                         ("c-baseline-tcp", "zram"), ("c-baseline-tcp-all-dirty", "zram"),
                         ("ssi-pager", "c-baseline"), ("ssi-pager", "c-baseline-tcp")):
                if ops.get(a) and ops.get(b):
                    _emit({"name": f"{case}-{a}/{b}", "ratio": round(ops[a] / ops[b], 3),
                           **common})
    return 0
