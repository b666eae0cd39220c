"""Placement of an address space on memory nodes: fixed-size extents, each on ``R`` nodes
(`replicas`); and the order an extent's holders are read in (`read_order`).

Two schemes. ``home`` (every space placed from now on): the space's home node, the node it
prefers (rendezvous hashing of ``(node, space)``: `affinity`), holds every extent, and the
other ``R - 1`` copies of an extent go to the nodes that rank highest among the rest by
rendezvous hashing of ``(node, space, extent)``. ``rendezvous`` (spaces recorded before homes,
their record carries no scheme): all ``R`` copies by that per-extent ranking. Both move
little when a node joins or leaves: a home changes only for the spaces whose home left or
whose preference the newcomer tops, and every other extent copy keeps its node unless the
per-extent ranking changed.

Why a home: a guest's faults then all go to one node (with R=2 over 3 nodes under
``rendezvous``, two thirds went to one node and the rest to a second), so one fault lane per
guest sees its faults close together and answers from its polling window, and no second
node's lane polls beside it for the occasional fault (on two CPUs, that polling slowed the
lane that serves: `bench cluster` R=2 / one node fault p50 1.02-1.15 against 0.93-1.05 with
homes, alternated runs). Different spaces have different homes, so several guests still
spread over the cluster; a home that fails hands the reads to the copies spread over the
others until repair makes the next node in the space's preference its home.

Reads: from the holder with the lowest round trip, but holders whose round trips are within
`NEAR_REL` + `NEAR_ABS` of the best count as equally near, and among those the space's
preference (`affinity`) decides: the home first.
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


@functools.lru_cache(maxsize=1 << 12)
def affinity(node_id: str, space: str) -> int:
    """How much ``space``'s reads prefer ``node_id`` among equally near holders (higher
    first): fixed for a space, different from one space to the next."""
    key = f"read\0{node_id}\0{space}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")


HOME = "home"
RENDEZVOUS = "rendezvous"
SCHEMES = (HOME, RENDEZVOUS)


def unknown_scheme(space: str, scheme: str, where: str) -> str | None:
    """Why ``space`` cannot be read when its placement ``scheme`` (recorded in ``where``) is
    not one of `SCHEMES`; None when it is."""
    if scheme in SCHEMES:
        return None
    return (f"space {space!r} was placed by scheme {scheme!r} (recorded in {where}), which "
            f"this version of ssi-pager does not know: use the version that wrote it")


def home(space: str, nodes: Iterable[str]) -> str:
    """The node of ``nodes`` that holds every extent of ``space`` under `HOME`."""
    return max(nodes, key=lambda n: (affinity(n, space), n))


def replicas(space: str, extent: int, nodes: Iterable[str], r: int,
             scheme: str = HOME) -> list[str]:
    """The ``r`` nodes holding ``extent`` of ``space`` (fewer if there are fewer nodes), the
    home first under `HOME`."""
    nodes = list(nodes)
    if scheme == RENDEZVOUS or not nodes or r < 1:
        return rank(space, extent, nodes)[:r]
    first = home(space, nodes)
    return [first, *rank(space, extent, [n for n in nodes if n != first])[:r - 1]]


@functools.lru_cache(maxsize=1 << 16)
def placed(space: str, extent: int, nodes: frozenset[str], r: int,
           scheme: str = HOME) -> tuple[str, ...]:
    """`replicas` for a fixed node set, cached: the fault path asks it for every fetch."""
    return tuple(replicas(space, extent, nodes, r, scheme))


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
