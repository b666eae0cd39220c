"""Every event kind and every resolving ioctl on real memory, faults raised by C threads.

WP faults + dirty tracking, MINOR faults resolved with CONTINUE on shmem, POISON (SIGBUS in a
child), MOVE, and the non-cooperative events FORK, REMAP, REMOVE, UNMAP (the kernel holds the
forking / mremapping / madvising / unmapping thread until the event is read, so those calls run
on C threads too).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from pager.uffd import Fork, Ioctl, PageFault, Remap, Remove, UffdGone, Unmap, Userfaultfd
from pager.uffd.mman import MADV_DONTNEED, Mapping
from pager.uffd.toucher import Background, Toucher, check_pattern, fill_pattern, pattern_bytes

from .conftest import PAGE, serve


def _populate(u: Userfaultfd, m: Mapping, seed: int, *, wp: bool = False) -> None:
    assert u.copy(m.address, pattern_bytes(m.length, seed), wp=wp) == m.length


def test_wp_faults_track_dirty_pages(anon):
    seed = 3
    with Userfaultfd(features=["pagefault_flag_wp"]) as u:
        ioctls = u.register(anon.address, anon.length, missing=True, wp=True)
        assert Ioctl.WRITEPROTECT in ioctls
        _populate(u, anon, seed, wp=True)            # mapped write-protected (COPY_MODE_WP)
        dirty: set[int] = set()

        def handle(ev):
            assert isinstance(ev, PageFault) and ev.wp and ev.write and not ev.minor
            page = ev.address - ev.address % PAGE
            dirty.add((page - anon.address) // PAGE)
            u.writeprotect(page, PAGE, protect=False)   # unprotect and wake the writer

        # write every third page from a C thread: each first write is a WP fault
        t = Toucher(anon.address, anon.length, op="write", step=3 * PAGE, seed=99).start()
        serve(u, t, handle)
        assert t.join(5).accesses == len(range(0, 64, 3))
        assert dirty == set(range(0, 64, 3))
        # reads never fault; content of clean pages untouched
        assert check_pattern((anon.address + PAGE, PAGE), seed, PAGE) == -1
        # protect again: a second round of writes reports the pages dirty again
        u.writeprotect(anon.address, anon.length, protect=True)
        dirty.clear()
        t = Toucher(anon.address, 4 * PAGE, op="write", seed=99).start()
        serve(u, t, handle)
        t.join(5)
        assert dirty == {0, 1, 2, 3}


def test_minor_faults_resolved_with_continue_on_shmem(memfd):
    seed = 21
    with Userfaultfd(features=["minor_shmem"]) as u:
        ioctls = u.register(memfd.address, memfd.length, missing=False, minor=True)
        assert Ioctl.CONTINUE in ioctls
        # a second, unregistered view of the same memfd fills the page cache
        with memfd.map_again() as other:
            fill_pattern((other.address, other.length), seed)
            kinds = []

            def handle(ev):
                assert isinstance(ev, PageFault)
                kinds.append(ev.kind)
                assert u.continue_(ev.address - ev.address % PAGE, PAGE) == PAGE

            t = Toucher(memfd.address, memfd.length, op="verify", seed=seed).start()
            serve(u, t, handle)
            r = t.join(5)
    assert r.mismatches == 0 and r.accesses == 64
    assert kinds == ["minor"] * 64


POISON_CHILD = """
import resource, sys
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
from pager.uffd import Userfaultfd
from pager.uffd.mman import Mapping
from pager.uffd.toucher import Toucher
m = Mapping.anonymous(4 * 4096)
u = Userfaultfd(features=["poison"])
u.register(m.address, m.length)
assert u.poison(m.address + 4096, 4096) == 4096
u.zeropage(m.address, 4096)
assert Toucher(m.address, 4096, op="read").start().join(5).accesses == 1   # fine
print("poisoned", flush=True)
Toucher(m.address + 4096, 4096, op="read").start().join(5)                 # SIGBUS
print("survived", flush=True)
"""


def test_poison_raises_sigbus_in_child():
    proc = subprocess.run([sys.executable, "-c", POISON_CHILD], capture_output=True, text=True,
                          timeout=30)
    assert "poisoned" in proc.stdout, proc.stderr
    assert "survived" not in proc.stdout
    assert proc.returncode == -signal.SIGBUS, (proc.returncode, proc.stderr)


def test_move_resolves_fault_without_copy(anon):
    seed = 5
    with Userfaultfd(features=["move"]) as u, Mapping.anonymous(anon.length) as src:
        ioctls = u.register(anon.address, anon.length)
        assert Ioctl.MOVE in ioctls
        fill_pattern((src.address, src.length), seed)   # src pages exist (anonymous, private)

        def handle(ev):
            page = ev.address - ev.address % PAGE
            off = page - anon.address
            assert u.move(page, src.address + off, PAGE) == PAGE

        t = Toucher(anon.address, anon.length, op="verify", seed=seed, order="random").start()
        serve(u, t, handle)
        r = t.join(5)
        assert r.mismatches == 0 and r.accesses == 64
        # the pages left src: it reads as zero now
        assert bytes(src.view[:PAGE]) == bytes(PAGE)


def test_fork_event_gives_child_uffd(anon):
    with Userfaultfd(features=["event_fork"]) as u:
        u.register(anon.address, anon.length)
        children: list[Userfaultfd] = []
        page1 = anon.address + PAGE
        expect = pattern_bytes(PAGE, 8, PAGE)[0]

        def handle(ev):
            if isinstance(ev, Fork):
                children.append(Userfaultfd.adopt(ev.ufd))
            else:
                raise AssertionError(f"parent saw {ev}")

        bg = Background.fork_read(page1, expect).start()
        deadline = time.monotonic() + 10
        child_faults = []
        while not bg.finished and time.monotonic() < deadline:
            for ev in u.read_events():
                handle(ev)
            for c in children:
                for ev in c.read_events():
                    child_faults.append(ev)
                    c.copy(ev.address, pattern_bytes(PAGE, 8, PAGE))
            time.sleep(0.001)
        status = bg.result(5)
        assert len(children) == 1 and children[0].opened_by == "adopted"
        assert [type(e) for e in child_faults] == [PageFault]
        assert child_faults[0].address == page1
        assert os.waitstatus_to_exitcode(status) == 0
        for c in children:
            c.close()


def test_remap_event(anon):
    with Userfaultfd(features=["event_remap"]) as u, Mapping.anonymous(anon.length) as target:
        u.register(anon.address, anon.length)
        _populate(u, anon, 4)
        old = anon.address
        bg = Background.mremap(old, anon.length, anon.length, target.address).start()
        events = serve(u, bg, lambda ev: None)
        assert bg.result(5) == target.address
        anon.forget()           # the range moved: target now owns it
        assert events == [Remap(old, target.address, target.length)]
        assert check_pattern((target.address, target.length), 4) == -1


def test_remove_and_unmap_events(anon):
    with Userfaultfd(features=["event_remove", "event_unmap"]) as u:
        u.register(anon.address, anon.length)
        _populate(u, anon, 6)
        a = anon.address
        bg = Background.madvise(a + 4 * PAGE, 4 * PAGE, MADV_DONTNEED).start()
        events = serve(u, bg, lambda ev: None)
        assert bg.result(5) == 0
        assert events == [Remove(a + 4 * PAGE, a + 8 * PAGE)]
        # the removed pages fault again (MISSING), the others keep their content
        got = []
        t = Toucher(a + 4 * PAGE, PAGE, op="read").start()
        serve(u, t, lambda ev: (got.append(ev), u.zeropage(a + 4 * PAGE, PAGE)))
        t.join(5)
        assert [e.address for e in got] == [a + 4 * PAGE]
        assert check_pattern((a, 4 * PAGE), 6) == -1

        bg = Background.munmap(a + 60 * PAGE, 4 * PAGE).start()
        events = serve(u, bg, lambda ev: None)
        assert bg.result(5) == 0
        assert events == [Unmap(a + 60 * PAGE, a + 64 * PAGE)]
        # the unmapped range is gone for the binding too: a typed error, not a crash
        with pytest.raises(UffdGone, match=r"not in a range registered|unmapped"):
            u.zeropage(a + 60 * PAGE, PAGE)
