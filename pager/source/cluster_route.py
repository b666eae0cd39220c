"""How a cluster lane routes the C fault loop (`pager.engine.cloop`): per extent, the lane of
the holder a fetch would try first (`pager.source.placement.read_order`: lowest round trip,
equally near holders in the space's fixed preference); the source's ``route_gen`` as the
loop's routing generation, so a holder lost sends the loop's faults back to Python (failover,
repair bookkeeping) until the table is rebuilt; and what a fetch C could not complete means
for the node it was sent to."""

from __future__ import annotations

import errno
import os
import time
from array import array
from typing import TYPE_CHECKING, Any

from pager.source.base import CRoutes
from pager.source.placement import EXTENT_SHIFT
from transport.errors import RemoteError, TransportError

if TYPE_CHECKING:
    from pager.source.cluster import ClusterSource

# seconds at least between two rebuilds of a C table for holders gained (repair adds them one
# extent at a time) or round trips that change a read order; a holder lost rebuilds at once
SOFT_REROUTE = 1.0


class CRouting:
    """The C-loop half of `pager.source.cluster.ClusterLane` (its ``src``, ``lanes``,
    ``_lane`` and ``_failed``)."""

    src: ClusterSource
    lanes: dict[tuple[str, str], Any]
    _c_fds: dict[int, tuple[str, str]]  # fd given to C -> (node, space)
    _c_nodes: dict[tuple[str, int, int], tuple[int, int, float, list[str | None]]]

    if TYPE_CHECKING:
        def _lane(self, node_id: str, space: str) -> Any: ...

        def _failed(self, node_id: str, space: str, exc: BaseException) -> None: ...

    def c_generation(self) -> array:
        return self.src.route_gen

    def c_route(self, space: str | None, gpa: int, size: int, routes: CRoutes) -> list[int]:
        name = space or self.src.space
        nodes = self._read_nodes(name, gpa, size)
        index: dict[str | None, int] = {None: -1}
        for node_id in dict.fromkeys(nodes):
            if node_id is None:
                continue
            try:
                ep = self._lane(node_id, name).c_endpoint()
            except RemoteError:
                raise
            except TransportError as exc:
                self._failed(node_id, name, exc)  # Python fails over for its extents
                ep = None
            if ep is not None:
                self._c_fds[ep[0]] = (node_id, name)
            index[node_id] = routes.add(ep)
        return [index[n] for n in nodes]

    def _read_nodes(self, space: str, gpa: int, size: int) -> list[str | None]:
        """The node each extent of ``[gpa, gpa + size)`` is read from (None: no live holder),
        kept while no holder is lost (``route_gen``), refreshed at most once a second for
        holders gained or round trips that change a read order (``route_soft``)."""
        src = self.src
        gen, soft, now = src.route_gen[0], src.route_soft, time.monotonic()
        key = (space, gpa, size)
        got = self._c_nodes.get(key)
        if got is None or got[0] != gen or (got[1] != soft and now - got[2] >= SOFT_REROUTE):
            first, last = gpa >> EXTENT_SHIFT, (gpa + max(size, 1) - 1) >> EXTENT_SHIFT
            nodes = [next(iter(src.holders(space, ext)), None)
                     for ext in range(first, last + 1)]
            got = self._c_nodes[key] = (gen, soft, now, nodes)
        return got[3]

    def c_failed(self, fd: int, err: int) -> None:
        where = self._c_fds.pop(fd, None)
        if where is None:
            self.reset()
            return
        node_id, space = where
        if err == errno.EPROTO:
            # an ERROR frame (a replica lost, a stale epoch) or a reply out of step: only
            # this connection is dropped; Python's fetch tells which, and fails over
            lane = self.lanes.pop(where, None)
            if lane is not None:
                lane.close()
            return
        self.src.counters["failovers"] += 1
        self._failed(node_id, space, TransportError(
            f"fetch from the C fault loop failed: {os.strerror(err) if err else 'unknown'}",
            errno=err or None))
