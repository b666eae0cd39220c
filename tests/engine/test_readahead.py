"""Readahead with the real kernel and a real memory node (engine in-process, so its counters
can be read): random faults stay in the C loop exactly as without readahead, sequential
streams (one or several at once) are read ahead."""

from __future__ import annotations

import os

import pytest
from enginekit import wait_or_fail

from pager.core.region import Region
from pager.engine import EngineStats, FaultEngine
from pager.tools.workload import Client, DataSet, Touch

MIB = 1 << 20
PAGE = 4096
SIZE = 8 * MIB
PAGES = SIZE // PAGE


@pytest.fixture
def seeded(memnode):
    data = DataSet(SIZE, holes=False)
    memnode.seed(data)
    return memnode, data


def run(memnode, data: DataSet, readahead: int, touches) -> EngineStats:
    """A 4 KiB-chunk engine with the C loop: serve a client, run ``touches(client)`` (Touch
    objects, waited for), the engine's counters once everything served is folded in."""
    engine = FaultEngine(memnode.source(), chunk_size=PAGE, readahead=readahead, c_loop=True)
    c = Client(SIZE)
    try:
        engine.add_client(os.dup(c.uffd.fileno()), [Region(c.base, c.size, c.offset)])
        for t in touches(c):
            wait_or_fail(t)
            assert t.mismatches == 0
        assert all(p.quiesce() for p in engine.clients)
        st = engine.stats()
        assert c.check(data) == []  # (faults in the rest: after the counters were taken)
        return st
    finally:
        c.close(unmap=True)
        engine.close()


def test_random_faults_are_served_in_c_as_without_readahead(seeded):
    memnode, data = seeded
    # every other page in random order: no fault is on the chunk after an earlier one
    got = {}
    for ra in (0, MIB):
        st = run(memnode, data, ra, lambda c: [c.touch(order="rand", threads=1, step=2 * PAGE)])
        got[ra] = (st.faults, st.c_faults, st.served_fetch)
        assert st.readahead_chunks == 0 and st.readahead_installed == 0
        assert st.failed_faults == 0
    assert got[MIB] == got[0] == (PAGES // 2, PAGES // 2, PAGES // 2)


def test_a_random_permutation_requests_no_readahead(seeded):
    memnode, data = seeded
    st = run(memnode, data, MIB, lambda c: [c.touch(order="rand", threads=1)])
    assert st.readahead_chunks == 0 and st.served_wait == 0
    assert st.faults == st.served_fetch == PAGES
    # only a fault on the chunk after one faulted on just before goes to the detector
    assert st.faults - st.c_faults < PAGES // 100, st.as_dict()


def test_a_sequential_stream_is_read_ahead(seeded):
    memnode, data = seeded
    st = run(memnode, data, MIB, lambda c: [c.touch(order="seq", threads=1)])
    assert st.c_faults >= 1  # its first fault: C served it, the detector still saw the stream
    assert st.readahead_chunks > 0 and st.readahead_installed > 0
    assert st.faults < PAGES, st.as_dict()


def test_two_streams_at_once_are_read_ahead_each(seeded):
    memnode, data = seeded
    half = SIZE // 2

    def two(c: Client) -> list[Touch]:
        return [Touch(c.base + k * half, half, origin=c.offset + k * half, threads=1).start()
                for k in (0, 1)]

    st = run(memnode, data, MIB, two)
    assert st.readahead_chunks > 0 and st.readahead_installed > 0
    assert st.faults < PAGES, st.as_dict()
