"""Adaptive polling (``--poll-us``): the pager's C fault loop and the memory node's C fault lane
read without blocking for a bounded window after the last event. With it on or off the data
served is the same, and an idle pager or node that polls still sleeps (~0% CPU)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from pathlib import Path

import pytest
from enginekit import Memnode, memnode_args, wait_or_fail

from pager.core.region import Region
from pager.engine import FaultEngine
from pager.errors import ConfigError
from pager.tools.bench import Burners, cpu_seconds
from pager.tools.workload import Client, DataSet

MIB = 1 << 20
PAGE = 4096


def _served_digest(node: Memnode, data: DataSet, poll_us: int, chunk: int) -> str:
    engine = FaultEngine(node.source(), chunk_size=chunk, readahead=0, c_loop=True,
                         poll_us=poll_us)
    c = Client(data.size)
    try:
        client = engine.add_client(os.dup(c.uffd.fileno()), [Region(c.base, c.size, c.offset)])
        t = c.touch(threads=3, order="rand")
        wait_or_fail(t)
        assert t.mismatches == 0
        assert c.check(data) == []
        assert client.quiesce()  # the C loop's counters folded
        st = engine.stats()
        assert st.c_faults > 0 and st.failed_faults == 0
        return hashlib.sha256(c.mem[:]).hexdigest()
    finally:
        c.close(unmap=True)
        engine.close()


@pytest.mark.parametrize("chunk", [PAGE, 64 * 1024])
def test_polling_on_and_off_serve_the_same_bytes(tmp_path, chunk):
    node = Memnode(tmp_path, "127.0.0.1:0", "--poll-us", "500")  # the node's lane polls too
    try:
        data = DataSet(8 * MIB)  # with holes: zero pages through both paths
        node.seed(data)
        digests = {us: _served_digest(node, data, us, chunk) for us in (0, 500, 20000)}
        assert len(set(digests.values())) == 1, digests
    finally:
        node.proc.stop()


def _idle_share(pid: int, seconds: float = 1.0) -> float:
    t0, c0 = time.monotonic(), cpu_seconds(pid)
    time.sleep(seconds)
    return (cpu_seconds(pid) - c0) / (time.monotonic() - t0)


def test_idle_pager_and_node_that_poll_use_no_cpu(tmp_path, run_pager):
    # the node's window may grow to 8 ms (--poll-max-us) while faults come: still idle after
    node = Memnode(tmp_path, "127.0.0.1:0", "--poll-us", "2000", "--poll-max-us", "8000")
    try:
        data = DataSet(4 * MIB, holes=False)
        node.seed(data)
        pager, sock = run_pager(*memnode_args(node), "--space", "default", "--chunk", "4K",
                                "--readahead", "0", "--poll-us", "2000")
        c = Client(data.size)
        try:
            c.handoff(sock)
            wait_or_fail(c.touch(threads=1, order="rand"))  # faults: both windows opened
            assert c.check(data) == []
            # no more faults: the windows close after 2 ms and both block again
            pager_share = _idle_share(pager.p.pid)
            node_share = _idle_share(node.proc.p.pid)
            assert pager_share < 0.10, f"idle pager used {pager_share:.0%} of a CPU"
            assert node_share < 0.10, f"idle memory node used {node_share:.0%} of a CPU"
        finally:
            c.close(unmap=True)
    finally:
        node.proc.stop()


def _pin(pid: int, cpu: int) -> None:
    """Every thread of ``pid`` (and so the threads they start) on ``cpu``."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):  # the thread ended
            os.sched_setaffinity(int(task.name), {cpu})


TWO_CPUS = pytest.mark.skipif(not {0, 1} <= os.sched_getaffinity(0), reason="needs CPUs 0 and 1")


def _sleeps(pid: int) -> int:
    """Times the threads of ``pid`` blocked so far (voluntary context switches)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "status").read_text()
        except OSError:
            continue  # the thread ended
        total += int(text.split("voluntary_ctxt_switches:")[1].split()[0])
    return total


def _paced_faults(tmp_path: Path, run_pager, node_args: tuple[str, ...], gap: float,
                  burner: bool = False) -> tuple[float, float]:
    """A guest that faults a page every ``gap`` seconds, the memory node (``node_args``)
    pinned to CPU 0, the pager and the guest to CPU 1 (a spin preempted by a neighbour backs
    off, so where the scheduler puts them must not decide what is measured); ``burner``: a
    CPU-bound process shares CPU 0. Returns the share of CPU 0 the node took while the guest
    faulted, and how often its threads blocked per fault."""
    tmp_path.mkdir()
    node = Memnode(tmp_path, "127.0.0.1:0", *node_args)
    hog = None
    try:
        data = DataSet(2 * MIB, holes=False)
        node.seed(data)
        pager, sock = run_pager(*memnode_args(node), "--space", "default", "--chunk", "4K",
                                "--readahead", "0", name=tmp_path.name)
        _pin(node.proc.p.pid, 0)
        _pin(pager.p.pid, 1)
        if burner:
            hog = Burners(pinned=[0])
        c = Client(data.size)
        expect = bytearray(data.size)
        data.fill(expect, 0)
        here = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {1})
        try:
            c.handoff(sock)
            pages = data.size // PAGE
            c.mem[0]  # the first fault opens the node's lane
            pid = node.proc.p.pid
            t0, c0, s0 = time.monotonic(), cpu_seconds(pid), _sleeps(pid)
            for p in range(1, pages):
                time.sleep(gap)
                assert c.mem[p * PAGE:p * PAGE + 8] == expect[p * PAGE:p * PAGE + 8]
            return ((cpu_seconds(pid) - c0) / (time.monotonic() - t0),
                    (_sleeps(pid) - s0) / (pages - 1))
        finally:
            os.sched_setaffinity(0, here)
            c.close(unmap=True)
            pager.stop()
    finally:
        if hog is not None:
            hog.stop()
        node.proc.stop()


def _node_sleeps_per_fault(tmp_path: Path, run_pager, *window: str) -> float:
    """A guest that faults a page every ~0.5 ms (sparser than the node's 50 µs base window):
    how often the memory node's threads blocked per fault."""
    return _paced_faults(tmp_path, run_pager, ("--poll-us", "50", *window), 0.0004)[1]


@TWO_CPUS
def test_node_window_grows_over_a_guests_gaps(tmp_path, run_pager):
    """With --poll-max-us the node's lane doubles its window while each request comes just
    after it ended, so a steady sparse guest finds it polling; a fixed window (--poll-max-us
    0) sleeps before nearly every request."""
    fixed = _node_sleeps_per_fault(tmp_path / "fixed", run_pager, "--poll-max-us", "0")
    adaptive = _node_sleeps_per_fault(tmp_path / "adaptive", run_pager, "--poll-max-us", "5000")
    assert fixed > 0.5, f"a fixed 50 µs window blocked only {fixed:.2f} times per fault"
    assert adaptive < fixed / 3, (f"the adaptive window blocked {adaptive:.2f} times per "
                                  f"fault, a fixed one {fixed:.2f}")


def test_bad_poll_windows_are_refused(tmp_path, run_pager):
    with pytest.raises(ConfigError, match="poll window -1"):
        FaultEngine(None, poll_us=-1)  # type: ignore[arg-type]
    from enginekit import Proc
    p = Proc(["serve", "--socket", str(tmp_path / "s"), "--source", "file:x",
              "--poll-us", "x"], tmp_path / "bad.log")
    try:
        assert p.p.wait(20) == 2
    finally:
        p.stop()
    assert "--poll-us" in (tmp_path / "bad.log").read_text()


def _node_cpu_share(tmp_path: Path, run_pager, burner: bool) -> float:
    """The share of its CPU a node with a 20 ms polling window (it would spin between all of
    the faults) took while a guest faulted every ~1 ms."""
    return _paced_faults(tmp_path, run_pager, ("--poll-us", "20000", "--poll-max-us", "0"),
                         0.001, burner)[0]


@TWO_CPUS
def test_polling_gives_way_to_a_busy_thread_on_its_cpu(tmp_path, run_pager):
    """Alone on its CPU a node with a long window spins between the guest's faults; beside a
    CPU-bound thread its spin yields and, once that got it preempted, backs off: it leaves
    that thread its CPU instead of taking half of it."""
    alone = _node_cpu_share(tmp_path / "alone", run_pager, burner=False)
    shared = _node_cpu_share(tmp_path / "shared", run_pager, burner=True)
    assert alone > 0.5, f"a node with a 20 ms window spun only {alone:.0%} of its CPU"
    assert shared < 0.15, (f"beside a CPU-bound thread the polling node still took "
                           f"{shared:.0%} of their CPU (alone: {alone:.0%})")
