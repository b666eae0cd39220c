"""Engine test fixtures: a real memory node and a real pager, each in its own process."""

from __future__ import annotations

import pytest
from enginekit import Memnode, Proc


@pytest.fixture
def memnode(tmp_path):
    m = Memnode(tmp_path)
    yield m
    m.proc.stop()


@pytest.fixture
def run_pager(tmp_path):
    """run_pager(*source_args, extra...) -> (Proc, socket path); all stopped at teardown."""
    procs: list[Proc] = []

    def start(*args: str, name: str = "pager") -> tuple[Proc, str]:
        sock = str(tmp_path / f"{name}.sock")
        p = Proc(["-v", "serve", "--socket", sock, *args], tmp_path / f"{name}.log")
        procs.append(p)
        p.wait_for(r"pager: serving")
        return p, sock

    yield start
    for p in procs:
        p.stop()
