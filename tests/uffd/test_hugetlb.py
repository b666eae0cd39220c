"""MISSING faults on hugetlbfs (memfd MFD_HUGETLB): 2 MiB pages, copied whole.

Reserves two huge pages for the test (vm.nr_hugepages) and restores the old value; skipped when
the host cannot give them.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import pytest

from pager.uffd import Ioctl, UffdInvalid, Userfaultfd
from pager.uffd.mman import Mapping
from pager.uffd.toucher import Toucher, pattern_bytes
from tuning.errors import HugePagesError
from tuning.hugepages import reserved

from .conftest import serve


@contextmanager
def huge_pages(count: int):
    """``count`` free huge pages (their size in bytes is yielded), given back after; others'
    reservations made meanwhile are kept (tuning.hugepages.reserved)."""
    if os.geteuid() != 0:
        pytest.skip("reserving huge pages needs root")
    try:
        with reserved(count) as pool:
            yield pool.page_size
    except HugePagesError as exc:
        pytest.skip(f"the host could not reserve huge pages: {exc}")


def test_missing_faults_on_hugetlbfs():
    with huge_pages(2) as huge:
        seed = 13
        with Mapping.memfd(2 * huge, hugetlb=True) as m, \
                Userfaultfd(features=["missing_hugetlbfs"]) as u:
            base = m.address
            ioctls = u.register(m.address, m.length, page_size=huge)
            assert Ioctl.COPY in ioctls
            # page size named in errors: a 4 KiB-aligned address is not huge-page aligned
            with pytest.raises(UffdInvalid, match=f"page size {huge}"):
                u.copy(m.address + 4096, bytes(huge))
            faults = []

            def handle(ev):
                faults.append(ev.address)
                start = ev.address - (ev.address - m.address) % huge
                assert u.copy(start, pattern_bytes(huge, seed, start - m.address)) == huge

            t = Toucher(m.address, m.length, op="verify", seed=seed).start()
            serve(u, t, handle)
            r = t.join(10)
        assert r.mismatches == 0 and r.accesses == 2 * huge // 4096
        assert sorted(faults) == [base, base + huge]
