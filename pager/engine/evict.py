"""Far memory for a client: its evictor thread, and the fault thread's side of dirty tracking.

A client served with a resident limit (``serve --max-resident``) has guest RAM on a shared memfd
that the pager can read and punch; its regions are registered with write-protect mode, every
install is write-protected, and ``pager.core.farmem.FarMemory`` keeps the units, their dirty
bits and the replacement policy. All of it is guarded by the client's ``fm_lock`` (a
Condition: the fault thread waits on it for room, the evictor notifies after each batch).

The evictor (its own thread and its own store lanes: a fault never queues behind write-back)
wakes when the resident bytes pass the high watermark and evicts batches down to the low one;
the stores of a batch's runs go to ``DEPTH`` store workers (several in flight), and each run
goes on to steps 3-5 as soon as its own acks are in. The C fault loop serves missing faults of
the client too (``pager.engine.cloop``): before its punch the evictor publishes the run's range
to the loop, which then leaves faults there to Python, and clears it after the wake.
Each victim goes through, in this order:

1. write-protect it in the guest's mm (from here on a write blocks in a WP fault, which the
   fault thread leaves to step 5);
2. dirty: ``pread`` it from the memfd (never through a mapping: touching a hole there would
   create a page the guest then reads as zeros without a fault), store it on the node and
   wait for the ack (retried until it is acked; never punched before); clean: nothing, the
   node holds this copy;
3. ``fallocate(PUNCH_HOLE|KEEP_SIZE)``: the page cache drops the pages and the guest's mapping
   faults again (no uffd event: the engine never mistakes an eviction for a guest REMOVE);
4. the state forgets the unit (not resident; a written-back unit is no longer "zero on the
   next fault" even if the guest had REMOVE'd part of it: it is fetched again);
5. ``UFFDIO_WAKE``: a writer blocked on the unit faults again, as MISSING, and is served the
   stored copy. A missing fault on a unit being evicted is likewise left to this wake.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import TYPE_CHECKING

from pager.core.farmem import FarMemory, Victim
from pager.core.region import Region
from pager.core.state import Fetch
from pager.errors import ConfigError, HandoffError
from pager.uffd.errors import UffdError
from pager.uffd.faultloop import MAX_VICTIMS
from pager.uffd.mman import data_ranges, punch_hole
from transport.errors import TransportError

if TYPE_CHECKING:
    from pager.engine.client import ClientPager
    from pager.source import Lane, PageSource
    from pager.uffd.binding import Userfaultfd

log = logging.getLogger(__name__)

BATCH = 1 << 20  # bytes per eviction batch
DEPTH = 4  # write-backs in flight (store workers, each with its own lane)


def _dirty(run: list[tuple[Victim, int, str | None]]) -> bool:
    return any(v.dirty for v, _, _ in run)


class Evictor:
    """One client's evictor thread (see the module docstring)."""

    def __init__(self, client: ClientPager, fm: FarMemory) -> None:
        self.client = client
        self.fm = fm
        self._kick = threading.Event()
        self.stalled = False  # the last batch evicted nothing
        self._max_run = max(BATCH, fm.unit)  # bytes of one run at most
        self._local = threading.local()  # a store worker's lane
        self._lanes: list[Lane] = []
        self._lanes_lock = threading.Lock()
        self.batch: list[int] = []  # the units of the batch in progress (under fm_lock)
        self._thread = threading.Thread(target=self._run, name=f"evict-{client.name}",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def kick(self) -> None:
        self._kick.set()

    def join(self, timeout: float) -> None:
        self._kick.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _run(self) -> None:
        c = self.client
        pool = ThreadPoolExecutor(DEPTH, thread_name_prefix=f"store-{c.name}",
                                  initializer=self._open_lane)
        try:
            while not c._stop.is_set():
                self._kick.wait(0.05)
                self._kick.clear()
                while not c._stop.is_set():
                    with c.fm_lock:
                        want = self.fm.excess()
                    if want <= 0 or not self._batch(pool, min(want, BATCH)):
                        break
        except Exception:
            log.exception("%s: evictor failed; the resident limit is no longer held", c.name)
            c.error = "evictor failed (see log)"
        finally:
            pool.shutdown(wait=True)
            with self._lanes_lock:
                lanes, self._lanes = self._lanes, []
            for lane in lanes:
                lane.close()
            with c.fm_lock:
                c.fm_lock.notify_all()

    def _open_lane(self) -> None:
        """A store worker's own lane (its stores in flight beside the other workers')."""
        lane = self._local.lane = self.client.engine.source.open_lane(bulk=True)
        with self._lanes_lock:
            self._lanes.append(lane)

    def _batch(self, pool: ThreadPoolExecutor, want: int) -> int:
        """Evict up to ``want`` bytes; the bytes evicted (0: nothing could be). Victims
        adjacent in the guest and in the memfd go as one run: one write-protect, one store per
        dirty stretch, one punch, one wake. The runs' stores go to ``pool`` (``DEPTH`` in
        flight, each on its worker's lane); each run is punched and woken after its own acks,
        never before."""
        c, fm = self.client, self.fm
        t0 = time.perf_counter_ns()
        with c.fm_lock:
            victims, reprotect = fm.pick(want)
            for v in victims[MAX_VICTIMS:]:  # more than the C loop can be told of: later
                fm.abort(v, dirty=False)
            del victims[MAX_VICTIMS:]
            for start, length in reprotect:
                try:
                    c.uffd.writeprotect(start, length, protect=True)
                    c.stats.reprotects += 1
                except UffdError:
                    fm.installed(start, length, known=False)  # protection not known to hold
            # the C loop resolves write faults: tell it the batch first (it leaves write faults
            # there to Python from now on), write-protect, then take what it un-protected
            # before: those units are dirty, whatever they were when picked
            self.batch = sorted(v.start for v in victims)
            cl = c.c_farmem
            if cl is not None:
                cl.set_victims(self.batch)
            runs = self._protect(victims)
            if cl is not None:
                # a unit C installed and its residency not folded yet: the fold marks it
                c.c_wp_later += [s for s in cl.take_wp_dirty() if not fm.written(s)]
                runs = [[(self._current(v), off, space) for v, off, space in run]
                        for run in runs]
        try:
            return self._write_runs(pool, runs, victims, t0)
        finally:
            with c.fm_lock:
                self.batch = []
                if c.c_farmem is not None:  # (made during this batch, by the fault thread)
                    c.c_farmem.set_victims(())

    def _current(self, v: Victim) -> Victim:
        """``v`` dirty if the state says so now (holding ``fm_lock``)."""
        u = self.fm.units.get(v.start)
        return Victim(v.start, v.length, True) if u is not None and u.dirty else v

    def _write_runs(self, pool: ThreadPoolExecutor,
                    runs: list[list[tuple[Victim, int, str | None]]], victims: list[Victim],
                    t0: int) -> int:
        """The write-protected runs of a batch stored, punched and woken (see ``_batch``)."""
        c = self.client
        done = 0
        pending = {pool.submit(self._store_run, run): run for run in runs if _dirty(run)}
        for run in runs:  # clean runs: the node holds them, nothing to wait for
            if not _dirty(run):
                done += self._finish_run(run, True)
        for fut in as_completed(pending):
            done += self._finish_run(pending[fut], fut.result())
        # nothing could be evicted (a layout event pending makes UFFDIO_WRITEPROTECT fail
        # until the fault thread reads it): a fault waiting for room must not wait for this
        self.stalled = bool(victims) and not done
        if self.stalled:
            with c.fm_lock:
                c.fm_lock.notify_all()
        if victims:
            c.stats.observe_evict_us((time.perf_counter_ns() - t0) // 1000 // len(victims))
        return done

    def _protect(self, victims: list[Victim]) -> list[list[tuple[Victim, int, str | None]]]:
        """Holding ``fm_lock``: runs of adjacent victims (with their memfd offset and space),
        each write-protected in the guest's mm; victims that cannot be go back to the state."""
        c, fm = self.client, self.fm
        runs: list[list[tuple[Victim, int, str | None]]] = []
        for v in sorted(victims, key=lambda v: v.start):
            r = c.state.regions.find(v.start)
            if r is None:
                fm.abort(v, dirty=False)  # left the region table: the layout event says why
                continue
            item = (v, r.gpa(v.start), r.space)
            last = runs[-1][-1] if runs else None
            if (last is not None and last[0].start + last[0].length == v.start
                    and last[1] + last[0].length == item[1] and last[2] == item[2]
                    and item[1] + v.length - runs[-1][0][1] <= self._max_run):
                runs[-1].append(item)
            else:
                runs.append([item])
        out = []
        for run in runs:
            first, last = run[0][0], run[-1][0]
            try:
                c.uffd.writeprotect(first.start, last.start + last.length - first.start)
                out.append(run)
            except UffdError as exc:  # a layout event pending (EAGAIN), unmapped meanwhile
                log.debug("%s: cannot evict %#x now: %s", c.name, first.start, exc)
                for v, _, _ in run:
                    fm.abort(v, dirty=False)
        return out

    def _store_run(self, run: list[tuple[Victim, int, str | None]]) -> bool:
        """A store worker: write back the dirty stretches of one write-protected run (one
        pread, one store each); False if the client closed first."""
        lane = self._local.lane
        space = run[0][2]
        i = 0
        while i < len(run):
            if not run[i][0].dirty:
                i += 1
                continue
            j = i
            while j + 1 < len(run) and run[j + 1][0].dirty:
                j += 1
            off = run[i][1]
            n = run[j][1] + run[j][0].length - off
            if not self._write_back(lane, memoryview(bytearray(n)), off, space):
                return False
            i = j + 1
        return True

    def _finish_run(self, run: list[tuple[Victim, int, str | None]], stored: bool) -> int:
        """After the run's acks (``stored``): punch, forget, wake; else keep it resident."""
        c, fm = self.client, self.fm
        first, _, space = run[0]
        length = run[-1][0].start + run[-1][0].length - first.start
        cl = c.c_farmem
        slot = None
        if stored and cl is not None:
            slot = cl.evicting(first.start, first.start + length)
            stored = slot is not None  # cannot tell the C loop: keep the run
        if not stored:
            with c.fm_lock:
                for v, _, _ in run:
                    fm.abort(v)
                c.fm_lock.notify_all()
            c.uffd.wake(first.start, length)
            return 0
        try:
            return self._drop_run(run, length, space)
        finally:
            if slot is not None:
                cl.evicted(slot)  # after the wake: C may serve that range again

    def _drop_run(self, run: list[tuple[Victim, int, str | None]], length: int,
                  space: str | None) -> int:
        """Punch a stored (or clean) run, forget it, wake its waiters."""
        c, fm = self.client, self.fm
        first, off0, _ = run[0]
        punch_hole(c.memfd, off0, length)
        stored = False
        with c.fm_lock:
            removed = c.state.removed.get(space)
            for v, off, _ in run:
                fm.evicted(v)
                if v.dirty and removed is not None and removed.overlaps(off, off + v.length):
                    stored = True  # on the node now: fetch it again, not zero
            c.state.resident.discard(first.start, first.start + length)
            if stored:
                c.state.on_stored(first.start, first.start + length)
            c.fm_lock.notify_all()
        try:
            c.uffd.wake(first.start, length)
        except UffdError as exc:  # the range was unmapped meanwhile
            log.debug("%s: wake %#x: %s", c.name, first.start, exc)
        if stored and c.on_layout is not None:  # a restarted pager replays it after REMOVEs
            c.on_layout("stored", first.start, first.start + length)
        st = c.stats
        st.evictions += len(run)
        st.evicted_bytes += length
        st.clean_drops += sum(1 for v, _, _ in run if not v.dirty)
        return length

    def _write_back(self, lane: Lane, view: memoryview, off: int, space: str | None) -> bool:
        """Read ``len(view)`` bytes at ``off`` of the memfd and store them; returns after the
        node's ack (retried with backoff); False only if the client is closing first."""
        c = self.client
        got = 0
        while got < len(view):  # a hole reads as zeros (a page REMOVE'd meanwhile)
            n = os.preadv(c.memfd, [view[got:]], off + got)
            if n <= 0:
                view[got:] = bytes(len(view) - got)
                break
            got += n
        delay = 0.01
        while True:
            try:
                lane.store_from(space, off, view)
                with self._lanes_lock:  # store workers count side by side
                    c.stats.written_back_bytes += len(view)
                return True
            except (TransportError, OSError) as exc:
                with self._lanes_lock:
                    c.stats.store_errors += 1
                lane.reset()
                if c._stop.is_set():
                    return False
                if delay >= 1.0 or c.stats.store_errors == 1:
                    log.warning("%s: write-back of gpa %#x failed (%s); retrying, nothing is "
                                "dropped before the node acks it", c.name, off, exc)
                c._stop.wait(delay)
                delay = min(delay * 2, 1.0)


class FarMemMixin:
    """The fault thread's side of far memory, part of ``ClientPager``."""

    def _fm_unit(self: ClientPager, addr: int) -> tuple[int, int] | None:
        r = self.state.regions.find(addr)
        return None if r is None else r.chunk(addr, self.engine.chunk_size)

    def _fm_fetch(self: ClientPager, f: Fetch, lane: Lane | None, zero: bool = False) -> bool:
        """A missing fault's unit fetched (or zero filled) and installed, write-protected; False
        if it is being evicted (the evictor's wake makes the thread fault again)."""
        fm = self.state.farmem
        assert fm is not None
        unit = self._fm_unit(f.start)
        key = f.start if unit is None else unit[0]
        with self.fm_lock:
            if not fm.begin_fetch(key):
                self.stats.evict_waits += 1
                return False
            self._fm_room(fm, f.length)
        # a write fault: install the unit writable and dirty at once (saves the WP fault
        # that would follow); it is not picked before end_fetch, so nothing sees it clean
        write, self._write_miss = self._write_miss, False
        mode = self.installer.mode
        if write:
            self.installer.mode = 0
        try:
            if zero:
                self.installer.install(f.start, f.length, None, 0, (), f.region.page_size)
            else:
                self._fetch_and_install(f, lane)
        finally:
            self.installer.mode = mode
            with self.fm_lock:
                if write and key in fm.units:
                    fm.on_write(key, unit[1] if unit else f.length)
                fm.end_fetch(key)
        if fm.excess() > 0:
            self.evictor.kick()
        return True

    def _fm_room(self: ClientPager, fm: FarMemory, length: int) -> None:
        """Holding ``fm_lock``: wait until ``length`` more bytes fit under the limit (the
        evictor ran behind); past ``fetch_timeout`` go on, over the limit, and say so."""
        if not fm.full(length):
            return
        self.stats.full_waits += 1
        deadline = time.monotonic() + self.engine.fetch_timeout
        while fm.full(length) and not self._stop.is_set():
            self.evictor.kick()
            if self.evictor.stalled:  # events to read first: serve this one over the limit
                return
            if time.monotonic() > deadline or not self.evictor._thread.is_alive():
                log.warning("%s: the evictor is behind (%d of %d bytes resident); serving "
                            "over the limit", self.name, fm.bytes, fm.limit)
                return
            self.fm_lock.wait(0.05)

    def _fm_write(self: ClientPager, addr: int) -> None:
        """A write-protect fault: mark the unit dirty and clear the protection, unless it is
        being evicted or no longer resident (then the wake / a missing fault serves it)."""
        fm = self.state.farmem
        assert fm is not None
        unit = self._fm_unit(addr)
        if unit is None:
            return
        start, length = unit
        with self.fm_lock:
            if self.state.resident.find(addr) is None:
                self.stats.wp_stale += 1
                self.uffd.wake(start, length)  # a fault from before an eviction: fault again
                return
            if not fm.on_write(start, length):
                self.stats.evict_waits += 1
                return
            self.uffd.writeprotect(start, length, protect=False)
        self.stats.wp_dirty += 1


def check_writable(source: PageSource) -> None:
    """Far memory writes dirty pages back: the source must take stores (a memory node)."""
    from pager.source import Lane
    lane = source.open_lane()
    try:
        if type(lane).store_from is Lane.store_from:
            raise ConfigError(f"a resident limit needs a source that takes write-backs; "
                              f"{source.describe()} is read-only: serve from a memory node "
                              "(--memnode HOST:PORT)")
    finally:
        lane.close()


def check_far_memory(regions: list[Region], memfd: int | None) -> None:
    """A client under a resident limit must hand over the memfd behind all of its RAM (each
    region's offset is its offset in that memfd, as the QEMU shim sends it)."""
    if memfd is None or not all(r.memfd for r in regions):
        raise HandoffError(
            "this pager keeps guests under a resident limit (--max-resident / "
            "--pager-max-resident), which needs guest RAM on a shared memfd handed over in the "
            "handshake (the pager reads and punches evicted pages there); this client's memory "
            "is anonymous (Firecracker today): serve it from a pager without a limit, or run "
            "the guest through `ssi-pager vm` (QEMU on a shared memfd)")


def register_wp(u: Userfaultfd, regions: list[Region]) -> None:
    """Register the client's regions again, with write-protect mode added (dirty tracking);
    the uffd's mm is the client's, so this works from the pager."""
    for r in regions:
        try:
            u.register(r.base, r.size, missing=True, wp=True, page_size=r.page_size)
        except UffdError as exc:
            raise HandoffError(f"cannot track dirty pages of region {r.base:#x}+{r.size:#x} "
                               f"(write-protect mode refused: {exc}); a resident limit needs "
                               "a kernel with userfaultfd write-protect on shmem "
                               "(CONFIG_PTE_MARKER_UFFD_WP, Linux 6.1+)") from exc


def rebuild_residency(client: ClientPager) -> int:
    """A (restarted) pager adopting a far-memory client: what the memfd holds is resident, and
    dirty (nothing proves the node has that copy). Returns the bytes found."""
    fm = client.state.farmem
    assert fm is not None and client.memfd is not None
    found = 0
    cs = client.engine.chunk_size
    for r in client.state.regions:
        for off, n in data_ranges(client.memfd, r.offset + r.size, r.offset):
            a, end = r.addr_of(off), r.addr_of(off + n)
            client.state.resident.add(a, end)
            while a < end:
                start, length = r.chunk(a, cs)
                fm.installed(start, length, known=False)
                found += min(end, start + length) - a
                a = start + length
    return found
