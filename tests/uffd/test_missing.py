"""MISSING faults on anonymous and memfd (shmem) memory, raised by C threads, content checked."""

from __future__ import annotations

import pytest

from pager.uffd import Ioctl, PageFault, Userfaultfd
from pager.uffd.toucher import Toucher, check_pattern, pattern_bytes

from .conftest import PAGE, serve


@pytest.mark.parametrize("kind", ["anon", "memfd"])
def test_missing_faults_copy_content_checked(kind, request):
    m = request.getfixturevalue(kind)
    seed = 11
    with Userfaultfd(features=["thread_id"]) as u:
        ioctls = u.register(m.address, m.length, missing=True)
        assert Ioctl.COPY in ioctls and Ioctl.WAKE in ioctls
        faults: list[PageFault] = []

        def handle(ev):
            assert isinstance(ev, PageFault) and not ev.wp and not ev.minor
            faults.append(ev)
            off = ev.address - m.address
            assert u.copy(ev.address, pattern_bytes(PAGE, seed, off)) == PAGE

        t = Toucher(m.address, m.length, op="verify", seed=seed, threads=2).start()
        serve(u, t, handle)
        r = t.join(5)
    assert r.accesses == m.length // PAGE
    assert r.mismatches == 0 and r.first_bad == -1
    assert sorted(f.address for f in faults) == list(range(m.address, m.address + m.length, PAGE))
    assert all(f.thread_id > 0 for f in faults)
    assert check_pattern((m.address, m.length), seed) == -1


def test_zeropage_resolves_reads_with_zeros(anon):
    with Userfaultfd() as u:
        u.register(anon.address, anon.length)
        t = Toucher(anon.address, anon.length, op="read").start()
        serve(u, t, lambda ev: u.zeropage(ev.address, PAGE))
        r = t.join(5)
    assert r.checksum == 0 and r.accesses == anon.length // PAGE
    assert bytes(anon.view[:PAGE]) == bytes(PAGE)
