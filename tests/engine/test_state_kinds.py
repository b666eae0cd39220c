"""The client state machine without a kernel: fault kinds become actions, and the resident set
follows installs and layout events (REMOVE, UNMAP, REMAP, fork)."""

import pytest

from pager.core.region import Region, RegionTable
from pager.core.state import (
    MINOR,
    WP,
    ClientState,
    Continue,
    Fetch,
    Unknown,
    Unprotect,
)

K = 4096
BASE = 0x40000000  # aligned for 2 MiB pages too


def state(page_size: int = K) -> ClientState:
    return ClientState(RegionTable([Region(BASE, 64 * page_size, 0, page_size)]),
                       chunk_size=4 * K)


def test_kinds_become_actions():
    st = state()
    assert isinstance(st.on_fault(BASE + 5 * K + 9), Fetch)
    assert st.on_fault(BASE + 5 * K + 9, WP) == Unprotect(st.regions.find(BASE), BASE + 5 * K, K)
    assert st.on_fault(BASE + 5 * K, MINOR) == Continue(st.regions.find(BASE), BASE + 5 * K, K)
    assert isinstance(st.on_fault(BASE - K, WP), Unknown)
    with pytest.raises(ValueError, match="fault kind 'odd'"):
        st.on_fault(BASE, "odd")


def test_kinds_act_on_the_region_page_size():
    huge = 2 << 20
    st = state(huge)
    a = st.on_fault(BASE + huge + 123, WP)
    assert isinstance(a, Unprotect) and (a.start, a.length) == (BASE + huge, huge)


def test_resident_follows_installs_and_layout_events():
    st = state()
    st.on_installed(BASE, 8 * K, "copy")
    st.on_installed(BASE + 8 * K, 4 * K, "zero")
    st.on_installed(BASE + 20 * K, 4 * K, "eexist")
    assert list(st.resident) == [(BASE, BASE + 12 * K), (BASE + 20 * K, BASE + 24 * K)]
    assert st.resident_bytes == 16 * K
    child = st.fork()
    st.on_remove(BASE + 2 * K, BASE + 4 * K)
    assert list(st.resident) == [(BASE, BASE + 2 * K), (BASE + 4 * K, BASE + 12 * K),
                                 (BASE + 20 * K, BASE + 24 * K)]
    assert child.resident_bytes == 16 * K  # the child's copy is its own
    st.on_remap(BASE, BASE + 40 * K, 12 * K)  # moved with the mapping
    assert list(st.resident) == [(BASE + 20 * K, BASE + 24 * K),
                                 (BASE + 40 * K, BASE + 42 * K), (BASE + 44 * K, BASE + 52 * K)]
    st.on_unmap(BASE + 44 * K, BASE + 64 * K)
    assert list(st.resident) == [(BASE + 20 * K, BASE + 24 * K), (BASE + 40 * K, BASE + 42 * K)]
