"""Far memory for a client: its evictor thread (the fault thread's side: ``pager.engine.dirty``).

A client served with a resident limit (``serve --max-resident``) has guest RAM on a shared memfd
that the pager can read and punch; its regions are registered with write-protect mode, every
install is write-protected, and ``pager.core.farmem.FarMemory`` keeps the units, their dirty
bits and the replacement policy. All of it is guarded by the client's ``fm_lock`` (a
Condition: the fault thread waits on it for room, the evictor notifies after each batch).

The evictor (its own thread and its own store lanes: a fault never queues behind write-back)
wakes when the resident bytes pass the high watermark and evicts batches down to the low one.
A batch's I/O runs in C, one call per step for the whole batch (``pager.uffd.evictio``): its
dirty stretches are read and stored pipelined on the evictor's own connection, then the acked
runs and the clean ones are punched, forgotten and woken. Runs C could not write back (no C
path to the node, the connection failed) go to ``DEPTH`` Python store workers, which retry
until acked, and each of those runs goes on to steps 3-5 after its own acks.

The C fault loop serves missing and write-protect faults of the client (``pager.engine.cloop``,
``csrc/farmem.c``): before the evictor write-protects a batch it publishes the batch's units to
the loop, which from then on leaves faults there to Python, and takes the units the loop
un-protected before (dirty, whatever they were when picked); the batch is cleared after its
last wake.
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
from pager.core.intervals import IntervalSet
from pager.uffd.errors import UffdError
from pager.uffd.evictio import BatchIO
from pager.uffd.faultloop import MAX_VICTIMS
from pager.uffd.mman import data_ranges, punch_hole
from transport.errors import StaleEpochError, TransportError

if TYPE_CHECKING:
    from pager.engine.client import ClientPager
    from pager.source import Lane

log = logging.getLogger(__name__)

BATCH = 1 << 20  # bytes per eviction batch
DEPTH = 4  # write-backs in flight (store workers, each with its own lane)


def _dirty(run: list[tuple[Victim, int, str | None]]) -> bool:
    return any(v.dirty for v, _, _ in run)


def _length(run: list[tuple[Victim, int, str | None]]) -> int:
    return run[-1][0].start + run[-1][0].length - run[0][0].start


def _stretches(run: list[tuple[Victim, int, str | None]]) -> list[tuple[int, int]]:
    """``(memfd offset, length)`` of each stretch of adjacent dirty victims of a run."""
    out: list[tuple[int, int]] = []
    for v, off, _ in run:
        if not v.dirty:
            continue
        if out and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + v.length)
        else:
            out.append((off, v.length))
    return out


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
        self._c_lane_: Lane | None = None
        # a batch's I/O in C: needs the C loop (it keeps faults off the batch's units)
        self._io = (BatchIO(2 * self._max_run, MAX_VICTIMS)
                    if client.engine.c_loop else None)
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
            while not c._stop.is_set() and c.fenced is None:
                self._kick.wait(0.05)
                self._kick.clear()
                while not c._stop.is_set() and c.fenced is None:
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
        adjacent in the guest and in the memfd go as one run (one write-protect, one store per
        dirty stretch, one punch, one wake); each step is one C call for the batch where it
        can be, and no run is punched before its acks. Runs C could not store go to ``pool``
        (``DEPTH`` in flight, each on its worker's lane, retried until acked)."""
        c, fm = self.client, self.fm
        t0 = time.perf_counter_ns()
        with c.fm_lock:
            victims, reprotect = fm.pick(want)
            for v in victims[MAX_VICTIMS:]:  # more than the C loop can be told of: later
                fm.abort(v, dirty=False)
            del victims[MAX_VICTIMS:]
            self._reprotect(reprotect)
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

    def _reprotect(self, units: list[tuple[int, int]]) -> None:
        """Holding ``fm_lock``: write-protect the CLOCK's sampled dirty units again."""
        bad = self._write_protect(units)
        self.client.stats.reprotects += len(units) - len(bad)
        for i in bad:
            self.fm.installed(*units[i], known=False)  # protection not known to hold

    def _write_protect(self, ranges: list[tuple[int, int]]) -> set[int]:
        """Write-protect each ``(address, length)`` in the guest's mm (one C call per
        ``MAX_VICTIMS``); the indexes of those that failed (a layout event pending: EAGAIN,
        unmapped meanwhile)."""
        u = self.client.uffd
        bad: set[int] = set()
        if self._io is not None:
            step = self._io.max_runs
            for k in range(0, len(ranges), step):
                bad.update(k + i for i in self._io.protect(u.fileno(), ranges[k:k + step]))
            return bad
        for i, (start, length) in enumerate(ranges):
            try:
                u.writeprotect(start, length, protect=True)
            except UffdError:
                bad.add(i)
        return bad

    def _current(self, v: Victim) -> Victim:
        """``v`` dirty if the state says so now (holding ``fm_lock``)."""
        u = self.fm.units.get(v.start)
        return Victim(v.start, v.length, True) if u is not None and u.dirty else v

    def _write_runs(self, pool: ThreadPoolExecutor,
                    runs: list[list[tuple[Victim, int, str | None]]], victims: list[Victim],
                    t0: int) -> int:
        """The write-protected runs of a batch stored, punched and woken (see ``_batch``)."""
        c = self.client
        dirty = [run for run in runs if _dirty(run)]
        # clean runs: the node holds them, nothing to wait for; dirty ones written back in C
        # (one call for the batch), those it could not go to the store workers (retrying)
        failed = self._c_store(dirty)
        done = self._drop_runs([run for run in runs if not _dirty(run)]
                               + [run for run in dirty if id(run) not in failed])
        pending = {pool.submit(self._store_run, run): run for run in dirty if id(run) in failed}
        for fut in as_completed(pending):
            done += self._finish_run(pending[fut], fut.result())
        # nothing could be evicted (a layout event pending makes UFFDIO_WRITEPROTECT fail
        # until the fault thread reads it): a fault waiting for room must not wait for this
        self.stalled = bool(victims) and not done
        if self.stalled:
            with c.fm_lock:
                c.fm_lock.notify_all()
        if victims:
            c.stats.observe_evict_us((time.perf_counter_ns() - t0) // 1000, len(victims))
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
        bad = self._write_protect([(run[0][0].start, _length(run)) for run in runs])
        for i in bad:  # a layout event pending (EAGAIN), unmapped meanwhile: not now
            log.debug("%s: cannot evict %#x now", c.name, runs[i][0][0].start)
            for v, _, _ in runs[i]:
                fm.abort(v, dirty=False)
        return [run for i, run in enumerate(runs) if i not in bad]

    def _c_store(self, runs: list[list[tuple[Victim, int, str | None]]]) -> set[int]:
        """Write back the dirty stretches of ``runs`` from C, one connection per space: the
        ids of the runs not acked (the store workers retry them)."""
        c = self.client
        by_space: dict[str | None, list[list[tuple[Victim, int, str | None]]]] = {}
        for run in runs:
            by_space.setdefault(run[0][2], []).append(run)
        failed: set[int] = set()
        for space, group in by_space.items():
            stretches = [(off, off, n) for run in group for off, n in self._stored(run)]
            ep = None
            if (self._io is not None and len(stretches) <= self._io.max_runs
                    and sum(n for _, _, n in stretches) <= self._io.max_bytes):
                try:
                    ep = self._c_lane().c_endpoint(space)
                except (TransportError, OSError) as exc:
                    log.debug("%s: write-back from C waits for the node: %s", c.name, exc)
            if ep is None or ep[1] == "raw":
                failed.update(id(run) for run in group)
                continue
            rc = self._io.write_back(c.memfd, ep[0], ep[2], stretches,
                                     ep[3] if len(ep) > 3 else None)
            if rc < 0:
                with self._lanes_lock:
                    c.stats.store_errors += 1
                log.debug("%s: write-back from C failed (%s); the store workers retry",
                          c.name, os.strerror(-rc))
                self._c_lane().c_failed(ep[0], -rc)
                failed.update(id(run) for run in group)
                continue
            with self._lanes_lock:
                n = sum(n for _, _, n in stretches)
                c.stats.written_back_bytes += n
                c.stats.c_written_back_bytes += n
        return failed

    def _c_lane(self) -> Lane:
        """The evictor's own lane for write-back from C (opened on first use)."""
        if self._c_lane_ is None:
            self._c_lane_ = self.client.engine.source.open_lane(bulk=True)
            with self._lanes_lock:
                self._lanes.append(self._c_lane_)
        return self._c_lane_

    def _store_run(self, run: list[tuple[Victim, int, str | None]]) -> bool:
        """A store worker: write back the dirty stretches of one write-protected run (one
        pread, one store each); False if the client closed first."""
        lane = self._local.lane
        space = run[0][2]
        for off, n in self._stored(run):
            if not self._write_back(lane, memoryview(bytearray(n)), off, space):
                return False
        return True

    def _stored(self, run: list[tuple[Victim, int, str | None]]) -> list[tuple[int, int]]:
        """``(memfd offset, length)`` to store of a run: its dirty stretches (`_pieces`)."""
        return [p for off, n in _stretches(run) for p in self._pieces(off, n, run[0][2])]

    def _pieces(self, off: int, n: int, space: str | None) -> list[tuple[int, int]]:
        """What of ``[off, off+n)`` of the memfd to store: its pages present, and the holes a
        REMOVE made (zeros now). Any other hole was never installed since the unit's last
        eviction (the node's copy is the guest's; a copy cut short by EAGAIN or a kill leaves
        such a unit): storing it would put zeros over the guest's writes."""
        c = self.client
        assert c.memfd is not None
        keep = list(data_ranges(c.memfd, off + n, off))
        if keep == [(off, n)]:
            return keep  # the usual case: the whole stretch is there
        with c.fm_lock:
            removed = c.state.removed.get(space)
            gone = removed.overlaps(off, off + n) if removed is not None else []
        pieces = IntervalSet()
        for s, k in keep:
            pieces.add(s, s + k)
        for s, e in gone:
            pieces.add(s, e)
        out = [(s, e - s) for s, e in pieces]
        if out != [(off, n)]:
            with self._lanes_lock:  # store workers count side by side
                c.stats.holes_kept += 1
        return out

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

    def _drop_runs(self, runs: list[list[tuple[Victim, int, str | None]]]) -> int:
        """Punch stored (or clean) runs, forget them, wake their waiters: one call each for
        the batch (the C loop leaves faults in them to Python until the batch ends)."""
        c = self.client
        if not runs:
            return 0
        if self._io is None:
            return sum(self._drop_run(run, _length(run), run[0][2]) for run in runs)
        spans = [(run[0][0].start, _length(run)) for run in runs]
        for k in range(0, len(runs), self._io.max_runs):
            self._io.punch(c.memfd, [(run[0][1], n) for run, (_, n)
                                     in zip(runs[k:k + self._io.max_runs],
                                            spans[k:k + self._io.max_runs], strict=True)])
        stored_ranges = []
        with c.fm_lock:
            for run, (start, length) in zip(runs, spans, strict=True):
                if self._forget(run, start, length):
                    stored_ranges.append((start, start + length))
            c.fm_lock.notify_all()
        for k in range(0, len(spans), self._io.max_runs):
            self._io.wake(c.uffd.fileno(), spans[k:k + self._io.max_runs])
        if c.on_layout is not None:  # a restarted pager replays them after REMOVEs
            for start, end in stored_ranges:
                c.on_layout("stored", start, end)
        st = c.stats
        st.evictions += sum(len(run) for run in runs)
        st.evicted_bytes += sum(n for _, n in spans)
        st.clean_drops += sum(1 for run in runs for v, _, _ in run if not v.dirty)
        return sum(n for _, n in spans)

    def _forget(self, run: list[tuple[Victim, int, str | None]], start: int,
                length: int) -> bool:
        """Holding ``fm_lock``: a punched run is not resident; True if part of it had been
        REMOVE'd and is on the node now (fetched again, not zero)."""
        c, fm = self.client, self.fm
        removed = c.state.removed.get(run[0][2])
        stored = False
        for v, off, _ in run:
            fm.evicted(v)
            if v.dirty and removed is not None and removed.overlaps(off, off + v.length):
                stored = True
        c.state.resident.discard(start, start + length)
        if stored:
            c.state.on_stored(start, start + length)
        return stored

    def _drop_run(self, run: list[tuple[Victim, int, str | None]], length: int,
                  space: str | None) -> int:
        """Punch a stored (or clean) run, forget it, wake its waiters."""
        c = self.client
        first, off0, _ = run[0]
        punch_hole(c.memfd, off0, length)
        with c.fm_lock:
            stored = self._forget(run, first.start, length)
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
        node's ack (retried with backoff); False if the client is closing
        first, or fenced (a newer owner holds its space: nothing more is stored)."""
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
                if isinstance(exc, StaleEpochError):
                    c.fence(str(exc))  # never stored: the run stays resident
                if c._stop.is_set() or c.fenced is not None:
                    return False
                if delay >= 1.0 or c.stats.store_errors == 1:
                    log.warning("%s: write-back of gpa %#x failed (%s); retrying, nothing is "
                                "dropped before the node acks it", c.name, off, exc)
                c._stop.wait(delay)
                delay = min(delay * 2, 1.0)
