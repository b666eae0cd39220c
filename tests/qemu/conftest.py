"""Fixtures of the QEMU tests: the test guest, a memory node, a pager with metrics.

The guest (Debian cloud kernel + busybox initramfs, tests/guest/build.py) is built once per
session; without a cached or fetchable kernel, or without QEMU, the tests skip with the reason.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from pagerkit import (
    MEM_MIB,
    PASSES,
    SMALL_MEM_MIB,
    SMALL_PASSES,
    SMALL_WORK_MIB,
    WORK_MIB,
    Pager,
    metrics_pager,
)

from pager.vm.bench import guest_builder, start_memnode
from pager.vm.procs import stop_process

QEMU = "qemu-system-x86_64"


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


@pytest.fixture
def pager(tmp_path: Path, memnode: str, token: Path) -> Iterator[Pager]:
    with metrics_pager(tmp_path, memnode, token) as p:
        yield p
