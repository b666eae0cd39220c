"""Engine test fixtures: a real memory node and a real pager, each in its own process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pager.child import Child
from pager.source import MemnodeSource
from pager.workload import DataSet

ROOT = Path(__file__).resolve().parents[2]


class Proc(Child):
    """A child ``ssi-pager`` process of a test, run from the checkout."""

    def __init__(self, args: list[str], log: Path) -> None:
        super().__init__(args, log, cwd=ROOT)


class Memnode:
    def __init__(self, tmp: Path, listen: str = "127.0.0.1:0") -> None:
        self.tmp = tmp
        self.token_file = tmp / "token"
        self.store = tmp / "store"
        self.start(listen)

    def start(self, listen: str) -> None:
        self.proc = Proc(["memnode", "--listen", listen, "--store", str(self.store),
                          "--token-file", str(self.token_file)], self.tmp / "memnode.log")
        self.endpoint = self.proc.wait_for(r"listening on (\S+)")

    def restart(self) -> None:
        self.proc.stop()
        self.start(self.endpoint)

    def source(self, space: str = "default") -> MemnodeSource:
        from transport.token import load_token
        return MemnodeSource(self.endpoint, load_token(self.token_file), space)

    def seed(self, data: DataSet, space: str = "default") -> None:
        lane = self.source(space).open_lane()
        try:
            for off, buf in data.chunks():
                lane.store(None, off, buf)
        finally:
            lane.close()


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


def memnode_args(m: Memnode) -> list[str]:
    return ["--memnode", m.endpoint, "--token-file", str(m.token_file)]


def wait_or_fail(touch, timeout: float = 60.0) -> None:
    assert touch.wait(timeout), f"toucher stuck: {touch.done}/{touch.naccess} accesses done"


@pytest.fixture(autouse=True)
def _no_leaked_children():
    yield
    # every Proc is stopped by its fixture; reap anything left so runs stay clean
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass
