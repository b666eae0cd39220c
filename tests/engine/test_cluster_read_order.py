"""Which replica a fault reads from (`pager.source.placement.read_order`): the lowest round
trip when round trips really differ; among holders about as near as the best, one fixed
preference per space, whose first node is the space's home (it holds every extent), so a
space's faults go to one node."""

from __future__ import annotations

from collections import Counter

from pager.source.placement import (
    HOME,
    NEAR_ABS,
    NEAR_REL,
    RENDEZVOUS,
    affinity,
    home,
    near_groups,
    nearness,
    read_order,
    replicas,
)

NODES = ["a", "b", "c"]


def preferred(space: str, nodes: list[str]) -> list[str]:
    return sorted(nodes, key=lambda n: -affinity(n, space))


def first_reads(space: str, rtt: dict[str, float], extents: int = 300,
                scheme: str = HOME) -> Counter:
    """Per node, how many of ``extents`` extents (R=2 over NODES) a fault reads from it."""
    return Counter(read_order(space, replicas(space, e, NODES, 2, scheme), rtt)[0]
                   for e in range(extents))


def test_round_trips_that_really_differ_decide():
    rtt = {"a": 300e-6, "b": 100e-6, "c": 200e-6}
    for holders in (["a", "b"], ["b", "c"], ["a", "c"], NODES):
        got = read_order("vm1", holders, rtt)
        assert got == sorted(holders, key=rtt.__getitem__)
    assert near_groups(rtt, NODES) == {"b": 0, "c": 1, "a": 2}


def test_equally_near_holders_are_read_in_the_space_preference():
    # loopback-like round trips a few µs apart: one group, the space's order decides
    rtt = {"a": 41e-6, "b": 44e-6, "c": 47e-6}
    assert set(near_groups(rtt, NODES).values()) == {0}
    for space in ("vm1", "vm2", "web"):
        order = preferred(space, NODES)
        for holders in (["a", "b"], ["b", "c"], ["a", "c"]):
            assert read_order(space, holders, rtt) == [n for n in order if n in holders]
        # which node is measured nearest within the group does not matter
        flipped = {"a": 47e-6, "b": 44e-6, "c": 41e-6}
        for holders in (["a", "b"], ["b", "c"], ["a", "c"]):
            assert read_order(space, holders, flipped) == read_order(space, holders, rtt)


def test_a_space_reads_from_its_home_alone():
    rtt = {"a": 50e-6, "b": 52e-6, "c": 55e-6}
    for space in ("vm1", "vm2", "web"):
        top = preferred(space, NODES)[0]
        assert home(space, NODES) == top
        assert first_reads(space, rtt) == Counter({top: 300})
    # the home farther than the noise: the nearer holder of each extent is read
    far = {**rtt, home("vm1", NODES): 500e-6}
    reads = first_reads("vm1", far)
    assert reads[home("vm1", NODES)] == 0 and sum(reads.values()) == 300


def test_a_space_placed_before_homes_reads_from_as_few_nodes_as_it_allows():
    rtt = {"a": 50e-6, "b": 52e-6, "c": 55e-6}
    reads = first_reads("vm1", rtt, scheme=RENDEZVOUS)
    top, second, third = preferred("vm1", NODES)
    # every extent its first choice holds (about 2/3 with R=2 over 3) is read from it, the
    # rest from the second; the third is read from only where it would be nearer
    assert reads[third] == 0
    assert reads[top] == sum(top in replicas("vm1", e, NODES, 2, RENDEZVOUS)
                             for e in range(300))
    assert reads[top] + reads[second] == 300 and reads[top] > reads[second]


def test_a_home_left_moves_only_its_spaces_first_copies():
    """A node leaving moves the home of only the spaces it was home of; every other space
    keeps its home, and each extent keeps every copy not on the leaver."""
    four = ["a", "b", "c", "d"]
    for i in range(40):
        space = f"vm{i}"
        gone = "d"
        was, now = home(space, four), home(space, NODES)
        assert now == was or was == gone
        for e in range(50):
            before = replicas(space, e, four, 2)
            after = replicas(space, e, NODES, 2)
            if gone not in before and was != gone:
                assert after == before


def test_different_spaces_prefer_different_nodes():
    firsts = {preferred(f"vm{i}", NODES)[0] for i in range(30)}
    assert firsts == set(NODES)


def test_tolerance_bounds_and_unmeasured_nodes():
    best = 100e-6
    edge = best * (1 + NEAR_REL) + NEAR_ABS
    assert near_groups({"a": best, "b": edge * 0.99}, ["a", "b"]) == {"a": 0, "b": 0}
    assert near_groups({"a": best, "b": edge * 1.01}, ["a", "b"]) == {"a": 0, "b": 1}
    # a node not measured yet is as near as the best: the preference orders it
    rtt = {"a": 1e-3}
    assert read_order("vm1", ["a", "b"], rtt) == preferred("vm1", ["a", "b"])
    assert read_order("vm1", ["a", "b"], {}) == preferred("vm1", ["a", "b"])


def test_nearness_moves_only_when_an_order_can_change():
    rtt = {"a": 50e-6, "b": 52e-6, "c": 55e-6}
    before = nearness(rtt)
    assert nearness({**rtt, "b": 49e-6}) == before  # noise inside the group
    assert nearness({**rtt, "c": 500e-6}) != before  # c is really farther now
