"""Residency and fault kinds with the real kernel and a real memory node (engine in-process):
the pager's resident set is exactly what the workload touched, through the C loop and through
the Python loop, and MADV_DONTNEED / munmap clear it; a write-protect fault is resolved by
clearing the protection, a minor fault by mapping the page cache's page."""

from __future__ import annotations

import mmap
import os

import pytest
from enginekit import wait_or_fail

from pager.core.region import Region
from pager.engine import ClientPager, FaultEngine
from pager.source import FileSource
from pager.tools.workload import Client, DataSet, Touch
from pager.uffd import Userfaultfd
from pager.uffd.mman import Mapping
from pager.uffd.toucher import Background, fill_pattern

MIB = 1 << 20
PAGE = 4096
CHUNK = 64 * 1024


def serve(engine: FaultEngine, c: Client) -> ClientPager:
    return engine.add_client(os.dup(c.uffd.fileno()), [Region(c.base, c.size, c.offset)])


def touch(c: Client, start: int, length: int, op: str = "read") -> None:
    wait_or_fail(Touch(c.base + start, length, origin=c.offset + start, threads=2,
                       op=op).start())


def resident(client: ClientPager, c: Client) -> list[tuple[int, int]]:
    """The pager's resident set, as offsets from the client's base, once it has folded."""
    assert client.quiesce(30), "the fault thread did not fold its counters"
    return [(s - c.base, e - c.base) for s, e in client.state.resident]


def background(call: Background) -> None:
    # from a C thread: the call blocks until the pager reads its event, and the pager's fault
    # thread runs in this process (a call holding the GIL would deadlock)
    assert call.start().result(30) == 0


@pytest.mark.parametrize("c_loop", [True, False], ids=["c-loop", "python-loop"])
def test_resident_set_is_what_was_touched_and_events_clear_it(memnode, c_loop):
    data = DataSet(8 * MIB)  # with holes: zero pages count as resident too
    memnode.seed(data)
    engine = FaultEngine(memnode.source(), chunk_size=CHUNK, readahead=0, c_loop=c_loop)
    c = Client(8 * MIB)
    try:
        client = serve(engine, c)
        touch(c, 0, 2 * MIB)
        touch(c, 5 * MIB, 1 * MIB)
        touch(c, 7 * MIB + 3 * PAGE, PAGE)  # one page: its whole chunk is installed
        want = [(0, 2 * MIB), (5 * MIB, 6 * MIB), (7 * MIB, 7 * MIB + CHUNK)]
        assert resident(client, c) == want
        assert client.resident_bytes == engine.resident_bytes() == 3 * MIB + CHUNK
        st = engine.stats()
        assert (st.c_faults > 0) == c_loop
        assert st.copied_bytes + st.zero_pages * PAGE == client.resident_bytes
        assert c.check(data, 0, 2 * MIB) == []

        background(Background.madvise(c.base + MIB, MIB, mmap.MADV_DONTNEED))
        assert resident(client, c) == [(0, MIB), (5 * MIB, 6 * MIB),
                                       (7 * MIB, 7 * MIB + CHUNK)]
        touch(c, MIB + 4 * PAGE, PAGE)  # a removed chunk: zero-filled, resident again
        assert resident(client, c) == [(0, MIB + CHUNK), (5 * MIB, 6 * MIB),
                                       (7 * MIB, 7 * MIB + CHUNK)]
        assert c.mem[MIB:MIB + CHUNK] == bytes(CHUNK)

        background(Background.munmap(c.base + 5 * MIB, 3 * MIB))
        assert resident(client, c) == [(0, MIB + CHUNK)]
        assert client.resident_bytes == MIB + CHUNK
    finally:
        c.close(unmap=True)
        engine.close()


def test_resident_set_with_page_sized_chunks_and_random_order(memnode):
    data = DataSet(4 * MIB)
    memnode.seed(data)
    engine = FaultEngine(memnode.source(), chunk_size=PAGE, readahead=0)
    c = Client(4 * MIB)
    try:
        client = serve(engine, c)
        pages = [3, 4, 5, 100, 511, 700, 1023]
        for p in pages:
            touch(c, p * PAGE, PAGE)
        want = [(3 * PAGE, 6 * PAGE)] + [(p * PAGE, (p + 1) * PAGE) for p in pages[3:]]
        assert resident(client, c) == want
        wait_or_fail(c.touch(threads=3, order="rand"))
        assert resident(client, c) == [(0, 4 * MIB)]
        assert c.check(data) == []
    finally:
        c.close(unmap=True)
        engine.close()


def test_write_protect_fault_is_unprotected_and_the_write_lands(tmp_path):
    path = tmp_path / "image"
    data = DataSet(MIB, holes=False)
    data.write_file(str(path))
    engine = FaultEngine(FileSource(str(path)), chunk_size=CHUNK, readahead=0)
    c = Client(MIB)
    c.uffd.register(c.base, c.size, missing=True, wp=True)  # add write-protect mode
    try:
        client = serve(engine, c)
        touch(c, 0, MIB)  # read: installed (not protected)
        c.uffd.writeprotect(c.base, 2 * CHUNK)
        # a write to the protected range raises WP faults; the pager (no dirty tracking)
        # clears the protection and the writer goes on
        touch(c, 0, 2 * CHUNK, op="write")
        assert client.quiesce(30)
        st = engine.stats()
        assert st.faults_wp >= 1 and st.served_unprotect == st.faults_wp
        assert st.failed_faults == 0
        assert resident(client, c) == [(0, MIB)]
    finally:
        c.close(unmap=True)
        engine.close()


def test_minor_faults_are_continued_from_the_page_cache(tmp_path):
    path = tmp_path / "image"
    size = 16 * PAGE
    path.write_bytes(bytes(size))  # never read: the pages are in the page cache
    engine = FaultEngine(FileSource(str(path)), chunk_size=CHUNK, readahead=0)
    with Mapping.memfd(size) as ram, Userfaultfd(features=["minor_shmem"]) as u:
        fill_pattern((ram.address, size), seed=5)  # through the first mapping: page cache
        alias = ram.map_again()  # a second view, registered for minor faults
        try:
            u.register(alias.address, size, missing=False, minor=True)
            engine.add_client(os.dup(u.fileno()), [Region(alias.address, size, 0)])
            t = Touch(alias.address, size, op="verify", seed=5, threads=2).start()
            wait_or_fail(t)
            assert t.mismatches == 0
            st = engine.stats()
            assert st.faults_minor == size // PAGE
            assert st.served_continue == st.faults_minor and st.fetched_bytes == 0
        finally:
            engine.close()
            alias.close()
