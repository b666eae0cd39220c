"""The fault engine: one lean fault thread per client uffd, Python as the control plane.

Shape (decided from measurements, see README "Design"): asyncio scheduling per fault costs more
than the fault, so each client gets a plain thread that blocks in poll(2), reads up to 64 uffd
events per read(2), resolves each fault by its chunk and installs it with UFFDIO_COPY (or
UFFDIO_ZEROPAGE), all through blocking calls that release the GIL. The uvloop loop (handoff
server, metrics) stays idle on the fast path. A second thread per client, the *readahead lane*,
fetches chunks ahead of sequential streams on its own connection; the fault thread installs
what it fetched only when no fault is waiting, so readahead never delays a fault. All ioctls on
a client's uffd come from its fault thread, in event order, which is what makes REMOVE safe:

Kernel rules this code relies on (linux/fs/userfaultfd.c, Documentation/admin-guide/mm/
userfaultfd.rst):
- UFFDIO_COPY / ZEROPAGE fail with EEXIST when a page is already there: someone (readahead, a
  previous fault) filled it; done, but no waiter was woken, so UFFDIO_WAKE the range.
- While a non-cooperative event (REMOVE, UNMAP, REMAP, FORK) is queued and not yet read, every
  ioctl on the uffd fails with EAGAIN (``mmap_changing``): defer the fault, read the events,
  retry. A REMOVE is read *before* madvise zaps the pages, so data fetched before it must never
  be installed after it into removed pages: removed ranges are checked at install time, by the
  thread that reads the events.
- UFFDIO_COPY fails with ESRCH once the client's mm is gone (process exited): the client ends.
- Events of a forked child arrive on the new uffd the FORK event carries.

The C fast path (``c_loop``, default on; ``SSI_PAGER_C_LOOP=0`` or ``serve --no-c-loop`` turn it
off): measured, the Python loop above adds ~5 us to a ~11 us remote 4 KiB fault, so for sources
whose lanes expose a socket (memory node) and clients without readahead in flight, the fault
thread hands the per-fault loop to C (``pager.uffd.faultloop``, GIL released): poll, read a
batch, fetch each ordinary fault's chunk, UFFDIO_COPY / ZEROPAGE it. C returns every event it
does not serve (layout events, WP/MINOR faults, faults in REMOVE'd or read-ahead chunks or
outside the table, failed installs) together with the rest of the batch, in order, to the
Python path below, and any fetch error after dropping the connection, so retries, poisoning,
REMOVE and fork semantics stay in Python. Its counters are folded into ``EngineStats`` whenever
it returns (at least every 50 ms). Forked children and readahead clients use the Python loop.

Failure policy: a fetch that fails is retried with exponential backoff (10 ms .. 1 s) until
``fetch_timeout``; a page a node holds is never zero-filled instead. A fault that cannot be
served is logged, counted (``failed_faults``) and the page is poisoned (UFFDIO_POISON), so the
client gets SIGBUS at that address rather than wrong data or a silent hang.

``EngineStats`` fields (plain ints, bumped by the fault threads, summed at scrape time by
pager.metrics):

================== ========================================================================
faults             page-fault events read (``faults_write`` of them writes, ``faults_wp``,
                   ``faults_minor`` by kind)
served_fetch       faults resolved by fetching their chunk from the source
served_zero        faults in REMOVE'd ranges resolved with zero pages (nothing fetched)
served_wait        faults resolved by a readahead chunk that was in flight (readahead hit)
served_dup         faults in a chunk already installed in the same batch / EEXIST
unknown_faults     faults outside every region (poisoned)
failed_faults      faults that could not be served (fetch failed after retries; poisoned)
fetched_bytes      bytes fetched from the source (faults + readahead)
copied_bytes       bytes installed with UFFDIO_COPY
zero_pages         pages installed with UFFDIO_ZEROPAGE (never written, or removed)
eexist             UFFDIO_COPY/ZEROPAGE that found pages present
eagain             faults deferred by EAGAIN (a layout event was pending)
fetch_errors       failed fetch attempts; ``retries`` of them retried
readahead_chunks   chunks requested by the readahead detector
readahead_installed  readahead chunks installed
readahead_wasted   readahead chunks dropped (unmapped, failed, client gone) or fully present
removes / unmaps / remaps / forks   layout events handled
latency_buckets    fault service time histogram (event read -> installed), counts per bucket
                   with upper bounds ``LATENCY_BUCKETS_US`` (last = +Inf); ``latency_sum_us``,
                   ``latency_count``
inflight           chunks being fetched right now (gauge)
c_faults           faults served by the C loop (also counted in ``faults`` and ``served_*``)
================== ========================================================================
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import logging
import os
import queue
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields

from pager.core.region import Region, RegionTable
from pager.core.state import Action, ClientState, Fetch, Readahead, Unknown, Wait, ZeroFill, runs
from pager.errors import FaultError
from pager.source import Lane, PageSource
from pager.uffd.binding import EVENT_WORDS, RawEvents, Userfaultfd, address_of
from pager.uffd.errors import UffdExists, UffdGone, UffdRetry, uffd_error
from pager.uffd.events import (
    EVENT_PAGEFAULT,
    FLAG_MINOR,
    FLAG_WP,
    FLAG_WRITE,
    Fork,
    Remap,
    Remove,
    Unmap,
    decode,
)
from pager.uffd.faultloop import (
    EVENTS,
    FETCH_ERROR,
    PROTO_RAW,
    PROTO_SSIP,
    READ_ERROR,
    FaultLoop,
    enabled_by_env,
)
from transport.errors import RemoteError, TransportError

log = logging.getLogger(__name__)

LATENCY_BUCKETS_US = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 25_000,
                      100_000, 1_000_000)
BATCH = 64
DEFAULT_CHUNK = 64 * 1024
DEFAULT_READAHEAD = 2 * 1024 * 1024
PAGE = 4096
RA_BATCH = 64 * 1024  # bytes per readahead fetch (the memory node streams these best)


@dataclass
class EngineStats:
    """Plain integer counters (see the module docstring for each field)."""

    faults: int = 0
    faults_write: int = 0
    faults_wp: int = 0
    faults_minor: int = 0
    served_fetch: int = 0
    served_zero: int = 0
    served_wait: int = 0
    served_dup: int = 0
    unknown_faults: int = 0
    failed_faults: int = 0
    fetched_bytes: int = 0
    copied_bytes: int = 0
    zero_pages: int = 0
    eexist: int = 0
    eagain: int = 0
    fetch_errors: int = 0
    retries: int = 0
    readahead_chunks: int = 0
    readahead_installed: int = 0
    readahead_wasted: int = 0
    removes: int = 0
    unmaps: int = 0
    remaps: int = 0
    forks: int = 0
    inflight: int = 0
    c_faults: int = 0
    written_back_bytes: int = 0  # placeholder until the write-back counter lands
    latency_sum_us: int = 0
    latency_count: int = 0
    latency_buckets: list[int] = field(
        default_factory=lambda: [0] * (len(LATENCY_BUCKETS_US) + 1))

    def observe_us(self, us: int) -> None:
        self.latency_buckets[bisect.bisect_left(LATENCY_BUCKETS_US, us)] += 1
        self.latency_sum_us += us
        self.latency_count += 1

    def add(self, other: EngineStats) -> None:
        for f in fields(self):
            if f.name == "latency_buckets":
                self.latency_buckets = [a + b for a, b in
                                        zip(self.latency_buckets, other.latency_buckets,
                                            strict=True)]
            else:
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict[str, int | list[int]]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def latency_quantile_us(self, q: float) -> float:
        """Upper bound of the bucket holding quantile ``q`` (coarse; for summaries)."""
        total = sum(self.latency_buckets)
        if not total:
            return 0.0
        seen = 0
        for i, n in enumerate(self.latency_buckets):
            seen += n
            if seen >= q * total:
                return float(LATENCY_BUCKETS_US[i]) if i < len(LATENCY_BUCKETS_US) else 1e7
        return 1e7


class FaultEngine:
    """Owns the source and the clients; the control plane calls ``add_client``/``close``."""

    def __init__(self, source: PageSource, *, chunk_size: int = DEFAULT_CHUNK,
                 readahead: int = DEFAULT_READAHEAD, fetch_timeout: float = 60.0,
                 c_loop: bool | None = None) -> None:
        if chunk_size < 4096 or chunk_size & (chunk_size - 1):
            from pager.errors import ConfigError
            raise ConfigError(f"chunk size {chunk_size} must be a power of two >= 4096; "
                              "pass e.g. --chunk 64K")
        self.source = source
        self.chunk_size = chunk_size
        self.readahead = readahead
        self.fetch_timeout = fetch_timeout
        self.c_loop = enabled_by_env() if c_loop is None else c_loop
        self.clients: list[ClientPager] = []
        self._closed_stats = EngineStats()
        self._lock = threading.Lock()
        self._next_id = 1

    def add_client(self, uffd_fd: int, regions: list[Region], *, memfd: int | None = None,
                   pid: int = 0, wake: bool = False, name: str | None = None,
                   layout: list[list] | None = None,
                   on_layout: Callable[..., None] | None = None) -> ClientPager:
        """Serve a client's uffd (ownership of the fds passes to the engine).

        ``wake``: a restarted pager taking over a uffd wakes every region, so faults whose
        events the previous pager read (and lost) are raised again. ``layout``: the layout
        events (``["remove", start, end]``, ``["unmap", ...]``, ``["remap", old, new, len]``)
        the previous pager saw, replayed first. ``on_layout(kind, *args)`` is told of each new
        one (the supervisor keeps them).
        """
        for r in regions:
            self.source.check_region(r)
        u = Userfaultfd.adopt(uffd_fd)
        state = ClientState(RegionTable(regions), chunk_size=self.chunk_size,
                            readahead=self._detector())
        with self._lock:
            cid = self._next_id
            self._next_id += 1
        for kind, *args in layout or ():
            getattr(state, f"on_{kind}")(*args)
        client = ClientPager(self, u, state, name=name or f"client{cid}", pid=pid, memfd=memfd)
        client.on_layout = on_layout
        with self._lock:
            self.clients.append(client)
        client.start()
        if wake:
            client.wake_all()
        return client

    @property
    def readahead_active(self) -> bool:
        """Whether sequential streams are read ahead (see ``_detector``)."""
        return bool(self.readahead) and self.chunk_size < RA_BATCH

    def _detector(self) -> Readahead:
        # Readahead moves 64 KiB groups through a second thread; with chunks that large the
        # fault path already streams as fast, and the thread hand-off only adds latency
        # (measured: README "Design"), so it is used for smaller chunks only.
        if not self.readahead_active:
            return Readahead(min_hits=1 << 60)
        return Readahead(max_chunks=max(2, self.readahead // self.chunk_size))

    def adopt_child(self, parent: ClientPager, fd: int) -> ClientPager:
        u = Userfaultfd.adopt(fd)
        child = ClientPager(self, u, parent.state.fork(), name=f"{parent.name}.fork",
                            pid=0, memfd=None, parent=parent)
        with self._lock:
            self.clients.append(child)
        child.start()
        return child

    def _retire(self, client: ClientPager) -> None:
        with self._lock:
            if client in self.clients:
                self.clients.remove(client)
                self._closed_stats.add(client.stats)

    def stats(self) -> EngineStats:
        """Totals over live and finished clients (a fresh object)."""
        total = EngineStats()
        with self._lock:
            total.add(self._closed_stats)
            live = list(self.clients)
        for c in live:
            total.add(c.stats)
        return total

    def close(self) -> None:
        for c in list(self.clients):
            c.close()
        self.source.close()


class ClientPager:
    """One client uffd: its fault thread, its readahead lane, its state and stats."""

    def __init__(self, engine: FaultEngine, uffd, state: ClientState, *, name: str, pid: int,
                 memfd: int | None, parent: ClientPager | None = None) -> None:
        self.engine = engine
        self.uffd = uffd
        self.state = state
        self.name = name
        self.pid = pid
        self.memfd = memfd
        self.parent = parent
        self.children: list[ClientPager] = []
        self.stats = EngineStats()
        self.error: str | None = None  # last unservable fault, for status
        self.on_layout: Callable[..., None] | None = None
        self.finished = threading.Event()
        self._stop = threading.Event()
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._efd_lock = threading.Lock()  # _kick never writes to a closed (reused) number
        self._ra_queue: queue.SimpleQueue = queue.SimpleQueue()
        self._ra_done: collections.deque = collections.deque()
        self._ra_thread: threading.Thread | None = None
        self._pidfd: int | None = None
        self._lane: Lane | None = None
        self._c_dirty = True  # the C loop's region table / slow ranges must be rebuilt
        self._c_retry_at = 0.0
        self._thread = threading.Thread(target=self._run, name=f"fault-{name}", daemon=True)
        buf_size = max(engine.chunk_size, 4096)
        self._buf = memoryview(bytearray(buf_size))
        self._buf_keep, self._buf_addr = address_of(self._buf)
        os.set_blocking(uffd.fileno(), False)

    # -- control plane ------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop serving (the client exited or the pager stops); idempotent."""
        for child in list(self.children):
            child.close(timeout)
        self._stop.set()
        self._kick()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _kick(self) -> None:
        """Wake the fault thread through its eventfd; nothing once the thread has closed it
        (close() after the thread ended on its own, a readahead fetch finishing late): that
        fd number may belong to another client's memfd, uffd or socket by then."""
        with self._efd_lock:
            if self._efd >= 0:
                with contextlib.suppress(OSError):
                    os.eventfd_write(self._efd, 1)

    def wake_all(self) -> None:
        """UFFDIO_WAKE every region: faults whose events were lost are raised again."""
        for r in self.state.regions:
            try:
                self.uffd.wake(r.base, r.size)
            except Exception as exc:  # a region unmapped meanwhile
                log.debug("%s: wake %#x failed: %s", self.name, r.base, exc)

    # -- fault thread -------------------------------------------------------------------------
    def _run(self) -> None:
        lane = self._lane = self.engine.source.open_lane()
        try:
            self._loop(lane)
        except UffdGone:
            log.info("%s: client address space gone", self.name)
        except Exception:
            log.exception("%s: fault thread failed", self.name)
            self.error = "fault thread failed (see log)"
        finally:
            self._stop.set()
            self._ra_queue.put(None)
            if self._ra_thread is not None:
                self._ra_thread.join(5)
            lane.close()
            for _ in range(len(self._ra_done)):
                self.stats.readahead_wasted += 1
            self._ra_done.clear()
            for fd in (self.memfd, self._pidfd):
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            with contextlib.suppress(OSError):
                self.uffd.close()
            with self._efd_lock:
                efd, self._efd = self._efd, -1
            with contextlib.suppress(OSError):
                os.close(efd)
            if self.parent is not None:
                with contextlib.suppress(ValueError):
                    self.parent.children.remove(self)
            self.engine._retire(self)
            self.finished.set()

    def _loop(self, lane: Lane) -> None:
        u = self.uffd
        raw = RawEvents(BATCH)  # preallocated: page faults are read without event objects
        words = raw.words
        read_raw = u.read_raw
        poller = select.poll()
        poller.register(u.fileno(), select.POLLIN)
        poller.register(self._efd, select.POLLIN)
        stop = self._stop
        state = self.state
        ufd, efd = u.fileno(), self._efd
        cl = self._c_loop(raw, lane)
        # poll, then read only when the uffd is readable: two syscalls per fault when faults
        # come one at a time, and poll returns at once while more events are queued
        while not stop.is_set():
            busy = state.deferred or self._ra_done
            timeout = 0 if busy else 1000
            if cl is not None and not busy and self._c_prepare(cl, lane):
                code, first, n, err = cl.run()  # GIL released while C serves faults
                self._c_fold(cl)
                if code in (EVENTS, FETCH_ERROR):
                    if code == FETCH_ERROR:
                        self._c_fetch_failed(lane, err)
                    self._handle(raw, words, n, lane, first)
                    continue
                if code == READ_ERROR:
                    raise uffd_error(err, "read(userfaultfd)")
                timeout = 0  # WAKE / IDLE: one Python pass (eventfd, stop, pidfd)
            uffd_ready = False
            for fd, ev in poller.poll(timeout):
                if fd == ufd:
                    uffd_ready = True
                elif fd == efd:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(efd)
                elif fd == self._pidfd and ev:
                    raise UffdGone(3, "forked client exited")
            if uffd_ready:
                n = read_raw(raw)
                if n:
                    self._handle(raw, words, n, lane)
                    continue  # faults first: look for more events before anything else
            if state.deferred:
                # no event left to read, so those that made ioctls fail with EAGAIN (a
                # pending REMOVE/UNMAP/REMAP) have been handled: retry
                for addr in state.take_deferred():
                    self._serve(addr, lane, time.perf_counter_ns())
                if state.deferred:
                    poller.poll(1)
                continue
            if self._ra_done:
                self._install_readahead(*self._ra_done.popleft())

    def _handle(self, raw: RawEvents, words, n: int, lane: Lane, first: int = 0) -> None:
        """One batch (from event ``first``), in order: page faults straight from the raw
        words, others decoded."""
        t0 = time.perf_counter_ns()
        done: list[tuple[int, int]] = []  # chunks installed by this batch
        for i in range(EVENT_WORDS * first, EVENT_WORDS * n, EVENT_WORDS):
            if words[i] == EVENT_PAGEFAULT:
                self._on_fault(words[i + 1], words[i + 2], words[i + 3], lane, t0, done)
                continue
            ev = decode(words[i:i + EVENT_WORDS].tolist(), 1)[0]
            match ev:
                case Remove():
                    self.stats.removes += 1
                    self._layout("remove", ev.start, ev.end)
                case Unmap():
                    self.stats.unmaps += 1
                    self._layout("unmap", ev.start, ev.end)
                case Remap():
                    self.stats.remaps += 1
                    self._layout("remap", ev.old, ev.new, ev.length)
                case Fork():
                    self.stats.forks += 1
                    self.children.append(self.engine.adopt_child(self, _fd_of(ev.ufd)))
                case _:
                    log.warning("%s: ignoring unknown uffd event %r", self.name, ev)

    def _layout(self, kind: str, *args: int) -> None:
        getattr(self.state, f"on_{kind}")(*args)
        self._c_dirty = True
        if self.on_layout is not None:
            try:
                self.on_layout(kind, *args)
            except Exception:
                log.exception("%s: recording a %s event failed", self.name, kind)

    def _on_fault(self, flags: int, addr: int, tid: int, lane: Lane, t0: int,
                  done: list[tuple[int, int]]) -> None:
        st = self.stats
        st.faults += 1
        if flags:
            st.faults_write += bool(flags & FLAG_WRITE)
            st.faults_wp += bool(flags & FLAG_WP)
            st.faults_minor += bool(flags & FLAG_MINOR)
        if self._pidfd is None and self.parent is not None and tid:
            self._watch_pid(tid)
        for s, e in done:
            if s <= addr < e:
                # installed by an earlier fault of this batch: that copy woke this thread too
                st.served_dup += 1
                return
        installed = self._serve(addr, lane, t0)
        if installed is not None:
            done.append(installed)

    def _serve(self, addr: int, lane: Lane, t0: int) -> tuple[int, int] | None:
        """Resolve one fault; the chunk installed for it, if any (for batch dedupe)."""
        action: Action = self.state.on_fault(addr)
        try:
            if type(action) is Fetch:  # the hot case first, without the match below
                self._fetch_and_install(action, lane)
                self.stats.served_fetch += 1
                if self.engine.readahead:
                    self._readahead(addr)
                self.stats.observe_us((time.perf_counter_ns() - t0) // 1000)
                return action.start, action.start + action.length
            match action:
                case Fetch():
                    self._fetch_and_install(action, lane)
                    self.stats.served_fetch += 1
                    self._readahead(addr)
                case ZeroFill():
                    self._install(action.start, action.length, None, 0, ())
                    self.stats.served_zero += 1
                    return None
                case Wait():
                    self.stats.served_wait += 1
                    self._readahead(addr)
                    return None
                case Unknown():
                    self.stats.unknown_faults += 1
                    self._fail(addr, "no region covers this address")
                    return None
        except UffdRetry:
            self.stats.eagain += 1
            self.state.defer(addr)
            return None
        except FaultError as exc:
            self.stats.failed_faults += 1
            self._fail(addr, str(exc))
            return None
        self.stats.observe_us((time.perf_counter_ns() - t0) // 1000)
        return action.start, action.start + action.length

    def _fetch_and_install(self, f: Fetch, lane: Lane) -> None:
        if f.length > len(self._buf):  # huge pages: a chunk is at least one page
            self._buf = memoryview(bytearray(f.length))
            self._buf_keep, self._buf_addr = address_of(self._buf)
        buf = self._buf[:f.length]
        self.stats.inflight += 1
        try:
            mask = self._fetch(lane, f, buf)
        finally:
            self.stats.inflight -= 1
        if mask and f.region.page_size > PAGE:
            mask = _materialize_zeros(buf, mask)
        self._install(f.start, f.length, self._buf_addr, mask, f.removed, f.region.page_size)

    def _fetch(self, lane: Lane, f: Fetch, buf: memoryview) -> int:
        self._c_dirty = True  # the lane may reconnect: the C loop takes its sockets again
        delay = 0.01
        deadline = 0.0
        space = f.region.space
        while True:
            try:
                mask = lane.fetch_into(space, f.gpa, buf)
                self.stats.fetched_bytes += f.length
                return mask
            except (TransportError, OSError) as exc:
                self.stats.fetch_errors += 1
                lane.reset()
                deadline = deadline or time.monotonic() + self.engine.fetch_timeout
                where = f"{self.engine.source.describe()} gpa {f.gpa:#x}+{f.length:#x}"
                if isinstance(exc, RemoteError) or time.monotonic() > deadline:
                    raise FaultError(f"cannot fetch {where}: {exc}; check the memory node "
                                     "and the client's regions") from exc
                if self._stop.is_set():
                    raise FaultError(f"client closing while fetching {where}") from exc
                if self.stats.retries == 0 or delay >= 1.0:
                    log.warning("%s: fetch %s failed (%s); retrying", self.name, where, exc)
                self.stats.retries += 1
                self._stop.wait(delay)
                delay = min(delay * 2, 1.0)

    def _install(self, start: int, length: int, src: int | None, mask: int,
                 removed: tuple[tuple[int, int], ...], page: int = 4096) -> None:
        """UFFDIO_COPY the written pages from address ``src`` (the bytes of ``start``),
        UFFDIO_ZEROPAGE the never-written (``src`` None: all); pages in ``removed`` are left
        alone. EEXIST: page by page, then wake."""
        u = self.uffd
        st = self.stats
        if src is not None and not mask and not removed:
            # the common case: every page written, nothing removed: one copy
            try:
                done = u.copy(start, src, length)
            except UffdExists:
                done = 0
            st.copied_bytes += done
            if done == length:
                return
            src, start, length = src + done, start + done, length - done
        plan = [("zero", start, length)] if src is None else runs(start, length, page, mask,
                                                                  removed)
        for kind, s, n in plan:
            try:
                if kind == "copy":
                    done = u.copy(s, src + (s - start), n)  # type: ignore[operator]
                    st.copied_bytes += done
                else:
                    done = u.zeropage(s, n)
                    st.zero_pages += done // page
            except UffdExists:
                done = 0
            if done < n:
                # the kernel stopped at a page already present (or a changing mapping):
                # finish page by page; EAGAIN propagates and the fault is deferred
                st.eexist += 1
                self._install_pages(kind, s + done, n - done, start, src, page)

    def _install_pages(self, kind: str, s: int, n: int, start: int, src: int | None,
                       page: int) -> None:
        u = self.uffd
        for a in range(s, s + n, page):
            try:
                if kind == "copy":
                    u.copy(a, src + (a - start), page)  # type: ignore[operator]
                    self.stats.copied_bytes += page
                else:
                    u.zeropage(a, page)
                    self.stats.zero_pages += 1
            except UffdExists:
                pass
        u.wake(s, n)

    def _fail(self, addr: int, why: str) -> None:
        """A fault that cannot be served: log, remember, poison the page (client: SIGBUS)."""
        page = addr & ~4095
        self.error = f"fault at {page:#x} not served: {why}"
        log.error("%s (pid %d): %s; the client gets SIGBUS there", self.name, self.pid,
                  self.error)
        try:
            self.uffd.poison(page, 4096)
        except Exception as exc:
            log.error("%s: cannot poison %#x (%s); the faulting thread stays blocked",
                      self.name, page, exc)

    def _watch_pid(self, tid: int) -> None:
        """A forked child has no socket: watch its process to know when it exits."""
        try:
            with open(f"/proc/{tid}/status") as f:
                tgid = next(int(line.split()[1]) for line in f if line.startswith("Tgid:"))
            self._pidfd = os.pidfd_open(tgid)
        except (OSError, StopIteration, ValueError):
            self._pidfd = -1  # do not try again; the child is closed with its parent
            return
        self.pid = tgid

    # -- C fast path -------------------------------------------------------------------------
    def _c_loop(self, raw: RawEvents, lane: Lane) -> FaultLoop | None:
        """The C loop for this client, or None where the Python loop serves every fault."""
        eng = self.engine
        if not eng.c_loop or not lane.c_capable or self.parent is not None \
                or eng.readahead_active:
            return None
        return FaultLoop(self.uffd.fileno(), [self._efd], raw, max(eng.chunk_size, PAGE),
                         LATENCY_BUCKETS_US)

    def _c_prepare(self, cl: FaultLoop, lane: Lane) -> bool:
        """Give C the current region table, sockets and slow ranges; False: Python's turn."""
        if not self._c_dirty:
            return True
        now = time.monotonic()
        if now < self._c_retry_at:
            return False
        state = self.state
        table = []
        slow: list[tuple[int, int]] = []
        try:
            for r in state.regions:
                ep = lane.c_endpoint(r.space) if r.page_size == PAGE else None
                sock, proto, space = (-1, 0, 0) if ep is None else (
                    ep[0], PROTO_RAW if ep[1] == "raw" else PROTO_SSIP, ep[2])
                table.append((r.base, r.size, r.offset, sock, proto, space))
                removed = state.removed.get(r.space)
                if removed is not None:
                    slow += [(r.addr_of(s), r.addr_of(e))
                             for s, e in removed.overlaps(r.offset, r.offset + r.size)]
        except (TransportError, OSError) as exc:
            log.debug("%s: C loop waits for the source: %s", self.name, exc)
            self._c_retry_at = now + 1.0
            return False
        cs = self.engine.chunk_size
        slow += [(base + i * cs, base + (i + 1) * cs) for base, i in state.inflight]
        if not (cl.set_regions(table) and cl.set_slow(slow)):
            self._c_retry_at = now + 1.0  # too many regions / removed ranges for C
            return False
        self._c_dirty = False
        return True

    def _c_fold(self, cl: FaultLoop) -> None:
        got = cl.take_stats()
        if got is None:
            return
        counters, buckets = got
        st = self.stats
        for name, v in counters.items():
            if v:
                setattr(st, name, getattr(st, name) + v)
        st.c_faults += counters["served_fetch"] + counters["served_dup"]
        lb = st.latency_buckets
        for i, v in enumerate(buckets):
            if v:
                lb[i] += v

    def _c_fetch_failed(self, lane: Lane, err: int) -> None:
        """A fetch from C failed: drop the connections; Python serves the fault, retrying."""
        self.stats.fetch_errors += 1
        log.debug("%s: C loop fetch failed (%s); Python path retries",
                  self.name, os.strerror(err) if err else "?")
        lane.reset()
        self._c_dirty = True

    # -- readahead ----------------------------------------------------------------------------
    def _readahead(self, addr: int) -> None:
        if not self.engine.readahead:
            return
        todo = self.state.readahead_after(addr)
        if not todo:
            return
        if self._ra_thread is None:
            self._ra_thread = threading.Thread(target=self._ra_run, name=f"ra-{self.name}",
                                               daemon=True)
            self._ra_thread.start()
        self._c_dirty = True
        self.stats.readahead_chunks += len(todo)
        self.stats.inflight += len(todo)
        # consecutive chunks travel as one fetch and one install (fewer round trips/ioctls)
        group: list[Fetch] = []
        size = 0
        for f in todo:
            if group and (f.start != group[-1].start + group[-1].length
                          or f.region is not group[0].region or size + f.length > RA_BATCH):
                self._ra_queue.put(group)
                group, size = [], 0
            group.append(f)
            size += f.length
        self._ra_queue.put(group)

    def _ra_run(self) -> None:
        """Readahead lane: fetch on its own connection; the fault thread installs."""
        lane = self.engine.source.open_lane()
        try:
            while True:
                group = self._ra_queue.get()
                if group is None or self._stop.is_set():
                    break
                first = group[0]
                total = sum(f.length for f in group)
                buf = memoryview(bytearray(total))
                try:
                    mask = lane.fetch_into(first.region.space, first.gpa, buf)
                    self.stats.fetched_bytes += total
                    self._ra_done.append((group, buf, mask, None))
                except Exception as exc:
                    lane.reset()
                    self._ra_done.append((group, None, 0, exc))
                self._kick()
        finally:
            lane.close()

    def _install_readahead(self, group: list[Fetch], buf: memoryview | None, mask: int,
                           exc: Exception | None) -> None:
        self._c_dirty = True
        self.stats.inflight -= len(group)
        waiters: list[int] = []
        for f in group:
            waiters += self.state.landed(f)
        first = group[0]
        whole = Fetch(first.region, first.start, sum(f.length for f in group), first.gpa)
        plan = self.state.install_plan(whole) if exc is None else None
        if plan is None:
            self.stats.readahead_wasted += len(group)
            if exc is not None:
                log.debug("%s: readahead %#x failed: %s", self.name, first.gpa, exc)
        else:
            if mask and plan.region.page_size > PAGE:
                mask = _materialize_zeros(buf, mask)  # type: ignore[arg-type]
            _keep, addr = address_of(buf)  # keeps buf exported during the install
            try:
                self._install(plan.start, plan.length, addr, mask, plan.removed,
                              plan.region.page_size)
                self.stats.readahead_installed += len(group)
                end = plan.start + plan.length
                waiters = [a for a in waiters if not plan.start <= a < end
                           or any(s <= a < e for s, e in plan.removed)]
            except UffdRetry:
                self.stats.readahead_wasted += len(group)
        t0 = time.perf_counter_ns()
        for addr in waiters:  # not covered by what was installed: serve them now
            self._serve(addr, self._lane, t0)


def _materialize_zeros(buf: memoryview, mask: int) -> int:
    """Zero the never-written 4 KiB pages in ``buf`` and return mask 0.

    A huge page (hugetlbfs) is installed whole with UFFDIO_COPY (UFFDIO_ZEROPAGE does not
    exist for hugetlbfs), so its never-written 4 KiB parts must be real zeros in the buffer.
    """
    zero = bytes(PAGE)
    i = 0
    while mask:
        if mask & 1:
            buf[i * PAGE:(i + 1) * PAGE] = zero
        mask >>= 1
        i += 1
    return 0


def _fd_of(ufd) -> int:
    return ufd if isinstance(ufd, int) else ufd.fileno()
