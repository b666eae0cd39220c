"""`ssi-pager demo`: the whole job on the embedded defaults, with no configuration.

1. starts a local memory node (``ssi-pager memnode``: temp store, token in a temp dir, port
   picked automatically) and seeds an address space with a deterministic data set that leaves
   some pages never written (they come back as zero pages);
2. runs the pager (this process: fault engine + handoff server on a Unix socket);
3. runs a workload process (``python -m pager.tools.workload``) that maps memory, registers a
   userfaultfd, hands it over with the Firecracker handshake, touches every page from several C
   threads and checks every byte.

Prints the SSI-HV status lines, a progress bar (stderr) and a summary; exits non-zero on any
wrong byte.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pager.core.region import PAGE_SIZE
from pager.engine import FaultEngine
from pager.service.serve import PagerService, announce_source
from pager.source import MemnodeSource
from pager.tools.child import Child
from pager.tools.workload import DataSet

SPACE = "demo"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mib", type=int, default=256, help="guest memory size (default 256)")
    parser.add_argument("--threads", type=int, default=4, help="toucher threads (default 4)")
    parser.add_argument("--order", choices=("seq", "rand"), default="seq")
    parser.add_argument("--chunk", type=int, default=64 * 1024, help="bytes per fault")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class _PagerThread:
    """The pager's control plane (uvloop) on a thread of this process."""

    def __init__(self, engine: FaultEngine, sock: str) -> None:
        self.service = PagerService(engine, sock)
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._run, name="pager-control", daemon=True)
        self.thread.start()
        self.ready.wait(30)
        if self.error:
            raise self.error

    def _run(self) -> None:
        from transport.tcp import run as run_loop
        try:
            run_loop(self._main())
        except BaseException as exc:
            self.error = exc
            self.ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        await self.service.start()
        self.ready.set()
        await self._stop.wait()
        await self.service.close()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(30)


def check_args(args: argparse.Namespace) -> None:
    """Every bad value named with what to pass instead (ConfigError)."""
    from pager.errors import ConfigError
    if args.mib < 1:
        raise ConfigError(f"--mib {args.mib}: guest memory must be at least 1 MiB; pass e.g. "
                          "--mib 64")
    if args.threads < 1:
        raise ConfigError(f"--threads {args.threads}: pass at least 1")
    if args.chunk < PAGE_SIZE or args.chunk & (args.chunk - 1):
        raise ConfigError(f"--chunk {args.chunk}: must be a power of two >= {PAGE_SIZE}, "
                          "e.g. 65536")


def run(args: argparse.Namespace) -> int:
    check_args(args)
    size = args.mib << 20
    data = DataSet(size)
    with tempfile.TemporaryDirectory(prefix="ssi-demo-") as tmp_s:
        tmp = Path(tmp_s)
        token_file = tmp / "token"
        node = Child(["memnode", "--listen", "127.0.0.1:0", "--store", str(tmp / "store"),
                       "--token-file", str(token_file)], tmp / "memnode.log")
        pager: _PagerThread | None = None
        try:
            endpoint = node.wait_for(r"listening on (\S+)")
            from transport.token import load_token
            token = load_token(token_file)
            _say(f"demo: memory node on {endpoint} (store and token in {tmp})")
            source = MemnodeSource(endpoint, token, SPACE)
            from transport.tcp import run as run_loop
            run_loop(announce_source(source))
            t0 = time.perf_counter()
            lane = source.open_lane()
            for off, buf in data.chunks():
                lane.store_from(None, off, buf)
            lane.close()
            holes = sum(e - s for s, e in data.hole_ranges()) // PAGE_SIZE
            _say(f"demo: seeded {data.written_bytes() >> 20} MiB in "
                 f"{time.perf_counter() - t0:.1f} s ({holes} pages left never written)")
            engine = FaultEngine(source, chunk_size=args.chunk)
            sock = str(tmp / "pager.sock")
            pager = _PagerThread(engine, sock)
            _say(f"demo: pager serving {sock}, chunk {args.chunk >> 10} KiB")
            w = subprocess.run(
                [sys.executable, "-m", "pager.tools.workload", "--socket", sock, "--mib",
                 str(args.mib), "--threads", str(args.threads), "--order", args.order,
                 "--progress"], stdout=subprocess.PIPE, text=True, timeout=600)
            result = json.loads(w.stdout.strip().splitlines()[-1]) if w.stdout.strip() else {}
            st = engine.stats()
        finally:
            if pager is not None:
                pager.stop()
            node.stop()
    if not result:
        _say(f"demo: the workload failed (exit {w.returncode})")
        return 1
    ok = result["bad_pages"] == 0 and w.returncode == 0
    print(f"demo: {'OK' if ok else 'FAILED'}: {args.mib} MiB touched by {args.threads} "
          f"threads, {result['bad_pages']} wrong pages")
    print(f"  faults served   {st.faults}: {st.served_fetch} chunks fetched, "
          f"{st.served_dup} already filled by another thread's fault, {st.served_wait} "
          f"waited for readahead ({st.readahead_installed} chunks read ahead)")
    print(f"  bytes           {st.fetched_bytes >> 20} MiB fetched, {st.copied_bytes >> 20} MiB "
          f"copied, {st.zero_pages} zero pages")
    print(f"  fault latency   p50 <= {st.latency_quantile_us(0.5):g} us, p99 <= "
          f"{st.latency_quantile_us(0.99):g} us (pager: event read -> page installed)")
    print(f"  page touches    p50 {result['p50_us']} us, p99 {result['p99_us']} us (first "
          f"touch of every page, seen by the workload: one fault fills a whole chunk)")
    print(f"  throughput      {result['gbps']} GB/s ({result['seconds']} s)")
    return 0 if ok else 3
