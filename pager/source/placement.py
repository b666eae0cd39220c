"""Placement of an address space on memory nodes: fixed-size extents, each on the ``R``
nodes that rank highest by rendezvous hashing of ``(node, space, extent)``.

Rendezvous hashing moves only the extents of a node that joins or leaves: every other
extent keeps its replicas, so losing one of N nodes re-replicates about R/N of the space.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable

from pager.errors import ConfigError

EXTENT_SHIFT = 21  # 2 MiB extents: one huge page, a few hundred pages per placement decision
EXTENT_SIZE = 1 << EXTENT_SHIFT


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
