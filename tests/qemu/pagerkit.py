"""Helpers the QEMU tests import by name (a conftest is not importable as a module when
several test folders each have one): guest sizes, a pager with a metrics endpoint."""

from __future__ import annotations

import contextlib
import re
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pager.vm.bench import start_pager
from pager.vm.procs import stop_process

MEM_MIB, WORK_MIB, PASSES = 256, 128, 4
SMALL_MEM_MIB, SMALL_WORK_MIB, SMALL_PASSES = 128, 16, 2


@dataclass
class Pager:
    """A running `ssi-pager serve` with a Prometheus endpoint."""

    proc: subprocess.Popen
    socket: Path
    metrics_url: str
    log: Path

    def metrics(self) -> dict[str, float]:
        """Samples by full name with labels, e.g. 'ssi_pager_fetched_bytes_total'."""
        with urllib.request.urlopen(self.metrics_url, timeout=10) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    out[name] = float(value)
        return out


METRICS_URL = re.compile(r"metrics: (http://\S+)")
PAGER_START_TIMEOUT = 30


@contextlib.contextmanager
def metrics_pager(tmp_path: Path, memnode: str, token: Path,
                  extra: tuple[str, ...] | list[str] = ()) -> Iterator[Pager]:
    """A pager (with ``extra`` serve options) whose metrics endpoint binds a port of the
    kernel's choosing (no port picked here that another process could take first); its URL is
    read from the pager's log."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    sock = tmp_path / "pager.sock"
    logf = tmp_path / "pager.log"
    proc = start_pager(sock, memnode, token, logf, ["--metrics", "127.0.0.1:0", *extra])
    deadline = time.monotonic() + PAGER_START_TIMEOUT
    while (m := METRICS_URL.search(logf.read_text(errors="replace"))) is None:
        if time.monotonic() > deadline or proc.poll() is not None:
            stop_process(proc)
            pytest.fail(f"the pager printed no metrics URL: {logf.read_text()[-800:]}")
        time.sleep(0.05)
    p = Pager(proc, sock, m.group(1), logf)
    try:
        assert "ssi_pager_fetched_bytes_total" in p.metrics()
        yield p
    finally:
        stop_process(proc)
