"""`ssi-pager bench cluster`: what replication costs, JSON lines on stdout.

Three memory nodes are started on loopback (their own processes, one token); then, through
the pager's lanes (`ClusterSource` against `MemnodeSource`, the fault path's fetch and the
write-back path's store):

* ``fetch_p50`` 64 KiB fetch p50, R=2 over 3 nodes against one node alone, in alternated
  rounds, the median of each side's per-round p50 (``ratio``: goal <= 1.1);
* ``fault_p50_us`` guest faults: a workload client faulting 4 KiB pages at random (one C
  toucher thread, as `bench faults`) through a `serve` pager on the cluster (R=2 over the 3
  nodes) against one through a pager on one node, runs interleaved, the median of each
  side's p50 reported (``ratio``: goal <= 1.1), with the share of the R=2 side's reads each
  node served (``r2_reads_per_node``, most first: how concentrated the read choice keeps
  them, `pager.source.placement.read_order`);
* ``store_gbps`` store throughput with R=2 against R=1 on the same 3 nodes (goal >= 0.5);
* ``aggregate_gbps`` ``--threads`` threads fetching their own spaces, 3 nodes (R=2) against
  one node;
* ``compression_gbps`` page throughput over a 1 Gbit `tc tbf` link between two network
  namespaces, raw against lz4 and zstd, on real guest memory (`pager.tools.compress_bench`).

Numbers only mean something on a quiet machine; the ratios compare runs of the same process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from pager.source import MemnodeSource
from pager.source.cluster import ClusterSource
from pager.tools import compress_bench
from pager.tools.child import Child
from pager.tools.refpager import free_port
from pager.tools.status import scrape
from transport.membership import StaticMembership
from transport.token import load_token

CHUNK = 64 << 10
FETCH_ROUNDS = 5  # alternated rounds of the lane-level fetch figure


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="JSON lines (the only format)")
    parser.add_argument("--mib", type=int, default=64, help="data set per space (MiB)")
    parser.add_argument("--count", type=int, default=2000, help="fetches per latency figure")
    parser.add_argument("--threads", type=int, default=3, help="threads of the aggregate run")
    parser.add_argument("--fault-runs", type=int, default=9, metavar="N",
                        help="runs of each side of the guest-fault figure (medians reported)")
    parser.add_argument("--node-arg", action="append", default=[], metavar="ARG",
                        help="extra `ssi-pager memnode` argument for every node, e.g. "
                             "--node-arg=--poll-max-us=0 (repeatable)")
    compress_bench.add_arguments(parser)


def start_nodes(tmp: Path, n: int, extra: list[str] | None = None
                ) -> list[tuple[Child, str, str]]:
    """``n`` memory nodes: (process, endpoint, metrics endpoint) each (``extra``: more
    memnode arguments)."""
    nodes = []
    for i in range(n):
        d = tmp / f"n{i}"
        d.mkdir()
        if i:
            shutil.copy(tmp / "n0" / "token", d / "token")
            os.chmod(d / "token", 0o600)
        metrics = f"127.0.0.1:{free_port()}"
        c = Child(["memnode", "--listen", "127.0.0.1:0", "--store", str(d / "store"),
                   "--token-file", str(d / "token"), "--name", f"n{i}", "--metrics", metrics,
                   *(extra or [])],
                  d / "memnode.log")
        nodes.append((c, c.wait_for(r"listening on (\S+)"), metrics))
    return nodes


def fetches_served(metrics: list[str]) -> list[float]:
    """FETCH requests each node has answered so far."""
    return [scrape(m, "memory node").total("ssi_memnode_requests_total", op="fetch",
                                           result="ok") for m in metrics]


def fill(source: Any, space: str, size: int) -> float:
    """Store ``size`` random bytes into ``space``; returns Gbit/s."""
    data = os.urandom(1 << 20)
    t0 = time.perf_counter()
    with source.open_lane() as lane:
        for gpa in range(0, size, len(data)):
            lane.store_from(space, gpa, data)
    return size * 8 / (time.perf_counter() - t0) / 1e9


def fetch_p50(source: Any, space: str, size: int, count: int) -> float:
    buf = memoryview(bytearray(CHUNK))
    lat = []
    with source.open_lane() as lane:
        for i in range(count):
            gpa = (i * 7919 * CHUNK) % size
            t0 = time.perf_counter()
            lane.fetch_into(space, gpa, buf)
            lat.append(time.perf_counter() - t0)
    return statistics.median(lat) * 1e6


def fetch_figure(sources: dict[str, Any], spaces: dict[str, str], size: int, count: int,
                 rounds: int) -> dict[str, Any]:
    """The lane-level fetch figure: ``rounds`` alternated rounds of ``count // rounds``
    fetches per side (a drift of the machine during the run hits both sides alike), the
    median of each side's per-round p50."""
    per = max(1, count // rounds)
    got: dict[str, list[float]] = {k: [] for k in sources}
    for _ in range(rounds):
        for k, src in sources.items():
            got[k].append(fetch_p50(src, spaces[k], size, per))
    med = {k: statistics.median(v) for k, v in got.items()}
    return {"r2": round(med["r2"], 1), "one_node": round(med["one_node"], 1),
            "ratio": round(med["r2"] / med["one_node"], 3), "goal": "<=1.1", "rounds": rounds}


def aggregate(source: Any, spaces: list[str], size: int) -> float:
    done = [0] * len(spaces)

    def worker(i: int) -> None:
        buf = memoryview(bytearray(CHUNK))
        with source.open_lane() as lane:
            for gpa in range(0, size, CHUNK):
                lane.fetch_into(spaces[i], gpa, buf)
                done[i] += CHUNK

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(spaces))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    return sum(done) * 8 / (time.perf_counter() - t0) / 1e9


def fault_p50(tmp: Path, eps: list[str], metrics: list[str], sources: dict[str, Any],
              size: int, runs: int) -> dict[str, Any]:
    """The guest-fault figure: ``sources`` {"one_node": one-node source, "r2": cluster
    source}, each seeded here with its own space; a pager per side (``serve``, 4 KiB
    chunks, no readahead: every touch one fault), ``runs`` interleaved runs of a fresh
    client each."""
    from pager.tools.bench import measure
    from pager.tools.workload import DataSet

    data = DataSet(size, holes=False)
    token = str(tmp / "n0" / "token")
    where = {"one_node": ["--memnode", eps[0]],
             "r2": [a for ep in eps for a in ("--memnode", ep)] + ["--replicas", "2"]}
    pagers: dict[str, tuple[Child, str]] = {}
    try:
        for side, src in sources.items():
            with src.open_lane() as lane:
                for off, buf in data.chunks():
                    lane.store_from(f"f-{side}", off, buf)
            sock = str(tmp / f"{side}.sock")
            pager = Child(["serve", "--socket", sock, *where[side], "--token-file", token,
                           "--space", f"f-{side}", "--chunk", "4096", "--readahead", "0"],
                          tmp / f"pager-{side}.log")
            pagers[side] = (pager, sock)
            pager.wait_for("pager: serving")
        p50: dict[str, list[float]] = {side: [] for side in pagers}
        bad = 0
        reads = [0.0] * len(metrics)  # per node, the R=2 side's fetches
        for _ in range(runs):
            for side, (_, sock) in pagers.items():
                before = fetches_served(metrics) if side == "r2" else []
                r = measure(sock, size, 4096, "rand", data)
                if before:
                    reads = [t + a - b for t, a, b in
                             zip(reads, fetches_served(metrics), before, strict=True)]
                p50[side].append(r["p50_us"])
                bad += r["bad_pages"]
    finally:
        for pager, _ in pagers.values():
            pager.stop()
    one, r2 = statistics.median(p50["one_node"]), statistics.median(p50["r2"])
    return {"r2": round(r2, 1), "one_node": round(one, 1), "ratio": round(r2 / one, 3),
            "goal": "<=1.1", "runs": runs, "runs_r2": p50["r2"],
            "runs_one_node": p50["one_node"], "bad_pages": bad,
            "r2_reads_per_node": sorted((round(n / max(1.0, sum(reads)), 3) for n in reads),
                                        reverse=True)}


def emit(name: str, **kw: Any) -> None:
    print(json.dumps({"bench": "cluster", "name": name, **kw}), flush=True)


def run(args: argparse.Namespace) -> int:
    if args.link_child:
        print(json.dumps(compress_bench.link_child(*args.link_child)), flush=True)
        return 0
    size = args.mib << 20
    status = 0
    spaces = [f"agg{i}" for i in range(args.threads)]
    with tempfile.TemporaryDirectory(prefix="ssi-bench-cluster-") as tmp_name:
        tmp = Path(tmp_name)
        nodes = start_nodes(tmp, 3, args.node_arg)
        token = load_token(tmp / "n0" / "token")
        eps = [ep for _, ep, _ in nodes]
        one = MemnodeSource(eps[0], token, "b1", prefer="tcp")
        r2 = ClusterSource(StaticMembership(endpoints=eps), token, "b2", replicas=2,
                           prefer="tcp")
        r1 = ClusterSource(StaticMembership(endpoints=eps), token, "b3", replicas=1,
                           prefer="tcp")
        try:
            store_one, store_r2, store_r1 = (fill(one, "b1", size), fill(r2, "b2", size),
                                             fill(r1, "b3", size))
            emit("store_gbps", r2=round(store_r2, 3), r1=round(store_r1, 3),
                 one_node=round(store_one, 3), ratio=round(store_r2 / store_r1, 3), goal=">=0.5")
            emit("fetch_p50_us", **fetch_figure({"one_node": one, "r2": r2},
                                                {"one_node": "b1", "r2": "b2"}, size,
                                                args.count, FETCH_ROUNDS))
            faults = fault_p50(tmp, eps, [m for _, _, m in nodes], {"one_node": one, "r2": r2},
                               size, args.fault_runs)
            emit("fault_p50_us", **faults)
            if faults["bad_pages"]:
                print(f"bench cluster: {faults['bad_pages']} wrong pages served",
                      file=sys.stderr)
                status = 1
            for s in spaces:
                fill(one, s, size)
                fill(r2, s, size)
            a_one, a_three = aggregate(one, spaces, size), aggregate(r2, spaces, size)
            emit("aggregate_gbps", three_nodes=round(a_three, 3), one_node=round(a_one, 3),
                 ratio=round(a_three / a_one, 3), threads=args.threads)
            if not args.no_link:
                emit("compression_gbps", **compress_bench.compression_figure(
                    tmp, tmp / "n0" / "token", args.image))
        finally:
            for src in (r2, r1, one):
                src.close()
            for c, _, _ in nodes:
                c.stop()
    print("bench cluster: fault_p50_us is guest faults through a pager; the others are "
          "lane-level (the fault and write-back paths' fetch and store)", file=sys.stderr)
    return status
