"""``ClientPager``: one client uffd's fault thread (see the package docstring for the shape).

The thread polls the uffd and an eventfd, reads event batches, hands the per-fault loop to C
where it can (``cloop``), and otherwise resolves each fault with the action the client state
returns for its kind: fetch (with the retry policy below) and install, zero fill, wait for
readahead, unprotect, continue, or fail and poison. Layout events go to the state in order.

Failure policy: a fetch that fails is retried with exponential backoff (10 ms .. 1 s) until
``fetch_timeout``; a fault that cannot be served is logged, counted and its page poisoned
(``pager.engine.fail``: the client gets SIGBUS there, never wrong data or a silent hang).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import queue
import select
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from pager.core.region import PAGE_SIZE
from pager.core.state import (
    MINOR,
    MISSING,
    WP,
    Action,
    ClientState,
    Continue,
    Fetch,
    Unknown,
    Unprotect,
    Wait,
    ZeroFill,
)
from pager.engine.cloop import CLoopMixin
from pager.engine.dirty import FarMemMixin
from pager.engine.evict import Evictor
from pager.engine.fail import FailMixin
from pager.engine.install import Installer
from pager.engine.prefetch import WorkingSetMixin
from pager.engine.readahead import ReadaheadMixin
from pager.engine.stats import EngineStats
from pager.errors import FaultError
from pager.source import Lane
from pager.uffd.binding import EVENT_WORDS, RawEvents
from pager.uffd.buffers import address_of
from pager.uffd.errors import UffdGone, UffdRetry, uffd_error
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
    MAX_MS,
    READ_ERROR,
    TIMEOUT_MS,
    FaultLoop,
)
from transport.errors import RemoteError, StaleEpochError, TransportError

if TYPE_CHECKING:
    from pager.engine.engine import FaultEngine

log = logging.getLogger(__name__)

BATCH = 64  # events per read(2)
REPLAY_MAX_MS = 2.0  # during a replay the C loop hands back this often (a batch may go in)


class ClientPager(CLoopMixin, ReadaheadMixin, FarMemMixin, WorkingSetMixin, FailMixin):
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
        self.fenced: str | None = None  # why a newer owner holds its space (`fence`)
        self.on_layout: Callable[..., None] | None = None
        self.claimed: set[str | None] = set()  # spaces it writes back to (the engine's)
        self.finished = threading.Event()
        self._synced: list[threading.Event] = []  # quiesce() callers, set by the fault thread
        self._stop = threading.Event()
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._efd_lock = threading.Lock()  # _kick never writes to a closed (reused) number
        self._ra_queue: queue.SimpleQueue = queue.SimpleQueue()
        self._ra_done: collections.deque = collections.deque()
        self._ra_thread: threading.Thread | None = None
        self._ws_init()
        self._pidfd: int | None = None
        self._lane: Lane | None = None
        self._c_dirty = True  # the C loop's region table / slow ranges must be rebuilt
        self._cl: FaultLoop | None = None  # the C loop, once the fault thread made one
        self._c_retry_at = 0.0
        self._thread = threading.Thread(target=self._run, name=f"fault-{name}", daemon=True)
        buf_size = max(engine.chunk_size, PAGE_SIZE)
        self._buf = memoryview(bytearray(buf_size))
        self._buf_keep, self._buf_addr = address_of(self._buf)
        self.installer = Installer(uffd.fileno(), state, self.stats)
        self.fm_lock = threading.Condition()  # far memory: state shared with the evictor
        self.evictor: Evictor | None = None
        self._write_miss = False
        self.c_farmem: FaultLoop | None = None  # the C loop, for the evictor's in-flight ranges
        self.c_wp_later: list[int] = []  # units C un-protected, taken by the evictor too early
        if state.farmem is not None:
            from pager.uffd.install import COPY_MODE_WP
            self.installer.mode = COPY_MODE_WP
            self.installer.lock = self.fm_lock
            self.evictor = Evictor(self, state.farmem)
        os.set_blocking(uffd.fileno(), False)

    # -- control plane ------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()
        if self.evictor is not None:
            self.evictor.start()

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

    def quiesce(self, timeout: float = 10.0) -> bool:
        """Wait until the fault thread has folded everything served so far into ``stats`` and
        ``state`` (the C loop reports when it returns); False if it did not within
        ``timeout``. For status and tests: the fault path never waits for this."""
        if self.finished.is_set():
            return True
        ev = threading.Event()
        self._synced.append(ev)
        self._kick()
        return ev.wait(timeout) or self.finished.is_set()

    @property
    def resident_bytes(self) -> int:
        """Bytes of this client's memory the pager installed and no event dropped since."""
        return self.state.resident_bytes

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
            self._ws_begin()
            self._loop(lane)
        except UffdGone:
            log.info("%s: client address space gone", self.name)
        except Exception:
            log.exception("%s: fault thread failed", self.name)
            self.error = "fault thread failed (see log)"
        finally:
            self._stop.set()
            self._ws_end()
            self._ra_queue.put(None)
            if self.evictor is not None:
                self.evictor.join(30)  # it uses the memfd and the uffd closed below
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
            self._cl = None  # its buffers are freed with it
            self.engine._retire(self)
            self.finished.set()
            for ev in self._synced:
                ev.set()

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
        replaying = False  # the C loop's timeout is 0: it returns when no fault waits
        while not stop.is_set():
            busy = state.deferred or self._ra_done
            timeout = 0 if busy or self._pf_done else 1000
            c_next = False  # C returned and runs again next: a fault waiting now is its
            if cl is not None and not busy and self._c_prepare(cl, lane):
                if replaying != bool(self._pf_done):  # replay batches wait: C serves the
                    replaying = not replaying         # faults waiting, then hands back
                    cl.set_limits(*((0, REPLAY_MAX_MS) if replaying else (TIMEOUT_MS, MAX_MS)))
                code, first, n, err = cl.run()  # GIL released while C serves faults
                self._c_fold(cl)
                if code in (EVENTS, FETCH_ERROR):
                    if code == FETCH_ERROR:
                        self._c_fetch_failed(cl, lane, err)
                    self._handle(raw, words, n, lane, first)
                    continue
                if code == READ_ERROR:
                    raise uffd_error(err, "read(userfaultfd)")
                timeout = 0  # WAKE / IDLE: one Python pass (eventfd, stop, pidfd)
                c_next = True
            uffd_ready = False
            for fd, ev in poller.poll(timeout):
                if fd == ufd:
                    uffd_ready = True
                elif fd == efd:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(efd)
                elif fd == self._pidfd and ev:
                    raise UffdGone(3, "forked client exited")
            while self._synced:  # C (if any) returned and folded: all served so far is known
                self._synced.pop().set()
            if uffd_ready:
                if c_next and not (state.deferred or self._ra_done):
                    self._ws_tick(install=False)  # the recording window only
                    continue  # C reads it at once: faults first, a replay batch later
                n = read_raw(raw)
                if n:
                    self._handle(raw, words, n, lane)
                    continue  # faults first: look for more events before anything else
            if state.deferred:
                # no event left to read, so those that made ioctls fail with EAGAIN (a
                # pending REMOVE/UNMAP/REMAP) have been handled: retry
                for addr, kind in state.take_deferred():
                    self._serve(addr, lane, time.perf_counter_ns(), kind)
                if state.deferred:
                    poller.poll(1)
                continue
            if self._ra_done:
                self._install_readahead(*self._ra_done.popleft())
            self._ws_tick()  # a replay batch (no fault waiting), the recording window

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
        if kind == "unmap":
            self._ws_keep(*args)  # what the window saw there stays in the working set
        with self.fm_lock:
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
        kind = MISSING
        self._write_miss = flags == FLAG_WRITE  # far memory: install that unit writable, dirty
        if flags:
            st.faults_write += bool(flags & FLAG_WRITE)
            if flags & FLAG_WP:
                st.faults_wp += 1
                kind = WP
            elif flags & FLAG_MINOR:
                st.faults_minor += 1
                kind = MINOR
        if self._pidfd is None and self.parent is not None and tid:
            self._watch_pid(tid)
        if kind is MISSING:
            for s, e in done:
                if s <= addr < e:
                    # installed by an earlier fault of this batch: that copy woke this one too
                    st.served_dup += 1
                    return
        installed = self._serve(addr, lane, t0, kind)
        if installed is not None:
            done.append(installed)
            if not self.replay_done.is_set():
                self._pf_seen(addr, 0, "")  # the replay fetches around it next

    def _serve(self, addr: int, lane: Lane, t0: int,
               kind: str = MISSING) -> tuple[int, int] | None:
        """Resolve one fault as the state says; the chunk installed for it, if any (for batch
        dedupe)."""
        fm = self.state.farmem
        if fm is None:
            action: Action = self.state.on_fault(addr, kind)
        else:
            with self.fm_lock:  # the evictor changes removed ranges and residency
                action = self.state.on_fault(addr, kind)
        if self.fenced is not None and type(action) in (Fetch, ZeroFill):
            self.stats.failed_faults += 1  # the newer owner's pages are not this guest's
            self._fail(addr, f"its space is owned by a newer pager: {self.fenced}")
            return None
        try:
            if fm is not None and type(action) in (Fetch, ZeroFill, Unprotect):
                return self._fm_serve(action, addr, lane, t0)
            if type(action) is Fetch:  # the hot case first, without the match below
                self._fetch_and_install(action, lane)
                self.stats.served_fetch += 1
                if self.engine.readahead:
                    self._readahead(addr)
                self.stats.observe_us((time.perf_counter_ns() - t0) // 1000)
                return action.start, action.start + action.length
            match action:
                case ZeroFill():
                    self.installer.install(action.start, action.length, None, 0, (),
                                           action.region.page_size)
                    self.stats.served_zero += 1
                case Unprotect():
                    self.uffd.writeprotect(action.start, action.length, protect=False)
                    self.stats.served_unprotect += 1
                case Continue():
                    self.uffd.continue_(action.start, action.length)
                    self.stats.served_continue += 1
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
            self.state.defer(addr, kind)
            return None
        except FaultError as exc:
            self.stats.failed_faults += 1
            self._fail(addr, str(exc))
            return None
        self.stats.observe_us((time.perf_counter_ns() - t0) // 1000)
        return None  # not a fetched chunk: nothing for the batch to dedupe against

    def _fm_serve(self, action: Action, addr: int, lane: Lane,
                  t0: int) -> tuple[int, int] | None:
        """``_serve`` for a client under a resident limit (see ``pager.engine.dirty``)."""
        if type(action) is Unprotect:
            self._fm_write(addr)
            self.stats.served_unprotect += 1
        elif type(action) is ZeroFill:
            f = Fetch(action.region, action.start, action.length, 0)
            if self._fm_fetch(f, None, zero=True):
                self.stats.served_zero += 1
        elif self._fm_fetch(action, lane):  # type: ignore[arg-type]
            self.stats.served_fetch += 1
            self.stats.observe_us((time.perf_counter_ns() - t0) // 1000)
            return action.start, action.start + action.length  # type: ignore[union-attr]
        else:
            return None
        self.stats.observe_us((time.perf_counter_ns() - t0) // 1000)
        return None

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
        self.installer.install(f.start, f.length, self._buf_addr, mask, f.removed,
                               f.region.page_size)

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
                src = self.engine.source
                other = f" (this region: space {space})" if space and space != getattr(
                    src, "space", space) else ""
                where = f"{src.describe()}{other} gpa {f.gpa:#x}+{f.length:#x}"
                if isinstance(exc, StaleEpochError):
                    self.fence(str(exc))  # says why, once
                    raise FaultError(f"cannot fetch {where}: {exc}") from exc
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


def _fd_of(ufd) -> int:
    return ufd if isinstance(ufd, int) else ufd.fileno()
