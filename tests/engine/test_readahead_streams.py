"""The sequential-stream detector alone (pure: no kernel, no node)."""

from __future__ import annotations

from pager.core.readahead import CONFIRM_WITHIN, NEVER, PATIENCE, PATIENCE_PER_CHUNK, Readahead
from pager.core.region import Region, RegionTable
from pager.core.state import ClientState

A, B = 0x100000, 0x900000  # two regions' bases
N = 1000  # chunks per region


def test_a_stream_is_confirmed_on_its_third_chunk_and_its_window_doubles():
    ra = Readahead(max_chunks=8)
    assert ra.on_fault(A, 10, N) == range(0)
    assert ra.on_fault(A, 11, N) == range(0)
    assert ra.on_fault(A, 12, N) == range(13, 15)
    assert ra.on_fault(A, 13, N) == range(15, 18)  # window 4, from past what was asked
    assert ra.on_fault(A, 16, N) == range(18, 25)  # inside the window: still the stream
    assert ra.on_fault(A, 25, N) == range(25 + 1, 25 + 9)  # capped at max_chunks
    assert ra.on_fault(A, N - 1, N) == range(0)  # a jump: a new candidate, nothing read


def test_random_faults_never_read_ahead():
    ra = Readahead()
    for i in (500, 7, 300, 301, 9, 42, 999, 0, 600, 302, 11):
        assert ra.on_fault(A, i, N) == range(0)


def test_interleaved_streams_are_followed_each():
    ra = Readahead()
    got = [ra.on_fault(base, i, N) for i in (0, 1, 2) for base in (A, B)]
    assert got[:4] == [range(0)] * 4
    assert got[4] == range(3, 5) and got[5] == range(3, 5)
    # two streams of one region (two threads)
    ra = Readahead()
    got = [ra.on_fault(A, i, N) for j in (0, 1, 2) for i in (100 + j, 500 + j)]
    assert got[4] == range(103, 105) and got[5] == range(503, 505)


def test_a_fault_behind_the_front_keeps_the_stream():
    ra = Readahead()
    for i in (0, 1, 2):
        ra.on_fault(A, i, N)
    assert ra.on_fault(A, 1, N) == range(0)  # another thread behind: no reset, no window
    assert ra.on_fault(A, 3, N) == range(5, 8)


def test_a_fault_after_one_c_served_counts_and_the_next_chunk_is_watched():
    ra = Readahead()
    assert ra.on_fault(A, 40, N, follows=True) == range(0)  # 39 was served by C just before
    assert ra.watch() == [(A, 41)]
    assert ra.on_fault(A, 41, N) == range(42, 44)
    assert ra.watch() == [(A, 44)]  # past what is read ahead
    # a candidate with nothing behind it is not watched; the first chunk has no "before"
    ra = Readahead()
    ra.on_fault(A, 7, N)
    ra.on_fault(B, 0, N, follows=True)
    assert ra.watch() == []
    ra.on_fault(A, N - 2, N)
    ra.on_fault(A, N - 1, N)
    assert ra.watch() == []  # the region ends there


def test_streams_not_continued_age_out():
    ra = Readahead()
    ra.on_fault(A, 0, N, clock=1)
    ra.on_fault(A, 1, N, clock=2)
    assert ra.watch(clock=2 + CONFIRM_WITHIN) == [(A, 2)]
    # the next chunk, but only after many other faults: a coincidence, not a stream
    assert ra.on_fault(A, 2, N, clock=3 + CONFIRM_WITHIN) == range(0)
    assert ra.watch(clock=3 + CONFIRM_WITHIN) == []
    assert ra.on_fault(A, 3, N, clock=4 + CONFIRM_WITHIN) == range(0)
    assert ra.on_fault(A, 4, N, clock=5 + CONFIRM_WITHIN) == range(5, 7)
    # a confirmed stream is given longer, the more so the wider its window
    t = 5 + CONFIRM_WITHIN + PATIENCE
    assert ra.on_fault(A, 5, N, clock=t) == range(7, 10)
    assert ra.watch(clock=t + PATIENCE + 4 * PATIENCE_PER_CHUNK) == [(A, 10)]
    assert ra.watch(clock=t + PATIENCE + 4 * PATIENCE_PER_CHUNK + 1) == []


def test_least_recently_used_stream_is_dropped():
    ra = Readahead(max_streams=2)
    for base in (A, B, A + 1):
        ra.on_fault(base, 0, N)
        ra.on_fault(base, 1, N)
    assert ra.on_fault(B, 2, N) == range(3, 5)
    assert ra.on_fault(A, 2, N) == range(0)  # dropped: a new candidate


def test_off():
    for ra in (Readahead(min_hits=NEVER), Readahead(max_streams=0)):
        assert not ra.active
        assert [ra.on_fault(A, i, N, follows=True) for i in range(5)] == [range(0)] * 5
        assert ra.watch() == []
    ra = Readahead(min_hits=3, max_chunks=4, max_streams=2)
    ra.on_fault(A, 0, N)
    f = ra.fresh()
    assert (f.min_hits, f.max_chunks, f.max_streams, f.streams) == (3, 4, 2, [])


def test_client_state_feeds_the_detector_and_marks_chunks_in_flight():
    K = 4096
    small = Region(base=0x200000, size=64 * K, offset=0)
    huge = Region(base=0x40000000, size=8 << 20, offset=1 << 30, page_size=2 << 20)
    st = ClientState(RegionTable([small, huge]), chunk_size=K)
    served_by_c = {small.base + 9 * K}  # C served chunk 8 just before: chunk 9 follows it
    assert st.readahead_after(small.base + 9 * K, served_by_c.__contains__) == []
    ra = st.readahead_after(small.base + 10 * K, served_by_c.__contains__)
    assert [f.start for f in ra] == [small.base + 11 * K, small.base + 12 * K]
    assert set(st.inflight) == {(small.base, 11), (small.base, 12)}
    # huge pages: every fault fetches a whole page; nothing is read ahead there
    for i in range(4):
        assert st.readahead_after(huge.base + i * K) == []
