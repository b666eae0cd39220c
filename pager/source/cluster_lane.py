"""One thread's lanes to a cluster's memory nodes (`ClusterLane`, opened by
`pager.source.cluster.ClusterSource.open_lane`): a fetch from an extent's holders in read
order, going on to the next replica when one fails; a store to every target and holder of the
extent, done once it reached ``R`` targets. The C fault loop fetches on these lanes too
(`pager.source.cluster_route.CRouting`)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from pager.source.base import Lane, close_lanes
from pager.source.cluster_route import CRouting
from pager.source.placement import EXTENT_SHIFT
from transport.errors import RemoteError, StaleEpochError, TransportError
from transport.wire import PAGE_SHIFT
from transport.wire.frames import ErrorCode

if TYPE_CHECKING:
    from pager.source.cluster import ClusterSource

log = logging.getLogger(__name__)

PARALLEL_STORE_BYTES = 128 << 10  # stores this large go to their replicas in parallel

# errors about the request itself: every replica would refuse it alike, so they are raised;
# any other error a node reports about a fetch is about its store (I/O error, failed store
# identity or checksum check, codes added later included): that replica is lost for the extent
REQUEST_ERRORS = frozenset({ErrorCode.BAD_FRAME, ErrorCode.TOO_LARGE, ErrorCode.UNKNOWN_TYPE,
                            ErrorCode.MISALIGNED, ErrorCode.OUT_OF_RANGE,
                            ErrorCode.AUTH_REQUIRED, ErrorCode.AUTH_FAILED, ErrorCode.VERSION,
                            ErrorCode.NO_SUCH_SPACE, ErrorCode.BAD_MESSAGE,
                            ErrorCode.STALE_EPOCH})


def replica_lost(exc: BaseException) -> bool:
    """Is ``exc``, raised by a fetch from one node, that node's store failing the extent (so
    another replica serves it and repair rewrites it), not a bad request?"""
    return isinstance(exc, RemoteError) and exc.code not in REQUEST_ERRORS


class ReplicationError(TransportError):
    """No replica could serve an extent, or a store reached fewer nodes than required."""


class ClusterLane(CRouting, Lane):
    """One thread's lanes to the cluster's nodes, one per (node, space), opened on use.

    The C fault loop fetches on them too (`pager.source.cluster_route.CRouting`)."""

    c_capable = True

    def __init__(self, src: ClusterSource, bulk: bool = False) -> None:
        self.src = src
        self.bulk = bulk
        self.lanes: dict[tuple[str, str], Any] = {}
        self._c_fds: dict[int, tuple[str, str]] = {}  # fd given to C -> (node, space)
        self._c_nodes: dict[tuple[str, int, int],
                            tuple[int, int, float, list[str | None]]] = {}

    def _lane(self, node_id: str, space: str) -> Any:
        lane = self.lanes.get((node_id, space))
        if lane is None:
            lane = self.lanes[node_id, space] = self.src.lanes.open_node_lane(
                node_id, space, bulk=self.bulk)
        return lane

    def _failed(self, node_id: str, space: str, exc: BaseException) -> None:
        lane = self.lanes.pop((node_id, space), None)
        if lane is not None:
            try:
                lane.close()
            except Exception:
                log.debug("closing a failed lane", exc_info=True)
        self.src.node_failed(node_id, exc)

    def fetch_into(self, space: str | None, gpa: int, buf: memoryview) -> int:
        name = space or self.src.space
        n = len(buf)
        ext = gpa >> EXTENT_SHIFT
        if (gpa + n - 1) >> EXTENT_SHIFT == ext:  # the usual case: one extent
            return self._fetch_extent(name, ext, gpa, memoryview(buf))
        view = memoryview(buf)
        mask, off = 0, 0
        while off < n:
            ext = (gpa + off) >> EXTENT_SHIFT
            end = min(n, ((ext + 1) << EXTENT_SHIFT) - gpa)
            part = view if (off, end) == (0, n) else view[off:end]
            mask |= self._fetch_extent(name, ext, gpa + off, part) << (off >> PAGE_SHIFT)
            off = end
        return mask

    def _fenced(self, space: str) -> None:
        """Raise STALE_EPOCH for our own space once a newer owner holds it."""
        src = self.src
        if src.lost(space):
            raise StaleEpochError(f"space {space} is owned by a newer pager now "
                                  f"({src.fenced})", ErrorCode.STALE_EPOCH)

    def _refused(self, space: str, exc: RemoteError) -> None:
        """A request error from a node (raised next): a stale epoch fences our space."""
        if isinstance(exc, StaleEpochError) and space == self.src.space:
            self.src.lose_space(f"a memory node refused epoch {self.src.epoch}: {exc}")

    def _fetch_extent(self, space: str, ext: int, gpa: int, part: memoryview) -> int:
        self._fenced(space)
        tried: list[str] = []
        for node_id in self.src._read_order(space, ext):
            tried.append(node_id)
            try:
                return self._lane(node_id, space).fetch_into(gpa, part)
            except RemoteError as exc:
                if not replica_lost(exc):
                    self._refused(space, exc)
                    raise
                self.src.drop_holder(space, ext, node_id, exc)
                self.src.counters["failovers"] += 1
            except TransportError as exc:
                self._failed(node_id, space, exc)
                self.src.counters["failovers"] += 1
        raise ReplicationError(f"no live replica holds extent {ext} of space {space!r} "
                               f"(tried {', '.join(tried) or 'none'}): its nodes are down "
                               f"or lost it; `ssi-pager status` shows which")

    def store_from(self, space: str | None, gpa: int, buf: bytes | memoryview) -> None:
        name = space or self.src.space
        view = memoryview(buf)
        off, n = 0, len(view)
        while off < n:
            ext = (gpa + off) >> EXTENT_SHIFT
            end = min(n, ((ext + 1) << EXTENT_SHIFT) - gpa)
            self._store_extent(name, ext, gpa + off, view[off:end])
            off = end

    def _store_extent(self, space: str, ext: int, gpa: int, part: memoryview) -> None:
        src = self.src
        self._fenced(space)
        done: set[str] = set()
        tried: set[str] = set()
        with src.ext_lock(space, ext):
            while True:
                todo = (set(src.targets(space, ext)) | set(src.holders(space, ext))) - tried
                if not todo:
                    break
                tried |= todo
                for node_id, error in self._store_all(sorted(todo), space, gpa, part):
                    if error is None:
                        done.add(node_id)
                    elif isinstance(error, RemoteError):
                        self._refused(space, error)
                        raise error
                    else:
                        self._failed(node_id, space, error)
            targets = src.targets(space, ext)
        need = min(src.r, len(targets))
        reached = len(done & set(targets))
        if need == 0 or reached < need:
            raise ReplicationError(f"a store to extent {ext} of space {space!r} reached "
                                   f"{reached} of {max(need, src.r)} memory nodes; retrying "
                                   f"once nodes are back")
        missed = src.placed_on(space, ext) - done
        if missed and not src.mark_missed(space, missed):
            raise ReplicationError(f"a store to extent {ext} of space {space!r} reached its "
                                   f"nodes, but that {', '.join(sorted(missed))} missed it "
                                   f"could not be recorded (etcd unreachable?); retrying")

    def _store_all(self, nodes: list[str], space: str, gpa: int, part: memoryview
                   ) -> list[tuple[str, BaseException | None]]:
        """Store ``part`` on every node of ``nodes``: all but the first on the source's
        store threads when the part is large enough to pay for the hand-off (each node's
        lane is still used by one thread at a time)."""
        def one(node_id: str) -> BaseException | None:
            try:
                self._lane(node_id, space).store_from(gpa, part)
            except TransportError as exc:
                return exc
            return None

        if len(nodes) == 1 or len(part) < PARALLEL_STORE_BYTES:
            return [(n, one(n)) for n in nodes]
        futures = [(n, self.src.pool.submit(one, n)) for n in nodes[1:]]
        first = (nodes[0], one(nodes[0]))
        return [first, *((n, f.result()) for n, f in futures)]

    def reset(self) -> None:
        close_lanes(self.lanes)
