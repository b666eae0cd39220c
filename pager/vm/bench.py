"""`ssi-pager bench vm`: a QEMU guest's wall time with and without the pager; lazy resume.

    ssi-pager bench vm [--json] [--repeat N] [--mem-mib M] [--work-mib W] [--passes P]

One JSON object per line (`name`, `wall_s`, `ratio`, and details):
  vm_baseline            the test guest under plain QEMU (median of --repeat runs)
  vm_pager_local         the same guest with all RAM behind the pager, memory node on loopback
  vm_pager_netns         ... memory node in another network namespace, across a veth link
  vm_boot_baseline, vm_boot_pager_local   boot to power-off alone (workload of 1 MiB)
  vm_resume_full_load_migration  ordinary QEMU migration (RAM in the stream, via a local file)
                         after pass 1: time from starting the new QEMU to first guest output
  vm_resume_full_load_memnode    `vm suspend`, then resume loading all stored RAM from the
                         memory node before `cont`: the same time
  vm_resume_lazy         `vm suspend` after pass 1, `vm resume`: the same time, RAM on demand
  vm_many_pass_*, vm_resume_ws_*, vm_resume_scatter_*   many-pass guest; resume lazy / with
                         working-set prefetch /
                         full load: first output, workload done, faults (pager.vm.bench_ws)
ratio: wall time / baseline for the pager runs (goal <= 1.10); memory-node full load / lazy
for vm_resume_lazy (goal >= 5; ratio_vs_migration against ordinary migration). Times are QEMU
process lifetimes; the pager and memory node run as long-lived services, started once before
the measured runs.

The guest comes from the source checkout's tests/guest/build.py (Debian cloud kernel, cached).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import logging
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import IO, Any

from pager.errors import VmError
from pager.vm import bench_ws
from pager.vm.launch import Launch, finish, launch
from pager.vm.nodes import Nodes
from pager.vm.procs import spawn_memnode, spawn_pager, stop_process
from pager.vm.qmp import Qmp
from pager.vm.ramstore import load_ram
from pager.vm.resume import resume_start
from pager.vm.suspend import do_suspend

log = logging.getLogger(__name__)

CHECKOUT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT = 600.0  # one guest run


def load_test_module(relpath: str, name: str) -> ModuleType:
    """A helper module of the source checkout's tests/ (the guest builder, netns helper)."""
    path = CHECKOUT / relpath
    if name in sys.modules:
        return sys.modules[name]
    if not path.is_file():
        raise VmError(f"{relpath} not found next to the installed package ({CHECKOUT}); run "
                      f"the benchmark from a source checkout installed with `pip install -e .`")
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def guest_builder() -> ModuleType:
    return load_test_module("tests/guest/build.py", "ssi_guest_build")


# --- services ---------------------------------------------------------------------------------

def start_memnode(workdir: Path, token_file: Path, listen: str = "127.0.0.1:0",
                  prefix: list[str] | None = None) -> tuple[subprocess.Popen, str]:
    """A memory node with its store in ``workdir`` (``prefix``: e.g. `ip netns exec NS`)."""
    return spawn_memnode(workdir / "store", workdir / f"memnode-{time.monotonic_ns()}.log",
                            str(token_file), listen, prefix)


def start_pager(sock: Path, memnode: str, token_file: Path, logf: Path,
                extra: list[str] | None = None,
                prefix: list[str] | None = None) -> subprocess.Popen:
    """A pager logging to ``logf`` (``prefix``: e.g. `ip netns exec NS`)."""
    return spawn_pager(sock, memnode, str(token_file), list(extra or []), prefix=prefix,
                          log=logf)


@contextlib.contextmanager
def services(workdir: Path, token_file: Path, listen: str = "127.0.0.1:0",
             memnode_prefix: list[str] | None = None,
             pager_prefix: list[str] | None = None,
             pager_args: list[str] | None = None) -> Iterator[tuple[str, Path]]:
    """A memory node and a pager using it; yields (memnode endpoint, pager socket).
    The prefixes (``ip netns exec NS``) put either in another network namespace; QEMU reaches
    the pager by its Unix socket path, which namespaces do not separate."""
    node, endpoint = start_memnode(workdir, token_file, listen, memnode_prefix)
    sock = workdir / f"pager-{time.monotonic_ns()}.sock"
    try:
        pager = start_pager(sock, endpoint, token_file, workdir / "pager.log",
                            pager_args, pager_prefix)
        try:
            yield endpoint, sock
        finally:
            stop_process(pager)
    finally:
        stop_process(node)


# --- runs ---------------------------------------------------------------------------------------

def vm_args(memnode: str | None, token_file: Path, pager: Path | None,
            hugetlb: bool = False) -> argparse.Namespace:
    return argparse.Namespace(memnode=memnode, token_file=str(token_file), space=None,
                              pager=str(pager) if pager else None, name=None, state=None,
                              pager_arg=None, verbose=0, hugetlb=hugetlb)


def run_plain(argv: list[str]) -> tuple[float, str]:
    t0 = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT,
                          check=False)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise VmError(f"plain QEMU failed ({proc.returncode}): {proc.stderr[-400:]}")
    return wall, proc.stdout


def run_paged(args: argparse.Namespace, argv: list[str], name: str) -> tuple[float, str]:
    t0 = time.monotonic()
    lau = launch(args, argv, name, stdout=subprocess.PIPE)
    assert lau.qemu.stdout is not None
    out = rest_of_console(lau.qemu)
    rc = finish(lau)
    wall = time.monotonic() - t0
    if rc != 0:
        raise VmError(f"QEMU under the pager failed ({rc})")
    return wall, out


def read_until(stream: IO[bytes], pattern: str, timeout: float = 300) -> tuple[float, str]:
    """Read the console until ``pattern`` appears; (monotonic time seen, all text read). The
    deadline holds also when the guest prints nothing."""
    fd = stream.fileno()
    want = pattern.encode()
    buf = b""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise VmError(f"no {pattern!r} on the guest console within {timeout:.0f} s: "
                          f"{buf.decode(errors='replace')[-400:]}")
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            raise VmError(f"guest output ended before {pattern!r}: "
                          f"{buf.decode(errors='replace')[-400:]}")
        buf += chunk
        if want in buf[:buf.rfind(b"\n") + 1]:  # whole lines: a checksum is not cut off
            return time.monotonic(), buf.decode(errors="replace")


def rest_of_console(proc: subprocess.Popen, timeout: float = RUN_TIMEOUT) -> str:
    """The guest console up to QEMU's exit (VmError, QEMU stopped, after ``timeout``)."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        stop_process(proc)
        raise VmError(f"QEMU (pid {proc.pid}) still ran after {timeout:.0f} s") from exc
    return out.decode(errors="replace")


def first_output(stream: IO[bytes]) -> float:
    """Time of the first workload line (a progress or checksum line) on the console."""
    t, _ = read_until(stream, "pass ")
    return t


def load_all_ram(lau: Launch) -> None:
    """Eager comparator: copy every stored page of the guest's space from the memory node
    into its fresh RAM memfd before the guest runs (what resuming without lazy paging does)."""
    st = lau.state
    nodes = Nodes.from_args(argparse.Namespace(), st)
    assert nodes, "the guest was started without memory nodes"
    load_ram(f"/proc/{st.qemu_pid}/fd/{st.memfd}", st.ram_size, nodes, st.space)


def resume_lazy(args: argparse.Namespace, guest: Any, name: str,
                eager: bool = False, times: dict[str, float] | None = None,
                before_resume: Callable[[], None] | None = None) -> tuple[float, str]:
    """Run ``guest`` (a test guest waiting after each pass) to pass 1, suspend it there,
    resume; (time from resume start to first output, full text). The suspend happens while
    the guest waits, so it never races the next pass; the resumed guest is let go at once.
    ``eager``: load all RAM from the memory node before `cont` instead of on demand.
    ``times`` gets ``first_s`` and ``done_s`` (resume start to QEMU's exit, the workload
    done); ``before_resume`` runs between the suspend and the resume."""
    if not guest.wait or guest.passes < 2:
        raise VmError("the resume cases need a guest that waits after each pass, 2+ passes")
    argv = guest.qemu_args()
    args = argparse.Namespace(**vars(args))  # resume fills in --space etc.: not for the next run
    lau = launch(args, argv, name, stdout=subprocess.PIPE, stdin=subprocess.PIPE)
    try:
        _, before = read_until(lau.qemu.stdout, "pass 1 waiting")
        do_suspend(args, name)
        before += rest_of_console(lau.qemu)
    finally:
        lau.qemu.stdin.close()
    finish(lau)
    if before_resume is not None:
        before_resume()
    t0 = time.monotonic()
    res = resume_start(args, name, argv, stdout=subprocess.PIPE, stdin=subprocess.PIPE,
                          before_cont=load_all_ram if eager else None)
    try:  # one line for each wait left (pass 1's included): the guest runs to its end
        res.qemu.stdin.write(b"go\n" * (guest.passes - 1))
        res.qemu.stdin.flush()
        t1 = first_output(res.qemu.stdout)
        after = rest_of_console(res.qemu)
        t2 = time.monotonic()
    finally:
        res.qemu.stdin.close()
    rc = finish(res)
    if rc != 0:
        raise VmError(f"resumed QEMU failed ({rc})")
    if times is not None:
        times.update(first_s=t1 - t0, done_s=t2 - t0)
    return t1 - t0, before + after


def resume_full_load(guest: Any, workdir: Path) -> tuple[float, str, int]:
    """Ordinary migration with RAM in the stream, through a file, of ``guest`` (waiting after
    each pass, migrated while it waits after pass 1); (time to first output, text, state
    bytes)."""
    argv = guest.qemu_args()
    qmp_path = workdir / "full-qmp.sock"
    state = workdir / "full-state"
    qmp_arg = ["-qmp", f"unix:{qmp_path},server=on,wait=off"]
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    src = subprocess.Popen([*argv, *qmp_arg], **pipes)
    try:
        _, before = read_until(src.stdout, "pass 1 waiting")
        q = Qmp(qmp_path)
        q.execute("stop")
        q.execute("migrate", uri=f"exec:cat > {state}")
        q.wait_migration()
        q.quit()
        q.close()
        src.wait(60)
    finally:
        stop_process(src)
        src.stdin.close()
    size = state.stat().st_size
    t0 = time.monotonic()
    dst = subprocess.Popen([*argv, *qmp_arg, "-incoming", "defer"], **pipes)
    try:
        q = Qmp(qmp_path)
        q.execute("migrate-incoming", uri=f"exec:cat {state}")
        q.wait_migration()
        q.execute("cont")
        q.close()
        dst.stdin.write(b"go\n" * (guest.passes - 1))
        dst.stdin.flush()
        t1 = first_output(dst.stdout)
        after = rest_of_console(dst)
    finally:
        stop_process(dst)
        dst.stdin.close()
        state.unlink(missing_ok=True)
    return t1 - t0, before + after, size


# --- the command ---------------------------------------------------------------------------------

def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="JSON lines only (the default "
                        "output is JSON lines too; status lines go to stderr)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case (median)")
    parser.add_argument("--mem-mib", type=int, default=512, help="guest RAM (default 512)")
    parser.add_argument("--work-mib", type=int, default=384,
                        help="RAM the guest workload fills (default 384)")
    parser.add_argument("--passes", type=int, default=3, help="workload passes (default 3)")
    parser.add_argument("--resume-mem-mib", type=int, default=1024,
                        help="guest RAM of the resume cases (default 1024: a full load grows "
                             "with RAM, a lazy resume does not)")
    parser.add_argument("--resume-work-mib", type=int, default=768,
                        help="RAM the workload fills in the resume cases (default 768)")
    parser.add_argument("--no-netns", action="store_true", help="skip the namespace case")
    parser.add_argument("--pager-arg", action="append", default=[], metavar="ARG",
                        help="extra `ssi-pager serve` argument, e.g. --pager-arg=--chunk=256K "
                             "(repeatable)")
    bench_ws.configure(parser)


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def check(out: str, expected: list[str], what: str) -> None:
    got = guest_builder().checksums(out)
    if got != expected:
        raise VmError(f"{what}: guest checksums {got} differ from the expected {expected}")


def run(args: argparse.Namespace) -> int:
    gb = guest_builder()
    try:
        guest = gb.build(args.mem_mib, args.work_mib, args.passes)
    except gb.GuestUnavailable as exc:
        raise VmError(f"cannot build the test guest: {exc}") from exc
    expected = gb.expected_checksums(args.work_mib, args.passes)
    plain = guest.qemu_args()
    reps = max(1, args.repeat)
    with tempfile.TemporaryDirectory(prefix="ssi-bench-vm-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("SSI_PAGER_RUNTIME_DIR", str(work / "run"))
        token = work / "token"
        if args.ws_only:
            bench_ws.run(args, gb, work, token, reps)
            return 0
        # baseline and paged runs interleaved: other load on the host drifts over minutes
        base: list[float] = []
        walls: list[float] = []
        with services(work, token, pager_args=args.pager_arg) as (endpoint, sock):
            a = vm_args(endpoint, token, sock)
            for i in range(reps):
                wall, out = run_plain(plain)
                check(out, expected, "baseline")
                base.append(wall)
                wall, out = run_paged(a, plain, f"bench-local-{i}")
                check(out, expected, "pager, local memory node")
                walls.append(wall)
            b, w = statistics.median(base), statistics.median(walls)
            emit({"name": "vm_baseline", "wall_s": round(b, 3), "ratio": 1.0, "runs": base,
                  "mem_mib": args.mem_mib, "work_mib": args.work_mib})
            emit({"name": "vm_pager_local", "wall_s": round(w, 3), "ratio": round(w / b, 3),
                  "runs": walls, "goal_ratio_max": 1.10})
            # boot alone (the workload touches 1 MiB): kernel + initramfs + power-off
            boot = gb.build(args.mem_mib, 1, 1).qemu_args()
            bb, bp = [], []
            for i in range(reps):
                bb.append(run_plain(boot)[0])
                bp.append(run_paged(a, boot, f"bench-boot-{i}")[0])
            b0, p0 = statistics.median(bb), statistics.median(bp)
            emit({"name": "vm_boot_baseline", "wall_s": round(b0, 3), "ratio": 1.0, "runs": bb})
            emit({"name": "vm_boot_pager_local", "wall_s": round(p0, 3),
                  "ratio": round(p0 / b0, 3), "runs": bp})
        rguest = dataclasses.replace(
            gb.build(args.resume_mem_mib, args.resume_work_mib, args.passes), wait=True)
        rexpected = gb.expected_checksums(args.resume_work_mib, args.passes)
        lazies, eagers, fulls = [], [], []
        with services(work, token, pager_args=args.pager_arg) as (endpoint, sock):
            a = vm_args(endpoint, token, sock)
            for i in range(reps):
                lazy, out = resume_lazy(a, rguest, f"bench-resume-{i}")
                check(out, rexpected, "lazy resume")
                lazies.append(lazy)
                eager, out = resume_lazy(a, rguest, f"bench-eager-{i}", eager=True)
                check(out, rexpected, "eager resume")
                eagers.append(eager)
        for _ in range(reps):
            full, out, size = resume_full_load(rguest, work)
            check(out, rexpected, "ordinary migration")
            fulls.append(full)
        lazy, eager, full = (statistics.median(x) for x in (lazies, eagers, fulls))
        emit({"name": "vm_resume_full_load_migration", "wall_s": round(full, 3), "ratio": 1.0,
              "runs": fulls, "state_bytes": size,
              "what": "QEMU migration with RAM in the stream, from a file in the page cache"})
        emit({"name": "vm_resume_full_load_memnode", "wall_s": round(eager, 3), "ratio": 1.0,
              "runs": eagers,
              "what": "device state, then all stored RAM from the memory node, then cont"})
        emit({"name": "vm_resume_lazy", "wall_s": round(lazy, 3), "runs": lazies,
              "ratio": round(eager / lazy, 2), "ratio_vs_migration": round(full / lazy, 2),
              "mem_mib": args.resume_mem_mib, "work_mib": args.resume_work_mib,
              "goal_ratio_min": 5.0})
        bench_ws.run(args, gb, work, token, reps)
        if not args.no_netns:
            bench_netns(work, token, plain, expected, reps, args.pager_arg)
    return 0


def netns_helper() -> ModuleType:
    """The checkout's network-namespace helper (tests/netns.py)."""
    try:
        import tests.netns as netns  # the checkout on sys.path (pytest, python -m)
    except ImportError:
        netns = load_test_module("tests/netns.py", "ssi_test_netns")
    return netns


def bench_netns(work: Path, token: Path, argv: list[str], expected: list[str],
                reps: int, pager_args: list[str]) -> None:
    """Pager (and QEMU's shim, over its Unix socket) in one namespace, memory node in
    another, across a veth link."""
    try:
        netns = netns_helper()
        why = netns.unavailable()
    except VmError as exc:
        why = str(exc)
    if why:
        emit({"name": "vm_pager_netns", "skipped": why})
        return
    with netns.two_hosts() as (ns_a, _ip_a, ns_b, ip_b), \
            services(work, token, f"{ip_b}:0", ["ip", "netns", "exec", ns_b],
                     ["ip", "netns", "exec", ns_a], pager_args) as (ep, sock):
        a = vm_args(ep, token, sock)
        base, walls = [], []
        for i in range(reps):
            wall, out = run_plain(argv)
            base.append(wall)
            wall, out = run_paged(a, argv, f"bench-netns-{i}")
            check(out, expected, "pager, memory node across a namespace link")
            walls.append(wall)
        b, w = statistics.median(base), statistics.median(walls)
        emit({"name": "vm_pager_netns", "wall_s": round(w, 3), "ratio": round(w / b, 3),
              "runs": walls, "baseline_runs": base, "goal_ratio_max": 1.10})
