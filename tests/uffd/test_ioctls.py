"""UNREGISTER, WAKE after DONTWAKE resolutions, and copy from every kind of buffer."""

from __future__ import annotations

import mmap
import time

from pager.uffd import PageFault, Userfaultfd
from pager.uffd.mman import Mapping
from pager.uffd.toucher import Toucher, check_pattern, pattern_bytes
from tests.kernel import uffd_blocked, wait_until

from .conftest import PAGE


def test_unregister_stops_faults(anon):
    with Userfaultfd() as u:
        u.register(anon.address, anon.length)
        u.unregister(anon.address, anon.length)
        assert u.registered() == []
        # no handler runs: the kernel fills the pages itself
        r = Toucher(anon.address, anon.length, op="read").start().join(5)
        assert r.accesses == 64 and r.checksum == 0
        assert u.read_events() == []


def test_dontwake_then_wake(anon):
    with Userfaultfd() as u:
        u.register(anon.address, anon.length)
        t = Toucher(anon.address, PAGE, op="verify", seed=4).start()
        (ev,) = u.read_events(timeout=5)
        assert isinstance(ev, PageFault)
        assert u.copy(anon.address, pattern_bytes(PAGE, 4), dontwake=True) == PAGE
        # the page is there, but the faulting thread sleeps in the fault until WAKE
        wait_until(lambda: uffd_blocked() == 1, "the toucher asleep in its fault", 30)
        assert not t.wait(0.1) and uffd_blocked() == 1
        u.wake(anon.address, PAGE)
        r = t.join(5)
        assert r.mismatches == 0


def test_copy_from_bytes_bytearray_memoryview_mmap_and_address(anon):
    seed = 12
    sources = [pattern_bytes(PAGE, seed, i * PAGE) for i in range(5)]
    mm = mmap.mmap(-1, PAGE)
    mm[:] = sources[3]
    with Userfaultfd() as u:
        u.register(anon.address, anon.length)
        assert u.copy(anon.address, bytes(sources[0])) == PAGE
        assert u.copy(anon.address + PAGE, sources[1]) == PAGE                      # bytearray
        assert u.copy(anon.address + 2 * PAGE, memoryview(sources[2])) == PAGE
        assert u.copy(anon.address + 3 * PAGE, mm) == PAGE
        with Mapping.anonymous(PAGE) as src:
            src.view[:] = sources[4]
            assert u.copy(anon.address + 4 * PAGE, src.address, PAGE) == PAGE        # int address
        # a length shorter than the buffer copies only that much
        assert u.copy(anon.address + 5 * PAGE, bytes(2 * PAGE), PAGE) == PAGE
    mm.close()
    assert check_pattern((anon.address, 5 * PAGE), seed) == -1


def test_zeropage_dontwake_then_wake(anon):
    with Userfaultfd() as u:
        u.register(anon.address, anon.length)
        t = Toucher(anon.address + PAGE, PAGE, op="read").start()
        deadline = time.monotonic() + 30
        events = []
        while not events and time.monotonic() < deadline:
            events = u.read_events(timeout=0.1)
        assert [(type(e), e.address) for e in events] == [(PageFault, anon.address + PAGE)]
        u.zeropage(anon.address + PAGE, PAGE, dontwake=True)
        # resolved but not woken: the toucher thread sleeps in the fault (it may not have
        # reached its sleep when the event was read: wait for it there) and stays there
        wait_until(lambda: uffd_blocked() == 1, "the toucher asleep in its fault", 30)
        assert not t.wait(0.1) and uffd_blocked() == 1
        u.wake(anon.address, anon.length)
        assert t.join(5).checksum == 0
