"""The engine's C fault loop with the real kernel and a real memory node (engine in-process, so
its counters can be read): content, zero pages, REMOVE, a node restart, and the Python path."""

from __future__ import annotations

import mmap
import os
import time

import pytest
from enginekit import uffd_blocked, wait_or_fail, wait_until

from pager.core.region import Region
from pager.engine import FaultEngine
from pager.source import FileSource
from pager.tools.workload import Client, DataSet
from pager.uffd.faultloop import enabled_by_env

MIB = 1 << 20
PAGE = 4096


def serve(engine: FaultEngine, c: Client):
    return engine.add_client(os.dup(c.uffd.fileno()), [Region(c.base, c.size, c.offset)])


def stats(engine: FaultEngine, installed: int):
    """The engine's counters once they account for ``installed`` bytes put into clients: the
    C loop folds its counters in when it returns, so wait for that rather than a fixed time."""
    deadline = time.monotonic() + 60
    while True:
        st = engine.stats()
        if st.copied_bytes + st.zero_pages * PAGE >= installed:
            return st
        assert time.monotonic() < deadline, f"counters never covered {installed} bytes: " \
            f"{st.as_dict()}"
        time.sleep(0.01)


@pytest.mark.parametrize("chunk", [PAGE, 64 * 1024])
def test_content_with_several_threads_and_zero_pages(memnode, chunk):
    data = DataSet(8 * MIB)  # holes: never-written pages inside written chunks
    memnode.seed(data)
    engine = FaultEngine(memnode.source(), chunk_size=chunk, readahead=0, c_loop=True)
    c = Client(8 * MIB)
    try:
        serve(engine, c)
        t = c.touch(threads=4, order="rand")
        wait_or_fail(t)
        assert t.mismatches == 0
        assert c.check(data) == []
        st = stats(engine, data.size)
        assert st.c_faults > 0
        assert st.c_faults >= st.faults // 2, st.as_dict()  # C served most of them
        assert st.failed_faults == 0 and st.unknown_faults == 0
        assert st.zero_pages > 0  # the holes, through UFFDIO_ZEROPAGE
        assert st.latency_count == st.served_fetch + st.served_zero + st.served_wait
        assert sum(st.latency_buckets) == st.latency_count
        assert st.copied_bytes + st.zero_pages * PAGE >= data.size
    finally:
        c.close(unmap=True)
        engine.close()


def test_never_written_space_is_all_zero_pages(memnode):
    engine = FaultEngine(memnode.source("empty"), chunk_size=64 * 1024, readahead=0)
    c = Client(2 * MIB)
    try:
        serve(engine, c)
        wait_or_fail(c.touch(threads=2))
        assert c.mem[:] == bytes(2 * MIB)
        st = stats(engine, 2 * MIB)
        assert st.c_faults > 0
        assert st.zero_pages == 2 * MIB // PAGE and st.copied_bytes == 0
    finally:
        c.close(unmap=True)
        engine.close()


def test_remove_while_the_c_loop_serves(memnode):
    data = DataSet(8 * MIB, holes=False)
    memnode.seed(data)
    engine = FaultEngine(memnode.source(), chunk_size=64 * 1024, readahead=0)
    c = Client(8 * MIB)
    try:
        serve(engine, c)
        wait_or_fail(_touch(c, 0, 4 * MIB))  # the second half stays unfaulted
        before = stats(engine, 4 * MIB)
        assert before.c_faults > 0
        start, length = 2 * MIB + 5 * PAGE, MIB + 3 * PAGE  # unaligned to chunks
        # madvise from a C thread: it blocks until the pager reads REMOVE, and the pager runs
        # in this process (mmap.madvise would hold the GIL the fault thread needs)
        _madvise(c, start, length)
        # and 3 pages in the middle of a chunk never faulted: C must leave that chunk to
        # Python, which installs the rest of it and never the removed pages
        s2, n2 = 6 * MIB + 5 * PAGE, 3 * PAGE
        _madvise(c, s2, n2)
        t = c.touch(threads=3, order="rand")
        wait_or_fail(t)
        assert c.mem[start:start + length] == bytes(length)
        assert c.mem[s2:s2 + n2] == bytes(n2)
        bad = c.check(data)
        assert len(bad) == (length + n2) // PAGE
        assert all(start <= p < start + length or s2 <= p < s2 + n2 for p in bad)
        st = stats(engine, 8 * MIB)
        assert st.removes >= 1
        assert st.served_zero > 0  # the removed pages, by Python (never fetched again)
        # the second half, away from the removed range, was served by C again
        assert st.c_faults > before.c_faults
    finally:
        c.close(unmap=True)
        engine.close()


def test_memory_node_restart_while_the_c_loop_waits(memnode):
    data = DataSet(8 * MIB)
    memnode.seed(data)
    engine = FaultEngine(memnode.source(), chunk_size=64 * 1024, readahead=0)
    c = Client(8 * MIB)
    try:
        serve(engine, c)
        wait_or_fail(_touch(c, 0, MIB))
        assert stats(engine, MIB).c_faults > 0
        memnode.proc.kill()
        t = c.touch(threads=4, order="rand")
        # the case under test: a fetch failed on the dead node and the faults wait
        wait_until(lambda: engine.stats().fetch_errors >= 1, "a fetch error counted")
        wait_until(lambda: uffd_blocked() == 4, "4 faulting threads blocked")
        assert not t.finished, "faults were served while the memory node was down"
        memnode.start(memnode.endpoint)
        wait_or_fail(t, 60)
        assert c.check(data) == []
        st = stats(engine, 8 * MIB)
        assert st.fetch_errors >= 1 and st.failed_faults == 0
        # after the Python path reconnected, the C loop serves again
        c2 = Client(4 * MIB, offset=4 * MIB)
        try:
            before = stats(engine, 8 * MIB).c_faults
            serve(engine, c2)
            wait_or_fail(c2.touch(threads=2))
            assert c2.check(data) == []
            assert stats(engine, 12 * MIB).c_faults > before
        finally:
            c2.close(unmap=True)
    finally:
        c.close(unmap=True)
        engine.close()


def _madvise(c: Client, start: int, length: int) -> None:
    from pager.uffd.toucher import Background
    assert Background.madvise(c.base + start, length, mmap.MADV_DONTNEED).start().result(30) == 0


def _touch(c: Client, start: int, length: int):
    from pager.tools.workload import Touch
    return Touch(c.base + start, length, origin=c.offset + start, threads=2).start()


def test_python_path_when_the_c_loop_is_off(memnode, monkeypatch):
    data = DataSet(4 * MIB)
    memnode.seed(data)
    monkeypatch.setenv("SSI_PAGER_C_LOOP", "0")
    assert not enabled_by_env()
    engine = FaultEngine(memnode.source(), chunk_size=64 * 1024, readahead=0)
    assert engine.c_loop is False
    c = Client(4 * MIB)
    try:
        serve(engine, c)
        wait_or_fail(c.touch(threads=3, order="rand"))
        assert c.check(data) == []
        st = stats(engine, 4 * MIB)
        assert st.c_faults == 0 and st.served_fetch > 0 and st.zero_pages > 0
    finally:
        c.close(unmap=True)
        engine.close()


def test_sources_and_clients_c_cannot_serve_use_python(tmp_path):
    data = DataSet(2 * MIB)
    snap = tmp_path / "snap.mem"
    data.write_file(str(snap))
    engine = FaultEngine(FileSource(str(snap)), chunk_size=64 * 1024, readahead=0)
    c = Client(2 * MIB)
    try:
        serve(engine, c)
        wait_or_fail(c.touch(threads=2))
        assert c.check(data) == []
        assert stats(engine, 2 * MIB).c_faults == 0
    finally:
        c.close(unmap=True)
        engine.close()


def test_serve_flag_turns_the_c_loop_off(memnode, monkeypatch):
    import argparse

    from pager.service import serve as serve_cmd
    monkeypatch.delenv("SSI_PAGER_C_LOOP", raising=False)
    for argv, want in (([], True), (["--no-c-loop"], False)):
        parser = argparse.ArgumentParser()
        serve_cmd.configure(parser)
        args = parser.parse_args(["--socket", "/nonexistent", *argv])
        engine = serve_cmd.engine_from_args(args, memnode.source())
        assert engine.c_loop is want
