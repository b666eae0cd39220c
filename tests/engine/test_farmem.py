"""Far memory with the real kernel and a real memory node (engine in-process, the workload in
C threads): two threads doing random reads and read-modify-writes over 4x the resident limit,
every value checked against a model, the limit held, dirty pages written back and clean ones
dropped; the same with the memory node killed and restarted during write-back; a client with
anonymous memory refused with the reason."""

from __future__ import annotations

import json
import mmap
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
from enginekit import ROOT, farmem_guest, memnode_args, run_workload

from pager.core.region import Region
from pager.engine import FaultEngine
from pager.errors import ConfigError, HandoffError
from pager.source import FileSource
from pager.tools.workload import Client
from pager.uffd import Userfaultfd
from pager.uffd.buffers import address_of
from pager.uffd.mman import Mapping, data_ranges, punch_hole
from pager.uffd.rmw import Rmw
from pager.uffd.toucher import Background

MIB = 1 << 20
PAGE = 4096
FEATURES = ["event_remove", "event_unmap", "event_remap", "thread_id"]


class Guest:
    """Memory on a shared memfd behind a uffd, served by ``engine`` with its memfd."""

    def __init__(self, engine: FaultEngine, size: int, space: str | None = None) -> None:
        self.map = Mapping.memfd(size)
        self.uffd = Userfaultfd(features=FEATURES)
        self.uffd.register(self.map.address, size, missing=True)
        region = Region(self.map.address, size, 0, space=space, memfd=True)
        self.client = engine.add_client(os.dup(self.uffd.fileno()), [region],
                                        memfd=os.dup(self.map.fd))
        self.size = size

    def close(self) -> None:
        self.uffd.close()
        self.map.close()


def memfd_client(size: int) -> Client:
    """A workload client whose memory is a shared memfd it hands over (as the QEMU shim)."""
    fd = os.memfd_create("guest")
    os.ftruncate(fd, size)
    return Client(size, memory=mmap.mmap(fd, size, flags=mmap.MAP_SHARED), memfd=fd)


@pytest.fixture
def farmem(memnode):
    made: list[tuple[FaultEngine, Guest]] = []

    def start(size: int, limit: int, chunk: int = 16 * 1024) -> tuple[FaultEngine, Guest]:
        # no compression, whatever the loopback's measured tier under load: the tests count
        # write-backs from C, which never drives a compressing lane
        engine = FaultEngine(memnode.source(compress=()), chunk_size=chunk, readahead=0,
                             max_resident=limit)
        g = Guest(engine, size)
        made.append((engine, g))
        return engine, g

    yield start
    for engine, g in made:
        engine.close()
        g.close()


def check_run(engine: FaultEngine, g: Guest, w: Rmw, limit: int) -> None:
    assert w.errors == 0, f"page {w.first_bad} differed from the model during the run"
    assert g.client.quiesce(30)
    fm = g.client.state.farmem
    assert fm is not None and fm.bytes <= limit
    assert g.client.resident_bytes <= limit


@pytest.mark.parametrize(("skewed", "fill", "chunk"),
                         [(False, False, 16384), (True, False, 16384), (False, True, 16384),
                          (False, False, PAGE)],
                         ids=["uniform", "skewed", "uniform-filled", "uniform-4k"])
def test_random_rmw_over_4x_the_limit_matches_the_model(farmem, skewed, fill, chunk):
    """(4 KiB chunks and a larger limit: the most units, and the C loop serves many between
    two returns, so write faults, units not yet folded and the evictor's batches meet most.)"""
    limit = 2 * MIB if chunk > PAGE else 16 * MIB
    engine, g = farmem(4 * limit, limit, chunk)
    w = Rmw(g.map.address, g.size // PAGE, threads=2, ops=3000 if chunk > PAGE else 30000,
            write_pct=50, hot_ops=90 if skewed else 0, hot_pages=20, fill=fill)
    for _ in range(3):
        w.run()
        check_run(engine, g, w, limit)
    assert w.check() == 0, f"page {w.first_bad} differs from the model"
    st = engine.stats()
    assert st.evictions > 0 and st.clean_drops > 0 and st.evictions > st.clean_drops
    assert st.written_back_bytes == (st.evictions - st.clean_drops) * chunk
    assert st.wp_dirty > 0 and st.failed_faults == 0
    assert st.served_fetch > 0
    if engine.c_loop:  # (SSI_PAGER_C_LOOP=0: Python serves and writes back everything)
        assert st.c_wp_dirty > 0  # write-protect faults resolved by the C loop
        assert st.c_written_back_bytes > 0  # batches written back from C


def test_filled_pages_are_checked_whole():
    """The workload's ``fill`` data is part of the check: one changed byte is found."""
    m = mmap.mmap(-1, 64 * PAGE)
    keep, addr = address_of(m)
    w = Rmw(addr, 64, threads=2, ops=2000, write_pct=100, fill=True)
    w.run()
    assert w.errors == 0 and w.check() == 0
    page = next(p for p in range(64) if m[p * PAGE:p * PAGE + 8] != bytes(8))
    m[page * PAGE + PAGE - 1] ^= 0xFF  # the last byte of a written page's fill
    assert w.check() == 1 and w.first_bad == page
    del keep


def test_removed_range_written_and_evicted_is_fetched_again_not_zeroed(farmem):
    """A range the guest REMOVE'd reads as zero; written afterwards and evicted, it must come
    back from the node (the eviction is not a REMOVE: "zero forever" would lose the writes)."""
    limit = MIB
    engine, g = farmem(8 * MIB, limit)
    base = g.map.address
    assert Background.madvise(base, MIB, mmap.MADV_REMOVE).start().result(30) == 0
    removed = Rmw(base, MIB // PAGE, threads=2, ops=1500, write_pct=70)
    rest = Rmw(base + MIB, 7 * MIB // PAGE, threads=2, ops=1500, write_pct=70)
    for _ in range(3):  # the rest pushes the removed range's dirty units out every round
        removed.run()
        rest.run()
    assert removed.errors == 0 and rest.errors == 0, (removed.first_bad, rest.first_bad)
    assert removed.check() == 0, f"page {removed.first_bad} lost its writes"
    st = engine.stats()
    assert st.removes == 1 and st.served_zero > 0 and st.written_back_bytes > 0


def test_restarted_pager_fills_a_unit_found_partly_in_the_memfd(memnode):
    """A pager killed inside the copy that installs a unit leaves part of it in the memfd. The
    next pager takes the unit as resident and dirty; written back as a whole, the missing pages
    must not go to the node as zeros (they hold the guest's writes on the node)."""
    limit, size, chunk = MIB, 4 * MIB, 16 * 1024
    m = Mapping.memfd(size)
    u = Userfaultfd(features=FEATURES)
    u.register(m.address, size, missing=True)
    region = Region(m.address, size, 0, memfd=True)
    tail_pages = chunk // PAGE  # the last unit: written, then pushed out to the node
    head = Rmw(m.address, size // PAGE - tail_pages, threads=2, ops=3000, write_pct=70)
    tail = Rmw(m.address + size - chunk, tail_pages, threads=1, ops=200, write_pct=100)
    tail_off = size - chunk
    engines = []

    def start(wake: bool) -> FaultEngine:
        e = FaultEngine(memnode.source(), chunk_size=chunk, readahead=0, max_resident=limit)
        engines.append(e)
        e.add_client(os.dup(u.fileno()), [region], memfd=os.dup(m.fd), wake=wake)
        return e

    def tail_resident() -> int:
        return sum(n for _, n in data_ranges(m.fd, size, tail_off))

    try:
        first = start(False)
        tail.run()
        for _ in range(10):  # the head's traffic evicts the tail unit (written back)
            head.run()
            if tail_resident() == 0:
                break
        assert tail_resident() == 0, "the tail unit was never evicted"
        assert first.clients[0].quiesce(30)
        first.close()
        # what the killed pager's copy had installed: the first page of the unit only
        lane = memnode.source().open_lane()
        try:
            buf = bytearray(chunk)
            lane.fetch_into(None, tail_off, memoryview(buf))
        finally:
            lane.close()
        assert int.from_bytes(buf[PAGE:PAGE + 8], "little") > 0  # the node has the writes
        os.pwrite(m.fd, bytes(buf[:PAGE]), tail_off)
        second = start(True)
        assert tail_resident() == chunk  # the rest of the unit installed from the node
        for _ in range(10):  # the unit is evicted again, written back as a whole
            head.run()
            if tail_resident() == 0:
                break
        assert tail_resident() == 0, "the tail unit was never evicted again"
        assert head.errors == 0, f"page {head.first_bad} differed from the model"
        assert tail.check() == 0, f"tail page {tail.first_bad} lost its writes"
        assert head.check() == 0, f"page {head.first_bad} differs from the model"
        assert second.stats().written_back_bytes > 0
    finally:
        for e in engines:
            e.close()
        u.close()
        m.close()


def test_write_back_keeps_the_node_copy_of_a_page_never_installed(farmem, memnode):
    """A dirty unit with a page missing from the memfd that no REMOVE explains (an install cut
    short): its write-back stores the pages present and leaves the node's copy of the missing
    one alone, never zeros over it."""
    limit, chunk = MIB, 16 * 1024
    engine, g = farmem(4 * MIB, limit, chunk)
    w = Rmw(g.map.address, g.size // PAGE, threads=2, ops=4000, write_pct=100)
    w.run()
    w.run()  # written, evicted and written again: the node holds older copies
    assert w.errors == 0 and g.client.quiesce(30)
    fm = g.client.state.farmem
    lane = memnode.source().open_lane()
    try:
        def node_page(off: int) -> bytes:
            buf = bytearray(chunk)
            lane.fetch_into(None, off - off % chunk, memoryview(buf))
            return bytes(buf[off % chunk:off % chunk + PAGE])

        with g.client.fm_lock:
            dirty = [start for start, u in fm.units.items() if u.dirty and not u.busy]
        for start in dirty:
            old = node_page(start - g.map.address + PAGE)
            if int.from_bytes(old[:8], "little"):
                break
        else:
            pytest.fail("no dirty resident unit has a page on the node")
        off = start - g.map.address
        punch_hole(g.map.fd, off + PAGE, PAGE)  # as a copy cut short would have left it
        with g.client.fm_lock:
            fm.set_limit(4 * chunk)  # evict (nearly) everything
        g.client.evictor.kick()
        deadline = time.monotonic() + 30
        while any(True for _ in data_ranges(g.map.fd, off + chunk, off)):
            assert time.monotonic() < deadline, "the unit was never evicted"
            time.sleep(0.01)
        assert node_page(off + PAGE) == old, "the write-back put zeros over the node's copy"
        assert node_page(off) != bytes(PAGE)
        assert engine.stats().holes_kept >= 1
    finally:
        lane.close()


def test_memory_node_restarted_during_write_back(farmem, memnode):
    limit = 2 * MIB
    engine, g = farmem(4 * limit, limit)
    w = Rmw(g.map.address, g.size // PAGE, threads=2, ops=3000, write_pct=70)
    w.run()  # everything written once: the next runs evict dirty pages all the time
    check_run(engine, g, w, limit)
    before = engine.stats().written_back_bytes
    run = threading.Thread(target=w.run, kwargs={"ops": 6000})
    run.start()
    # kill the node while write-backs flow; they retry (nothing is punched before the ack)
    while engine.stats().written_back_bytes < before + limit and run.is_alive():
        run.join(0.01)
    memnode.proc.stop()
    # however far ahead the evictor was, make it write back while the node is down
    with g.client.fm_lock:
        g.client.state.farmem.set_limit(limit // 2)
    g.client.evictor.kick()
    deadline = time.monotonic() + 60
    while engine.stats().store_errors == 0 and time.monotonic() < deadline:
        run.join(0.01)
    assert engine.stats().store_errors > 0, "no write-back met the dead node"
    memnode.start(memnode.endpoint)
    run.join(240)
    assert not run.is_alive(), f"workload stuck at {w.done} operations"
    check_run(engine, g, w, limit)
    assert w.check() == 0, f"page {w.first_bad} differs from the model"
    st = engine.stats()
    assert st.failed_faults == 0


def test_pager_killed_under_supervise_rebuilds_residency_and_the_data_is_right(
        memnode, run_pager):
    limit = 2 * MIB
    size = 4 * limit
    sup, sock = run_pager(*memnode_args(memnode), "--supervise", "--chunk", "16K",
                          "--max-resident", str(limit))
    first = int(sup.wait_for(r"pager pid (\d+) started"))
    c = memfd_client(size)
    try:
        c.handoff(sock)
        w = Rmw(c.base, size // PAGE, threads=2, ops=3000, write_pct=60)
        w.run()
        assert w.errors == 0
        run = threading.Thread(target=w.run, kwargs={"ops": 6000})
        run.start()
        run.join(1.0)  # mid-workload (or just after: the restart must be right either way)
        os.kill(first, signal.SIGKILL)
        sup.wait_for(r"restarting \(1\), 1 client kept", 20)
        run.join(240)
        assert not run.is_alive(), f"workload stuck at {w.done} operations"
        assert w.errors == 0, f"page {w.first_bad} differed from the model"
        w.run(ops=3000)  # the new pager evicts what the old one left resident
        assert w.errors == 0, f"page {w.first_bad} differed from the model"
        assert w.check() == 0, f"page {w.first_bad} differs from the model"
        log = sup.log.read_text()
        assert "took over client" in log and "already resident in the memfd" in log
    finally:
        c.close(unmap=True)
        os.close(c.memfd)


def test_status_shows_the_limit_held_and_real_written_back_bytes(memnode, run_pager):
    import json
    import subprocess
    import sys

    from enginekit import ROOT
    limit = 2 * MIB
    size = 4 * limit
    proc, sock = run_pager(*memnode_args(memnode), "--chunk", "16K", "--max-resident",
                           str(limit), "--metrics", "127.0.0.1:0")
    metrics = proc.wait_for(r"metrics: http://(\S+)/metrics")
    c = memfd_client(size)
    try:
        c.handoff(sock)
        w = Rmw(c.base, size // PAGE, threads=2, ops=4000, write_pct=50)
        w.run()
        assert w.errors == 0 and w.check() == 0
        r = subprocess.run([sys.executable, "-m", "pager.cli", "status", "--json", "--pager",
                            metrics, "--interval", "0"], capture_output=True, text=True,
                           cwd=ROOT, timeout=30)
        assert r.returncode == 0, r.stderr
        p = json.loads(r.stdout)["pager"]
        [g] = p["guests"]
        assert g["limit_bytes"] == limit and 0 < g["resident_bytes"] <= limit
        assert g["pid"] == os.getpid() and len(g["spaces"]) == 1 and g["spaces"][0], g
        assert p["evictions"] > 0
        human = subprocess.run([sys.executable, "-m", "pager.cli", "status", "--pager", metrics,
                                "--interval", "0"], capture_output=True, text=True, cwd=ROOT,
                               timeout=30)
        assert "LIMIT" in human.stdout and "2.0 MiB" in human.stdout, human.stdout
        row = next(x for x in human.stdout.splitlines() if g["client"] in x)
        assert str(os.getpid()) in row.split() and g["spaces"][0] in row.split(), human.stdout
    finally:
        c.close(unmap=True)
        os.close(c.memfd)


def test_pager_wide_limit_is_shared_by_its_guests(memnode):
    total = 4 * MIB
    engine = FaultEngine(memnode.source(), chunk_size=16 * 1024, readahead=0,
                         pager_max_resident=total)
    guests = []
    try:
        guests = [Guest(engine, 4 * MIB, space=f"guest{i}") for i in range(2)]
        limits = [g.client.state.farmem.limit for g in guests]
        assert limits == [total // 2, total // 2]
        work = [Rmw(g.map.address, g.size // PAGE, threads=1, ops=3000, write_pct=50)
                for g in guests]
        runs = [threading.Thread(target=w.run) for w in work]
        for t in runs:
            t.start()
        for t in runs:
            t.join(240)
            assert not t.is_alive()
        for g, w in zip(guests, work, strict=True):
            assert w.errors == 0 and w.check() == 0
            assert g.client.quiesce(30) and g.client.resident_bytes <= total // 2
        assert engine.resident_bytes() <= total
    finally:
        engine.close()
        for g in guests:
            g.close()


def test_a_second_far_memory_guest_of_a_space_is_refused_while_the_first_is_attached(memnode):
    """A far-memory guest writes its pages back to its space: a second guest of that space
    would overwrite them and read the first's back as its own, so it is refused with the
    reason while the first is attached; a guest of another space is served meanwhile, and
    the space is free again once the first is gone."""
    engine = FaultEngine(memnode.source(), chunk_size=16 * 1024, readahead=0,
                         max_resident=MIB)
    guests = []
    try:
        guests.append(Guest(engine, 2 * MIB))  # the source's space, "default"
        m = Mapping.memfd(MIB)
        u = Userfaultfd(features=FEATURES)
        u.register(m.address, MIB, missing=True)
        fd, memfd = os.dup(u.fileno()), os.dup(m.fd)
        try:
            for named in (None, "default"):
                with pytest.raises(HandoffError, match=r"space 'default' is in use by another "
                                   r"far-memory guest of this pager \(pid 0\).*its own space"):
                    engine.add_client(fd, [Region(m.address, MIB, 0, space=named, memfd=True)],
                                      memfd=memfd)
        finally:
            os.close(fd)
            os.close(memfd)
            u.close()
            m.close()
        guests.append(Guest(engine, MIB, space="vm2"))
        first = guests.pop(0)
        first.client.close()  # what the pager does when its guest hangs up
        first.close()
        assert first.client not in engine.clients
        guests.append(Guest(engine, MIB))
        assert guests[-1].client in engine.clients
    finally:
        engine.close()
        for g in guests:
            g.close()


def test_a_guest_the_pager_wide_limit_cannot_hold_is_refused(memnode):
    """Each guest needs 4 chunks: a pager-wide limit of 8 holds two guests, and a third is
    refused (it would have taken 4 chunks beyond the limit), with the reason."""
    chunk = 16 * 1024
    engine = FaultEngine(memnode.source(), chunk_size=chunk, readahead=0,
                         pager_max_resident=8 * chunk)
    guests = []
    try:
        guests = [Guest(engine, MIB, space=f"g{i}") for i in range(2)]
        m = Mapping.memfd(MIB)
        u = Userfaultfd(features=FEATURES)
        u.register(m.address, MIB, missing=True)
        fd, memfd = os.dup(u.fileno()), os.dup(m.fd)
        try:
            with pytest.raises(HandoffError, match=r"cannot take another guest: 3 guests"):
                engine.add_client(fd, [Region(m.address, MIB, 0, space="g2", memfd=True)],
                                  memfd=memfd)
        finally:
            os.close(fd)
            os.close(memfd)
            u.close()  # before the unmap: nobody reads this uffd's events
            m.close()
        assert [g.client.state.farmem.limit for g in guests] == [4 * chunk, 4 * chunk]
    finally:
        engine.close()
        for g in guests:
            g.close()


def test_anonymous_client_is_refused_with_the_reason(memnode):
    engine = FaultEngine(memnode.source(), readahead=0, max_resident=64 * MIB)
    m = Mapping.anonymous(MIB)
    u = Userfaultfd(features=FEATURES)
    u.register(m.address, MIB, missing=True)
    fd = os.dup(u.fileno())
    try:
        with pytest.raises(HandoffError, match=r"shared memfd.*anonymous"):
            engine.add_client(fd, [Region(m.address, MIB, 0)])
    finally:
        os.close(fd)
        engine.close()
        u.close()
        m.close()


def test_limit_needs_a_source_that_takes_stores(tmp_path):
    path = tmp_path / "image"
    path.write_bytes(bytes(MIB))
    with pytest.raises(ConfigError, match=r"read-only.*memory node"):
        FaultEngine(FileSource(str(path)), max_resident=64 * MIB)
    with pytest.raises(ConfigError, match="too small"):
        FaultEngine(FileSource(str(path)), max_resident=4096)


def _bench_farmem(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pager.cli", "bench", "farmem", "--json",
                           "--limit", "4M", "--ratios", "2", "--ops", "2000", "--no-zram",
                           "--only", "uniform", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_bench_farmem_runs_its_cases_and_passes_options_on():
    r = _bench_farmem("--node-arg=--poll-us=0", "--pager-arg=--poll-us=0")
    assert r.returncode == 0, r.stderr
    got = {d["name"]: d for d in map(json.loads, r.stdout.splitlines())}
    for mode in ("resident", "ssi-pager", "c-baseline", "c-baseline-tcp",
                 "c-baseline-tcp-all-dirty"):
        case = got[f"farmem-uniform-2x-{mode}"]
        assert case["ops_per_s"] > 0 and case["errors"] == 0 and case["check"] == 0, case
    assert got["farmem-uniform-2x-ssi-pager/resident"]["ratio"] > 0
    # the C baselines really paged: over twice the limit, pages went out and came back
    for mode in ("c-baseline", "c-baseline-tcp"):
        base = got[f"farmem-uniform-2x-{mode}"]
        assert base["evicted"] > 0 and base["missing"] > base["evicted"] // 2, base
        assert 0 < base["written_back"] < base["evicted"] and base["wp_faults"] > 0, base
        assert got[f"farmem-uniform-2x-ssi-pager/{mode}"]["ratio"] > 0
    # without dirty tracking: no write-protect fault, every victim written back
    base = got["farmem-uniform-2x-c-baseline-tcp-all-dirty"]
    assert base["evicted"] > 0 and base["wp_faults"] == 0, base
    assert base["written_back"] == base["evicted"], base
    # an option the pager does not take: named in one line, no traceback
    bad = _bench_farmem("--pager-arg=--bogus-option")
    assert bad.returncode == 1, bad.stderr
    assert "ssi-pager: error:" in bad.stderr and "pager.log" in bad.stderr, bad.stderr
    assert "unrecognized arguments: --bogus-option" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_a_refused_vmm_gets_sigbus_not_a_hang(memnode, run_pager):
    """A VMM handing anonymous memory to a pager with a limit is refused; it does not watch
    the socket, so its regions are poisoned: SIGBUS at the first touch, not a hung guest."""
    proc, sock = run_pager(*memnode_args(memnode), "--max-resident", "32M")
    rc, err = run_workload(sock, 4, "the refused client hung")
    assert rc == -signal.SIGBUS, (rc, err[-500:])
    log = proc.log.read_text()
    assert "anonymous" in log and "KiB poisoned: it gets SIGBUS" in log, log[-2000:]
    assert "handoff refused" not in log, log[-2000:]  # said once, not again as a warning
    assert proc.p.poll() is None  # the pager keeps serving others


def test_a_stopped_pager_leaves_its_far_memory_guest_sigbus_not_a_hang(memnode, run_pager):
    """A pager stopping with a far-memory guest attached poisons the pages it has not served,
    the evicted ones included (a page punched while write-protected keeps a marker the kernel
    will not poison over): the guest gets SIGBUS, never a hang (it holds its uffd open) nor
    zeros."""
    pager, sock = run_pager(*memnode_args(memnode), "--chunk", "16K", "--max-resident", "2M",
                            "--stop-timeout", "1")
    guest = farmem_guest(sock, 8 * MIB)
    try:
        pager.p.send_signal(signal.SIGTERM)
        assert pager.p.wait(30) == 0
        try:
            rc = guest.wait(60)
        except subprocess.TimeoutExpired:
            raise AssertionError("the guest of a stopped pager hangs") from None
        assert rc == -signal.SIGBUS, (rc, guest.stderr.read()[-2000:])
        poisoned = int(re.search(r"client pid \d+: (\d+) KiB not served yet poisoned",
                                 pager.log.read_text()).group(1))
        assert poisoned >= 4 * 1024  # most of its 8 MiB was evicted, under a 2 MiB limit
    finally:
        guest.kill()
        guest.wait()
