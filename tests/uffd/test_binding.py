"""The binding's plumbing: constants from the header, batched reads, the raw fast path, the
toucher's checks, adopting a uffd passed over a Unix socket."""

from __future__ import annotations

import array
import socket
import time

import pytest
from pager.uffd._uffd_cffi import ffi, lib

from pager.uffd import (
    EVENT_PAGEFAULT,
    Feature,
    Ioctl,
    PageFault,
    RawEvents,
    Userfaultfd,
)
from pager.uffd._cffi_src.userfaultfd import NEWER
from pager.uffd.toucher import Toucher, fill_pattern

from .conftest import PAGE, serve


def pending(u: Userfaultfd) -> int:
    with open(f"/proc/self/fdinfo/{u.fileno()}") as f:
        for line in f:
            if line.startswith("pending:"):
                return int(line.split()[1])
    raise AssertionError("no pending line in fdinfo")


def wait_pending(u: Userfaultfd, count: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while pending(u) < count:
        assert time.monotonic() < deadline, f"only {pending(u)} of {count} faults pending"
        time.sleep(0.001)


def test_constants_come_from_header_or_uapi_fallback():
    assert ffi.sizeof("struct uffd_msg") == 32
    assert ffi.sizeof("struct uffdio_move") == 40 and ffi.sizeof("struct uffdio_poison") == 32
    # the UAPI values (Linux 6.8) whichever way they were obtained
    assert Feature.MOVE == 1 << 16 and Feature.POISON == 1 << 14
    assert Ioctl.MOVE == 1 << 5 and Ioctl.POISON == 1 << 8 and Ioctl.API == 1 << 0x3F
    # every constant newer than Linux 6.1 has an SSI_HAS_ flag saying where its value came from
    for name, _ in NEWER:
        assert getattr(lib, f"SSI_HAS_{name.lstrip('_')}") in (0, 1)
        assert isinstance(getattr(lib, name), int)


def test_runtime_detection_lists_features_and_ioctls():
    with Userfaultfd() as u:
        assert u.features == 0
        assert Ioctl.REGISTER in u.ioctls and Ioctl.API in u.ioctls
        assert Feature.MISSING_SHMEM in u.available
    with Userfaultfd(features="thread_id") as u:
        assert u.features == Feature.THREAD_ID


def test_many_events_per_read(anon):
    """Four C threads fault on four pages; one read returns all four messages."""
    with Userfaultfd(features=["thread_id"]) as u:
        u.register(anon.address, anon.length)
        t = Toucher(anon.address, 4 * PAGE, op="read", threads=4).start()
        wait_pending(u, 4)
        events = u.read_events(max_events=64)
        assert len(events) == 4
        assert sorted(e.address for e in events) == [anon.address + i * PAGE for i in range(4)]
        assert len({e.thread_id for e in events}) == 4     # four distinct faulting threads
        u.zeropage(anon.address, 4 * PAGE)                  # resolves and wakes all four
        assert t.join(5).accesses == 4


def test_raw_fast_path(anon):
    raw = RawEvents(2)
    with Userfaultfd() as u:
        u.register(anon.address, anon.length)
        t = Toucher(anon.address, 3 * PAGE, op="read", threads=3).start()
        wait_pending(u, 3)
        n = u.read_raw(raw)
        assert n == 2                                       # capped by the buffer
        assert raw.words[0] == EVENT_PAGEFAULT
        first = raw.addresses(n)
        assert all(isinstance(e, PageFault) for e in raw.events(n))
        assert u.read_raw(raw) == 1
        rest = raw.addresses(1)
        assert sorted(first + rest) == [anon.address + i * PAGE for i in range(3)]
        assert u.read_raw(raw) == 0                         # nothing pending: 0, no exception
        u.zeropage(anon.address, 3 * PAGE)
        t.join(5)


def test_exact_address_feature(anon):
    with Userfaultfd(features=["exact_address"]) as u:
        u.register(anon.address, anon.length)
        # a toucher whose base is 8 bytes into the page: the fault reports that address
        t = Toucher(anon.address + 8, 8, op="read").start()
        events = serve(u, t, lambda ev: u.zeropage(anon.address, PAGE))
        t.join(5)
    assert [e.address for e in events] == [anon.address + 8]


def test_toucher_verify_reports_mismatches(anon):
    fill_pattern((anon.address, anon.length), 1)
    anon.view[5 * PAGE + 16] ^= 0xFF                  # corrupt one byte in page 5
    r = Toucher(anon.address, anon.length, op="verify", seed=1, threads=2).start().join(5)
    assert r.mismatches == 1 and r.first_bad == 5 * PAGE + 16
    r = Toucher(anon.address, anon.length, op="verify", seed=2).start().join(5)
    assert r.mismatches == 64 and r.first_bad == 0
    assert len(r.latencies_ns) == 64 and all(x > 0 for x in r.latencies_ns)


def test_toucher_join_timeout_while_fault_unresolved(anon):
    with Userfaultfd() as u:
        u.register(anon.address, anon.length)
        t = Toucher(anon.address, PAGE, op="read").start()
        with pytest.raises(TimeoutError, match="unresolved faults"):
            t.join(0.05)
        u.zeropage(anon.address, PAGE)
        assert t.join(5).accesses == 1


def test_adopt_uffd_received_over_unix_socket(anon):
    """The handoff path: a uffd (API done, range registered) sent by SCM_RIGHTS, then served."""
    left, right = socket.socketpair()
    with left, right:
        sender = Userfaultfd(features=["thread_id"])
        sender.register(anon.address, anon.length)
        socket.send_fds(left, [b"regions"], [sender.fileno()])
        sender.close()                                   # the receiver's copy keeps it alive
        msg, fds, _, _ = socket.recv_fds(right, 100, 1)
        assert msg == b"regions"
        with Userfaultfd.adopt(fds[0]) as u:
            assert u.opened_by == "adopted" and Feature.THREAD_ID in u.features
            t = Toucher(anon.address, 2 * PAGE, op="verify", seed=9).start()
            buf = array.array("Q", bytes(PAGE))

            def handle(ev):
                fill_pattern(buf, 9, ev.address - anon.address)
                u.copy(ev.address, buf)

            serve(u, t, handle)
            assert t.join(5).mismatches == 0


def test_read_with_timeout_waits_for_first_event(anon):
    with Userfaultfd() as u:
        u.register(anon.address, anon.length)
        t0 = time.monotonic()
        assert u.read_events(timeout=0.05) == []
        assert time.monotonic() - t0 >= 0.04                 # it did wait
        t = Toucher(anon.address + 2 * PAGE, PAGE, op="read").start()
        events = u.read_events(timeout=5)                     # returns as soon as it faults
        assert [e.address for e in events] == [anon.address + 2 * PAGE]
        raw = RawEvents(4)
        assert u.read_raw(raw, timeout=0.01) == 0
        u.zeropage(anon.address + 2 * PAGE, PAGE)
        t.join(5)


def test_toucher_latency_into_caller_buffer(anon):
    lat = array.array("Q", bytes(8 * 64))
    with Userfaultfd() as u:
        u.register(anon.address, anon.length)
        t = Toucher(anon.address, anon.length, op="read", latency_buffer=lat).start()
        serve(u, t, lambda ev: u.zeropage(ev.address, PAGE))
        r = t.join(5)
    assert list(lat) == r.latencies_ns and min(lat) > 0
    with pytest.raises(ValueError, match="64 accesses need one each"):
        Toucher(anon.address, anon.length, latency_buffer=array.array("Q", bytes(8)))
