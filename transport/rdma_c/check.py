"""`ssi-pager rdma-check HOST:PORT`: does RDMA work to this memory node, from this host?

Loads the RDMA extension, lists the RDMA devices, connects an RDMA lane to the node's RDMA
service (its TCP port + 1000; start the node with ``memnode --rdma``), proves it (a random
page stored into the scratch space and read back, compared) and times round trips and 4 KiB
fetches. Prints one line per step and ``rdma-check: OK`` or ``rdma-check: FAILED: why``;
the exit status says the same (0 / 1). `bench_lines` gives ``bench transport --rdma`` its
``rdma_fetch_*`` lines.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Any

from transport.token import default_token_path, load_token
from transport.wire import PAGE_SIZE


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("endpoint", metavar="HOST:PORT", help="the memory node's TCP endpoint "
                        "(its RDMA service listens on PORT + 1000)")
    parser.add_argument("--token-file", default=None,
                        help=f"cluster token (default {default_token_path()})")
    parser.add_argument("--insecure-no-auth", action="store_true",
                        help="the node runs with --insecure-no-auth")
    parser.add_argument("--count", type=int, default=1000, help="round trips to time")


def _say(text: str) -> None:
    print(f"rdma-check: {text}", flush=True)


def check(endpoint: str, token: bytes | None, count: int = 1000) -> dict[str, Any]:
    """Every step of the check; raises (TransportError, anything) at the first failure."""
    from transport.lane import PROOF_SPACE, prove_lane
    from transport.rdma import RdmaLane, backend, rdma_devices

    result: dict[str, Any] = {"backend": backend(), "devices": rdma_devices()}
    _say(f"backend {result['backend']}, devices {' '.join(result['devices'])}")
    with RdmaLane.connect(endpoint, token, PROOF_SPACE) as lane:
        _say(f"connected and authenticated to {endpoint} (RDMA port +1000)")
        prove_lane(lane)
        _say("lane proven: a random page stored and read back byte for byte")
        rtts = [lane.ping() for _ in range(max(1, count))]
        result["rtt_p50_us"] = round(statistics.median(rtts) * 1e6, 2)
        page = bytearray(os.urandom(PAGE_SIZE))
        lane.store_from(0, page)
        buf = bytearray(PAGE_SIZE)
        import time

        lat = []
        for _ in range(max(1, count)):
            t0 = time.perf_counter()
            lane.fetch_into(0, buf)
            lat.append(time.perf_counter() - t0)
        if buf != page:
            raise RuntimeError("a fetched page differs from the one stored")
        result["fetch_4k_p50_us"] = round(statistics.median(lat) * 1e6, 2)
        _say(f"round trip p50 {result['rtt_p50_us']} us, 4 KiB fetch p50 "
             f"{result['fetch_4k_p50_us']} us ({count} each)")
    return result


def bench_lines(endpoint: str, token: bytes | None, space: str, span: int, count: int,
                label: str) -> list[dict[str, Any]]:
    """``rdma_fetch_4k`` / ``rdma_fetch_64k`` over a proven RDMA lane (pages already stored
    in ``space`` by the TCP part of the bench)."""
    from transport.bench import bench_blocking
    from transport.lane import PROOF_SPACE, prove_lane
    from transport.rdma import RdmaLane

    with RdmaLane.connect(endpoint, token, PROOF_SPACE) as probe:
        prove_lane(probe)
    with RdmaLane.connect(endpoint, token, space) as lane:
        return [bench_blocking(lane, "rdma_fetch_4k", PAGE_SIZE, span, count, label),
                bench_blocking(lane, "rdma_fetch_64k", 64 * 1024, span, max(500, count // 4),
                               label)]


def run(args: argparse.Namespace) -> int:
    token = None if args.insecure_no_auth else load_token(args.token_file)
    try:
        check(args.endpoint, token, args.count)
    except Exception as exc:
        _say(f"FAILED: {type(exc).__name__}: {exc}")
        return 1
    _say("OK")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="rdma-check")
    configure(p)
    sys.exit(run(p.parse_args()))
