"""Helpers shared by the engine tests (a module of its own: every tests/*/conftest.py is
imported as `conftest`, so tests must not import from it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pager.source import MemnodeSource
from pager.tools.child import Child
from pager.tools.workload import DataSet
from tests.kernel import uffd_blocked, wait_until
from tests.procs import line_within

__all__ = ["ROOT", "Memnode", "Proc", "farmem_guest", "memnode_args", "run_workload",
           "uffd_blocked", "wait_or_fail", "wait_until"]

ROOT = Path(__file__).resolve().parents[2]


class Proc(Child):
    """A child ``ssi-pager`` process of a test, run from the checkout."""

    def __init__(self, args: list[str], log: Path) -> None:
        super().__init__(args, log, cwd=ROOT)


class Memnode:
    def __init__(self, tmp: Path, listen: str = "127.0.0.1:0", *args: str) -> None:
        self.tmp = tmp
        self.args = list(args)  # extra memnode options
        self.token_file = tmp / "token"
        self.store = tmp / "store"
        self.start(listen)

    def start(self, listen: str) -> None:
        self.proc = Proc(["memnode", "--listen", listen, "--store", str(self.store),
                          "--token-file", str(self.token_file), *self.args],
                         self.tmp / "memnode.log")
        self.endpoint = self.proc.wait_for(r"listening on (\S+)")

    def restart(self) -> None:
        self.proc.stop()
        self.start(self.endpoint)

    def source(self, space: str = "default", **kw: Any) -> MemnodeSource:
        """A source on this node (``kw``: MemnodeSource's options, e.g. ``compress=()``)."""
        from transport.token import load_token
        return MemnodeSource(self.endpoint, load_token(self.token_file), space, **kw)

    def seed(self, data: DataSet, space: str = "default") -> None:
        lane = self.source(space).open_lane()
        try:
            for off, buf in data.chunks():
                lane.store_from(None, off, buf)
        finally:
            lane.close()


def start_pager(procs: list[Proc], sock_dir: Path, log_dir: Path, *args: str,
                name: str = "pager") -> tuple[Proc, str]:
    """A `serve` process with its socket in ``sock_dir`` (added to ``procs``), once serving."""
    sock = str(sock_dir / f"{name}.sock")
    p = Proc(["-v", "serve", "--socket", sock, *args], log_dir / f"{name}.log")
    procs.append(p)
    p.wait_for(r"pager: serving")
    return p, sock


def run_workload(sock: str, mib: int, what: str, timeout: float = 120.0) -> tuple[int, str]:
    """Run the checking workload on the pager's socket: (return code, stderr). ``what``
    names the failure if it hangs past ``timeout``."""
    import subprocess
    import sys

    w = subprocess.Popen([sys.executable, "-m", "pager.tools.workload", "--socket", sock,
                          "--mib", str(mib), "--threads", "2"], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err = w.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        w.kill()
        w.communicate()
        raise AssertionError(what) from None
    return w.returncode, err


def memnode_args(m: Memnode) -> list[str]:
    return ["--memnode", m.endpoint, "--token-file", str(m.token_file)]


def wait_or_fail(touch, timeout: float = 60.0) -> None:
    assert touch.wait(timeout), f"toucher stuck: {touch.done}/{touch.naccess} accesses done"



# a far-memory guest on a shared memfd (as the QEMU shim hands it over), in its own process:
# writes every page once (so the pager evicts dirty pages), prints "warm" and its errors, then
# reads and read-modify-writes pages at random until it is killed
_FARMEM_GUEST = """
import mmap, os, sys, time
from pager.tools.workload import Client
from pager.uffd.rmw import Rmw
size = int(sys.argv[2])
fd = os.memfd_create("guest")
os.ftruncate(fd, size)
c = Client(size, memory=mmap.mmap(fd, size, flags=mmap.MAP_SHARED), memfd=fd,
           space=sys.argv[3] or None)
c.handoff(sys.argv[1])
w = Rmw(c.base, size // 4096, threads=2, write_pct=100, hot_ops=0)
w.run(ops=size // 4096)
print("warm", w.errors, flush=True)
w.set_mix(write_pct=50, hot_ops=0)
while True:
    w.run(ops=4000)
    print("round", w.errors, time.monotonic(), flush=True)
"""


def farmem_guest(sock: str, size: int, space: str = "") -> Any:
    """Start `_FARMEM_GUEST` on the pager's socket (its regions in ``space``, "": the pager's)
    and wait until it is warm; it then prints "round ERRORS MONOTONIC-TIME" after each round.
    The caller kills and waits for it."""
    import subprocess
    import sys

    g = subprocess.Popen([sys.executable, "-c", _FARMEM_GUEST, sock, str(size), space],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = line_within(g, 120).split()
    if line != ["warm", "0"]:
        g.kill()
        _, err = g.communicate()
        raise AssertionError(f"the far-memory guest did not warm up ({line}): {err[-2000:]}")
    return g
