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
* ``aggregate_gbps`` guest fault throughput: ``--guests`` clients of one pager, each faulting
  its own space at random at the same time (4 KiB faults, every byte checked), the pager on
  the 3 nodes (R=2) against one on one node, in alternated rounds;
* ``compression_gbps`` page throughput over a 1 Gbit `tc tbf` link between two network
  namespaces, raw against lz4 and zstd, on real guest memory (`pager.tools.compress_bench`).

Numbers only mean something on a quiet machine; the ratios compare runs of the same process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
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
AGGREGATE_ROUNDS = 3  # alternated rounds of the several-guest figure


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="JSON lines (the only format)")
    parser.add_argument("--mib", type=int, default=64, help="data set per space (MiB)")
    parser.add_argument("--count", type=int, default=2000, help="fetches per latency figure")
    parser.add_argument("--guests", type=int, default=3,
                        help="guests faulting at once in the aggregate figure (default 3)")
    parser.add_argument("--fault-runs", type=int, default=25, metavar="N",
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


@contextlib.contextmanager
def side_pagers(tmp: Path, eps: list[str], sources: dict[str, Any], data: Any,
                guests: int) -> Iterator[dict[str, str]]:
    """A `serve` pager per side (4 KiB chunks, no readahead: every touch one fault) on
    ``sources``' nodes ({"one_node": the first node alone, "r2": the cluster, R=2}), and the
    spaces its guests read, seeded here through ``sources``: ``f-SIDE`` (the latency figure)
    and ``aggI-SIDE`` (the aggregate figure's guests); yields {side: pager socket}."""
    token = str(tmp / "n0" / "token")
    where = {"one_node": ["--memnode", eps[0]],
             "r2": [a for ep in eps for a in ("--memnode", ep)] + ["--replicas", "2"]}
    pagers: list[Child] = []
    socks: dict[str, str] = {}
    try:
        for side, src in sources.items():
            with src.open_lane() as lane:
                for space in [f"f-{side}"] + [f"agg{i}-{side}" for i in range(guests)]:
                    for off, buf in data.chunks():
                        lane.store_from(space, off, buf)
            socks[side] = str(tmp / f"{side}.sock")
            pagers.append(Child(["serve", "--socket", socks[side], *where[side], "--token-file",
                                 token, "--space", f"f-{side}", "--chunk", "4096",
                                 "--readahead", "0"], tmp / f"pager-{side}.log"))
            pagers[-1].wait_for("pager: serving")
        yield socks
    finally:
        for pager in pagers:
            pager.stop()


def fault_p50(socks: dict[str, str], metrics: list[str], data: Any, size: int,
              runs: int) -> dict[str, Any]:
    """The guest-fault figure: ``runs`` interleaved runs per side of a fresh client faulting
    its space at random, the median of each side's p50."""
    from pager.tools.bench import measure

    p50: dict[str, list[float]] = {side: [] for side in socks}
    bad = 0
    reads = [0.0] * len(metrics)  # per node, the R=2 side's fetches
    for _ in range(runs):
        for side, sock in socks.items():
            before = fetches_served(metrics) if side == "r2" else []
            r = measure(sock, size, 4096, "rand", data)
            if before:
                reads = [t + a - b for t, a, b in
                         zip(reads, fetches_served(metrics), before, strict=True)]
            p50[side].append(r["p50_us"])
            bad += r["bad_pages"]
    one, r2 = statistics.median(p50["one_node"]), statistics.median(p50["r2"])
    return {"r2": round(r2, 1), "one_node": round(one, 1), "ratio": round(r2 / one, 3),
            "goal": "<=1.1", "runs": runs, "runs_r2": p50["r2"],
            "runs_one_node": p50["one_node"], "bad_pages": bad,
            "r2_reads_per_node": sorted((round(n / max(1.0, sum(reads)), 3) for n in reads),
                                        reverse=True)}


def guests_gbps(sock: str, side: str, data: Any, size: int, guests: int) -> tuple[float, int]:
    """``guests`` clients of the pager on ``sock``, each faulting its own space (4 KiB at
    random, one thread each) at the same time: (Gbit/s of all of them, wrong pages)."""
    from pager.tools.workload import Client

    clients = [Client(size, space=f"agg{i}-{side}") for i in range(guests)]
    try:
        for c in clients:
            c.handoff(sock)
        t0 = time.perf_counter()
        touches = [c.touch(order="rand", threads=1, step=4096, latency=False) for c in clients]
        if not all(t.wait(300) for t in touches):
            raise RuntimeError("the pager did not serve the guests' faults within 300 s")
        seconds = time.perf_counter() - t0
        bad = sum(len(c.check(data)) for c in clients)
    finally:
        for c in clients:
            c.close(unmap=True)
    return guests * size * 8 / seconds / 1e9, bad


def aggregate(socks: dict[str, str], data: Any, size: int, guests: int,
              rounds: int) -> dict[str, Any]:
    """The aggregate figure: several guests faulting at once through the 3-node pager (R=2)
    against through the one-node pager, ``rounds`` alternated rounds, each side's median."""
    got: dict[str, list[float]] = {side: [] for side in socks}
    bad = 0
    for _ in range(rounds):
        for side, sock in socks.items():
            gbps, wrong = guests_gbps(sock, side, data, size, guests)
            got[side].append(round(gbps, 3))
            bad += wrong
    three, one = statistics.median(got["r2"]), statistics.median(got["one_node"])
    return {"three_nodes": round(three, 3), "one_node": round(one, 3),
            "ratio": round(three / one, 3), "guests": guests, "rounds": rounds,
            "rounds_three_nodes": got["r2"], "rounds_one_node": got["one_node"],
            "bad_pages": bad}


def emit(name: str, **kw: Any) -> None:
    print(json.dumps({"bench": "cluster", "name": name, **kw}), flush=True)


def run(args: argparse.Namespace) -> int:
    if args.link_child:
        print(json.dumps(compress_bench.link_child(*args.link_child)), flush=True)
        return 0
    size = args.mib << 20
    status = 0
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
            from pager.tools.workload import DataSet

            data = DataSet(size, holes=False)
            with side_pagers(tmp, eps, {"one_node": one, "r2": r2}, data, args.guests) as socks:
                faults = fault_p50(socks, [m for _, _, m in nodes], data, size, args.fault_runs)
                emit("fault_p50_us", **faults)
                agg = aggregate(socks, data, size, args.guests, AGGREGATE_ROUNDS)
                emit("aggregate_gbps", **agg)
            if faults["bad_pages"] or agg["bad_pages"]:
                print(f"bench cluster: {faults['bad_pages'] + agg['bad_pages']} wrong pages "
                      "served", file=sys.stderr)
                status = 1
            if not args.no_link:
                emit("compression_gbps", **compress_bench.compression_figure(
                    tmp, tmp / "n0" / "token", args.image))
        finally:
            for src in (r2, r1, one):
                src.close()
            for c, _, _ in nodes:
                c.stop()
    print("bench cluster: fault_p50_us and aggregate_gbps are guest faults through a pager; "
          "store_gbps and fetch_p50_us are lane-level (the write-back and fault paths' store "
          "and fetch)", file=sys.stderr)
    return status
