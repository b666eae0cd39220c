"""Working-set record and prefetch replay: the bitmap and its record (pure), then a real
memory node and the engine in-process: a client's faults recorded and stored with its space,
replayed ahead of demand for the next client of the space (every byte right, no faults left),
and a fault during a slow replay served before the replay's queue reaches its page."""

from __future__ import annotations

import os
import time

import pytest
from enginekit import wait_or_fail

from pager.core.region import Region
from pager.core.workingset import GRANULE, WorkingSet, batches, merged, parse_header
from pager.engine import FaultEngine
from pager.engine.prefetch import ReplayOrder, host_runs, load_record
from pager.errors import ConfigError
from pager.tools.workload import Client, DataSet, Touch
from pager.uffd.faultloop import enabled_by_env

MIB = 1 << 20
CHUNK = 64 * 1024


def test_bitmap_runs_and_record_round_trip():
    ws = WorkingSet(0)
    for s, e in ((0, 1), (3 * GRANULE, 20 * GRANULE + 5), (64 * GRANULE, 65 * GRANULE)):
        ws.add(s, e)
    assert list(ws.runs()) == [(0, GRANULE), (3 * GRANULE, 18 * GRANULE),
                               (64 * GRANULE, GRANULE)]
    assert ws.count == 20
    data = ws.to_bytes(7.5)
    assert len(data) % GRANULE == 0
    info = parse_header(data[:GRANULE])
    assert info is not None and (info.nbits, info.count, info.window_s) == (65, 20, 7.5)
    back = WorkingSet.from_body(info, data[GRANULE:])
    assert list(back.runs()) == list(ws.runs())
    assert parse_header(bytes(GRANULE)) is None  # never written: no record
    bad = bytearray(data[:GRANULE])
    bad[8] = 9  # another version
    with pytest.raises(ConfigError, match="version 9"):
        parse_header(bytes(bad))
    # close runs travel together; batches cut at page boundaries
    assert list(merged([(0, GRANULE), (5 * GRANULE, GRANULE)])) == [(0, 6 * GRANULE)]
    assert list(batches([(0, 6 * MIB, 2 * MIB)], 3 * MIB)) == [
        [(0, 2 * MIB), (2 * MIB, 2 * MIB)], [(4 * MIB, 2 * MIB)]]  # whole 2 MiB pages
    assert list(batches([(0, 3 * MIB, GRANULE), (8 * MIB, MIB, GRANULE)], 2 * MIB)) == [
        [(0, 2 * MIB)], [(2 * MIB, MIB), (8 * MIB, MIB)]]


def test_huge_page_regions_replay_whole_pages():
    r = Region(1 << 30, 8 * MIB, 2 * MIB, page_size=2 * MIB)
    runs = list(host_runs([(3 * MIB, GRANULE), (3 * MIB + 8 * GRANULE, GRANULE),
                           (20 * MIB, GRANULE)], [r]))
    assert [(addr, gpa, n) for _r, addr, gpa, n in runs] == [((1 << 30) + MIB - MIB, 2 * MIB,
                                                              2 * MIB)]


def _engine(memnode, **kw) -> FaultEngine:
    return FaultEngine(memnode.source(), chunk_size=CHUNK, readahead=0, **kw)


def _record(memnode, data: DataSet, ranges: list[tuple[int, int]]) -> int:
    """A first client touches ``ranges``; its working set is stored when it ends."""
    engine = _engine(memnode, ws_window=60)
    c = Client(data.size)
    try:
        engine.add_client(os.dup(c.uffd.fileno()), [Region(c.base, c.size, 0)])
        for s, e in ranges:
            wait_or_fail(Touch(c.base + s, e - s, origin=s, threads=1).start())
    finally:
        c.close(unmap=True)
        engine.close()  # the window closes with the client: recorded and stored
    assert engine.stats().ws_recorded_pages > 0
    with memnode.source().open_lane() as lane:
        ws = load_record(lane, "default")
    assert ws is not None
    return ws.count


def test_replay_order_follows_the_latest_fault():
    plan = [[(i * MIB, MIB)] for i in range(8)]
    order = ReplayOrder(plan)
    assert order.next() == plan[0]
    # the guest faulted in batch 5: it, then its neighbours on both sides, go first
    got = [order.next(5 * MIB + 5 * GRANULE)] + [order.next() for _ in range(4)]
    assert got == [plan[5], plan[6], plan[4], plan[7], plan[3]]
    assert order.next(40 * MIB) == plan[1]  # outside every batch: ascending order goes on
    assert order.next(6 * MIB) == plan[2]  # around it all fetched: ascending order goes on
    assert order.next() is None
    assert order.jumps == 5


def test_recorded_working_set_is_replayed_for_the_next_client(memnode):
    data = DataSet(16 * MIB)
    memnode.seed(data)
    ranges = [(0, 2 * MIB), (5 * MIB, 5 * MIB + 3 * CHUNK), (12 * MIB, 14 * MIB)]
    pages = _record(memnode, data, ranges)
    assert pages * GRANULE == sum(e - s for s, e in ranges)  # whole chunks, nothing else

    engine = _engine(memnode, ws_window=60)
    c = Client(data.size)
    try:
        client = engine.add_client(os.dup(c.uffd.fileno()), [Region(c.base, c.size, 0)])
        assert client.replay_done.wait(30)
        assert client.quiesce()
        before = engine.stats()
        assert before.prefetch_bytes == pages * GRANULE
        for s, e in ranges:  # the working set: no fault left to take
            wait_or_fail(Touch(c.base + s, e - s, origin=s, threads=2).start())
        assert client.quiesce()
        assert engine.stats().faults == before.faults
        assert c.check(data) == []  # every byte, also outside the set (faulted in)
        assert client.quiesce()
        assert engine.stats().faults > before.faults
    finally:
        c.close(unmap=True)
        engine.close()


def test_fault_during_replay_is_served_before_the_queue(memnode):
    data = DataSet(32 * MIB, holes=False)
    memnode.seed(data)
    pages = _record(memnode, data, [(0, 12 * MIB)])
    # replay paced at 2 MiB/s: its queue reaches the last MiB only after ~5 s
    engine = _engine(memnode, ws_window=60, prefetch_rate=2 * MIB)
    c = Client(data.size)
    try:
        client = engine.add_client(os.dup(c.uffd.fileno()), [Region(c.base, c.size, 0)])
        last = 12 * MIB - CHUNK
        t = Touch(c.base + last, CHUNK, origin=last, threads=1).start()
        wait_or_fail(t, 5)
        assert t.mismatches == 0
        assert not client.replay_done.is_set()
        assert client.quiesce()
        st = engine.stats()
        assert st.served_fetch >= 1  # the fault fetched its chunk itself ...
        assert st.prefetch_bytes < pages * GRANULE // 2  # ... while the replay was far behind
    finally:
        c.close(unmap=True)
        engine.close()
    assert engine.stats().prefetch_bytes < pages * GRANULE  # stopped with the client


def test_replay_fetches_around_a_fault_next(memnode):
    data = DataSet(32 * MIB, holes=False)
    memnode.seed(data)
    _record(memnode, data, [(0, 12 * MIB)])
    # paced at 2 MiB/s: in ascending order the replay reaches MiB 9..11 only after ~5 s
    engine = _engine(memnode, ws_window=60, prefetch_rate=2 * MIB)
    c = Client(data.size)
    try:
        client = engine.add_client(os.dup(c.uffd.fileno()), [Region(c.base, c.size, 0)])
        at = 10 * MIB + 5 * CHUNK
        wait_or_fail(Touch(c.base + at, CHUNK, origin=at, threads=1).start(), 5)
        at_fault = engine.stats().prefetch_bytes
        around = (c.base + 9 * MIB, c.base + 12 * MIB)
        deadline = time.monotonic() + 30
        while not _covered(client._pf_installed, *around, skip=(c.base + at, CHUNK)):
            assert time.monotonic() < deadline, "the batches around the fault never came"
            assert not client.replay_done.is_set(), "the replay ended in ascending order"
            time.sleep(0.02)
        st = engine.stats()
        # after the fault, the three batches around it came next: what was installed since is
        # those 3 MiB and at most the 2 batches queued before the fault (1 MiB each), however
        # far the sweep had got when the fault came
        assert st.prefetch_bytes - at_fault <= 5 * MIB
        if enabled_by_env():
            assert st.c_faults >= 1  # the C loop served the fault while batches waited
        assert client.quiesce()
        assert c.check(data) == []
    finally:
        c.close(unmap=True)
        engine.close()


def _covered(ranges, start: int, end: int, skip: tuple[int, int]) -> bool:
    """``[start, end)`` all in ``ranges`` but the chunk ``skip`` (the fault installed it)."""
    got = sum(min(e, end) - max(s, start) for s, e in ranges.overlaps(start, end))
    return got >= end - start - skip[1]


def test_window_closes_while_the_client_runs(memnode):
    data = DataSet(4 * MIB)
    memnode.seed(data)
    engine = _engine(memnode, ws_window=0.2)
    c = Client(data.size)
    try:
        client = engine.add_client(os.dup(c.uffd.fileno()), [Region(c.base, c.size, 0)])
        wait_or_fail(Touch(c.base, MIB, threads=1).start())
        deadline = time.monotonic() + 10
        while engine.stats().ws_recorded_pages == 0 and time.monotonic() < deadline:
            client.quiesce()
            time.sleep(0.05)
        assert engine.stats().ws_recorded_pages == MIB // GRANULE
        # touched after the window: not part of the set
        wait_or_fail(Touch(c.base + 2 * MIB, MIB, origin=2 * MIB, threads=1).start())
    finally:
        c.close(unmap=True)
        engine.close()
    with memnode.source().open_lane() as lane:
        ws = load_record(lane, "default")
    assert ws is not None and list(ws.runs()) == [(0, MIB)]


def test_bad_working_set_options_are_refused(memnode):
    with pytest.raises(ConfigError, match="window -1"):
        _engine(memnode, ws_window=-1)
    with pytest.raises(ConfigError, match="cap 0"):
        _engine(memnode, ws_window=1, ws_max_fraction=0)
