"""Engine test fixtures: a real memory node and a real pager, each in its own process."""

from __future__ import annotations

import pytest
from clusterkit import Etcd, nodes
from enginekit import Memnode, Proc, start_pager


@pytest.fixture
def memnode(tmp_path):
    m = Memnode(tmp_path)
    yield m
    m.proc.stop()


@pytest.fixture
def three(tmp_path):
    """Three memory nodes sharing a token (a cluster from a file or --memnode list)."""
    ns = nodes(tmp_path, 3)
    yield ns
    for n in ns:
        n.proc.stop()


@pytest.fixture
def etcd(tmp_path):
    """An etcd server of the test's own."""
    e = Etcd(tmp_path)
    yield e
    e.stop()


@pytest.fixture
def three_etcd(tmp_path, etcd):
    """Three memory nodes registered in ``etcd``."""
    ns = nodes(tmp_path, 3, etcd.url)
    yield ns
    for n in ns:
        n.proc.stop()


@pytest.fixture
def run_pager(tmp_path):
    """run_pager(*source_args, extra...) -> (Proc, socket path); all stopped at teardown."""
    procs: list[Proc] = []

    def start(*args: str, name: str = "pager") -> tuple[Proc, str]:
        return start_pager(procs, tmp_path, tmp_path, *args, name=name)

    yield start
    for p in procs:
        p.stop()
