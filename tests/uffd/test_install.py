"""The one page installer (``ssi_install``) with a real userfaultfd: zero masks become
ZEROPAGE runs, EEXIST is finished page by page, every resident range is logged with how it
became resident, errors keep their errno."""

from __future__ import annotations

import pytest

from pager.uffd import Userfaultfd
from pager.uffd.buffers import address_of
from pager.uffd.errors import UffdError, UffdInvalid
from pager.uffd.install import InstallLog, install
from pager.uffd.toucher import pattern_bytes

from .conftest import PAGE


@pytest.fixture
def uffd(anon):
    with Userfaultfd() as u:
        u.register(anon.address, anon.length)
        yield u


def source(n: int, seed: int = 7) -> tuple[bytearray, object, int]:
    buf = bytearray(pattern_bytes(n * PAGE, seed))
    keep, addr = address_of(buf)
    return buf, keep, addr


def test_zero_mask_runs_are_zero_pages_and_logged(uffd, anon):
    buf, _keep, src = source(8)
    log = InstallLog()
    install(uffd.fileno(), anon.address, src, 8 * PAGE, 0b00100110, PAGE, log)
    a, P = anon.address, PAGE
    assert log.take() == [(a, P, "copy"), (a + P, 2 * P, "zero"), (a + 3 * P, 2 * P, "copy"),
                          (a + 5 * P, P, "zero"), (a + 6 * P, 2 * P, "copy")]
    assert log.take() == []
    assert log.take_counters() == {"copied_bytes": 5 * P, "zero_pages": 3, "eexist": 0}
    view = anon.view
    for i in range(8):
        want = bytes(P) if i in (1, 2, 5) else bytes(buf[i * P:(i + 1) * P])
        assert view[i * P:(i + 1) * P] == want, f"page {i}"


def test_present_pages_are_finished_one_by_one(uffd, anon):
    first, _k1, src1 = source(4, seed=1)
    second, _k2, src2 = source(12, seed=2)
    log = InstallLog()
    a, P = anon.address, PAGE
    install(uffd.fileno(), a + 2 * P, src1, 4 * P, 0, P, log)
    log.take()
    log.take_counters()
    install(uffd.fileno(), a, src2, 12 * P, 0, P, log)  # pages 2..5 are there already
    assert log.take() == [(a, 2 * P, "copy"), (a + 2 * P, 4 * P, "eexist"),
                          (a + 6 * P, 6 * P, "copy")]
    assert log.take_counters() == {"copied_bytes": 8 * P, "zero_pages": 0, "eexist": 1}
    view = anon.view
    assert view[2 * P:6 * P] == bytes(first)  # never overwritten
    assert view[6 * P:12 * P] == bytes(second[6 * P:12 * P])
    assert view[:2 * P] == bytes(second[:2 * P])


def test_errors_keep_errno_and_name_the_range(uffd, anon):
    _buf, _keep, src = source(1)
    log = InstallLog()
    with pytest.raises(UffdInvalid) as e:
        install(uffd.fileno(), anon.address, src, PAGE, 0, 3000, log)  # not a page size
    assert "page size 3000" in str(e.value)
    outside = anon.address + anon.length
    with pytest.raises(UffdError) as e:
        install(uffd.fileno(), outside, src, PAGE, 0, PAGE, log)
    assert e.value.errno and f"{outside:#x}" in str(e.value)
    assert log.take() == []


def test_the_log_grows_to_the_worst_case():
    log = InstallLog(4)
    log.reserve(64 * PAGE)  # every page its own run
    assert log.ptr.max_res >= 2 * 64


def test_huge_pages_are_copied_whole_with_their_zero_parts_cleared():
    from pager.uffd.mman import Mapping

    from .test_hugetlb import huge_pages
    with huge_pages(2) as huge, Mapping.memfd(2 * huge, hugetlb=True) as m, \
            Userfaultfd(features=["missing_hugetlbfs"]) as u:
        u.register(m.address, m.length, page_size=huge)
        buf, _keep, src = source(huge // PAGE)
        log = InstallLog()
        # wire pages 1 and 3 never written: cleared in the buffer, the huge page copied whole
        install(u.fileno(), m.address, src, huge, 0b1010, huge, log)
        # no ZEROPAGE for hugetlbfs: a zero fill is a copy of zeros
        install(u.fileno(), m.address + huge, None, huge, 0, huge, log)
        assert log.take() == [(m.address, 2 * huge, "copy")]
        assert log.take_counters() == {"copied_bytes": 2 * huge, "zero_pages": 0, "eexist": 0}
        view = m.view
        assert view[:PAGE] == bytes(buf[:PAGE])
        assert view[PAGE:2 * PAGE] == bytes(PAGE) and view[3 * PAGE:4 * PAGE] == bytes(PAGE)
        assert view[4 * PAGE:huge] == bytes(buf[4 * PAGE:huge])
        assert view[huge:2 * huge] == bytes(huge)
