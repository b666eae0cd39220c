"""A replica whose store cannot serve an extent (a damaged page file; a flipped byte once the
node checks page checksums) is lost for that extent only: the fetch is served by the other
replica, right, and repair copies the extent back onto a node that can store it."""

from __future__ import annotations

import os

import pytest
from clusterkit import flip_byte, wait_until

from pager.source.cluster import ClusterSource
from pager.source.placement import EXTENT_SIZE, replicas
from transport.errors import CorruptPageError
from transport.membership import StaticMembership
from transport.token import load_token

SPACE = "vm1"
SPACE_BYTES = 4 * EXTENT_SIZE


def cluster(ns):
    m = StaticMembership(endpoints=[n.endpoint for n in ns])
    src = ClusterSource(m, load_token(ns[0].token_file), SPACE, replicas=2, prefer="tcp")
    src.keep(SPACE, SPACE_BYTES)
    return src


def pattern() -> bytes:
    return b"".join(i.to_bytes(4, "little") * 1024 for i in range(SPACE_BYTES >> 12))


def write_all(ns) -> tuple[str, str]:
    """Store the pattern with R=2; the two nodes holding extent 0 (ids are endpoints)."""
    src = cluster(ns)
    try:
        lane = src.open_lane()
        lane.store_from(None, 0, pattern())
        lane.reset()
        holders = src.holders(SPACE, 0)
    finally:
        src.close()
    assert len(holders) == 2
    return holders[0], holders[1]


def node_of(ns, endpoint):
    return next(n for n in ns if n.endpoint == endpoint)


def read_all(src) -> bytes:
    lane = src.open_lane()
    try:
        buf = bytearray(SPACE_BYTES)
        assert lane.fetch_into(None, 0, memoryview(buf)) == 0
        return bytes(buf)
    finally:
        lane.reset()


def damaged(three, damage) -> tuple[str, str, ClusterSource]:
    """Write the pattern with R=2, ``damage(page file)`` on extent 0's first holder while it
    is stopped, restart it; (damaged node, other holder, a fresh cluster source reading from
    the damaged node first)."""
    first, second = write_all(three)
    bad = node_of(three, first)
    bad.proc.stop()
    damage(bad.store / f"{SPACE}.pages")
    bad.start(bad.endpoint)
    src = cluster(three)
    # read from the damaged replica first
    src.set_rtt({n: 0.0 if n == first else 1.0 for n in src.members})
    return first, second, src


def test_a_damaged_page_file_fails_over_to_the_other_replica(three):
    # the bitmap says more was written than the file holds: the node cannot open the space
    first, _, src = damaged(three, lambda p: os.truncate(p, EXTENT_SIZE // 2))
    try:
        assert read_all(src) == pattern()
        assert src.counters["lost_replicas"] >= 1
        assert first not in src.holders(SPACE, 0)
    finally:
        src.close()


def test_a_flipped_byte_is_served_from_the_other_replica_and_repaired(three):
    first, second, src = damaged(three, flip_byte)
    try:
        with src.lanes.open_node_lane(first) as lane:  # the node checks every page it serves
            buf = bytearray(EXTENT_SIZE)
            with pytest.raises(CorruptPageError):
                lane.fetch_into(0, buf)
        assert read_all(src) == pattern()
        assert src.counters["lost_replicas"] >= 1
        wait_until(lambda: first in src.holders(SPACE, 0), 30,
                   "the corrupt extent to be repaired onto its node")
        with src.lanes.open_node_lane(first) as lane:
            buf = bytearray(EXTENT_SIZE)
            assert lane.fetch_into(0, buf) == 0
            assert bytes(buf) == pattern()[:EXTENT_SIZE]
        assert sorted(replicas(SPACE, 0, frozenset(src.members), 2)) == sorted([first, second])
    finally:
        src.close()
