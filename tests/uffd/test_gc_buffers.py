"""Buffers whose addresses go to C stay valid through garbage collection.

CPython before 3.12.7 (gh-77894) crashes when the collector breaks a reference cycle holding a
memoryview that is still exported (its tp_clear frees the managed buffer, the later release
dereferences NULL). The fault engine hit this in its readahead install: the address of a
memoryview taken with ``address_of`` (an export), an EEXIST from ``copy`` (an exception whose
frame referenced it: a cycle reaching the caller's frame), then a collection. These tests run
that pattern for real: a segfault or a "memoryview has 1 exported buffer" means a regression.
"""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap

import pytest

from pager.uffd import UffdExists, Userfaultfd, address_of
from pager.uffd.buffers import pin
from pager.uffd.mman import Mapping

from .conftest import PAGE

# the engine's readahead install, minus the engine: a buffer's address in a local, EEXIST
CHILD = textwrap.dedent("""
    import gc, sys
    from pager.uffd import UffdExists, Userfaultfd, address_of
    from pager.uffd.mman import Mapping

    PAGE = 4096
    m = Mapping.anonymous(4 * PAGE)
    u = Userfaultfd(features=["thread_id"])
    u.register(m.address, m.length)
    u.copy(m.address, bytes(PAGE))  # present from now on: copies there fail with EEXIST

    def install_by_address():
        buf = memoryview(bytearray(16 * PAGE))
        keep, addr = address_of(buf)
        try:
            u.copy(m.address, addr, PAGE)
        except UffdExists:
            pass

    def install_by_buffer():
        buf = memoryview(bytearray(16 * PAGE))
        try:
            u.copy(m.address, buf[PAGE:2 * PAGE])
        except UffdExists:
            pass

    for _ in range(int(sys.argv[1])):
        install_by_address()
        install_by_buffer()
    gc.collect()
    print("collected", flush=True)
""")


def test_collection_after_eexist_with_buffer_addresses():
    """The crash the pager had: many EEXIST installs from buffer addresses, then a GC."""
    for _ in range(3):  # which object the collector clears first varies: try a few times
        r = subprocess.run([sys.executable, "-X", "dev", "-c", CHILD, "50"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "collected" in r.stdout, (r.returncode, r.stderr[-2000:])
        assert "exported buffer" not in r.stderr, r.stderr[-2000:]


@pytest.fixture
def present():
    m = Mapping.anonymous(4 * PAGE)
    u = Userfaultfd()
    u.register(m.address, m.length)
    u.copy(m.address, bytes(PAGE))
    yield u, m
    u.close()
    m.close()


def cyclic_garbage_of(fn) -> list[object]:
    """Run ``fn`` twice with the collector off, then collect: the exceptions and ``fn`` frames
    that only a reference cycle kept alive (other garbage in the process is not counted)."""
    import types
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        fn()
        fn()
        gc.collect()
        return [o for o in gc.garbage if isinstance(o, UffdExists)
                or (isinstance(o, types.FrameType) and o.f_code is fn.__code__)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if was:
            gc.enable()


def test_eexist_leaves_no_reference_cycle(present):
    """A failed copy's exception does not keep the frames of the fault path alive."""
    u, m = present
    _keep, addr = address_of(bytearray(PAGE))

    def install() -> None:
        try:  # noqa: SIM105 - the engine's shape: a plain except, no context manager
            u.copy(m.address, addr, PAGE)
        except UffdExists:
            pass

    def install_keeping_the_error() -> None:  # the check can fail: this one makes the cycle
        try:
            u.copy(m.address, addr, PAGE)
        except UffdExists as exc:
            kept = exc  # frame -> exc -> traceback -> frame
            assert kept

    assert cyclic_garbage_of(install) == [], "EEXIST left cyclic garbage (exception <-> frame)"
    assert len(cyclic_garbage_of(install_keeping_the_error)) >= 2


def test_address_of_memoryview_pins_its_owner_not_the_view():
    data = bytearray(4 * PAGE)
    view = memoryview(data)[PAGE:3 * PAGE]
    keep, addr, nbytes = pin(view)
    base_keep, base = address_of(data)
    assert addr == base + PAGE and nbytes == 2 * PAGE
    del base_keep
    view.release()  # the view itself carries no export
    with pytest.raises(BufferError):
        data.extend(b"x")  # ... but its memory cannot move while the address is in use
    del keep
    data.extend(b"x")


def test_copy_from_memoryview_slice(present):
    u, m = present
    src = memoryview(bytearray(b"\x5a" * (2 * PAGE)))
    assert u.copy(m.address + PAGE, src[PAGE:]) == PAGE
    assert m.view[PAGE:2 * PAGE] == b"\x5a" * PAGE
    with pytest.raises(OSError, match="exceeds"):
        u.copy(m.address + 2 * PAGE, src[PAGE:], 2 * PAGE)
