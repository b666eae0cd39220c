"""The cluster's background thread: probes nodes (round trips, failures, returns) and copies
under-replicated extents back to ``R`` nodes, rate-limited, on lanes of its own (bulk lanes:
never the fault threads')."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from pager.source.base import close_lanes
from pager.source.cluster_lane import replica_lost
from pager.source.placement import EXTENT_SHIFT
from transport.errors import AuthError, StaleEpochError, TransportError
from transport.wire import PAGE_SIZE
from transport.wire.frames import zero_mask_runs

if TYPE_CHECKING:
    from pager.source.cluster import ClusterSource

log = logging.getLogger(__name__)

PING_EVERY = 1.0  # seconds between round-trip measurements of a live node
REFUSED_RETRY = 10.0  # seconds between probes of a node that refused the cluster token


class Repairer(threading.Thread):
    """Probe and repair every ``interval`` seconds; copies at most ``rate`` bytes/s."""

    def __init__(self, src: ClusterSource, *, rate: float, interval: float) -> None:
        super().__init__(name="cluster-repair", daemon=True)
        self.src = src
        self.rate = rate
        self.interval = interval
        self._halt = threading.Event()
        self.lanes: dict[tuple[str, str], Any] = {}
        self._pinged = 0.0
        self._refused: dict[str, float] = {}  # node -> when it last refused our token
        self._round = 0
        self._lost_logged: set[tuple[str, int]] = set()

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=5)
        close_lanes(self.lanes)

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.probe()
                if self.src.dirty.is_set():
                    self.src.dirty.clear()
                    if not self.repair_pass():
                        self.src.dirty.set()  # something is still missing: try again
            except Exception:
                log.exception("cluster repair pass failed; retrying")
                self.src.dirty.set()
            self._halt.wait(self.interval)

    # --- lanes ----------------------------------------------------------------------------
    def _lane(self, node_id: str, space: str) -> Any:
        lane = self.lanes.get((node_id, space))
        if lane is None:
            lane = self.lanes[node_id, space] = self.src.lanes.open_node_lane(node_id, space,
                                                                               bulk=True)
        return lane

    def _drop(self, node_id: str) -> None:
        close_lanes({k: self.lanes.pop(k) for k in [k for k in self.lanes if k[0] == node_id]})

    # --- probing --------------------------------------------------------------------------
    def probe(self) -> None:
        src = self.src
        now = time.monotonic()
        ping_live = now - self._pinged >= PING_EVERY
        if ping_live:
            self._pinged = now
        with src.lock:
            down = set(src.down) & src.members
            live = [n for n in src.members if n not in src.down]
        # each round starts with another node: the first pings after this thread slept also
        # pay for its wakeup, which must not make one node look farther than the others
        # a node that refused our token is asked again only now and then (its token will
        # not change by itself: an operator fixes it), not on every probe
        down -= {n for n, t in self._refused.items() if now - t < REFUSED_RETRY}
        order = sorted(down | (set(live) if ping_live else set()))
        self._round += 1
        turn = self._round % len(order) if order else 0
        for node_id in order[turn:] + order[:turn]:
            try:
                # the fastest of a few pings counts (the node's side was asleep for the
                # first); more in the first round, whose figure orders reads until the next
                lane = self._lane(node_id, src.space)
                rtt = min(lane.ping() for _ in range(4 if self._round == 1 else 2))
            except StaleEpochError as exc:
                # it answered: up (its other spaces are served), but our space is a newer
                # owner's; asked again only now and then, like a node refusing our token
                self._drop(node_id)
                src.lose_space(f"memory node {node_id} refused epoch {src.epoch}: {exc}")
                self._refused[node_id] = time.monotonic()
                if node_id in down:
                    src.node_back(node_id)
                continue
            except TransportError as exc:
                self._drop(node_id)
                src.node_failed(node_id, exc)
                if isinstance(exc, AuthError):
                    self._refused[node_id] = time.monotonic()
                continue
            self._refused.pop(node_id, None)
            src.note_rtt(node_id, rtt)
            if node_id in down:
                src.node_back(node_id)

    # --- repair ---------------------------------------------------------------------------
    def repair_pass(self) -> bool:
        """One scan of every kept space; True when every extent is on its targets."""
        src = self.src
        with src.lock:
            spaces = dict(src.spaces)
        if src.lost(src.space):  # a newer owner keeps it now
            spaces.pop(src.space, None)
        # the extents short of a target first, so the gauge starts at their count and falls
        # as each is copied (counting them as found made it climb during a repair)
        todo = [(space, size, ext) for space, size in spaces.items()
                for ext in range(-(-size >> EXTENT_SHIFT)) if src.short_of(space, ext)]
        if todo and src.lag_since is None:
            src.lag_since = time.monotonic()
        src.under_replicated = len(todo)
        for space, size, ext in todo:
            if self._halt.is_set():
                return False
            missing = src.short_of(space, ext)
            if missing:  # (a node may have come back meanwhile)
                self.copy_extent(space, ext, min(size, (ext + 1) << EXTENT_SHIFT), missing)
            if not src.short_of(space, ext):
                src.under_replicated = max(0, src.under_replicated - 1)
        left = 0
        for space, size in spaces.items():
            n = sum(1 for ext in range(-(-size >> EXTENT_SHIFT)) if src.short_of(space, ext))
            if n == 0:
                src.settled(space)
            left += n
        src.under_replicated = left
        if left == 0:
            src.lag_since = None
        return left == 0

    def copy_extent(self, space: str, ext: int, end: int, missing: list[str]) -> None:
        src = self.src
        start = ext << EXTENT_SHIFT
        buf = bytearray(end - start)
        t0 = time.monotonic()
        with src.ext_lock(space, ext):
            mask = None
            for holder in src.holders(space, ext):
                try:
                    mask = self._lane(holder, space).fetch_into(start, memoryview(buf))
                    break
                except TransportError as exc:
                    if replica_lost(exc):
                        src.drop_holder(space, ext, holder, exc)
                        missing = sorted({*missing, holder} & set(src.targets(space, ext)))
                        continue
                    self._drop(holder)
                    src.node_failed(holder, exc)
            if mask is None:
                if (space, ext) not in self._lost_logged:
                    self._lost_logged.add((space, ext))
                    src.counters["lost_extents"] += 1
                    log.error("extent %d of space %r has no live replica: it cannot be "
                              "repaired until one of its nodes returns", ext, space)
                return
            moved = 0
            for node_id in missing:
                try:
                    n = self._store_written(node_id, space, start, buf, mask)
                except TransportError as exc:
                    self._drop(node_id)
                    src.node_failed(node_id, exc)
                    continue
                src.add_holder(space, ext, node_id)
                src.counters["repairs"] += 1
                src.counters["repair_bytes"] += n
                moved += n
                log.info("repaired extent %d of space %r onto %s (%d KiB written)", ext, space,
                         node_id, n >> 10)
        spent = time.monotonic() - t0
        budget = (len(buf) - mask.bit_count() * PAGE_SIZE + moved) / self.rate
        if budget > spent:
            self._halt.wait(budget - spent)

    def _store_written(self, node_id: str, space: str, start: int, buf: bytearray,
                       mask: int) -> int:
        """Store the runs of pages ``mask`` says were written (zero bits); the bytes stored."""
        lane = self._lane(node_id, space)
        view = memoryview(buf)
        n = 0
        for first, count in zero_mask_runs(len(buf) // PAGE_SIZE, mask):
            lane.store_from(start + first * PAGE_SIZE,
                            view[first * PAGE_SIZE:(first + count) * PAGE_SIZE])
            n += count * PAGE_SIZE
        return n
