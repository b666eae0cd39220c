"""A checked client workload: maps memory, hands its uffd to the pager, touches and verifies.

    python -m pager.tools.workload --socket PATH --mib N [--threads 4] [--order seq|rand]

It does what a VMM does with the Firecracker handshake: anonymous private memory, a userfaultfd
with MISSING registration (UFFDIO_API and UFFDIO_REGISTER done here, as Firecracker does), one
sendmsg of the regions JSON with the uffd, and the socket kept open. Then several C toucher
threads (pager.uffd's toucher: pthreads that never take the GIL) touch every page, recording the
latency of each first access, and every byte is checked against the data set: the
deterministic pattern where the data set wrote pages, zeros where it left holes.

Prints one JSON line on stdout (faults, p50_us, p99_us, gbps, bad_pages) and a progress bar
on stderr with ``--progress``; exits 3 on any wrong byte.

The data set (``DataSet``) is defined here once: the demo and the tests seed the source with it.
"""

from __future__ import annotations

import argparse
import json
import mmap
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

from pager.core.region import PAGE_SIZE
from pager.service.handoff import send_handshake
from pager.uffd.toucher import Toucher, TouchResult, check_pattern, fill_pattern

PAGE = PAGE_SIZE
STRIPE = 1 << 20
HOLE_OFFSET = 512 * 1024
HOLE_PAGES = 10  # a hole covers part of a 64 KiB chunk: mixed zero masks


@dataclass(frozen=True)
class DataSet:
    """Pattern ``seed`` over ``size`` bytes of a space, with never-written holes: in every
    fourth MiB, ``HOLE_PAGES`` pages at +512 KiB (``holes=False``: none)."""

    size: int
    seed: int = 0x5EED
    holes: bool = True

    def hole_ranges(self) -> Iterator[tuple[int, int]]:
        if not self.holes:
            return
        for stripe in range(3 * STRIPE, self.size, 4 * STRIPE):
            s = stripe + HOLE_OFFSET
            e = min(s + HOLE_PAGES * PAGE, self.size)
            if s < e:
                yield s, e

    def data_ranges(self) -> Iterator[tuple[int, int]]:
        pos = 0
        for s, e in self.hole_ranges():
            if pos < s:
                yield pos, s
            pos = e
        if pos < self.size:
            yield pos, self.size

    def written_bytes(self) -> int:
        return sum(e - s for s, e in self.data_ranges())

    def fill(self, buf, origin: int) -> None:
        """Write the pattern for space offset ``origin`` into ``buf`` (C, no Python loop)."""
        fill_pattern(buf, self.seed, origin)

    def chunks(self, max_bytes: int = 1 << 20) -> Iterator[tuple[int, bytearray]]:
        """(offset, bytes) pieces of the written ranges, for seeding a source."""
        for s, e in self.data_ranges():
            for off in range(s, e, max_bytes):
                n = min(max_bytes, e - off)
                buf = bytearray(n)
                self.fill(buf, off)
                yield off, buf

    def write_file(self, path: str) -> None:
        """A snapshot file holding the data set (holes left as file holes: zeros)."""
        with open(path, "wb") as f:
            f.truncate(self.size)
            for off, buf in self.chunks():
                f.seek(off)
                f.write(buf)


class Touch(Toucher):
    """The binding's C toucher threads, waited for without a busy C polling loop.

    ``wait`` sleeps in 0.5 ms naps (GIL released) instead of the binding's 20 us polling, which
    takes CPU from the pager and the memory node on a small machine and skews latencies; the
    end time, and so GB/s, is known to 0.5 ms.
    """

    def __init__(self, base: int, length: int, *, op: str = "read", order: str = "seq",
                 threads: int = 4, seed: int = 0, origin: int = 0, step: int = PAGE,
                 latency: bool = True) -> None:
        super().__init__(base, length, op=op, step=step, seed=seed, origin=origin,
                         threads=threads, order="random" if order == "rand" else order,
                         record=latency)
        self.naccess = self.count
        self.started = self.finished_at = 0.0
        self._result: TouchResult | None = None

    def start(self) -> Touch:
        self.started = time.perf_counter()
        super().start()
        return self

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.0005)
        if not self.finished_at:
            self.finished_at = time.perf_counter()
        return super().wait(0)

    def result(self) -> TouchResult:
        if self._result is None:
            self._result = self.join(0)
        return self._result

    @property
    def mismatches(self) -> int:
        return self.result().mismatches

    def latencies_us(self) -> list[float]:
        return sorted(x / 1000 for x in self.result().latencies_ns)

    def seconds(self) -> float:
        return self.finished_at - self.started


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


class Client:
    """A process's memory behind the pager: mmap, uffd, register, handshake."""

    FEATURES = ("event_remove", "event_unmap", "event_remap", "thread_id")

    def __init__(self, size: int, *, offset: int = 0, space: str | None = None,
                 fork: bool = False, memory: mmap.mmap | None = None,
                 page_size: int = PAGE, memfd: int | None = None) -> None:
        from pager.uffd.binding import Userfaultfd
        from pager.uffd.buffers import address_of
        self.size = size
        self.offset = offset
        self.page_size = page_size
        self.memfd = memfd  # the fd behind ``memory`` (shared RAM, as the QEMU shim sends)
        self.space = space
        self.mem = memory or mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._keep, self.base = address_of(self.mem)
        features = list(self.FEATURES) + (["event_fork"] if fork else [])
        self.uffd = Userfaultfd(features=features)
        self.uffd.register(self.base, size, missing=True, page_size=page_size)
        self.sock: socket.socket | None = None

    def region(self) -> dict:
        r = {"base_host_virt_addr": self.base, "size": self.size, "offset": self.offset,
             "page_size": self.page_size, "page_size_kib": self.page_size}
        if self.space:
            r["space"] = self.space
        if self.memfd is not None:
            r["memfd"] = True
        return r

    def handoff(self, path: str, timeout: float = 10.0) -> None:
        """Connect and send the handshake; like Firecracker, keep the socket open."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + timeout
        while True:
            try:
                sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        fds = [self.uffd.fileno()] + ([self.memfd] if self.memfd is not None else [])
        send_handshake(sock, [self.region()], fds)
        self.sock = sock

    def touch(self, **kw) -> Touch:
        return Touch(self.base, self.size, origin=self.offset, **kw).start()

    def check(self, data: DataSet, start: int = 0, end: int | None = None) -> list[int]:
        """Offsets (from base) of pages whose bytes differ from the data set."""
        end = self.size if end is None else end
        bad: list[int] = []
        for s, e in data.data_ranges():
            s, e = max(s - self.offset, start), min(e - self.offset, end)
            pos = s
            while pos < e:
                r = check_pattern((self.base + pos, e - pos), data.seed, self.offset + pos)
                if r < 0:
                    break
                page = (pos + r) // PAGE * PAGE
                bad.append(page)
                pos = page + PAGE
        zero = bytes(PAGE)
        for s, e in data.hole_ranges():
            for p in range(max(s - self.offset, start), min(e - self.offset, end), PAGE):
                if self.mem[p:p + PAGE] != zero:
                    bad.append(p)
        return sorted(bad)

    def close(self, unmap: bool = False) -> None:
        if self.sock is not None:
            self.sock.close()
        self.uffd.close()
        if unmap:
            self._keep = None  # the exported buffer pins the mapping
            self.mem.close()


def _progress(t: Touch, label: str) -> None:
    while not t.wait(0.1):
        frac = t.done / max(1, t.naccess)
        bar = "#" * int(frac * 30)
        print(f"\r{label} [{bar:<30}] {frac * 100:5.1f}%", end="", file=sys.stderr, flush=True)
    print(f"\r{label} [{'#' * 30}] 100.0%", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pager.tools.workload", description=__doc__)
    ap.add_argument("--socket", required=True)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--order", choices=("seq", "rand"), default="seq")
    ap.add_argument("--seed", type=int, default=DataSet(0).seed)
    ap.add_argument("--offset", type=int, default=0, help="region offset in the space")
    ap.add_argument("--space", default=None)
    ap.add_argument("--no-holes", action="store_true")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--hold", type=float, default=0.0,
                    help="seconds to keep the socket open after checking")
    a = ap.parse_args(argv)
    size = a.mib << 20
    data = DataSet(a.offset + size, seed=a.seed, holes=not a.no_holes)
    client = Client(size, offset=a.offset, space=a.space)
    client.handoff(a.socket)
    t = client.touch(op="read", order=a.order, threads=a.threads)
    if a.progress:
        _progress(t, "workload")
    else:
        t.wait()
    bad = client.check(data)
    lat = t.latencies_us()
    out = {"name": "workload", "mib": a.mib, "threads": a.threads, "order": a.order,
           "faults": t.naccess, "p50_us": round(percentile(lat, 0.5), 2),
           "p99_us": round(percentile(lat, 0.99), 2),
           "gbps": round(size / max(t.seconds(), 1e-9) / 1e9, 3),
           "seconds": round(t.seconds(), 3), "bad_pages": len(bad),
           "first_bad": bad[0] if bad else None}
    print(json.dumps(out), flush=True)
    if a.hold:
        time.sleep(a.hold)
    client.close()
    return 3 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
