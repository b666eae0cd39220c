"""Pure bookkeeping: regions, chunks, removed ranges, readahead, in-flight waits (no kernel)."""

import pytest

from pager.core.intervals import IntervalSet
from pager.core.region import Region, RegionTable
from pager.core.state import (
    ClientState,
    Fetch,
    Readahead,
    Unknown,
    Wait,
    ZeroFill,
    segments,
)
from pager.errors import HandoffError

K = 4096


def test_chunk_aligned_to_region_base_and_clipped():
    r = Region(base=0x10000 + K, size=20 * K, offset=8 * K)
    assert r.chunk(r.base + 5 * K + 7, 16 * K) == (r.base, 16 * K)
    # last chunk clipped to the region end
    assert r.chunk(r.base + 17 * K, 16 * K) == (r.base + 16 * K, 4 * K)
    assert r.gpa(r.base + K) == 9 * K
    assert r.addr_of(9 * K) == r.base + K
    # a chunk size that is not a page multiple is rounded up
    assert r.chunk(r.base, 5000) == (r.base, 2 * K)


@pytest.mark.parametrize("kw", [
    dict(base=0x1000, size=0, offset=0),
    dict(base=0x1001, size=K, offset=0),
    dict(base=0x1000, size=K + 1, offset=0),
    dict(base=0x1000, size=K, offset=12),
    dict(base=0x1000, size=K, offset=0, page_size=3000),
])
def test_region_validation(kw):
    with pytest.raises(HandoffError):
        Region(**kw).validate()


def test_table_overlap_unmap_remap():
    t = RegionTable([Region(0x100000, 16 * K, 0), Region(0x200000, 4 * K, 16 * K)])
    with pytest.raises(HandoffError, match="overlaps"):
        t.add(Region(0x100000 + 15 * K, 2 * K, 0))
    assert t.find(0x100000 + 3 * K).offset == 0
    assert t.find(0x100000 + 16 * K) is None
    t.remove_range(0x100000 + 4 * K, 0x100000 + 8 * K)
    assert t.find(0x100000 + 5 * K) is None
    tail = t.find(0x100000 + 9 * K)
    assert tail.base == 0x100000 + 8 * K and tail.offset == 8 * K
    t.move(0x100000 + 8 * K, 0x300000, 8 * K)
    moved = t.find(0x300000 + K)
    assert moved.offset == 8 * K and moved.gpa(0x300000 + K) == 9 * K
    assert t.find(0x100000 + 9 * K) is None
    assert [r.base for r in t] == [0x100000, 0x200000, 0x300000]


def test_interval_set():
    s = IntervalSet()
    s.add(10, 20)
    s.add(30, 40)
    s.add(20, 30)
    assert list(s) == [(10, 40)]
    s.discard(15, 25)
    assert list(s) == [(10, 15), (25, 40)]
    assert s.find(14) == (10, 15) and s.find(15) is None
    assert s.overlaps(0, 30) == [(10, 15), (25, 30)]
    s.add(0, 100)
    assert list(s) == [(0, 100)]


def _runs(members: set[int]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for x in sorted(members):
        if out and out[-1][1] == x:
            out[-1][1] = x + 1
        else:
            out.append([x, x + 1])
    return [(a, b) for a, b in out]


@pytest.mark.parametrize("block", [1, 2, 3, 8, 256])
def test_interval_set_matches_a_model_across_blocks(block):
    """Random adds and discards (touching, spanning many blocks, inside one interval) against
    a plain set of integers: the same intervals, count, total, finds and overlaps; no block
    grows past twice the block size or stays empty."""
    import random
    rnd = random.Random(block)
    for universe in (60, 3000):
        s, model = IntervalSet(block), set()
        for step in range(600):
            a = rnd.randrange(universe)
            b = a + rnd.choice([1, 1, 2, 7, 40, universe // 3])
            if rnd.random() < 0.55:
                s.add(a, b)
                model.update(range(a, b))
            else:
                s.discard(a, b)
                model.difference_update(range(a, b))
            if step % 25 and step != 599:
                continue
            runs = _runs(model)
            assert list(s) == runs and len(s) == len(runs) and s.total() == len(model)
            assert list(s.copy()) == runs
            for x in range(-1, universe + 50, 7):
                assert s.find(x) == next(((p, q) for p, q in runs if p <= x < q), None)
            q0 = rnd.randrange(universe)
            q1 = q0 + rnd.randrange(1, universe)
            assert s.overlaps(q0, q1) == [(max(q0, p), min(q1, q)) for p, q in runs
                                          if q > q0 and p < q1]
            assert all(0 < len(st) <= 2 * block for st, _ in s._blocks)


def test_interval_set_updates_do_not_grow_with_its_size():
    """An insert in the middle of a large set moves one block, not the whole set: adding and
    removing a page amid 200k intervals costs about what it costs amid 2k (a single sorted
    list took ~8x longer there). Compared as a ratio in one run, with a wide margin."""
    import time

    def per_op(n: int) -> float:
        s = IntervalSet()
        for i in range(n):
            s.add(2 * i, 2 * i + 1)  # n separate intervals
        mid = 2 * (n // 2) + 1  # a gap in the middle
        t0 = time.perf_counter()
        for _ in range(2000):
            s.add(mid, mid + 1)  # joins its two neighbours
            s.discard(mid, mid + 1)
        return time.perf_counter() - t0

    small, large = min(per_op(2000) for _ in range(3)), min(per_op(200_000) for _ in range(3))
    assert large < 4 * small, (large, small)


def state(chunk=16 * K):
    return ClientState(RegionTable([Region(0x100000, 64 * K, 1 << 20, space="vm")]),
                       chunk_size=chunk)


def test_fault_fetch_then_remove_gives_zero_never_fetch():
    st = state()
    a = st.on_fault(0x100000 + 5 * K + 1)
    assert isinstance(a, Fetch) and a.start == 0x100000 and a.length == 16 * K
    assert a.gpa == 1 << 20 and a.removed == ()
    st.on_remove(0x100000 + 2 * K, 0x100000 + 6 * K)
    z = st.on_fault(0x100000 + 3 * K)
    assert isinstance(z, ZeroFill) and (z.start, z.length) == (0x100000 + 2 * K, 4 * K)
    f = st.on_fault(0x100000 + 8 * K)
    assert isinstance(f, Fetch) and f.removed == ((0x100000 + 2 * K, 0x100000 + 6 * K),)
    # the removed range survives an mremap (kept in space offsets)
    st.on_remap(0x100000, 0x900000, 64 * K)
    z = st.on_fault(0x900000 + 3 * K)
    assert isinstance(z, ZeroFill)
    assert isinstance(st.on_fault(0x100000), Unknown)
    # a forked child keeps the removed ranges, not the in-flight ones
    st.inflight[(0x900000, 1)] = []
    child = st.fork()
    assert isinstance(child.on_fault(0x900000 + 3 * K), ZeroFill)
    assert child.inflight == {}


def test_segments_leave_out_removed_ranges():
    base = 0x100000
    assert segments(base, 4 * K) == [(base, 4 * K)]
    assert segments(base, 4 * K, ((base + K, base + 2 * K),)) == [(base, K),
                                                                 (base + 2 * K, 2 * K)]
    assert segments(base, 4 * K, ((base + 3 * K, base + 9 * K), (base - K, base + K))) == [
        (base + K, 2 * K)]
    assert segments(base, 4 * K, ((base, base + 4 * K),)) == []


def test_readahead_on_sequential_stream_and_waits():
    st = state(chunk=4 * K)
    base = 0x100000
    assert st.readahead_after(base) == []
    assert st.readahead_after(base + 4 * K) == []
    ra = st.readahead_after(base + 8 * K)
    assert [f.start for f in ra] == [base + 12 * K, base + 16 * K]
    # a fault on a chunk being read ahead waits for it
    w = st.on_fault(base + 13 * K)
    assert isinstance(w, Wait)
    assert st.landed(ra[0]) == [base + 13 * K]
    # the stream keeps going: the window grows, requested chunks are not requested again
    more = st.readahead_after(base + 12 * K)
    assert more[0].start == base + 20 * K
    assert len(more) >= 2
    # a random jump resets the detector
    assert st.readahead_after(base + 60 * K) == []
    assert Readahead().on_fault(0, 5, 10) == range(0)


def test_readahead_skips_removed_and_install_plan_rechecks():
    st = state(chunk=4 * K)
    base = 0x100000
    st.on_remove(base + 16 * K, base + 20 * K)
    for i in (0, 1):
        st.readahead_after(base + i * 4 * K)
    ra = st.readahead_after(base + 8 * K)
    assert [f.start for f in ra] == [base + 12 * K]
    st.on_remove(base + 12 * K, base + 13 * K)
    plan = st.install_plan(ra[0])
    assert plan.removed == ((base + 12 * K, base + 13 * K),)
    st.on_unmap(base, base + 64 * K)
    assert st.install_plan(ra[0]) is None


def test_deferred():
    st = state()
    st.defer(1)
    st.defer(2, "wp")
    assert st.take_deferred() == [(1, "missing"), (2, "wp")] and st.take_deferred() == []
