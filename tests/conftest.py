"""Shared pytest configuration: the suite runs against the real kernel, sockets and processes.

Every test is checked for what it leaves behind: its child processes, network namespaces,
mounts under the session's temporary directory and huge pages mapped by this process must be
as they were before it (what a wider-scoped fixture set up before the test counts as
"before"). Only this session's own things are looked at: other sessions may share the machine
(the system-wide huge page pool is restored by the test that resizes it). A leak fails the test
that made it, after the leaked processes are killed so the next test starts clean.

The pytest process is a child subreaper, so a grandchild orphaned by a stopped child (a pager a
supervisor started, a QEMU a `vm` command started) becomes its child and is seen too. As init
would, it reaps such children once they exit; one still running ``GRACE_S`` after the test
(time for a process already told to stop, e.g. by PR_SET_PDEATHSIG, to finish) is a leak.
"""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

PR_SET_CHILD_SUBREAPER = 36
GRACE_S = 20.0  # a deadline, not a wait: the check ends as soon as the children are gone


def pytest_configure(config: pytest.Config) -> None:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def _children() -> dict[int, str]:
    """This process's children: pid -> state letter (Z: exited, not yet waited for)."""
    out: dict[int, str] = {}
    for path in glob.glob(f"/proc/{os.getpid()}/task/*/children"):
        with contextlib.suppress(OSError), open(path) as f:
            for pid in map(int, f.read().split()):
                with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as st:
                    out[pid] = st.read().rsplit(")", 1)[1].split()[0]
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def _netns() -> set[str]:
    """This session's namespaces (tests/netns.py names them ssipg-<pid>-...)."""
    try:
        return {n for n in os.listdir("/run/netns") if n.startswith(f"ssipg-{os.getpid()}-")}
    except OSError:
        return set()


def _mounts(under: str) -> set[str]:
    with open("/proc/self/mounts") as f:
        return {" ".join(fields[:3]) for line in f
                if (fields := line.split())[1].startswith(under)}


def _hugepages() -> str:
    """Huge pages mapped by this process (kB), from /proc/self/status."""
    with open("/proc/self/status") as f:
        return next((line.split(":")[1].strip() for line in f
                     if line.startswith("HugetlbPages:")), "")


def _reap(pids: dict[int, str] | set[int]) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def _still_running(before: dict[int, str]) -> dict[int, str]:
    """New children that keep running: exited ones are reaped on the way (as init would),
    running ones get until ``GRACE_S`` to exit."""
    deadline = time.monotonic() + GRACE_S
    while True:
        kids = {pid: st for pid, st in _children().items() if pid not in before}
        for pid in [pid for pid, st in kids.items() if st == "Z"]:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            del kids[pid]
        if not kids or time.monotonic() > deadline:
            return {pid: _cmdline(pid) for pid in kids}
        time.sleep(0.02)


@pytest.fixture(autouse=True)
def _leaves_nothing_behind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    under = str(tmp_path_factory.getbasetemp())
    before = (_children(), _netns(), _mounts(under), _hugepages())
    yield
    kids = _still_running(before[0])
    _reap(set(kids))
    leaks = []
    if kids:
        leaks.append("child processes left running: " + "; ".join(
            f"pid {pid}: {cmd}" for pid, cmd in kids.items()))
    if new := _netns() - before[1]:
        leaks.append(f"network namespaces left behind: {sorted(new)}")
    if new := _mounts(under) - before[2]:
        leaks.append(f"mounts left behind: {sorted(new)}")
    if (now := _hugepages()) != before[3]:
        leaks.append(f"huge pages mapped by the tests' process: {before[3]} before, {now} after")
    assert not leaks, "; ".join(leaks)


@pytest.fixture(autouse=True)
def _fresh_transport_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-process memory of the transport (the "using TCP, not RDMA" line printed once, the
    store identities seen): each test starts as a fresh process would, so what it sees never
    depends on the tests before it."""
    import transport.lane
    from transport.wire import IDENTITIES

    monkeypatch.setattr(transport.lane, "_warned", False)
    # what "this pager" saw of each node's store: a test's pager is a new process, and a port
    # a previous test's node had may be another node's now
    for node in {node for node, _space in IDENTITIES._seen}:
        IDENTITIES.forget(node)


@pytest.fixture(scope="session")
def refpager_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The C reference pager (../shared/refpager beside the checkout), built once per session.
    Missing, the comparison tests fail saying how to provide it: they never silently shrink."""
    from pager.errors import ConfigError
    from pager.tools import refpager
    try:
        return refpager.locate(None, tmp_path_factory.mktemp("ref"))
    except ConfigError as exc:
        pytest.fail(f"the comparison with the C reference pager cannot run: {exc}")
