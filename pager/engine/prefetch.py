"""Working-set record and prefetch replay of a client (``WorkingSetMixin``, part of
``ClientPager``; the bitmap and its record format are ``pager.core.workingset``).

Record: for ``ws_window`` seconds after a client starts (a boot, a resume, a snapshot restore),
the pages it faulted in are its working set. When the window closes (or the client ends first),
the fault thread takes them from the client state (what prefetch installed is left out: the
guest did not fault on it), adds the set already recorded, and a helper thread stores the
bitmap on the memory node in the space ``NAME.ws``. A set larger than ``ws_max_fraction`` of
the client's RAM is not stored (the window was too long to mean anything).

Replay: when the client starts and the node holds a record of its space, a helper thread with
its own connection fetches the recorded pages in batches of pipelined runs (``PF_BATCH``
bytes, at most ``PF_AHEAD`` batches ahead) and hands them to the fault thread. Faults never
wait for the replay: while batches wait, the C loop serves every fault already raised and hands
back when none is left (or every ``REPLAY_MAX_MS`` of a stream of faults); only then does the
fault thread install a batch, run by run with UFFDIO_COPY DONTWAKE, stopping as soon as a fault
waits (``prefetch_yields``), and wake what it installed once. A fault on a page not yet
installed is served at once by the fault path on its own connection (the replay's copy then
meets EEXIST and leaves the page alone), and steers the replay (``ReplayOrder``): the batches
around the latest fault are fetched next, on both sides, so that the replay gets ahead of the
guest where it is instead of sweeping in address order behind it. Removed, unmapped or moved
ranges are re-checked by the fault thread at install time, as for readahead.
"""

from __future__ import annotations

import bisect
import logging
import select
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from pager.core.intervals import IntervalSet
from pager.core.region import Region
from pager.core.state import Fetch
from pager.core.workingset import (
    GRANULE,
    HEADER,
    WorkingSet,
    batches,
    merged,
    parse_header,
    record_space,
)
from pager.uffd.buffers import address_of
from pager.uffd.errors import UffdError, UffdRetry
from pager.uffd.install import COPY_DONTWAKE
from transport.errors import TransportError

if TYPE_CHECKING:
    from pager.engine.client import ClientPager
    from pager.source import Lane

log = logging.getLogger(__name__)

PF_BATCH = 1 << 20   # bytes per replay batch (one wake per batch)
PF_PIECE = 64 << 10  # bytes per install ioctl of a batch: a waiting fault goes first after one
PF_AHEAD = 2         # batches fetched and not yet installed, at most
STORE_CHUNK = 1 << 20
STORE_WAIT = 10.0    # s a starting client waits for its space's record being stored


class WorkingSetMixin:
    """Record and replay for ``ClientPager`` (see the module docstring)."""

    def _ws_init(self: ClientPager) -> None:
        self._pf_done: deque = deque()            # fetched batches (deques of runs)
        self._pf_poll = select.poll()             # the uffd: a fault waits (replay yields)
        self._pf_slots = threading.Semaphore(PF_AHEAD)
        self._pf_installed = IntervalSet()        # host ranges the replay installed
        self._pf_thread: threading.Thread | None = None
        self._ws_deadline = 0.0                   # 0: not recording
        self._ws_loaded: dict[str, WorkingSet] = {}
        self._ws_kept: dict[str, WorkingSet] = {}  # faulted-in ranges unmapped in the window
        self._ws_ram: dict[str, int] = {}            # bytes of RAM per space at start
        self._ws_ready = threading.Event()        # records loaded (or none)
        self.replay_done = threading.Event()      # replay fetched and installed (or none)
        self._pf_fetched = False                  # the helper fetched all it will
        self._pf_hint: tuple[int] | None = None   # (host address,) of the latest C fault
        self._pf_t0 = 0.0                         # replay start; stats then (for the log)
        self._pf_at_start = (0, 0, 0)

    def _ws_spaces(self: ClientPager) -> dict[str, list[Region]]:
        """Regions by the memory-node space they map (only sources that can store)."""
        default = getattr(self.engine.source, "space", None)
        if default is None or self.parent is not None:
            return {}
        out: dict[str, list[Region]] = {}
        for r in self.state.regions:
            out.setdefault(r.space or default, []).append(r)
        return out

    def _ws_begin(self: ClientPager) -> None:
        """From the fault thread at start: open the window, load the records, start replay."""
        eng = self.engine
        spaces = self._ws_spaces()
        if not spaces or not (eng.ws_window or eng.prefetch):
            self._ws_ready.set()
            self.replay_done.set()
            return
        self._ws_ram = {space: sum(r.size for r in rs) for space, rs in spaces.items()}
        if eng.ws_window:
            self._ws_deadline = time.monotonic() + eng.ws_window
        self._pf_poll.register(self.uffd.fileno(), select.POLLIN)
        self._pf_thread = threading.Thread(target=self._pf_run, args=(spaces,),
                                           name=f"ws-{self.name}", daemon=True)
        self._pf_thread.start()

    # -- helper thread: load, replay, store ------------------------------------------------
    def _pf_run(self: ClientPager, spaces: dict[str, list[Region]]) -> None:
        lane = self.engine.source.open_lane()
        try:
            for space in spaces:
                pending = self.engine.ws_stored.get(space)
                if pending is not None and not pending.wait(STORE_WAIT):
                    log.warning("%s: the working set of %r is still being stored; replaying "
                                "the previous one", self.name, space)
                try:
                    ws = load_record(lane, space)
                except (TransportError, OSError) as exc:
                    log.warning("%s: working set of %r not loaded: %s", self.name, space, exc)
                    lane.reset()
                    continue
                if ws is not None:
                    self._ws_loaded[space] = ws
            self._ws_ready.set()
            if self.engine.prefetch:
                for space, ws in self._ws_loaded.items():
                    self._replay(lane, space, ws, spaces[space])
        finally:
            self._ws_ready.set()
            self._pf_fetched = True
            self._kick()  # the fault thread sets replay_done once it installed the rest
            lane.close()

    def _replay(self: ClientPager, lane: Lane, space: str, ws: WorkingSet,
                regions: list[Region]) -> None:
        t0 = time.monotonic()
        if not self._pf_t0:
            st = self.stats
            self._pf_t0 = t0
            self._pf_at_start = (st.faults, st.latency_sum_us, st.latency_count)
        total = 0
        rate = self.engine.prefetch_rate
        runs = list(host_runs(list(merged(ws.runs())), regions))
        log.info("%s: prefetching the working set of %r: %d pages in %d runs", self.name,
                 space, ws.count, len(runs))
        order = ReplayOrder(list(batches(((gpa, n, r.page_size) for r, _a, gpa, n in runs),
                                         PF_BATCH)))
        seen = None
        while True:
            while not self._pf_slots.acquire(timeout=0.5):
                if self._stop.is_set():
                    return
            if self._stop.is_set():
                return
            hint = self._pf_hint
            batch = order.next(_gpa_of(hint[0], regions)
                               if hint is not None and hint is not seen else None)
            seen = hint
            if batch is None:
                self._pf_slots.release()
                break
            got = []
            for gpa, n in batch:
                for r, addr, g, k in host_runs([(gpa, n)], regions):
                    buf = memoryview(bytearray(k))
                    try:
                        mask = lane.fetch_into(space, g, buf)
                    except (TransportError, OSError) as exc:
                        log.warning("%s: prefetch of %r stopped: %s", self.name, space, exc)
                        self._pf_slots.release()
                        return
                    got.append((r, addr, g, k, buf, mask))
                    total += k
            self._pf_done.append(deque(got))
            self._kick()
            if rate:  # paced: never more than ``rate`` bytes/s
                ahead = total / rate - (time.monotonic() - t0)
                if ahead > 0 and self._stop.wait(ahead):
                    return
        log.info("%s: working set of %r fetched: %d MiB in %.2f s (%d batches moved ahead by "
                 "faults)", self.name, space, total >> 20, time.monotonic() - t0, order.jumps)

    # -- fault thread ------------------------------------------------------------------------
    def _ws_tick(self: ClientPager, install: bool = True) -> None:
        """One pass of the fault thread with no fault waiting (``install``): install a replay
        batch; close the recording window when it is due."""
        if install and self._pf_done:
            self._pf_install()
        if self._pf_fetched and not self._pf_done and not self.replay_done.is_set():
            self.replay_done.set()
            self._pf_log_done()
        if self._ws_deadline and time.monotonic() >= self._ws_deadline:
            if self._ws_ready.is_set():
                self._ws_record()
            else:  # the old record is still loading: never wait for it here
                self._ws_deadline = time.monotonic() + 1.0

    def _pf_seen(self: ClientPager, addr: int, _length: int, _how: str) -> None:
        """A fault the C loop served installed ``addr`` during the replay: the replay's
        next batch is the one holding it (the guest touches the rest of it next)."""
        self._pf_hint = (addr,)

    def _pf_log_done(self: ClientPager) -> None:
        if not self._pf_t0:
            return
        st = self.stats
        faults, lsum, lcount = (a - b for a, b in zip(
            (st.faults, st.latency_sum_us, st.latency_count), self._pf_at_start, strict=True))
        took = time.monotonic() - self._pf_t0
        log.info("%s: replay installed %d MiB in %.3f s (%.0f MiB/s), %d MiB wasted; %d faults "
                 "meanwhile, mean service %.0f µs", self.name, st.prefetch_bytes >> 20, took,
                 (st.prefetch_bytes >> 20) / max(took, 1e-9), st.prefetch_wasted >> 20, faults,
                 lsum / max(lcount, 1))

    def _pf_install(self: ClientPager) -> None:
        """Install the first fetched batch run by run, each with COPY DONTWAKE, then wake
        what was installed once. A fault arriving meanwhile comes first: the rest of the batch
        goes back to the head of the queue (``prefetch_yields``) until no fault waits. Runs
        go in pieces of ``PF_PIECE`` bytes: a fault waits for one piece's copy at most."""
        batch = self._pf_done[0]
        waiting = self._pf_poll.poll
        lo, hi = None, 0
        while batch:
            if waiting(0):
                self.stats.prefetch_yields += 1
                break
            r, addr, gpa, n, buf, mask = batch.popleft()
            piece = max(PF_PIECE, r.page_size)
            if n > piece:  # the rest after this piece: a fault waiting now goes before it
                batch.appendleft((r, addr + piece, gpa + piece, n - piece, buf[piece:],
                                  mask >> (piece // GRANULE)))
                n, buf, mask = piece, buf[:piece], mask & ((1 << (piece // GRANULE)) - 1)
            plan = self.state.install_plan(Fetch(r, addr, n, gpa))
            if plan is None:
                self.stats.prefetch_wasted += n
                continue
            _keep, src = address_of(buf)
            try:
                self.installer.install(plan.start, plan.length, src, mask, plan.removed,
                                       plan.region.page_size, mode=COPY_DONTWAKE)
            except UffdRetry:  # a layout event is pending: faults will fetch these pages
                self.stats.prefetch_wasted += n
                continue
            except UffdError as exc:
                log.debug("%s: prefetch install %#x failed: %s", self.name, plan.start, exc)
                self.stats.prefetch_wasted += n
                continue
            self.stats.prefetch_bytes += plan.length
            self._pf_installed.add(plan.start, plan.start + plan.length)
            lo = plan.start if lo is None else min(lo, plan.start)
            hi = max(hi, plan.start + plan.length)
        if not batch:
            self._pf_done.popleft()
            self._pf_slots.release()
        if lo is not None:
            try:
                self.uffd.wake(lo, hi - lo)
            except UffdError as exc:
                log.debug("%s: prefetch wake failed: %s", self.name, exc)

    def _ws_keep(self: ClientPager, start: int, end: int) -> None:
        """Before ``[start, end)`` is unmapped (the client may unmap its RAM as it exits):
        its pages faulted in during the window stay in the working set."""
        if not self._ws_deadline:
            return
        for space, regions in self._ws_spaces().items():
            ws = self._ws_kept.setdefault(space, WorkingSet(0))
            for r in regions:
                s, e = max(start, r.base), min(end, r.end)
                if s < e:
                    self._ws_add(ws, r, s, e)

    def _ws_add(self: ClientPager, ws: WorkingSet, r: Region, start: int, end: int) -> None:
        """Pages of ``r`` in ``[start, end)`` that faults installed (not the replay)."""
        for s, e in self.state.resident.overlaps(start, end):
            for ps, pe in _minus(max(s, start), min(e, end), self._pf_installed):
                ws.add(r.gpa(ps), r.gpa(pe))

    def _ws_record(self: ClientPager) -> None:
        """Close the window: the pages faulted in since start (not prefetched), plus the
        record loaded, stored by a helper thread."""
        self._ws_deadline = 0.0
        spaces = self._ws_spaces()
        if not self._ws_ready.wait(5):  # only at the client's end; from _ws_tick it is set
            log.warning("%s: the recorded working set did not load; storing this one alone",
                        self.name)
        sets: dict[str, WorkingSet] = {}
        rams = self._ws_ram
        for space in set(spaces) | set(self._ws_kept):
            ws = WorkingSet(0)
            for r in spaces.get(space, []):
                self._ws_add(ws, r, r.base, r.end)
            for more in (self._ws_kept.get(space), self._ws_loaded.get(space)):
                if more is not None:
                    ws.update(more)
            ram = rams.get(space, 0)
            pages = ws.count
            if pages * GRANULE > self.engine.ws_max_fraction * ram:
                log.warning("%s: working set of %r not stored: %d MiB is more than %.0f%% of "
                            "its RAM (shorten serve --ws-window)", self.name, space,
                            pages * GRANULE >> 20, 100 * self.engine.ws_max_fraction)
                continue
            if pages:
                sets[space] = ws
                self.stats.ws_recorded_pages += pages
        if sets:
            for space in sets:
                self.engine.ws_stored[space] = threading.Event()
            t = threading.Thread(target=self._ws_store, args=(sets,), name=f"ws-store-{self.name}",
                                 daemon=True)
            t.start()
            self._ws_store_thread = t

    def _ws_store(self: ClientPager, sets: dict[str, WorkingSet]) -> None:
        lane = self.engine.source.open_lane()
        try:
            for space, ws in sets.items():
                try:
                    store_record(lane, space, ws, self.engine.ws_window)
                    log.info("%s: working set of %r recorded: %d pages", self.name, space,
                             ws.count)
                except (TransportError, OSError) as exc:
                    log.warning("%s: working set of %r not stored: %s", self.name, space, exc)
                    lane.reset()
                finally:
                    self.engine.ws_stored[space].set()
        finally:
            lane.close()

    def _ws_end(self: ClientPager) -> None:
        """The fault thread ends: a window still open is closed now; wait for the store."""
        if self._ws_deadline:
            self._ws_record()
        t = getattr(self, "_ws_store_thread", None)
        if t is not None:
            t.join(10)
        if self._pf_thread is not None:
            self._pf_thread.join(5)
        while self._pf_done:
            self.stats.prefetch_wasted += sum(b[3] for b in self._pf_done.popleft())
        self.replay_done.set()


class ReplayOrder:
    """The order a replay fetches its batches in: ascending, except that after a fault the
    batches around it go first (the guest is there now and moves on to one side or the other:
    both neighbours give the replay a lead on it either way), those still to fetch."""

    AROUND = (0, 1, -1, 2, -2)  # batches around a fault, in this order

    def __init__(self, plan: list[list[tuple[int, int]]]) -> None:
        self.plan = plan
        self.starts = [b[0][0] for b in plan]
        self.done = [False] * len(plan)
        self.pos = 0                   # the next batch in ascending order
        self.urgent: list[int] = []    # batches around the latest fault, next first
        self.jumps = 0                 # batches fetched out of order for a fault

    def next(self, fault_gpa: int | None = None) -> list[tuple[int, int]] | None:
        """The next batch to fetch (None: all fetched); ``fault_gpa``: a new fault there."""
        if fault_gpa is not None:
            i = bisect.bisect_right(self.starts, fault_gpa) - 1
            last = self.plan[i][-1] if i >= 0 else None
            if last is not None and fault_gpa < last[0] + last[1] + PF_BATCH:
                n = len(self.plan)
                self.urgent = [j for k in reversed(self.AROUND)
                               if 0 <= (j := i + k) < n and not self.done[j]]
        while self.urgent:
            j = self.urgent.pop()
            if not self.done[j]:
                self.done[j] = True
                self.jumps += j != self.pos
                return self.plan[j]
        while self.pos < len(self.plan) and self.done[self.pos]:
            self.pos += 1
        if self.pos == len(self.plan):
            return None
        self.done[self.pos] = True
        return self.plan[self.pos]


def _gpa_of(addr: int, regions: list[Region]) -> int | None:
    for r in regions:
        if r.base <= addr < r.end:
            return r.gpa(addr)
    return None


def _minus(s: int, e: int, cut: IntervalSet) -> list[tuple[int, int]]:
    out, pos = [], s
    for cs, ce in cut.overlaps(s, e):
        if cs > pos:
            out.append((pos, cs))
        pos = max(pos, ce)
    if pos < e:
        out.append((pos, e))
    return out


def host_runs(runs: Iterable[tuple[int, int]],
              regions: list[Region]) -> Iterator[tuple[Region, int, int, int]]:
    """``(region, host address, gpa, length)`` of the runs' parts inside the regions, widened
    to whole pages of the region (a huge page is fetched and installed whole) and merged where
    the widening made them meet."""
    for r in sorted(regions, key=lambda r: r.offset):
        ps, lo, hi = r.page_size, r.offset, r.offset + r.size
        cur: list[int] | None = None
        for gpa, n in runs if isinstance(runs, list) else list(runs):
            s, e = max(gpa, lo), min(gpa + n, hi)
            if s >= e:
                continue
            s -= (s - lo) % ps
            e = min(e + -(e - lo) % ps, hi)
            if cur is not None and s <= cur[1]:
                cur[1] = max(cur[1], e)
                continue
            if cur is not None:
                yield r, r.addr_of(cur[0]), cur[0], cur[1] - cur[0]
            cur = [s, e]
        if cur is not None:
            yield r, r.addr_of(cur[0]), cur[0], cur[1] - cur[0]


def load_record(lane: Lane, space: str) -> WorkingSet | None:
    """The working set the node holds for ``space``, or None."""
    head = memoryview(bytearray(GRANULE))
    mask = lane.fetch_into(record_space(space), 0, head)
    if mask & 1:
        return None
    info = parse_header(head[:HEADER.size])
    if info is None:
        return None
    body = memoryview(bytearray(info.body_bytes))
    for off in range(0, len(body), STORE_CHUNK):
        part = body[off:off + STORE_CHUNK]
        m = lane.fetch_into(record_space(space), GRANULE + off, part)
        for i in range(len(part) // GRANULE):
            if m >> i & 1:
                part[i * GRANULE:(i + 1) * GRANULE] = bytes(GRANULE)
    return WorkingSet.from_body(info, body)


def store_record(lane: Lane, space: str, ws: WorkingSet, window_s: float) -> None:
    data = memoryview(ws.to_bytes(window_s))
    # the bitmap first, the header last: a record is whole once its header is there
    for off in range(GRANULE, len(data), STORE_CHUNK):
        lane.store_from(record_space(space), off, data[off:off + STORE_CHUNK])
    lane.store_from(record_space(space), 0, data[:GRANULE])
