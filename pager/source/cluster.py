"""Several memory nodes as one page source: extents placed over the live nodes (the space's
home and rendezvous hashing: `pager.source.placement`), ``R`` replicas, failover and repair.

Who holds an extent: at start, its ``R`` placed nodes over the nodes known then; a node
that fails an operation (or leaves the membership, or re-registers with a new boot id) is
*down* and its generation moves on, so it holds nothing any more. A background thread
(`pager.source.repair.Repairer`) probes down nodes and copies every extent whose current
targets (the ``R`` placed nodes over the live set) it does not hold, from a holder, so a
node that returns (empty or stale) serves an extent only after it has been re-synced.

* fetch: from the extent's live holders, lowest measured round trip first (holders about as
  near as the best in the space's fixed preference order: `pager.source.placement.read_order`;
  a node's round trip: the least of its last `RTT_SAMPLES` pings, from the `RTT_FIRST`th on);
  a failure marks the node down and the fetch goes on to the next replica (latency, never
  zeros). A node that answers but cannot serve the extent from its store (an I/O error, a
  failed store identity or checksum check: `replica_lost`) loses that extent only: the fetch
  goes on to the next replica and the repair thread copies the extent back onto it.
* store: to every target and holder of the extent; done once it reached ``R`` targets (or
  every live node, when fewer are live), else `ReplicationError` and the engine retries.

The fetch and the store run on a thread's `pager.source.cluster_lane.ClusterLane`; this
module keeps who holds what and which nodes are live.
"""

from __future__ import annotations

import logging
import socket
import threading
from array import array
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pager.core.region import Region
from pager.errors import HandoffError
from pager.source.base import PageSource
from pager.source.cluster_lane import ClusterLane
from pager.source.cluster_stores import StoreRecords
from pager.source.memnode import MemnodeSource
from pager.source.placement import (
    EXTENT_SHIFT,
    HOME,
    check_replicas,
    nearness,
    placed,
    read_order_of,
    unknown_scheme,
)
from transport.errors import RemoteError, StoreIdentityError, TransportError
from transport.leases import Ownership
from transport.membership import ClusterError, Membership
from transport.wire import IDENTITIES

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 1.0  # seconds a node has to accept a connection before it counts as down
# seconds a node has to answer a request before it counts as down (a partitioned node sends
# no reset: without this bound a fault would wait the lane's default 10 s to fail over)
LANE_TIMEOUT = 3.0
# a node's round trip is the least of its last pings (one a second): what the link costs,
# not how busy this host's scheduler was when one ping was sent
RTT_SAMPLES = 8
RTT_FIRST = 3  # pings before a node's round trip orders reads: one can be anything
_LOCKS = 256  # extent locks, striped: a store and a repair of one extent never interleave
ORDERS_KEPT = 1 << 16  # extents whose read order `ClusterSource.holders` keeps


class NodeStoreChanged(TransportError):
    """A node holds a space in another store than the one its writers left it in (wiped, or
    restarted on another store, while no pager watched), or missed stores to it while down
    (``missed``: its store stands): to the cluster, a failed node that is re-synced before
    it serves, never a source of pages."""

    missed = False


class _NodeLanes(MemnodeSource):
    """Per-node transports and lanes that fail at once (no reconnect-and-retry: a node
    that breaks a connection may have restarted empty, so the cluster decides, not the lane)
    and open the owned space under the owner's epoch (fencing). ``before_open(space)`` runs
    before a lane to ``space`` opens (the cluster seeds the identities recorded for it)."""

    epoch: int | None = None
    before_open: Any = None

    def open_node_lane(self, node_id: str, space: str | None = None, *,
                       bulk: bool = False) -> Any:
        if self.before_open is not None:
            self.before_open(space or self.space)
        try:
            return super().open_node_lane(node_id, space, bulk=bulk)
        except StoreIdentityError as exc:
            changed = NodeStoreChanged(str(exc), errno=exc.errno)
            changed.missed = exc.missed
            raise changed from exc

    def arm(self, t: Any) -> Any:
        if hasattr(t, "retry_for"):
            t.retry_for = 0.0
            t.timeout = LANE_TIMEOUT
        if self.epoch is not None and hasattr(t, "epochs"):
            t.epochs[self.space] = self.epoch
        return t

    def _select(self, node_id: str) -> Any:
        # a node that refuses or does not answer fails now, not after the selection's
        # reconnect-and-retry: the cluster has other replicas, and the repair thread probes
        from transport.errors import ConnectError
        from transport.tcp import require_port

        host, port = require_port(self.nodes[node_id])
        try:
            socket.create_connection((host, port), timeout=PROBE_TIMEOUT).close()
        except OSError as exc:
            raise ConnectError(f"memory node {node_id} ({self.nodes[node_id]}) does not "
                               f"accept connections: {exc.strerror or exc}",
                               errno=exc.errno) from exc
        return self.arm(super()._select(node_id))

    def _fall_back(self, node_id: str, failed: Any) -> None:
        super()._fall_back(node_id, failed)
        t = self.transports.get(node_id)
        if t is not None:
            self.arm(t)


class ClusterSource(PageSource):
    """The memory nodes of ``membership`` with ``replicas`` copies of every extent."""

    def __init__(self, membership: Membership, token: bytes | None, space: str, *,
                 replicas: int | None = None, prefer: str = "auto",
                 repair_rate: float = 64 << 20, probe_interval: float = 0.25,
                 owner: Ownership | None = None, compress: tuple[str, ...] | None = None
                 ) -> None:
        self.membership = membership
        self.owner = owner
        nodes = membership.nodes()
        self.r = check_replicas(replicas, len(nodes))
        self.space = space
        self.epoch = owner.epoch if owner is not None else None
        self.fenced: str | None = None  # why a newer owner holds our space (`lose_space`)
        # space -> (nodes, R, scheme) its extents were placed by before we came (`_base`)
        self.bases: dict[str, tuple[frozenset[str], int, str]] = {}
        self._recorded: dict[str, tuple[list[str], int]] = {}
        # (space, node): recorded as having missed stores since the node last failed
        self._missed: set[tuple[str, str]] = set()
        self._gens_at: dict[str, dict[str, int]] = {}  # space -> `_first_gens`
        self._store_changed: set[str] = set()  # nodes seen on another store than recorded
        self.lanes = _NodeLanes(nodes, token, space, prefer=prefer,
                                placement=lambda s, g: "", compress=compress)
        self.lanes.epoch = self.epoch
        self.stores = StoreRecords(membership, self.lanes.nodes)
        self.lanes.before_open = self.stores.expect_space
        self.lock = threading.RLock()
        self.gen: dict[str, int] = dict.fromkeys(nodes, 0)
        self.down: set[str] = set()
        self.members: set[str] = set(nodes)
        self.boots: dict[str, str | None] = {n: self._boot(n) for n in nodes}
        self._held: dict[tuple[str, int], set[tuple[str, int]]] = {}
        # (space, extent) -> (routing stamp, read order) for `holders` on the fault path:
        # valid while neither routing counter moved (every change to what it reads moves one)
        self._orders: dict[tuple[str, int], tuple[tuple[int, int], tuple[str, ...]]] = {}
        self.ext_locks = [threading.Lock() for _ in range(_LOCKS)]
        self.rtt: dict[str, float] = {}  # node -> round trip (s) reads are ordered by
        self._pings: dict[str, deque[float]] = {}
        # bumped (under the lock) whenever a node or an extent loses a holder: C fault loops
        # routing by an older table hand their faults to Python until rebuilt. Holders
        # gained and round trips reordered only move ``route_soft``: an older table is still
        # right, and is refreshed when next rebuilt (at most once a second)
        self.route_gen = array("Q", [0])
        self.route_soft = 0
        self.spaces: dict[str, int] = {}  # space -> bytes kept replicated
        self.counters = {"failovers": 0, "repairs": 0, "repair_bytes": 0, "lost_extents": 0,
                         "node_failures": 0, "lost_replicas": 0}
        self.under_replicated = 0
        self.lag_since: float | None = None  # when under-replication was first seen
        self.dirty = threading.Event()
        self.pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="cluster-store")
        membership.on_change(self._on_members)
        from pager.source.repair import Repairer

        with self.lock:
            self._first_gens(space)  # its own space: the generations before any lane opens
        if owner is not None:
            owner.on_lost(self.lose_space)
        if self.epoch is not None:
            self.fence()
            # the owner repairs what its space's writers recorded from the start, before
            # (or without) a guest of its own
            if size := membership.recorded_size(space):
                self.keep(space, size, record=False)
        self.repairer = Repairer(self, rate=repair_rate, interval=probe_interval)
        self.repairer.start()

    def fence(self) -> None:
        """Open the owned space on every live node under our epoch: from now on they refuse
        stores of an older owner. A node down now is fenced by the repair thread's first
        lane to it, before it is repaired."""
        for node_id in self.live():
            try:
                self.lanes.open_node_lane(node_id, self.space).close()
            except RemoteError:
                raise
            except TransportError as exc:
                self.node_failed(node_id, exc)

    def lose_space(self, why: str) -> None:
        """A newer owner holds our space (etcd said so, or a node refused us STALE_EPOCH):
        from now on every fetch and store of it is refused here, without asking a node, and
        nothing of it is repaired."""
        if self.fenced is None:
            self.fenced = why
            log.error("space %s is owned by a newer pager now (%s): this pager neither reads "
                      "nor writes it any more; its guest gets SIGBUS at the next page it "
                      "needs (run the guest where the space's new owner is)", self.space, why)
        self.dirty.set()

    def lost(self, space: str) -> bool:
        """Is ``space`` the one we owned and a newer owner holds now?"""
        return self.fenced is not None and space == self.space

    # --- node set -----------------------------------------------------------------------
    def _boot(self, node_id: str) -> str | None:
        boot = getattr(self.membership, "boot", None)
        return boot(node_id) if boot else None

    def _on_members(self, nodes: dict[str, str]) -> None:
        with self.lock:
            for n, ep in nodes.items():
                self.lanes.nodes[n] = ep
                boot = self._boot(n)
                if n not in self.gen:  # away when we started: trusted as placed, if it
                    self.gen[n] = 0     # still shows the store its writers recorded
                    self.stores.expect_node(n, ep)
                elif n not in self.members or boot != self.boots.get(n):
                    self._bump(n, "re-registered")
                self.boots[n] = boot
            for n in self.members - set(nodes):
                self._bump(n, "left the cluster")
            self.members = set(nodes)
            self.rerouted_soft()  # a node leaving was bumped above
            self.dirty.set()

    def rerouted(self) -> None:
        """A holder was lost (call under the lock): C tables built before are stale."""
        self.route_gen[0] += 1

    def rerouted_soft(self) -> None:
        """A holder was gained or the round trips reordered: C tables built before are still
        right, but may not read from the nearest holder."""
        self.route_soft += 1

    def _bump(self, node_id: str, why: str) -> None:
        """``node_id`` no longer holds anything: its generation moves on."""
        self.gen[node_id] = self.gen.get(node_id, 0) + 1
        self._missed = {(s, n) for s, n in self._missed if n != node_id}
        self.rerouted()
        # its store may come back empty: the next identity it shows is its new one
        IDENTITIES.forget(self.lanes.nodes.get(node_id, node_id))
        log.warning("memory node %s %s: its extents are re-synced before it serves them",
                    node_id, why)

    def node_failed(self, node_id: str, exc: BaseException) -> None:
        with self.lock:
            if node_id in self.down:
                return
            self.down.add(node_id)
            if isinstance(exc, NodeStoreChanged) and not exc.missed:
                self._store_changed.add(node_id)
            self.counters["node_failures"] += 1
            self._bump(node_id, f"failed ({exc})")
            self.dirty.set()

    def node_back(self, node_id: str) -> None:
        with self.lock:
            if node_id in self.down:
                self.down.discard(node_id)
                self.rerouted_soft()
                log.warning("memory node %s answers again", node_id)
            self.dirty.set()

    def live(self) -> list[str]:
        with self.lock:
            return [n for n in self.members if n not in self.down]

    # --- extents ------------------------------------------------------------------------
    def placed_on(self, space: str, ext: int) -> frozenset[str]:
        """The nodes a pager started later looks for ``space``'s extent ``ext`` on (its
        recorded placement), up or down."""
        return frozenset(placed(space, ext, *self._base(space)))

    def mark_missed(self, space: str, nodes: set[str]) -> bool:
        """``nodes`` (placed holders of an extent of ``space``) did not get a store that
        reached its targets: record it before the store counts as done, so a pager started
        later (this one may be killed first) does not read their old copy. Once per node
        and failure; False: not recorded."""
        if self.lost(space):
            return False  # a newer owner's records are not ours to write
        with self.lock:
            todo = sorted(n for n in nodes if (space, n) not in self._missed)
        if not todo:
            return True
        if not self.stores.mark_missed(space, todo):
            return False
        with self.lock:
            self._missed.update((space, n) for n in todo)
        log.warning("space %s: memory node%s %s missed stores while down: recorded, so no "
                    "later reader trusts %s copy before it is refilled", space,
                    "s" if len(todo) > 1 else "", ", ".join(todo),
                    "their" if len(todo) > 1 else "its")
        return True

    def targets(self, space: str, ext: int) -> list[str]:
        return list(placed(space, ext, frozenset(self.live()), self.r, self.scheme(space)))

    def short_of(self, space: str, ext: int) -> list[str]:
        """The targets of ``space``'s extent ``ext`` that do not hold it (repair's work)."""
        held = self.holders(space, ext)
        return [n for n in self.targets(space, ext) if n not in held]

    def holders(self, space: str, ext: int) -> list[str]:
        """Live nodes holding every page of the extent in the order a fetch tries them:
        lowest round trip first, equally near ones in ``space``'s preference order."""
        return list(self._read_order(space, ext))

    def _read_order(self, space: str, ext: int) -> tuple[str, ...]:
        """`holders` as a tuple, kept per extent while the routing counters stand still: a
        holder lost or gained, a node down or back, a member change and round trips that
        reorder reads each move ``route_gen`` or ``route_soft``. The stamp is read before
        the order is computed, so an order computed across a change is recomputed."""
        stamp = (self.route_gen[0], self.route_soft)
        hit = self._orders.get((space, ext))
        if hit is not None and hit[0] == stamp:
            return hit[1]
        with self.lock:
            stamp = (self.route_gen[0], self.route_soft)
            pairs = self._held.get((space, ext))
            if pairs is None:  # as placed, at the generations the space was first seen at
                seen = self._first_gens(space)
                pairs = {(n, seen.get(n, 0)) for n in placed(space, ext, *self._base(space))}
            got = [n for n, g in pairs if self.gen.get(n) == g and n not in self.down
                   and n in self.members]
        rtt = self.rtt
        order = read_order_of(space, tuple(got), tuple(rtt.get(n) for n in got))
        if len(self._orders) >= ORDERS_KEPT:
            self._orders.clear()  # bounded like `placed`'s cache: a huge space cycles through
        self._orders[space, ext] = (stamp, order)
        return order

    def _first_gens(self, space: str) -> dict[str, int]:
        """The nodes' generations when this pager first used ``space`` (call under the lock):
        a node that failed and came back before then missed none of this pager's stores to
        it, so its copy stands (checked against the recorded store identity when its lane
        opens), unless this pager saw it on another store than recorded; one that fails
        later holds nothing of it until re-synced."""
        gens = self._gens_at.get(space)
        if gens is None:  # a node seen on another store holds only what it was given since
            gens = self._gens_at[space] = {n: -1 if n in self._store_changed else g
                                           for n, g in self.gen.items()}
        return gens

    def _base(self, space: str) -> tuple[frozenset[str], int, str]:
        base = self.bases.get(space)
        if base is None:  # a space no writer placed yet: on the nodes in the cluster now
            nodes, r, scheme = self.membership.placement(space, sorted(self.members), self.r,
                                                         HOME)
            if why := unknown_scheme(space, scheme, self.membership.source):
                raise ClusterError(why)
            base = self.bases[space] = (frozenset(nodes), r, scheme)
        return base

    def scheme(self, space: str) -> str:
        """The placement scheme ``space``'s extents are placed by (`pager.source.placement`)."""
        return self._base(space)[2]

    def settled(self, space: str) -> None:
        """Repair found every extent of ``space`` on its targets: record the live set as its
        placement, so a pager started later computes the holders from it, and the store
        identity each live node shows for it, so that pager refuses a node wiped meanwhile."""
        live = sorted(self.live())
        if not live:  # nothing holds anything now: no placement to record
            return
        if self._recorded.get(space) != (live, self.r):
            self._recorded[space] = (live, self.r)
            self.membership.record_placement(space, live, self.r, self.scheme(space))
        self.record_identities(space, live)

    def record_identities(self, space: str, nodes: list[str] | None = None) -> None:
        """Record the store identity each of ``nodes`` showed this process for ``space``
        (None: the live nodes that hold every extent of the kept space they are targets of;
        `put` calls this once its stores are done), so a pager started later refuses a node
        that shows another (`StoreRecords`). A node being refilled is never among them: its
        old record stands, and the next pager refills it too."""
        if self.lost(space):
            return  # a newer owner records what it writes
        if nodes is None:
            size = self.spaces.get(space)
            if size is None:
                return
            missing: set[str] = set()
            for ext in range(-(-size >> EXTENT_SHIFT)):
                missing.update(self.short_of(space, ext))
            nodes = [n for n in self.live() if n not in missing]
        self.stores.record(space, nodes)

    def add_holder(self, space: str, ext: int, node_id: str) -> None:
        with self.lock:
            pairs = {(n, self.gen[n]) for n in self.holders(space, ext)}
            pairs.add((node_id, self.gen[node_id]))
            self._held[space, ext] = pairs
            self.rerouted_soft()

    def drop_holder(self, space: str, ext: int, node_id: str, exc: BaseException) -> None:
        """``node_id`` failed to serve extent ``ext`` of ``space`` from its store: it no longer
        holds that extent (the rest of its extents stay), and repair copies it back."""
        with self.lock:
            self._held[space, ext] = {(n, self.gen[n]) for n in self.holders(space, ext)
                                      if n != node_id}
            self.rerouted()
            self.counters["lost_replicas"] += 1
            self.dirty.set()
        log.warning("memory node %s cannot serve extent %d of space %r (%s): served from "
                    "another replica, repaired onto it", node_id, ext, space, exc)

    def ext_lock(self, space: str, ext: int) -> threading.Lock:
        return self.ext_locks[hash((space, ext)) % _LOCKS]

    def note_rtt(self, node_id: str, seconds: float) -> None:
        """A ping of ``node_id`` took ``seconds``; reads are rerouted (soft) when that changes
        which holders count as nearer than others."""
        pings = self._pings.setdefault(node_id, deque(maxlen=RTT_SAMPLES))
        pings.append(seconds)
        if len(pings) < RTT_FIRST:
            return  # not measured yet: as near as the nearest (the preference orders it)
        before = nearness(self.rtt)
        self.rtt[node_id] = min(pings)
        if nearness(self.rtt) != before:
            self.rerouted_soft()

    def set_rtt(self, rtts: dict[str, float]) -> None:
        """Take ``rtts`` (node -> seconds) as the nodes' round trips, as if measured: reads
        are reordered by them (until pings measure them again, if the repairer runs)."""
        self.rtt.update(rtts)
        self.rerouted_soft()

    def forget_rtt(self) -> None:
        """Forget every round trip measured: reads follow the preference order alone until
        pings measure them again."""
        self._pings.clear()
        self.rtt.clear()
        self.rerouted_soft()

    def keep(self, space: str, size: int, *, record: bool = True) -> None:
        """Keep ``size`` bytes of ``space`` replicated (repair scans them); ``record``: in
        etcd too, so a pager started later repairs them before a guest attaches."""
        with self.lock:
            self._first_gens(space)
            if size <= self.spaces.get(space, 0):
                return
            self.spaces[space] = size
            self.dirty.set()
        if record:
            self.membership.record_size(space, size)

    async def connect(self) -> None:
        """Select every node's transport (each prints its tier line); a node that cannot be
        reached is down (a warning), and the repair thread probes it."""
        from transport.errors import AuthError
        from transport.manager import TransportManager

        manager = TransportManager("pager", self.lanes.token, space=self.space,
                                   prefer=self.lanes.prefer)
        try:
            for node_id, endpoint in sorted(self.lanes.nodes.items()):
                try:
                    info = await manager.connect_peer(node_id, endpoint)
                except AuthError:
                    raise
                except (TransportError, OSError) as exc:
                    log.warning("memory node %s (%s) not reachable (%s): down until it "
                                "answers", node_id, endpoint, exc)
                    self.node_failed(node_id, exc)
                    continue
                self.lanes.record_peer(node_id, self.lanes.arm(manager.transport(node_id)), info)
        finally:
            await manager.close()

    # --- PageSource ---------------------------------------------------------------------
    def check_region(self, region: Region) -> None:
        space = region.space or self.space
        try:
            self._base(space)  # placed by a scheme this version cannot read: refused
        except ClusterError as exc:
            raise HandoffError(str(exc)) from exc
        self.keep(space, region.offset + region.size)

    def describe(self) -> str:
        return (f"cluster of {len(self.members)} memory nodes ({self.membership.source}), "
                f"R={self.r}, space {self.space}")

    def open_lane(self, bulk: bool = False) -> ClusterLane:
        return ClusterLane(self, bulk)

    def close(self) -> None:
        self.repairer.stop()
        self.pool.shutdown(wait=True)
        self.membership.close()
        if self.owner is not None:
            self.owner.close()

    def state(self) -> dict[str, Any]:
        """The cluster as `ssi-pager status` shows it (`cluster_metrics.cluster_state`)."""
        from pager.source.cluster_metrics import cluster_state

        return cluster_state(self)
