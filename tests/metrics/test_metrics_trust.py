"""/metrics cannot be made to hold a thread per idle connection (issue 14, item 8): a real
memory node process with its metrics endpoint, real TCP connections that never send."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from pager.metrics import METRICS_MAX_CONNECTIONS

ROOT = Path(__file__).resolve().parents[2]


def _threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))


def _wait_threads(pid: int, cond, what: str, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        n = _threads(pid)
        if cond(n):
            return n
        assert time.monotonic() < deadline, f"{what}: {n} threads"
        time.sleep(0.05)


def test_idle_connections_hold_a_bounded_number_of_threads(tmp_path):
    log = tmp_path / "memnode.log"
    with open(log, "wb") as f:
        p = subprocess.Popen([sys.executable, "-m", "pager.cli", "memnode", "--listen",
                              "127.0.0.1:0", "--store", str(tmp_path / "store"), "--token-file",
                              str(tmp_path / "token"), "--metrics", "127.0.0.1:0"],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=f)
    idle: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 30
        while not (m := re.search(r"metrics: http://([\d.]+):(\d+)/metrics", log.read_text())):
            assert time.monotonic() < deadline and p.poll() is None, log.read_text()
            time.sleep(0.05)
        host, port = m.group(1), int(m.group(2))
        url = f"http://{host}:{port}/metrics"
        base = _threads(p.pid)
        for _ in range(3 * METRICS_MAX_CONNECTIONS):
            idle.append(socket.create_connection((host, port), timeout=10))
        # the server saturates its slots, and never goes past them
        _wait_threads(p.pid, lambda n: n >= base + METRICS_MAX_CONNECTIONS, "never saturated")
        for _ in range(20):
            assert _threads(p.pid) <= base + METRICS_MAX_CONNECTIONS
            time.sleep(0.05)
        # idle connections are closed by the server: the threads go away while ours stay open
        _wait_threads(p.pid, lambda n: n <= base, "idle connections kept their threads")
        for s in idle:
            s.settimeout(30)
            assert s.recv(1) == b""  # closed by the server
        with urllib.request.urlopen(url, timeout=30) as r:
            assert b"ssi_memnode" in r.read()
    finally:
        for s in idle:
            s.close()
        p.terminate()
        p.wait(30)
