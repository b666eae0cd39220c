"""`ssi-pager bench transport`: page fetch latency and throughput, JSON lines on stdout.

Lines (``name``, ``p50_us``, ``p99_us``, ``gbps`` where they apply):

* ``fetch_4k``            4 KiB fetch, one request in flight (BlockingChannel: the fault path)
* ``fetch_64k``           64 KiB fetch, one request in flight
* ``fetch_4k_zero``       4 KiB fetch of a never-written page (32 bytes on the wire)
* ``fetch_4k_async``      4 KiB fetch on the asyncio transport's urgent lane
* ``pipelined``           many 64 KiB fetches in flight on the asyncio transport (throughput)
* ``ref_remote_4k`` / ``ref_remote_64k``   the C reference pager (refpager-remote against
  refpager-memnode) in the same run: fault latency, and its handler's mean fetch time
* ``ratio_*``             ours / reference (goal: 4 KiB p50 <= 1.5, pipelined >= 0.75)
* ``fault_4k``            real 4 KiB page faults (uffd) served by the pager's C fault loop from
  the node's C fault lane (``c_faults``: how many the C loop served): the fault path
* with ``--tls``: the same lines (label ``<label>-tls``) against a second node started with
  ``--tls`` in the same rounds, and ``tls_cost_*`` (how many times TLS costs: plaintext / TLS
  Gbit/s where the line has a rate, else TLS / plaintext p50). TLS runs in C on both sides
  (`transport.tlsc`): ``fetch_*`` and ``fault_4k`` go through the node's C fault lane, and
  ``fault_4k`` through the pager's C fault loop, so the cost is encryption's alone;
  ``pipelined`` is the bulk transfer (asyncio lanes, Python's ``ssl`` on the pager side).
* ``rdma_fetch_4k`` / ``rdma_fetch_64k``   with ``--rdma --endpoint``: the same fetches over a
  proven RDMA lane (`transport.rdma_c.check.bench_lines`)
* ``checksum-crc32-4k`` / ``checksum-crc32c-4k``   the memory node's per-page checksum
  (``ns_per_page``, zlib's crc32 of stores written before CRC32C vs CRC32C on the CPU's crc32
  instruction where ``hardware``), as the store computes it, in this process; and
  ``ratio-checksum-crc32c-crc32-4k`` (crc32c / crc32; `transport.node.checksum.bench_lines`)

Without ``--endpoint`` a memory node is started on loopback (its own process) and filled with
``--mib`` MiB. ``--netns`` repeats the client measurements across a veth link between two
network namespaces (needs root and the checkout's tests/netns.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pager.tools import refpager
from pager.tools.child import killed_after
from transport.node.checksum import bench_lines as checksum_lines
from transport.tcp import BlockingChannel, TcpTransport
from transport.tcp import run as run_loop
from transport.token import load_token
from transport.wire import PAGE_SIZE

NODE_START_TIMEOUT = 60.0  # s for a memory node to say where it listens


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="JSON lines only (the default "
                        "output is JSON lines too; this silences the human summary)")
    parser.add_argument("--endpoint", help="measure against this memory node (HOST:PORT)")
    parser.add_argument("--token-file", help="cluster token for --endpoint")
    parser.add_argument("--space", default="bench")
    parser.add_argument("--mib", type=int, default=64, help="data set size (default 64 MiB)")
    parser.add_argument("--count", type=int, default=5000, help="fetches per latency figure")
    parser.add_argument("--seconds", type=float, default=2.0, help="throughput run length")
    parser.add_argument("--label", default="loopback", help="suffix tag of this run's lines")
    refpager.add_arguments(parser)
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternate ours and the reference this many times; medians")
    parser.add_argument("--netns", action="store_true",
                        help="also measure across a veth link between two namespaces")
    parser.add_argument("--rdma", action="store_true",
                        help="also measure RDMA lanes (rdma_fetch_4k/64k) against --endpoint, "
                             "a node started with memnode --rdma on an RDMA NIC")
    parser.add_argument("--tls", action="store_true",
                        help="also measure TLS 1.3 (a second node with --tls) beside "
                             "plaintext in the same rounds")
    parser.add_argument("--no-fill", action="store_true", help=argparse.SUPPRESS)


def emit(line: dict[str, Any]) -> None:
    print(json.dumps(line), flush=True)


def percentiles(samples: list[float]) -> tuple[float, float]:
    s = sorted(samples)
    return s[len(s) // 2] * 1e6, s[min(len(s) - 1, int(len(s) * 0.99))] * 1e6


def bench_blocking(ch: BlockingChannel, name: str, size: int, span: int, count: int,
                   label: str, gpa_base: int = 0) -> dict[str, Any]:
    buf = bytearray(size)
    rnd = random.Random(1)
    slots = max(1, span // size)
    gpas = [gpa_base + rnd.randrange(slots) * size for _ in range(count)]
    for gpa in gpas[:100]:  # warm up
        ch.fetch_into(gpa, buf)
    lat = []
    perf = time.perf_counter
    t_start = perf()
    for gpa in gpas:
        t0 = perf()
        ch.fetch_into(gpa, buf)
        lat.append(perf() - t0)
    wall = perf() - t_start
    p50, p99 = percentiles(lat)
    return {"name": name, "label": label, "p50_us": round(p50, 2), "p99_us": round(p99, 2),
            "gbps": round(count * size * 8 / wall / 1e9, 3), "n": count}


async def bench_async(endpoint: str, token: bytes | None, space: str, span: int, count: int,
                      seconds: float, label: str) -> list[dict[str, Any]]:
    out = []
    async with TcpTransport(token, space) as t:
        await t.connect_peer("n", endpoint)
        buf = bytearray(PAGE_SIZE)
        rnd = random.Random(2)
        lat = []
        for _ in range(min(count, 3000)):
            gpa = rnd.randrange(span // PAGE_SIZE) * PAGE_SIZE
            t0 = time.perf_counter()
            await t.fetch_pages(gpa, 1, "n", buf)
            lat.append(time.perf_counter() - t0)
        p50, p99 = percentiles(lat)
        out.append({"name": "fetch_4k_async", "label": label, "p50_us": round(p50, 2),
                    "p99_us": round(p99, 2), "n": len(lat)})
        # pipelined: 64 KiB fetches, `depth` in flight across the bulk lanes
        depth, size = 32, 64 * 1024
        bufs = [bytearray(size) for _ in range(depth)]
        done = 0
        lat = []
        deadline = time.perf_counter() + seconds

        async def worker(i: int) -> None:
            nonlocal done
            r = random.Random(100 + i)
            while time.perf_counter() < deadline:
                gpa = r.randrange(span // size) * size
                t0 = time.perf_counter()
                await t.fetch_pages(gpa, size // PAGE_SIZE, "n", bufs[i], urgent=False)
                lat.append(time.perf_counter() - t0)
                done += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(depth)))
        wall = time.perf_counter() - t0
        p50, p99 = percentiles(lat)
        out.append({"name": "pipelined", "label": label, "p50_us": round(p50, 2),
                    "p99_us": round(p99, 2), "gbps": round(done * size * 8 / wall / 1e9, 3),
                    "in_flight": depth, "request_bytes": size})
    return out


def measure(endpoint: str, token: bytes | None, args: argparse.Namespace,
            label: str) -> list[dict[str, Any]]:
    span = args.mib << 20
    lines = []
    with BlockingChannel.connect(endpoint, token, args.space) as ch:
        if not args.no_fill:
            chunk = os.urandom(1 << 20)
            for off in range(0, span, len(chunk)):
                ch.store(off, chunk)
        lines.append(bench_blocking(ch, "fetch_4k", PAGE_SIZE, span, args.count, label))
        lines.append(bench_blocking(ch, "fetch_64k", 64 * 1024, span, max(500, args.count // 4),
                                    label))
        lines.append(bench_blocking(ch, "fetch_4k_zero", PAGE_SIZE, span,
                                    max(500, args.count // 4), label, gpa_base=span + (1 << 30)))
    lines.append(bench_faults(endpoint, token, args, label))
    lines += run_loop(bench_async(endpoint, token, args.space, span, args.count, args.seconds,
                             label))
    return lines


def bench_faults(endpoint: str, token: bytes | None, args: argparse.Namespace,
                 label: str) -> dict[str, Any]:
    """``fault_4k``: real 4 KiB page faults served by the pager's C fault loop (engine in this
    process) from the node's C fault lane, one toucher thread in random order; ``c_faults``
    says how many the C loop served (with TLS: both C lanes through their TLS sessions)."""
    from pager.source import MemnodeSource
    from pager.tools.bench import engine_case

    mib = max(1, min(args.mib, 16))
    r = engine_case(MemnodeSource(endpoint, token, args.space), mib, PAGE_SIZE, "rand", 0)
    r["gbps"] = round(r["gbps"] * 8, 3)  # GB/s there, Gbit/s in these lines
    return {"name": "fault_4k", "label": label, **r}


# --- the C reference ---------------------------------------------------------------------------

class RefPager:
    """refpager-memnode running, refpager-remote run against it on demand."""

    def __init__(self, refdir: Path, mib: int) -> None:
        self.refdir, self.mib, self.port = refdir, mib, refpager.free_port()
        self.node = subprocess.Popen([str(refdir / "refpager-memnode"), "--mib", str(mib),
                                      "--port", str(self.port), "--cpu", "-1"],
                                     stdout=subprocess.PIPE, text=True)
        assert self.node.stdout is not None
        ready = self.node.stdout.readline()
        if '"ready":true' not in ready:
            self.close()
            raise RuntimeError(f"refpager-memnode did not start: {ready!r}")

    def remote(self, chunk: int) -> dict[str, Any]:
        res = subprocess.run([str(self.refdir / "refpager-remote"), "--mib", str(self.mib),
                              "--chunk", str(chunk), "--order", "seq", "--tcpu", "-1",
                              "--hcpu", "-1", "--port", str(self.port)],
                             capture_output=True, text=True, timeout=300, check=True)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        return {"name": f"ref_remote_{chunk // 1024}k", "label": "loopback",
                "p50_us": r["fault_lat"]["p50_us"], "p99_us": r["fault_lat"]["p99_us"],
                "gbps": r["gbps"], "fetch_mean_us": r["handler"]["fetch_mean_us"],
                "verify_bad_pages": r["verify_bad_pages"]}

    def python_client_fetch(self, count: int) -> dict[str, Any]:
        """Our kind of client loop (Python, blocking, recv_into) against the C node: separates
        the client's cost from the server's."""
        req = struct.Struct("<QI")
        buf = bytearray(PAGE_SIZE)
        rnd = random.Random(3)
        lat = []
        with socket.create_connection(("127.0.0.1", self.port)) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(count):
                msg = req.pack(rnd.randrange((self.mib << 20) // PAGE_SIZE) * PAGE_SIZE,
                               PAGE_SIZE)
                t0 = time.perf_counter()
                s.sendall(msg)
                s.recv_into(buf, PAGE_SIZE, socket.MSG_WAITALL)
                lat.append(time.perf_counter() - t0)
        p50, p99 = percentiles(lat)
        return {"name": "ref_node_pyclient_4k", "label": "loopback", "p50_us": round(p50, 2),
                "p99_us": round(p99, 2), "n": count}

    def close(self) -> None:
        self.node.terminate()
        self.node.wait(10)


def ratios(ours: list[dict[str, Any]], ref: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {line["name"]: line for line in ours + ref}
    out = []
    if "fetch_4k" in by and "ref_remote_4k" in by:
        out.append({"name": "ratio_fetch_4k_p50_vs_ref_fault_4k_p50",
                    "ratio": round(by["fetch_4k"]["p50_us"] / by["ref_remote_4k"]["p50_us"], 3),
                    "goal": "<= 1.5"})
        out.append({"name": "ratio_fetch_4k_p50_vs_ref_fetch_4k_mean",
                    "ratio": round(by["fetch_4k"]["p50_us"]
                                   / by["ref_remote_4k"]["fetch_mean_us"], 3),
                    "goal": "<= 1.5"})
    if "fetch_4k" in by and "ref_node_pyclient_4k" in by:
        out.append({"name": "ratio_fetch_4k_p50_vs_pyclient_on_ref_node",
                    "ratio": round(by["fetch_4k"]["p50_us"]
                                   / by["ref_node_pyclient_4k"]["p50_us"], 3)})
    if "pipelined" in by and "ref_remote_64k" in by:
        out.append({"name": "ratio_pipelined_gbps_vs_ref_64k_gbps",
                    "ratio": round(by["pipelined"]["gbps"] / by["ref_remote_64k"]["gbps"], 3),
                    "goal": ">= 0.75"})
    return out


# --- memory node processes -----------------------------------------------------------------------

def start_memnode(tmp: Path, listen: str, prefix: list[str] | None = None,
                  extra: tuple[str, ...] = (), store: str = "store"
                  ) -> tuple[subprocess.Popen[str], str]:
    cmd = [*(prefix or []), sys.executable, "-m", "pager.cli", "memnode", "--listen", listen,
           "--store", str(tmp / store), "--token-file", str(tmp / "token"), *extra]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    with killed_after(proc, NODE_START_TIMEOUT):  # a silent node is killed: the loop ends
        for line in proc.stderr:
            m = re.search(r"listening on (\S+)", line)
            if m:
                return proc, m.group(1)
    proc.wait()
    raise RuntimeError(f"the memory node did not start within {NODE_START_TIMEOUT:.0f} s "
                       f"(exit code {proc.returncode}): {' '.join(cmd)}")


def bench_netns(args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    try:
        from tests.netns import two_hosts, unavailable
    except ImportError:
        print("bench: --netns needs the source checkout (tests/netns.py)", file=sys.stderr)
        return []
    reason = unavailable()
    if reason:
        print(f"bench: skipping the namespace link: {reason}", file=sys.stderr)
        return []
    lines = []
    with two_hosts() as (ns_a, _ip_a, ns_b, ip_b):
        node, endpoint = start_memnode(tmp / "ns", ip_b, ["ip", "netns", "exec", ns_b])
        try:
            res = subprocess.run(
                ["ip", "netns", "exec", ns_a, sys.executable, "-m", "pager.cli", "bench",
                 "transport", "--json", "--no-ref", "--endpoint", endpoint, "--token-file",
                 str(tmp / "ns" / "token"), "--label", "netns", "--mib", str(args.mib),
                 "--count", str(args.count), "--seconds", str(args.seconds)],
                capture_output=True, text=True, timeout=600, check=True)
            lines = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
        finally:
            node.terminate()
            node.wait(10)
    return lines


def run(args: argparse.Namespace) -> int:
    return main(args)


def measure_tls(endpoint: str, token: bytes | None, args: argparse.Namespace,
                tls_dir: Path) -> list[dict[str, Any]]:
    """`measure` with every connection of this process over TLS."""
    from transport.tls import client_context, use_client_tls

    use_client_tls(client_context(tls_dir))
    try:
        return measure(endpoint, token, args, f"{args.label}-tls")
    finally:
        use_client_tls(None)


def tls_costs(plain: list[dict[str, Any]], tls: list[dict[str, Any]]
              ) -> list[dict[str, Any]]:
    """How many times TLS costs per line: plaintext / TLS Gbit/s where the line has a rate,
    else TLS / plaintext p50."""
    by_name = {line["name"]: line for line in plain}
    out = []
    for line in tls:
        base = by_name.get(line["name"])
        if base is None:
            continue
        if line.get("gbps") and base.get("gbps"):
            out.append({"name": f"tls_cost_{line['name']}", "label": args_label(line),
                        "ratio": round(base["gbps"] / line["gbps"], 3)})
        elif line.get("p50_us") and base.get("p50_us"):
            out.append({"name": f"tls_cost_{line['name']}", "label": args_label(line),
                        "ratio": round(line["p50_us"] / base["p50_us"], 3)})
    return out


def args_label(line: dict[str, Any]) -> str:
    return str(line.get("label", ""))


def median_lines(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per name, the median over rounds of every numeric field."""
    out = []
    for first in rounds[0]:
        same = [line for r in rounds for line in r if line["name"] == first["name"]]
        merged = dict(first)
        for key, value in first.items():
            if isinstance(value, float | int) and not isinstance(value, bool):
                merged[key] = round(statistics.median(x[key] for x in same), 3)
        merged["rounds"] = len(same)
        out.append(merged)
    return out


def main(args: argparse.Namespace) -> int:
    if getattr(args, "rdma", False) and not args.endpoint:
        print("bench: --rdma needs --endpoint HOST:PORT of a node started with memnode --rdma",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="ssipg-bench-") as tmpdir:
        tmp = Path(tmpdir)
        if args.endpoint:
            token = load_token(args.token_file) if args.token_file else None
            for line in measure(args.endpoint, token, args, args.label):
                emit(line)
            if args.rdma:
                from transport.rdma_c.check import bench_lines

                for line in bench_lines(args.endpoint, token, args.space, args.mib << 20,
                                        args.count, args.label):
                    emit(line)
            return 0
        ref: RefPager | None = None
        if not args.no_ref:  # missing: an error saying where it was looked for
            ref = RefPager(refpager.locate(args.refpager, tmp), args.mib)
        node, endpoint = start_memnode(tmp, "127.0.0.1:0")
        token = load_token(tmp / "token")
        tls_node = None
        if getattr(args, "tls", False):
            tls_node, tls_endpoint = start_memnode(
                tmp, "127.0.0.1:0", extra=("--tls", "--tls-dir", str(tmp / "tls")),
                store="tls-store")
        tls_rounds: list[list[dict[str, Any]]] = []
        cost_rounds: list[list[dict[str, Any]]] = []
        ours_rounds: list[list[dict[str, Any]]] = []
        ref_rounds: list[list[dict[str, Any]]] = []
        ratio_rounds: list[list[dict[str, Any]]] = []
        try:
            # ours and the reference alternate, so both see the same machine load
            for r in range(args.rounds):
                args.no_fill = r > 0
                ours = measure(endpoint, token, args, args.label)
                ours_rounds.append(ours)
                if tls_node is not None:
                    tls = measure_tls(tls_endpoint, token, args, tmp / "tls")
                    tls_rounds.append(tls)
                    cost_rounds.append(tls_costs(ours, tls))
                if ref is not None:
                    refs = [ref.remote(4096), ref.remote(65536),
                            ref.python_client_fetch(args.count)]
                    ref_rounds.append(refs)
                    ratio_rounds.append(ratios(ours, refs))
        finally:
            for proc in (node, tls_node):
                if proc is not None:
                    proc.terminate()
                    proc.wait(10)
            if ref is not None:
                ref.close()
        ours = median_lines(ours_rounds)
        if tls_rounds:
            ours += median_lines(tls_rounds) + median_lines(cost_rounds)
        refs = median_lines(ref_rounds) if ref_rounds else []
        for line in ours + refs + (median_lines(ratio_rounds) if ratio_rounds else []):
            emit(line)
        for line in checksum_lines(label=args.label):  # the store's page checksum, per page
            emit(line)
        if args.netns:
            for line in bench_netns(args, tmp):
                emit(line)
        if not args.json:
            for line in ours + refs:
                head = f"{line['name']:>20} {line.get('label', ''):>9}"
                if "ratio" in line:  # tls_cost_*: how many times TLS costs
                    print(f"{head} {line['ratio']:6.2f}x", file=sys.stderr)
                    continue
                print(f"{head} p50 {line.get('p50_us', 0):8.1f} us  p99 "
                      f"{line.get('p99_us', 0):8.1f} us  {line.get('gbps', 0):6.2f} Gbit/s",
                      file=sys.stderr)
    return 0
