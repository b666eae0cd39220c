"""Cluster membership: which memory nodes exist, from a static file or from etcd.

A static file (``--cluster FILE``, JSON) suits small setups with no extra service::

    {"nodes": {"a": "10.0.0.1:50051", "b": "10.0.0.2:50051", "c": "10.0.0.3:50051"},
     "owners": {"vm1": {"pager": "host-a", "epoch": 1}}}

With etcd (``--etcd http://HOST:2379``) each memory node registers itself under a lease
(`transport.leases.register_node`): the key ``/ssi-pager/nodes/NAME`` holds ``{"endpoint":
..., "boot": ...}`` and disappears when the node stops renewing the lease. Pagers watch the prefix
(`EtcdMembership`, a poll every second) and keep the last map they read while etcd cannot be
reached, so faults keep being served on the last known map. Beside them, per space, the
placement its extents were written with (``/ssi-pager/placement/SPACE``) and the store each
node held it in (``/ssi-pager/stores/SPACE/NODE``, `EtcdMembership.identities`).

The etcd client is etcd3gw (HTTP/JSON through etcd's gRPC gateway, ``/v3/``): blocking like
the pager's lanes and with only ``requests`` underneath (no grpcio/protobuf pins).
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from transport.errors import TransportError

log = logging.getLogger(__name__)

PREFIX = "/ssi-pager/"
NODES = PREFIX + "nodes/"
OWNERS = PREFIX + "owners/"
EPOCHS = PREFIX + "epochs/"
PLACEMENT = PREFIX + "placement/"
# the placement scheme of a record that names none (written before schemes were recorded)
UNNAMED_SCHEME = "rendezvous"
STORES = PREFIX + "stores/"  # STORES + SPACE/NODE: the store identity the space was left in
SIZES = PREFIX + "sizes/"  # SIZES + SPACE: the bytes of it its writers keep replicated
DEFAULT_TTL = 5  # seconds a node's registration outlives its last renewal
POLL_SECONDS = 1.0


class ClusterError(TransportError):
    """The cluster's description (file or etcd) is missing, malformed or unreachable."""


def etcd_client(url: str, timeout: float = 3.0) -> Any:
    """An etcd3gw client for ``http://HOST:PORT`` (etcd 3.4 or later, gateway ``/v3/``)."""
    try:
        from etcd3gw.client import Etcd3Client
    except ImportError as exc:
        raise ClusterError("--etcd needs the etcd3gw package: pip install etcd3gw") from exc
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ClusterError(f"cannot read etcd URL {url!r}; write http://HOST:2379")
    return Etcd3Client(host=parts.hostname, port=parts.port or 2379, protocol=parts.scheme,
                       timeout=timeout, api_path="/v3/")


def _why(exc: BaseException) -> str:
    """An etcd client error as words (some carry no message)."""
    return str(exc).strip() or type(exc).__name__


def _etcd_errors() -> tuple[type[BaseException], ...]:
    from etcd3gw import exceptions

    return (exceptions.Etcd3Exception, OSError, ValueError, KeyError)


def _start(first: Callable[[], None], loop: Callable[[], None], name: str,
           failure: str) -> threading.Thread:
    """``first()`` now (its etcd errors raised as ClusterError starting with ``failure``),
    then ``loop`` on a daemon thread."""
    try:
        first()
    except _etcd_errors() as exc:
        raise ClusterError(f"{failure}: {_why(exc)}; is etcd running there?") from exc
    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    return thread


def placement_record(nodes: list[str], r: int, scheme: str) -> str:
    """The placement record of a space (``/ssi-pager/placement/SPACE``): ``{"nodes": [...],
    "replicas": R}`` for `UNNAMED_SCHEME` (what versions before schemes read and write);
    for any other scheme the same nested under the scheme's name, beside a top-level
    ``"nodes"`` and an infinite ``"replicas"``. Versions before schemes read only those two
    and convert R with ``int()``: infinity raises OverflowError, which they do not catch,
    so they fail on the space instead of reading it by their own placement (zeros where that
    differs) and recording it as theirs."""
    body = {"nodes": sorted(nodes), "replicas": r}
    if scheme == UNNAMED_SCHEME:
        return json.dumps(body)
    return json.dumps({scheme: body, "nodes": body["nodes"], "replicas": math.inf})


def read_placement(raw: str | bytes) -> tuple[list[str], int, str] | None:
    """(nodes, R, scheme) of a `placement_record`; None for an empty node set (an older
    pager could record one: it places nothing). A malformed record raises one of
    `MALFORMED`."""
    doc = json.loads(raw)
    if not isinstance(doc, dict):
        raise ValueError("a placement record is a JSON object")
    named = [k for k in doc if k not in ("nodes", "replicas")]
    if len(named) > 1:
        raise ValueError(f"a placement record names one scheme, not {sorted(named)}")
    scheme = named[0] if named else UNNAMED_SCHEME
    body = doc[scheme] if named else doc
    nodes = [str(n) for n in body["nodes"]]
    return (nodes, int(body["replicas"]), str(scheme)) if nodes else None


# what a malformed placement record raises in `read_placement`
MALFORMED = (TypeError, KeyError, ValueError, OverflowError)


class Membership:
    """The live memory nodes: ``nodes()`` -> {node id: endpoint}."""

    source = "?"

    def nodes(self) -> dict[str, str]:
        raise NotImplementedError

    def owner(self, space: str) -> dict[str, Any] | None:
        """``{"pager": id, "epoch": n}`` of the address space's owner, or None."""
        return None

    def on_change(self, callback: Callable[[dict[str, str]], None]) -> None:
        """Call ``callback(nodes)`` whenever the node set changes."""

    def placement(self, space: str, nodes: list[str], r: int, scheme: str
                  ) -> tuple[list[str], int, str]:
        """The node set, R and placement scheme (`pager.source.placement`) ``space``'s
        extents were placed with: recorded by the first writer (``nodes``, ``r``, ``scheme``
        if none is; a record without a scheme is `UNNAMED_SCHEME`'s), so a pager started
        while a holder is away still knows where every extent is. A static membership
        records nothing: its nodes are the file's, down or not, in ``scheme``."""
        return nodes, r, scheme

    def record_placement(self, space: str, nodes: list[str], r: int, scheme: str) -> None:
        """Every extent of ``space`` is now on its ``r`` nodes over ``nodes`` by ``scheme``."""

    def known(self, space: str) -> bool | None:
        """Whether a writer has placed ``space`` in this cluster (None: nothing records it
        here, or the record cannot be read now)."""
        return None

    def scheme(self, space: str) -> str | None:
        """The placement scheme recorded for ``space`` (None: none recorded, or unreadable)."""
        return None

    def recorded_size(self, space: str) -> int:
        """The bytes of ``space`` its writers kept replicated (a `put` image's size, a
        guest's RAM), so a pager that has no guest yet still repairs it; 0: unknown."""
        return 0

    def record_size(self, space: str, size: int) -> None:
        """``space``'s writers keep ``size`` bytes of it (recorded where it grows)."""

    def identities(self, space: str) -> dict[str, tuple[str, int]] | None:
        """{node id: (store id, generation)}: the store each node held ``space`` in when its
        writers last had every extent on its nodes (None: the record cannot be read now). A
        node that now shows another one lost its copy (wiped, or restarted on another store)
        while no pager watched. A static membership records nothing: a pager then knows only
        the identities it saw itself."""
        return {}

    def record_identities(self, space: str, ids: dict[str, tuple[str, int]]) -> bool:
        """``ids`` ({node id: (store id, generation)}) are where ``space`` now is; False:
        not recorded (etcd unreachable), to be tried again."""
        return True

    def close(self) -> None:
        """Stop watching."""


class StaticMembership(Membership):
    """Nodes (and owners) from a JSON file, read once; ``{node id: endpoint}`` for repeated
    ``--memnode`` with ``path`` None, each node's id its endpoint: placement goes by node id,
    so the order of the list does not matter, and the same endpoints find the same extents."""

    def __init__(self, path: str | Path | None = None, *,
                 endpoints: list[str] | None = None) -> None:
        self.source = str(path) if path else "--memnode"
        self._owners: dict[str, dict[str, Any]] = {}
        if path is None:
            self._nodes = {ep: ep for ep in endpoints or []}
            if len(self._nodes) != len(endpoints or []):
                raise ClusterError("the same --memnode is given twice: name each node once")
        else:
            self._nodes, self._owners = _read_cluster_file(Path(path))
        if not self._nodes:
            raise ClusterError(f"{self.source} names no memory node; list them as "
                               f'{{"nodes": {{"a": "HOST:PORT"}}}}')

    def nodes(self) -> dict[str, str]:
        return dict(self._nodes)

    def owner(self, space: str) -> dict[str, Any] | None:
        return self._owners.get(space)


def _read_cluster_file(path: Path) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    try:
        doc = json.loads(path.read_text())
    except OSError as exc:
        raise ClusterError(f"cannot read cluster file {path}: {exc.strerror}",
                           errno=exc.errno) from exc
    except ValueError as exc:
        raise ClusterError(f"cluster file {path} is not JSON ({exc}); write "
                           f'{{"nodes": {{"a": "HOST:PORT", ...}}}}') from exc
    nodes = doc.get("nodes") if isinstance(doc, dict) else None
    if not isinstance(nodes, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and ":" in v for k, v in nodes.items()):
        raise ClusterError(f'cluster file {path}: "nodes" must map node ids to "HOST:PORT"')
    owners = doc.get("owners", {})
    if not isinstance(owners, dict) or not all(
            isinstance(o, dict) and isinstance(o.get("epoch"), int) for o in owners.values()):
        raise ClusterError(f'cluster file {path}: "owners" must map spaces to '
                           f'{{"pager": ID, "epoch": N}}')
    return dict(nodes), dict(owners)


class EtcdMembership(Membership):
    """Nodes registered in etcd, polled every ``poll`` seconds by a thread; the last map read
    stays in force while etcd is unreachable (``healthy`` False meanwhile)."""

    def __init__(self, url: str, *, poll: float = POLL_SECONDS) -> None:
        self.source = url
        self.client = etcd_client(url)
        self.poll = poll
        self.healthy = False
        self._nodes: dict[str, str] = {}
        self._boots: dict[str, str] = {}
        self._callbacks: list[Callable[[dict[str, str]], None]] = []
        self._stop = threading.Event()
        self._thread = _start(self._refresh, self._watch, "etcd-watch",
                              f"cannot read the memory nodes from etcd at {url}")

    def nodes(self) -> dict[str, str]:
        return dict(self._nodes)

    def boot(self, node_id: str) -> str | None:
        """The registration's boot id: a new one means the node restarted."""
        return self._boots.get(node_id)

    def owner(self, space: str) -> dict[str, Any] | None:
        try:
            got = self.client.get(OWNERS + space)
        except _etcd_errors():
            return None
        return json.loads(got[0]) if got else None

    def on_change(self, callback: Callable[[dict[str, str]], None]) -> None:
        self._callbacks.append(callback)

    def placement(self, space: str, nodes: list[str], r: int, scheme: str
                  ) -> tuple[list[str], int, str]:
        try:
            if not self.client.create(PLACEMENT + space, placement_record(nodes, r, scheme)):
                got = self.client.get(PLACEMENT + space)
                if got and (placed := read_placement(got[0])) is not None:
                    return placed
        except (*_etcd_errors(), *MALFORMED) as exc:
            log.warning("etcd: cannot read the placement of space %s (%s): assuming the "
                        "current nodes hold it", space, _why(exc))
        return nodes, r, scheme

    def scheme(self, space: str) -> str | None:
        try:
            got = self.client.get(PLACEMENT + space)
            placed = read_placement(got[0]) if got else None
        except (*_etcd_errors(), *MALFORMED):
            return None
        return placed[2] if placed is not None else None

    def known(self, space: str) -> bool | None:
        try:
            return bool(self.client.get(PLACEMENT + space))
        except _etcd_errors():
            return None

    def record_placement(self, space: str, nodes: list[str], r: int, scheme: str) -> None:
        try:
            self.client.put(PLACEMENT + space, placement_record(nodes, r, scheme))
        except _etcd_errors() as exc:
            log.warning("etcd: cannot record the placement of space %s: %s", space, _why(exc))

    def recorded_size(self, space: str) -> int:
        try:
            got = self.client.get(SIZES + space)
            return max(0, int(got[0])) if got else 0
        except (*_etcd_errors(), ValueError) as exc:
            log.warning("etcd: cannot read the size of space %s (%s): it is repaired once a "
                        "guest uses it", space, _why(exc))
            return 0

    def record_size(self, space: str, size: int) -> None:
        if self.recorded_size(space) >= size:
            return
        try:
            self.client.put(SIZES + space, str(size))
        except _etcd_errors() as exc:
            log.warning("etcd: cannot record the size of space %s: %s", space, _why(exc))

    def identities(self, space: str) -> dict[str, tuple[str, int]] | None:
        prefix = f"{STORES}{space}/"
        ids: dict[str, tuple[str, int]] = {}
        try:
            for value, meta in self.client.get_prefix(prefix):
                node = meta["key"].decode()[len(prefix):]
                try:
                    doc = json.loads(value)
                    ids[node] = (str(doc["store"]), int(doc["generation"]))
                except (ValueError, KeyError, TypeError):
                    log.warning("etcd: ignoring malformed store record %s%s", prefix, node)
        except _etcd_errors() as exc:
            log.warning("etcd: cannot read where space %s was stored (%s): a node wiped while "
                        "no pager ran is not detected for it", space, _why(exc))
            return None
        return ids

    def record_identities(self, space: str, ids: dict[str, tuple[str, int]]) -> bool:
        try:
            for node, (store, generation) in sorted(ids.items()):
                self.client.put(f"{STORES}{space}/{node}",
                                json.dumps({"store": store, "generation": generation}))
        except _etcd_errors() as exc:
            log.warning("etcd: cannot record where space %s is stored (%s); trying again "
                        "later", space, _why(exc))
            return False
        return True

    def _refresh(self) -> None:
        nodes, boots = {}, {}
        for value, meta in self.client.get_prefix(NODES):
            name = meta["key"].decode()[len(NODES):]
            try:
                info = json.loads(value)
                nodes[name], boots[name] = info["endpoint"], info.get("boot", "")
            except (ValueError, KeyError, TypeError):
                log.warning("etcd: ignoring malformed registration of node %s", name)
        self.healthy = True
        if nodes != self._nodes or boots != self._boots:
            log.info("etcd: memory nodes now %s", ", ".join(sorted(nodes)) or "none")
            self._nodes, self._boots = nodes, boots
            for cb in self._callbacks:
                cb(dict(nodes))

    def _watch(self) -> None:
        while not self._stop.wait(self.poll):
            try:
                self._refresh()
            except _etcd_errors() as exc:
                if self.healthy:
                    log.warning("etcd at %s unreachable (%s): serving on the last known map "
                                "of %d nodes", self.source, _why(exc), len(self._nodes))
                self.healthy = False

    def close(self) -> None:
        self._stop.set()


def membership_from(*, etcd: str | None = None, cluster: str | None = None,
                    memnodes: list[str] | None = None) -> Membership:
    """The membership the command line names: ``--etcd``, ``--cluster`` or ``--memnode``s."""
    if sum(bool(x) for x in (etcd, cluster, memnodes)) != 1:
        raise ClusterError("name the memory nodes one way: --etcd URL, --cluster FILE or "
                           "--memnode HOST:PORT (repeatable)")
    if etcd:
        return EtcdMembership(etcd)
    if cluster:
        return StaticMembership(cluster)
    return StaticMembership(endpoints=memnodes)
