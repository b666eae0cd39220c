"""Placement of an address space on memory nodes: fixed-size extents, each on the ``R``
nodes that rank highest by rendezvous hashing of ``(node, space, extent)``; and the order an
extent's holders are read in (`read_order`).

Rendezvous hashing moves only the extents of a node that joins or leaves: every other
extent keeps its replicas, so losing one of N nodes re-replicates about R/N of the space.

Reads: from the holder with the lowest round trip, but holders whose round trips are within
`NEAR_REL` + `NEAR_ABS` of the best count as equally near, and among those each space has a
fixed preference order (rendezvous hashing of ``(node, space)``). A space's faults so go to
as few nodes as its placement allows (with R=2 over 3 nodes: two thirds to one node, the rest
to a second), and those nodes keep answering at once (their fault lanes poll while busy)
instead of every node seeing an occasional fault and sleeping between them; different spaces
prefer different nodes, so several guests still spread over the cluster.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Mapping
from itertools import combinations

from pager.errors import ConfigError

EXTENT_SHIFT = 21  # 2 MiB extents: one huge page, a few hundred pages per placement decision
EXTENT_SIZE = 1 << EXTENT_SHIFT
# holders whose round trips are within this of the best one's are read by preference, not by
# round trip: 20% plus 10 µs (measurement noise, and a gap no fault would notice)
NEAR_REL = 0.2
NEAR_ABS = 10e-6


def extent_of(gpa: int) -> int:
    return gpa >> EXTENT_SHIFT


def score(node_id: str, space: str, extent: int) -> int:
    key = f"{node_id}\0{space}\0{extent}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")


def rank(space: str, extent: int, nodes: Iterable[str]) -> list[str]:
    """Every node in ``nodes``, best first, for ``extent`` of ``space``."""
    return sorted(nodes, key=lambda n: (score(n, space, extent), n), reverse=True)


def replicas(space: str, extent: int, nodes: Iterable[str], r: int) -> list[str]:
    """The ``r`` nodes holding ``extent`` of ``space`` (fewer if there are fewer nodes)."""
    return rank(space, extent, nodes)[:r]


@functools.lru_cache(maxsize=1 << 16)
def placed(space: str, extent: int, nodes: frozenset[str], r: int) -> tuple[str, ...]:
    """`replicas` for a fixed node set, cached: the fault path asks it for every fetch."""
    return tuple(replicas(space, extent, nodes, r))


@functools.lru_cache(maxsize=1 << 12)
def affinity(node_id: str, space: str) -> int:
    """How much ``space``'s reads prefer ``node_id`` among equally near holders (higher
    first): fixed for a space, different from one space to the next."""
    key = f"read\0{node_id}\0{space}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")


def near_groups(rtt: Mapping[str, float], nodes: Iterable[str]) -> dict[str, int]:
    """Each of ``nodes``'s group of round trips, 0 the nearest: sorted by round trip, a node
    joins the group of the one before it when within `NEAR_REL` + `NEAR_ABS` of that group's
    best, else opens the next. Nodes with no round trip measured yet are in group 0."""
    nodes = list(nodes)
    groups = {n: 0 for n in nodes if n not in rtt}
    group, best = 0, None
    for t, n in sorted((rtt[n], n) for n in nodes if n in rtt):
        if best is None:
            best = t
        elif t > best * (1 + NEAR_REL) + NEAR_ABS:
            group, best = group + 1, t
        groups[n] = group
    return groups


def read_order(space: str, holders: Iterable[str], rtt: Mapping[str, float]) -> list[str]:
    """``holders`` of an extent of ``space`` in the order a fetch tries them: nearest round
    trip first, equally near ones (`near_groups`) in ``space``'s fixed preference order."""
    nodes = list(holders)
    known = [rtt[n] for n in nodes if n in rtt]
    if not known or max(known) <= min(known) * (1 + NEAR_REL) + NEAR_ABS:
        # one group (the usual case, on every fetch): the preference alone
        return sorted(nodes, key=lambda n: (-affinity(n, space), n))
    group = near_groups(rtt, nodes)
    return sorted(nodes, key=lambda n: (group[n], -affinity(n, space), n))


@functools.lru_cache(maxsize=1 << 12)
def read_order_of(space: str, holders: tuple[str, ...], rtts: tuple[float | None, ...]
                  ) -> tuple[str, ...]:
    """`read_order` cached, for the fault path: ``rtts`` are the ``holders``' round trips
    (None: not measured yet)."""
    rtt = {n: t for n, t in zip(holders, rtts, strict=True) if t is not None}
    return tuple(read_order(space, holders, rtt))


def nearness(rtt: Mapping[str, float]) -> list[dict[str, int]]:
    """What `read_order` depends on in ``rtt``: the near groups of all its nodes and of every
    pair (an extent's holders with R=2). Round trips that leave it alone reorder no read."""
    nodes = sorted(rtt)
    return [near_groups(rtt, nodes), *(near_groups(rtt, p) for p in combinations(nodes, 2))]


def default_replicas(n_nodes: int) -> int:
    """2 with at least two nodes, else 1."""
    return 2 if n_nodes >= 2 else 1


def check_replicas(r: int | None, n_nodes: int) -> int:
    """``--replicas`` checked against the node count (None: the default)."""
    if r is None:
        return default_replicas(n_nodes)
    if r < 1:
        raise ConfigError(f"--replicas {r}: give at least 1")
    if r > n_nodes:
        raise ConfigError(f"--replicas {r} needs at least {r} memory nodes; the cluster has "
                          f"{n_nodes}: lower --replicas or add nodes")
    return r
