"""`ssi-pager bench faults`: end-to-end fault resolution, with the C reference in the same run.

Each case starts a real pager process (``ssi-pager serve``) on a memory node over loopback
(``remote``) or a snapshot file (``file``), hands it this process's memory with the Firecracker
handshake, and lets one C toucher thread access the first word of every chunk, as the reference
does: latency = the first access to each chunk (each one faults), GB/s = region bytes / touch
time. Cases: source x chunk (4 KiB, 64 KiB) x order (seq, rand), readahead on (the default)
and, for remote seq, off (``-nora``: the bare fault path compared with the reference).
``-pyloop`` cases serve every fault with the engine's Python loop instead of its C loop
(``serve --no-c-loop``), so both are compared in one run.

The C reference (``pager.tools.refpager``: ``../shared/refpager`` built into a temporary
directory, or ``--refpager DIR``; ``--no-ref`` skips it) runs refpager-remote / refpager-local in
the same session and ``ratio`` lines compare them. ``--rss-gib N`` (default 4) also reports
the pager's RSS while serving an N GiB client.

Adaptive polling (``--poll-us``, on by default in pager and node) is compared with ``-nopoll``
cases (both at ``--poll-us 0``); every case of ours reports the CPU it cost:
``pager_cpu_s_per_mfault`` / ``node_cpu_s_per_mfault`` (CPU seconds per million faults, from
/proc/PID/stat) and ``pager_idle_cpu_pct`` (the pager's CPU over the second after the faults
stopped). ``-busy`` cases fault while one CPU burner per core runs (a guest that needs every
CPU): ``busy_cpu_share`` is the share of all CPUs the burners still got. The reference runs
with and without its ``--spin`` handler (``refpager-*-spin``).
One JSON object per line on stdout: ``name``, ``p50_us``, ``p99_us``, ``gbps`` (+ details).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pager.core.region import PAGE_SIZE, Region
from pager.source import Lane, PageSource
from pager.tools import refpager
from pager.tools.child import Child
from pager.tools.workload import Client, DataSet, Touch, percentile

log_prefix = "bench:"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mib", type=int, default=256, help="region size per case")
    parser.add_argument("--json", action="store_true", help="JSON lines (the only format)")
    refpager.add_arguments(parser)
    parser.add_argument("--rss-gib", type=int, default=4,
                        help="client size for the RSS measurement, 0 = skip (default 4)")
    parser.add_argument("--only", default="", help="run only cases whose name contains this")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each reference-node pair; medians are reported (noisy "
                             "shared machines)")


def _emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def _status(msg: str) -> None:
    print(f"{log_prefix} {msg}", file=sys.stderr, flush=True)


def measure(sock: str, size: int, chunk: int, order: str, data: DataSet | None) -> dict:
    """Hand ``size`` bytes to the pager on ``sock``, touch one word per chunk, check content."""
    c = Client(size)
    try:
        c.handoff(sock)
        t = Touch(c.base, size, order=order, threads=1, step=chunk).start()
        if not t.wait(300):
            raise RuntimeError("the pager did not serve the faults within 300 s")
        lat = t.latencies_us()
        bad = len(c.check(data)) if data is not None else 0
        return {"p50_us": round(percentile(lat, 0.5), 2), "p99_us": round(percentile(lat, 0.99), 2),
                "gbps": round(size / t.seconds() / 1e9, 3), "faults": t.naccess,
                "bad_pages": bad}
    finally:
        c.close(unmap=True)


HZ = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used by process ``pid`` (all its threads) so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / HZ  # utime, stime (stat fields 14, 15)


class Burners:
    """One CPU-bound process per core while a case runs (``pinned``: one on each of those
    CPUs, pinned there): ``share()`` is the part of all CPUs they got (1.0 = the faults cost
    them nothing)."""

    def __init__(self, pinned: list[int] | None = None) -> None:
        n = len(pinned) if pinned is not None else os.cpu_count() or 1
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                      for _ in range(n)]
        for p, cpu in zip(self.procs, pinned or [], strict=False):
            os.sched_setaffinity(p.pid, {cpu})
        self.t0 = time.monotonic()
        self.c0 = [cpu_seconds(p.pid) for p in self.procs]

    def share(self) -> float:
        used = sum(cpu_seconds(p.pid) - c for p, c in zip(self.procs, self.c0, strict=True))
        return used / ((time.monotonic() - self.t0) * len(self.procs))

    def stop(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait(10)


def _costed(pager_pid: int, node_pid: int | None, busy: bool, fn) -> dict:
    """``fn()``'s result plus the CPU the pager (and node) spent on its faults."""
    burners = Burners() if busy else None
    try:
        c0 = cpu_seconds(pager_pid)
        n0 = cpu_seconds(node_pid) if node_pid else 0.0
        r = fn()
        if burners is not None:
            r["busy_cpu_share"] = round(burners.share(), 3)
        per = 1e6 / max(1, r["faults"])
        r["pager_cpu_s_per_mfault"] = round((cpu_seconds(pager_pid) - c0) * per, 2)
        if node_pid:
            r["node_cpu_s_per_mfault"] = round((cpu_seconds(node_pid) - n0) * per, 2)
    finally:
        if burners is not None:
            burners.stop()
    t0, c0 = time.monotonic(), cpu_seconds(pager_pid)
    time.sleep(1.0)  # no faults now: a polling pager must be back asleep
    r["pager_idle_cpu_pct"] = round(100 * (cpu_seconds(pager_pid) - c0)
                                    / (time.monotonic() - t0), 1)
    return r


def _rss_kib(pid: int) -> tuple[int, int]:
    rss = hwm = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    return rss, hwm


class _RefnodeLane(Lane):
    """The C reference node's wire format ({u64 offset, u32 len} -> len raw bytes).

    Only for ``pager-refnode-*``: our engine against the *same* memory node process as
    refpager-remote, so the ratio isolates the pager's own cost from the node's.
    """

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.req = bytearray(12)

    c_capable = True

    def c_endpoint(self, space: str | None) -> tuple[int, str, int] | None:
        return self.sock.fileno(), "raw", 0

    def fetch_into(self, space: str | None, gpa: int, buf: memoryview) -> int:
        struct.pack_into("<QI", self.req, 0, gpa, len(buf))
        self.sock.sendall(self.req)
        got, n = 0, len(buf)
        while got < n:
            k = self.sock.recv_into(buf[got:], n - got, socket.MSG_WAITALL)
            if not k:
                raise ConnectionError("reference memory node closed the connection")
            got += k
        return 0

    def close(self) -> None:
        self.sock.close()


class _RefnodeSource(PageSource):
    def __init__(self, port: int) -> None:
        self.port = port

    def open_lane(self, bulk: bool = False) -> Lane:
        return _RefnodeLane(self.port)

    def describe(self) -> str:
        return f"reference node 127.0.0.1:{self.port}"


def _reference_pair(refdir: Path, port: int, mib: int, mode: str, chunk: int,
                    order: str, spin: bool = False) -> list[tuple[str, dict]]:
    """One refpager run (``spin``: its handler spins on the uffd), and for remote without
    spin our engine on the same node right after it."""
    cmd = [str(refdir / f"refpager-{mode}"), "--mib", str(mib), "--chunk", str(chunk),
           "--order", order, "--tcpu", "-1", "--hcpu", "-1", *(["--spin"] if spin else [])]
    if mode == "remote":
        cmd += ["--port", str(port)]
    r = json.loads(subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                                  check=True).stdout)
    name = f"refpager-{mode}-{chunk >> 10}k-{order}" + ("-spin" if spin else "")
    out = [(name, {"name": name, "p50_us": r["fault_lat"]["p50_us"],
                   "p99_us": r["fault_lat"]["p99_us"], "gbps": r["gbps"], "faults": r["faults"],
                   "bad_pages": r["verify_bad_pages"]})]
    if mode == "remote" and not spin:
        for ra in (0, 2 << 20) if order == "seq" and chunk < 65536 else (0,):
            for c_loop in (True, False):
                ours = (f"pager-refnode-{chunk >> 10}k-{order}" + ("" if ra else "-nora")
                        + ("" if c_loop else "-pyloop"))
                out.append((ours, {"name": ours, "c_loop": c_loop,
                                   **refnode_case(port, mib, chunk, order, ra, c_loop)}))
    return out


def refnode_case(port: int, mib: int, chunk: int, order: str, readahead: int,
                 c_loop: bool = True) -> dict:
    """Our engine (in this process, as refpager's handler is in its) on the C node; with
    ``c_loop`` False the Python fault loop serves every fault (readahead cases use it anyway)."""
    return engine_case(_RefnodeSource(port), mib, chunk, order, readahead, c_loop)


def engine_case(source: PageSource, mib: int, chunk: int, order: str, readahead: int,
                c_loop: bool = True) -> dict:
    """Faults of one toucher thread over ``mib`` MiB served by our engine (in this process)
    from ``source``: fault latency, rate, and how many faults the C loop served."""
    from pager.engine import FaultEngine
    engine = FaultEngine(source, chunk_size=chunk, readahead=readahead, c_loop=c_loop)
    size = mib << 20
    c = Client(size)
    try:
        engine.add_client(os.dup(c.uffd.fileno()), [Region(c.base, size, 0)])
        t = Touch(c.base, size, order=order, threads=1, step=chunk).start()
        if not t.wait(300):
            raise RuntimeError("the pager did not serve the faults within 300 s")
        lat = t.latencies_us()
        deadline = time.monotonic() + 2  # the C loop folds its counters in when it returns
        while engine.stats().faults < t.naccess and time.monotonic() < deadline:
            time.sleep(0.01)
        return {"p50_us": round(percentile(lat, 0.5), 2), "p99_us": round(percentile(lat, 0.99), 2),
                "gbps": round(size / t.seconds() / 1e9, 3), "faults": t.naccess,
                "c_faults": engine.stats().c_faults}
    finally:
        c.close(unmap=True)
        engine.close()


def _median_of(runs: list[dict]) -> dict:
    out = dict(runs[0])
    for key in ("p50_us", "p99_us", "gbps"):
        vals = sorted(r[key] for r in runs)
        out[key] = vals[len(vals) // 2]
    out["runs"] = len(runs)
    return out


def refpager_cases(refdir: Path, mib: int, repeat: int = 1) -> dict[str, dict]:
    """refpager-remote / -local, unpinned (like a real pager), same region size."""
    out: dict[str, dict] = {}
    port = refpager.free_port()
    node = subprocess.Popen([str(refdir / "refpager-memnode"), "--mib", str(mib), "--port",
                             str(port), "--cpu", "-1"], stdout=subprocess.PIPE, text=True)
    try:
        node.stdout.readline()  # {"ready": true ...}
        samples: dict[str, list[dict]] = {}
        for _ in range(max(1, repeat)):  # interleaved, so both see the same machine load
            for mode in ("remote", "local"):
                for chunk in (PAGE_SIZE, 65536):
                    for order in ("seq", "rand"):
                        for spin in (False, True) if chunk == PAGE_SIZE else (False,):
                            for name, r in _reference_pair(refdir, port, mib, mode, chunk,
                                                           order, spin):
                                samples.setdefault(name, []).append(r)
        for name, runs in samples.items():
            out[name] = _median_of(runs)
    finally:
        node.terminate()
        node.wait(10)
    return out


def _seeded_node(tmp: Path, store: str, extra: list[str], data: DataSet) -> tuple[Child, str]:
    """A memory node on ``tmp/store`` holding ``data`` in space "bench", and its endpoint."""
    node = Child(["memnode", "--listen", "127.0.0.1:0", "--store", str(tmp / store),
                  "--token-file", str(tmp / "token"), *extra], tmp / f"{store}.log")
    try:
        endpoint = node.wait_for(r"listening on (\S+)")
        _status(f"seeding {data.size >> 20} MiB on memory node {endpoint}")
        from pager.source import MemnodeSource
        from transport.token import load_token
        lane = MemnodeSource(endpoint, load_token(tmp / "token"), "bench").open_lane()
        try:
            for off, buf in data.chunks():
                lane.store_from(None, off, buf)
        finally:
            lane.close()
    except BaseException:
        node.stop()
        raise
    return node, endpoint


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="ssi-bench-ref-") as reftmp:
        # found (or built) first: a missing reference is an error before any case runs
        refdir = None if args.no_ref else refpager.locate(args.refpager, Path(reftmp))
        return _run(args, refdir)


def _run(args: argparse.Namespace, refdir: Path | None) -> int:
    size = args.mib << 20
    data = DataSet(size, holes=False)
    results: dict[str, dict] = {}
    bad = 0
    with tempfile.TemporaryDirectory(prefix="ssi-bench-") as tmp_s:
        tmp = Path(tmp_s)
        # the same pages on two nodes: one polling (the default), one not (-nopoll cases)
        node, endpoint = _seeded_node(tmp, "store", [], data)
        nopoll_node = None
        try:
            nopoll_node, nopoll_endpoint = _seeded_node(tmp, "store-nopoll", ["--poll-us", "0"],
                                                        data)
            snap = tmp / "snapshot.mem"
            data.write_file(str(snap))
            os.sync()  # the seeded store's writeback would otherwise compete with case one
            sources = {
                "remote": ["--memnode", endpoint, "--token-file", str(tmp / "token"),
                           "--space", "bench"],
                "file": ["--source", f"file:{snap}"],
            }
            # (source, chunk, readahead, orders, suffix, extra serve options)
            configs = [(src, chunk, True, ("seq", "rand"), "", [])
                       for src in ("remote", "file") for chunk in (PAGE_SIZE, 65536)]
            configs += [("remote", chunk, False, ("seq",), "-nora", [])
                        for chunk in (PAGE_SIZE, 65536)]
            # the bare fault path served by the Python loop too (serve --no-c-loop)
            configs += [("remote", PAGE_SIZE, False, ("seq",), "-nora-pyloop", ["--no-c-loop"])]
            # adaptive polling against none (pager and node both at --poll-us 0), idle and
            # beside a CPU burner per core
            configs += [("remote", PAGE_SIZE, False, ("rand",), "-nora", []),
                        ("remote", PAGE_SIZE, False, ("seq", "rand"), "-nora-nopoll",
                         ["--poll-us", "0"]),
                        ("remote", PAGE_SIZE, False, ("rand",), "-nora-busy", []),
                        ("remote", PAGE_SIZE, False, ("rand",), "-nora-nopoll-busy",
                         ["--poll-us", "0"])]
            for src, chunk, ra, orders, suffix, extra in configs:
                tag = f"{src}-{chunk >> 10}k"
                names = {o: f"pager-{tag}-{o}{suffix}" for o in orders}
                if args.only and not any(args.only in n for n in names.values()):
                    continue
                nopoll = "--poll-us" in extra
                n = nopoll_node if nopoll else node
                srcargs = sources[src] if src == "file" or not nopoll else [
                    "--memnode", nopoll_endpoint, *sources[src][2:]]
                sock = str(tmp / f"{tag}{suffix}.sock")
                pager = Child(["serve", "--socket", sock, *srcargs, "--chunk", str(chunk),
                                "--readahead", "2M" if ra else "0", *extra],
                              tmp / f"{tag}{suffix}.log")
                try:
                    pager.wait_for("pager: serving")
                    for order, name in names.items():
                        if args.only and args.only not in name:
                            continue
                        _status(f"{name} ...")
                        r = {"name": name, **_costed(
                            pager.p.pid, n.p.pid if src == "remote" else None,
                            suffix.endswith("-busy"),
                            functools.partial(measure, sock, size, chunk, order, data))}
                        bad += r["bad_pages"]
                        results[name] = r
                        _emit(r)
                finally:
                    pager.stop()
            if args.rss_gib:
                _emit(_rss_case(tmp, args.rss_gib))
        finally:
            node.stop()
            if nopoll_node is not None:
                nopoll_node.stop()
    refs = refpager_cases(refdir, args.mib, args.repeat) if refdir is not None else {}
    for r in refs.values():
        _emit(r)
    results.update({k: v for k, v in refs.items() if k.startswith("pager-")})
    for ours, ref, what in (
            ("pager-refnode-4k-seq-nora", "refpager-remote-4k-seq", "p50"),
            ("pager-refnode-4k-seq-nora-pyloop", "refpager-remote-4k-seq", "p50"),
            ("pager-refnode-4k-rand-nora-pyloop", "refpager-remote-4k-rand", "p50"),
            ("pager-remote-4k-seq-nora-pyloop", "refpager-remote-4k-seq", "p50"),
            ("pager-refnode-4k-rand-nora", "refpager-remote-4k-rand", "p50"),
            ("pager-refnode-64k-seq-nora", "refpager-remote-64k-seq", "gbps"),
            ("pager-refnode-4k-seq", "refpager-remote-4k-seq", "gbps"),
            ("pager-remote-4k-seq-nora", "refpager-remote-4k-seq", "p50"),
            ("pager-remote-4k-rand", "refpager-remote-4k-rand", "p50"),
            ("pager-remote-4k-rand-nora", "refpager-remote-4k-rand-spin", "p50"),
            ("pager-remote-4k-seq-nora", "refpager-remote-4k-seq-spin", "p50"),
            ("pager-remote-64k-seq-nora", "refpager-remote-64k-seq", "gbps"),
            ("pager-remote-64k-seq", "refpager-remote-64k-seq", "gbps"),
            ("pager-remote-4k-seq", "refpager-remote-4k-seq", "gbps")):
        if ours in results and ref in refs:
            a, b = results[ours], refs[ref]
            ratio = (a["p50_us"] / b["p50_us"]) if what == "p50" else (a["gbps"] / b["gbps"])
            goal = "<= 1.5" if what == "p50" else ">= 0.75"
            _emit({"name": f"ratio-{ours}-vs-{ref}", "metric": what, "ratio": round(ratio, 3),
                   "goal": goal, "ours": a[f"{what}_us" if what == "p50" else "gbps"],
                   "reference": b[f"{what}_us" if what == "p50" else "gbps"]})
    return 3 if bad else 0


def _rss_case(tmp: Path, gib: int) -> dict:
    """The pager's RSS while one client of ``gib`` GiB faults everything in (sparse file)."""
    snap = tmp / "big.mem"
    with open(snap, "wb") as f:
        f.truncate(gib << 30)
    sock = str(tmp / "rss.sock")
    pager = Child(["serve", "--socket", sock, "--source", f"file:{snap}"], tmp / "rss.log")
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                peak[0] = max(peak[0], _rss_kib(pager.p.pid)[0])
            stop.wait(0.05)

    try:
        pager.wait_for("pager: serving")
        idle = _rss_kib(pager.p.pid)[0]
        _status(f"pager RSS with a {gib} GiB client ...")
        th = threading.Thread(target=sample, daemon=True)
        th.start()
        r = measure(sock, gib << 30, 65536, "seq", None)
        stop.set()
        th.join()
        return {"name": f"pager-rss-{gib}g-client", "rss_idle_mib": round(idle / 1024, 1),
                "rss_peak_mib": round(peak[0] / 1024, 1),
                "hwm_mib": round(_rss_kib(pager.p.pid)[1] / 1024, 1), "gbps": r["gbps"],
                "goal_mib": 150}
    finally:
        stop.set()
        pager.stop()
