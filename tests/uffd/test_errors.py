"""Bad input gets a typed UffdError with a message naming the argument, never a crash."""

from __future__ import annotations

import errno

import pytest

from pager.uffd import (
    Feature,
    UffdClosed,
    UffdError,
    UffdExists,
    UffdGone,
    UffdInvalid,
    UffdRetry,
    UffdUnsupported,
    Userfaultfd,
)
from pager.uffd.mman import Mapping
from pager.uffd.toucher import pattern_bytes

from .conftest import PAGE


@pytest.fixture
def registered(anon):
    with Userfaultfd() as u:
        u.register(anon.address, anon.length)
        yield u, anon


def test_unaligned_address_names_argument_and_page_size(registered):
    u, m = registered
    with pytest.raises(UffdInvalid) as info:
        u.copy(m.address + 1, bytes(PAGE))
    msg = str(info.value)
    assert info.value.errno == errno.EINVAL
    assert "not aligned" in msg and "4096" in msg and hex(m.address + 1) in msg
    assert isinstance(info.value, OSError)


def test_length_not_page_multiple(registered):
    u, m = registered
    with pytest.raises(UffdInvalid, match="length 100 is not a positive multiple of the page "
                                          "size 4096"):
        u.zeropage(m.address, 100)
    with pytest.raises(UffdInvalid, match="length"):
        u.register(m.address, 4097)


def test_copy_length_beyond_source_buffer(registered):
    u, m = registered
    with pytest.raises(UffdInvalid, match="exceeds the 4096-byte source buffer"):
        u.copy(m.address, bytes(PAGE), 2 * PAGE)


def test_unregistered_range_is_gone(registered):
    u, _ = registered
    with Mapping.anonymous(4 * PAGE) as other, \
            pytest.raises(UffdGone, match="not in a range registered with this userfaultfd"):
        u.copy(other.address, bytes(PAGE))


def test_exists_and_partial_copy_reported(registered):
    u, m = registered
    assert u.copy(m.address + PAGE, bytes(PAGE)) == PAGE
    with pytest.raises(UffdExists) as info:
        u.copy(m.address + PAGE, bytes(PAGE))
    assert info.value.errno == errno.EEXIST
    # pages 0 is new, page 1 exists: the kernel copies one page and stops; the count says so
    done = u.copy(m.address, pattern_bytes(2 * PAGE, 1))
    assert done == PAGE
    with pytest.raises(UffdExists):
        u.zeropage(m.address, PAGE)


def test_closed_fd(anon):
    u = Userfaultfd()
    u.register(anon.address, anon.length)
    u.close()
    assert u.closed
    for call in (lambda: u.copy(anon.address, bytes(PAGE)), lambda: u.zeropage(anon.address, PAGE),
                 lambda: u.read_events(), lambda: u.fileno(), lambda: u.wake(anon.address, PAGE)):
        with pytest.raises(UffdClosed, match="closed"):
            call()
    u.close()   # idempotent


def test_unsupported_feature_bit():
    with pytest.raises(UffdUnsupported, match=r"does not support feature\(s\) bit30"):
        Userfaultfd(features=1 << 30)


def test_unknown_feature_name():
    with pytest.raises(UffdInvalid, match="unknown userfaultfd feature 'teleport'"):
        Userfaultfd(features=["teleport"])


def test_minor_mode_on_anonymous_memory_rejected(anon):
    with Userfaultfd(features=[Feature.MINOR_SHMEM]) as u, \
            pytest.raises(UffdInvalid, match="not supported on this memory kind"):
        u.register(anon.address, anon.length, missing=False, minor=True)


def test_register_twice_by_two_uffds(anon):
    with Userfaultfd() as a, Userfaultfd() as b:
        a.register(anon.address, anon.length)
        with pytest.raises(UffdError, match="another userfaultfd") as info:
            b.register(anon.address, anon.length)
        assert info.value.errno == errno.EBUSY


def test_adopt_rejects_non_uffd(tmp_path):
    import os

    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        with pytest.raises(UffdInvalid, match="not a userfaultfd"):
            Userfaultfd.adopt(fd)
    finally:
        os.close(fd)
    with pytest.raises(UffdClosed, match="not open"):
        Userfaultfd.adopt(9999)


def test_retry_is_eagain_subclass():
    assert issubclass(UffdRetry, UffdError) and issubclass(UffdError, OSError)
    assert UffdRetry(errno.EAGAIN, "x").errno == errno.EAGAIN


def test_ioctl_not_allowed_on_range_names_allowed_ones(registered):
    u, m = registered                       # anonymous, MISSING only
    with pytest.raises(UffdInvalid, match=r"UFFDIO_CONTINUE is not allowed on this range "
                                          r"\(allowed: wake, copy, zeropage"):
        u.continue_(m.address, PAGE)
    with pytest.raises(UffdInvalid, match="UFFDIO_WRITEPROTECT is not allowed"):
        u.writeprotect(m.address, PAGE)
