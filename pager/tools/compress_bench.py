"""`bench cluster`'s compression figure: page throughput over a 1 Gbit link (a `tc tbf` qdisc
on a veth pair between two network namespaces), raw against lz4 and zstd, on real guest
memory: ``--image FILE`` (a raw memory image, e.g. what `ssi-pager get` downloads of a
suspended guest's space), else the test guest's RAM read from its memfd once its workload
has run a pass (`ssi-pager vm` with a local memory node).

The memory node runs in one namespace; a child (``bench cluster --link-child``) in the other
stores the image's written pages through a bulk lane with compression forced on or off and
fetches them back, and prints Gbit/s of page bytes (raw size) both ways.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pager.core.region import PAGE_SIZE
from pager.uffd.mman import data_ranges

LINK_RATE = "1gbit"
CAPTURE_TIMEOUT = 300.0
CHUNK = 1 << 20


def capture_guest_ram(tmp: Path) -> Path | str:
    """The test guest's RAM after one pass of its workload, as a sparse image file; or why
    it cannot be had here."""
    from pager.vm.bench import guest_builder

    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is not installed"
    gb = guest_builder()
    try:
        guest = dataclasses.replace(gb.build(256, 128, 2), wait=True)
    except gb.GuestUnavailable as exc:
        return f"test guest unavailable: {exc}"
    runtime = tmp / "run"
    env = dict(os.environ, SSI_PAGER_RUNTIME_DIR=str(runtime))
    proc = subprocess.Popen([sys.executable, "-m", "pager.cli", "vm", "--name", "img", "--",
                             *guest.qemu_args()], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    image = tmp / "guest-ram.img"
    try:
        deadline = time.monotonic() + CAPTURE_TIMEOUT
        assert proc.stdout is not None
        for line in proc.stdout:  # the guest writes the console line by line
            if "pass 1 waiting" in line:
                break
            if time.monotonic() > deadline:
                return "the test guest did not reach its first pass in time"
        else:
            return "the test guest ended before its first pass"
        st = json.loads((runtime / "img" / "vm.json").read_text())
        copy_sparse(f"/proc/{st['qemu_pid']}/fd/{st['memfd']}", int(st["ram_size"]), image)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    return image


def copy_sparse(src: str, size: int, dst: Path) -> None:
    fd = os.open(src, os.O_RDONLY)
    try:
        with open(dst, "wb") as out:
            out.truncate(size)
            for start, length in data_ranges(fd, size):
                for off in range(start, start + length, CHUNK):
                    n = min(CHUNK, start + length - off)
                    out.seek(off)
                    out.write(os.pread(fd, n, off))
    finally:
        os.close(fd)


def link_child(endpoint: str, token_file: str, image: str, codec: str) -> dict[str, Any]:
    """Store the image's pages that `put` would send (written and not all zero) and fetch
    them back through one bulk lane (``codec`` "raw", "lz4" or "zstd"); Gbit/s of page
    bytes."""
    from pager.source import MemnodeSource
    from pager.tools.transfer import written_runs
    from transport.token import load_token

    compress = () if codec == "raw" else (codec,)
    src = MemnodeSource(endpoint, load_token(token_file), f"img-{codec}", prefer="tcp",
                        compress=compress)
    fd = os.open(image, os.O_RDONLY)
    size = os.fstat(fd).st_size
    buf = memoryview(bytearray(CHUNK))
    runs: list[tuple[int, int]] = []  # (offset, bytes): the non-zero pages, CHUNK at most
    for start, length in data_ranges(fd, size):
        for off in range(start, start + length, CHUNK):
            n = min(CHUNK, start + length - off) // PAGE_SIZE * PAGE_SIZE
            os.preadv(fd, [buf[:n]], off)
            runs += [(off + a, b - a) for a, b in written_runs(buf[:n])]
    total = sum(n for _, n in runs)
    try:
        with src.open_lane(bulk=True) as lane:
            t0 = time.perf_counter()
            for off, n in runs:
                os.preadv(fd, [buf[:n]], off)
                lane.store_from(None, off, buf[:n])
            t_store = time.perf_counter() - t0
            t0 = time.perf_counter()
            for off, n in runs:
                lane.fetch_into(None, off, buf[:n])
            t_fetch = time.perf_counter() - t0
    finally:
        os.close(fd)
        src.close()
    return {"codec": codec, "bytes": total, "store_gbps": total * 8 / t_store / 1e9,
            "fetch_gbps": total * 8 / t_fetch / 1e9}


def compression_figure(tmp: Path, token_file: Path, image: str | None) -> dict[str, Any]:
    """The figure's JSON fields (or ``skipped`` with the reason)."""
    from pager.vm.bench import netns_helper
    from pager.vm.procs import spawn_memnode, stop_process
    from transport.wire.codec import CODECS

    try:
        netns = netns_helper()
        why = netns.unavailable()
    except Exception as exc:  # the helper lives in the checkout's tests/
        why = f"no network-namespace helper: {exc}"
    if why:
        return {"skipped": why}
    if image is None:
        got = capture_guest_ram(tmp)
        if isinstance(got, str):
            return {"skipped": got}
        image = str(got)
    out: dict[str, Any] = {"link": f"tc tbf {LINK_RATE}", "image": image}
    with netns.two_hosts(rate=LINK_RATE) as (ns_a, _ip_a, ns_b, ip_b):
        (tmp / "link").mkdir(exist_ok=True)
        node, endpoint = spawn_memnode(tmp / "link" / "store", tmp / "link" / "memnode.log",
                                       str(token_file), f"{ip_b}:0",
                                       ["ip", "netns", "exec", ns_b])
        try:
            for codec in ("raw", *CODECS):
                res = subprocess.run(
                    ["ip", "netns", "exec", ns_a, sys.executable, "-m", "pager.cli", "bench",
                     "cluster", "--link-child", endpoint, str(token_file), image, codec],
                    capture_output=True, text=True, timeout=900, check=True)
                got = json.loads(res.stdout.strip().splitlines()[-1])
                out[f"{codec}_store_gbps"] = round(got["store_gbps"], 3)
                out[f"{codec}_fetch_gbps"] = round(got["fetch_gbps"], 3)
                out["page_bytes"] = got["bytes"]
        finally:
            stop_process(node)
    for codec in CODECS:
        out[f"{codec}_store_ratio"] = round(out[f"{codec}_store_gbps"] / out["raw_store_gbps"],
                                            3)
        out[f"{codec}_fetch_ratio"] = round(out[f"{codec}_fetch_gbps"] / out["raw_fetch_gbps"],
                                            3)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", metavar="FILE",
                        help="guest memory image for the compression figure (default: the "
                             "test guest's RAM after a pass of its workload)")
    parser.add_argument("--no-link", action="store_true",
                        help="skip the compression figure over the 1 Gbit namespace link")
    parser.add_argument("--link-child", nargs=4, metavar=("EP", "TOKEN", "IMAGE", "CODEC"),
                        help=argparse.SUPPRESS)
