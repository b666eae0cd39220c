"""2 MiB pages from a memory node: a Firecracker-style client whose regions are hugetlbfs
memory (memfd MFD_HUGETLB, handshake ``page_size`` 2097152), served by the C loop and by the
Python path. A 2 MiB page travels as one fetch (pipelined frames), never-written 2 MiB pages and
4 KiB holes inside written ones read as zeros, REMOVE and poisoning work at 2 MiB."""

from __future__ import annotations

import mmap
import os
import signal
import subprocess
import sys

import pytest
from enginekit import ROOT, memnode_args, wait_or_fail

from pager.core.region import Region
from pager.engine import FaultEngine
from pager.tools.workload import Client, DataSet
from pager.uffd.toucher import Background
from tuning.errors import HugePagesError
from tuning.hugepages import reserved

MIB = 1 << 20
HUGE = 2 * MIB
SEEDED = 8 * MIB    # written pages (with 4 KiB holes) in the space
SIZE = 12 * MIB     # the client's RAM: the last 2 huge pages were never written


@pytest.fixture
def huge_pool():
    """Free 2 MiB pages for the test (the pool is given back after)."""
    try:
        with reserved(16) as pool:
            if pool.page_size != HUGE:
                pytest.skip(f"default huge page size is {pool.page_size}, not 2 MiB")
            yield pool
    except HugePagesError as exc:
        pytest.skip(str(exc))


def hugetlb_client(size: int = SIZE) -> Client:
    fd = os.memfd_create("guest-ram", os.MFD_HUGETLB | os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    mem = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
    return Client(size, memory=mem, memfd=fd, page_size=HUGE)


def stats(engine: FaultEngine):
    """The engine's counters once every client's fault thread folded what C served."""
    assert all(c.quiesce() for c in engine.clients)
    return engine.stats()


@pytest.mark.parametrize("c_loop", [True, False], ids=["c-loop", "python"])
def test_hugetlbfs_client_from_a_memory_node(memnode, huge_pool, c_loop):
    data = DataSet(SEEDED)
    memnode.seed(data)
    engine = FaultEngine(memnode.source(), chunk_size=64 * 1024, readahead=0, c_loop=c_loop)
    c = hugetlb_client()
    try:
        engine.add_client(os.dup(c.uffd.fileno()),
                          [Region(c.base, c.size, 0, page_size=HUGE, memfd=True)])
        t = c.touch(threads=3, order="rand")
        wait_or_fail(t)
        assert t.mismatches == 0
        assert c.check(data) == []  # every byte, the 4 KiB holes as zeros
        assert c.mem[SEEDED:] == bytes(SIZE - SEEDED)  # never-written 2 MiB pages
        st = stats(engine)
        assert st.failed_faults == 0
        # one fetch per 2 MiB page, whatever the chunk size; C serves them when on
        assert st.served_fetch == SIZE // HUGE and st.fetched_bytes == SIZE
        assert (st.c_faults > 0) is c_loop
    finally:
        c.close(unmap=True)
        engine.close()


def test_remove_of_a_2mib_page(memnode, huge_pool):
    data = DataSet(SEEDED, holes=False)
    memnode.seed(data)
    engine = FaultEngine(memnode.source(), chunk_size=64 * 1024, readahead=0)
    c = hugetlb_client()
    try:
        engine.add_client(os.dup(c.uffd.fileno()),
                          [Region(c.base, c.size, 0, page_size=HUGE, memfd=True)])
        wait_or_fail(c.touch(threads=2))
        assert c.check(data) == []
        # the guest gives a huge page back (a balloon): MADV_REMOVE punches it out of the
        # hugetlbfs file; from a C thread, as the madvise waits for the in-process pager
        gone = 2 * HUGE
        assert Background.madvise(c.base + gone, HUGE, mmap.MADV_REMOVE).start().result(30) == 0
        wait_or_fail(c.touch(threads=2))
        assert c.mem[gone:gone + HUGE] == bytes(HUGE)  # zeros, not fetched again
        bad = c.check(data)
        assert bad and all(gone <= p < gone + HUGE for p in bad)
        st = stats(engine)
        assert st.removes >= 1 and st.served_zero >= 1
    finally:
        c.close(unmap=True)
        engine.close()


CHILD = """
import os, sys
sys.path.insert(0, {tests!r})
from test_huge_pages import hugetlb_client
c = hugetlb_client()
c.handoff(sys.argv[1])
print("touching", flush=True)
c.mem[3 * 2097152 + 5]  # a fetch that cannot succeed: SIGBUS, on the whole 2 MiB page
print("read", flush=True)
"""


def test_unservable_huge_page_gives_sigbus(memnode, run_pager, huge_pool):
    proc, sock = run_pager(*memnode_args(memnode), "--fetch-timeout", "1")
    memnode.proc.kill()  # gone for good
    w = subprocess.Popen([sys.executable, "-c",
                          CHILD.format(tests=str(ROOT / "tests" / "engine")), sock],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    out, err = w.communicate(timeout=60)
    assert w.returncode == -signal.SIGBUS, (w.returncode, out, err[-500:])
    assert "touching" in out and "read" not in out
    log = proc.log.read_text()
    assert "not served" in log and "SIGBUS" in log
    assert proc.p.poll() is None


def test_firecracker_style_handshake_through_serve(memnode, run_pager, huge_pool):
    """The whole path a Firecracker client takes: hugetlbfs memfd, Unix-socket handshake with
    ``page_size`` 2097152 and the memfd, a `serve` process on a memory node."""
    data = DataSet(SEEDED)
    memnode.seed(data)
    proc, sock = run_pager(*memnode_args(memnode))
    c = hugetlb_client()
    try:
        assert c.region()["page_size"] == HUGE
        c.handoff(sock)
        t = c.touch(threads=2, order="rand")
        wait_or_fail(t)
        assert t.mismatches == 0
        assert c.check(data) == []
        assert c.mem[SEEDED:] == bytes(SIZE - SEEDED)
        assert "2048 KiB pages" in proc.log.read_text()
    finally:
        c.close(unmap=True)
