"""Fixtures of the QEMU tests: the test guest, a memory node, a pager with metrics.

The guest (Debian cloud kernel + busybox initramfs, tests/guest/build.py) is built once per
session; without a cached or fetchable kernel, or without QEMU, the tests skip with the reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pager.vm.bench import guest_builder, start_memnode, start_pager
from pager.vm.procs import stop_process

QEMU = "qemu-system-x86_64"
MEM_MIB, WORK_MIB, PASSES = 256, 128, 4
SMALL_MEM_MIB, SMALL_WORK_MIB, SMALL_PASSES = 128, 16, 2


@pytest.fixture(scope="session")
def guest():
    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} is not installed (apt-get install qemu-system-x86)")
    gb = guest_builder()
    try:
        g = gb.build(MEM_MIB, WORK_MIB, PASSES)
    except gb.GuestUnavailable as exc:
        pytest.skip(f"test guest unavailable: {exc}")
    return g


@pytest.fixture(scope="session")
def waiting_guest(guest):
    """The same guest, waiting for a console line after each pass but the last (so a test
    suspends it at a known point: "pass N waiting")."""
    return dataclasses.replace(guest, wait=True)


@pytest.fixture(scope="session")
def small_guest(guest):
    """A waiting guest with a short workload, for the refusal paths."""
    return dataclasses.replace(guest, mem_mib=SMALL_MEM_MIB, work_mib=SMALL_WORK_MIB,
                               passes=SMALL_PASSES, wait=True)


@pytest.fixture(scope="session")
def small_expected() -> list[str]:
    return guest_builder().expected_checksums(SMALL_WORK_MIB, SMALL_PASSES)


@pytest.fixture(scope="session")
def expected() -> list[str]:
    """Per-pass checksums of an uninterrupted run (the same static binary, on the host)."""
    return guest_builder().expected_checksums(WORK_MIB, PASSES)


@pytest.fixture(scope="session")
def checksums():
    return guest_builder().checksums


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private runtime dir for `ssi-pager vm` state (inherited by the commands we run)."""
    d = tmp_path / "run"
    monkeypatch.setenv("SSI_PAGER_RUNTIME_DIR", str(d))
    return d


@pytest.fixture
def token(tmp_path: Path) -> Path:
    return tmp_path / "token"


@pytest.fixture
def memnode(tmp_path: Path, token: Path) -> Iterator[str]:
    proc, endpoint = start_memnode(tmp_path, token)
    try:
        yield endpoint
    finally:
        stop_process(proc)


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


@pytest.fixture
def pager(tmp_path: Path, memnode: str, token: Path) -> Iterator[Pager]:
    with metrics_pager(tmp_path, memnode, token) as p:
        yield p
