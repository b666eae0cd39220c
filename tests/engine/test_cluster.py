"""`ClusterSource`: three real memory nodes, R=2; a node killed with -9 mid-workload costs
latency, never bytes; a node restarted empty is refilled before it serves."""

from __future__ import annotations

import os
import threading
import time

import pytest
from clusterkit import nodes, wait_until

from pager.source.cluster import RTT_FIRST, ClusterSource
from pager.source.placement import EXTENT_SIZE, home, read_order, replicas
from transport.membership import StaticMembership
from transport.token import load_token

SPACE_BYTES = 16 * EXTENT_SIZE


@pytest.fixture
def sources():
    """sources(src) registers a source to close at teardown."""
    made = []
    yield made.append
    for src in made:
        src.close()


def cluster(ns, r=2):
    m = StaticMembership(endpoints=[n.endpoint for n in ns])
    src = ClusterSource(m, load_token(ns[0].token_file), "vm1", replicas=r, prefer="tcp")
    src.keep("vm1", SPACE_BYTES)
    return src


def read_all(lane, n=SPACE_BYTES):
    buf = bytearray(n)
    mask = lane.fetch_into(None, 0, memoryview(buf))
    return bytes(buf), mask


def on_node(src, node_id, gpa, n):
    with src.lanes.open_node_lane(node_id) as lane:
        buf = bytearray(n)
        mask = lane.fetch_into(gpa, buf)
        return bytes(buf), mask


def test_every_store_reaches_the_home_and_one_other_node(three, sources):
    """R=2 over 3 nodes: the space's home (its preferred node) holds every extent, and the
    second copy of each extent goes to one of the other two by rendezvous, both used."""
    ns = three
    src = cluster(ns)
    sources(src)
    data = os.urandom(SPACE_BYTES)
    with src.open_lane() as lane:
        lane.store_from(None, 0, data)
        got, mask = read_all(lane)
    assert mask == 0 and got == data
    ids = sorted(src.members)
    first = home("vm1", ids)
    seconds = set()
    for ext in range(SPACE_BYTES // EXTENT_SIZE):
        owners = replicas("vm1", ext, ids, 2)
        assert owners[0] == first and len(set(owners)) == 2
        seconds.add(owners[1])
        for node_id in ids:
            part, mask = on_node(src, node_id, ext * EXTENT_SIZE, EXTENT_SIZE)
            if node_id in owners:
                assert mask == 0 and part == data[ext * EXTENT_SIZE:(ext + 1) * EXTENT_SIZE]
            else:
                assert mask == (1 << EXTENT_SIZE // 4096) - 1  # never written there
    assert seconds == set(ids) - {first}


def test_node_killed_mid_workload_then_restarted_empty_is_refilled(three, sources):
    ns = three
    src = cluster(ns)
    sources(src)
    data = bytearray(os.urandom(SPACE_BYTES))
    with src.open_lane() as lane:
        lane.store_from(None, 0, data)
    # the space's home: it holds every extent and serves every read, so its loss fails
    # every fetch over to the copies spread over the other two
    victim = next(n for n in ns if n.endpoint == home("vm1", src.members))
    errors: list[BaseException] = []
    rounds = [0]
    killed = threading.Event()

    def reader() -> None:  # a workload: reads and checks every byte, over and over,
        try:               # until the cluster has noticed the loss, and twice more
            after = 0
            with src.open_lane() as lane:
                while after < 2:
                    got, mask = read_all(lane)
                    assert mask == 0 and got == data, "wrong bytes read"
                    rounds[0] += 1
                    if rounds[0] == 2:
                        victim.proc.kill()  # kill -9 mid-run
                        killed.set()
                    if victim.endpoint in src.down:
                        after += 1
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=reader)
    t.start()
    t.join(timeout=120)
    assert not t.is_alive(), "the workload hung"
    assert not errors, errors
    assert killed.is_set() and src.counters["node_failures"] >= 1
    # the two live nodes now hold every extent twice
    wait_until(lambda: src.under_replicated == 0 and not src.dirty.is_set(), 60,
               "re-replication onto the two live nodes")
    victim.proc.stop()
    victim.wipe_and_restart()
    vid = victim.endpoint
    wait_until(lambda: vid not in src.down and src.under_replicated == 0
               and not src.dirty.is_set(), 60, "the empty node to be refilled")
    assert src.counters["repairs"] > 0
    # what placement puts on the restarted node is there, byte for byte
    placed = [e for e in range(SPACE_BYTES // EXTENT_SIZE)
              if vid in replicas("vm1", e, sorted(src.live()), 2)]
    assert placed, "placement gives the restarted node no extent"
    for e in placed:
        assert vid in src.holders("vm1", e)
        part, mask = on_node(src, vid, e * EXTENT_SIZE, EXTENT_SIZE)
        assert mask == 0 and part == data[e * EXTENT_SIZE:(e + 1) * EXTENT_SIZE]
    with src.open_lane() as lane:
        got, mask = read_all(lane)
    assert mask == 0 and got == data


def test_repair_writes_and_counts_only_the_pages_written(three, sources):
    src = cluster(three)
    sources(src)
    page = os.urandom(4096)
    with src.open_lane() as lane:  # one page in each extent: the rest was never written
        for ext in range(SPACE_BYTES // EXTENT_SIZE):
            lane.store_from(None, ext * EXTENT_SIZE, page)
    victim = three[1]
    vid = victim.endpoint
    victim.proc.stop()
    victim.wipe_and_restart()
    wait_until(lambda: src.counters["repairs"] > 0 and vid not in src.down
               and src.under_replicated == 0 and not src.dirty.is_set(), 60,
               "the empty node to be refilled")
    assert src.counters["repair_bytes"] == src.counters["repairs"] * 4096
    for e in [e for e in range(SPACE_BYTES // EXTENT_SIZE) if vid in src.holders("vm1", e)]:
        part, mask = on_node(src, vid, e * EXTENT_SIZE, EXTENT_SIZE)
        assert mask == (1 << EXTENT_SIZE // 4096) - 2 and part[:4096] == page


def test_reads_prefer_the_lowest_round_trip(three, sources):
    ns = three
    src = cluster(ns)
    sources(src)
    src.repairer.stop()  # no pings: the round trips below stay as set
    src.forget_rtt()
    src.set_rtt({ns[0].endpoint: 3e-3, ns[1].endpoint: 1e-3, ns[2].endpoint: 2e-3})
    for ext in range(SPACE_BYTES // EXTENT_SIZE):
        held = src.holders("vm1", ext)
        assert len(held) == 2 and held == sorted(held, key=src.rtt.__getitem__)


def test_equally_near_replicas_are_read_from_as_few_nodes_as_placement_allows(three, sources):
    src = cluster(three)
    sources(src)
    src.repairer.stop()  # the round trips are ours: pings noted below
    src.forget_rtt()  # and only ours: the repairer may have pinged before it stopped
    ids = sorted(src.members)
    for n, rtt in zip(ids, (40e-6, 44e-6, 47e-6), strict=True):
        for _ in range(RTT_FIRST):
            src.note_rtt(n, rtt)
    assert len(src.rtt) == 3
    exts = range(SPACE_BYTES // EXTENT_SIZE)
    first = [src.holders("vm1", e)[0] for e in exts]
    # the space's preference order of the nodes (node ids are endpoints on ports the kernel
    # picked: placement and preference differ from run to run, the rule does not)
    top, second, _ = read_order("vm1", ids, {})
    # every extent the preferred node holds is read from it, all the others from one node
    assert first == [top if top in src.holders("vm1", e) else second for e in exts]
    # pings that swing within the tolerance change no read and rebuild no C table
    soft = src.route_soft
    for n, rtt in zip(ids, (46e-6, 39e-6, 42e-6), strict=True):
        src.note_rtt(n, rtt)
    assert [src.holders("vm1", e)[0] for e in exts] == first and src.route_soft == soft
    # a node really farther (its last 8 pings) is read from no more: every extent has a nearer
    # holder
    for _ in range(8):
        src.note_rtt(top, 900e-6)
    assert src.route_soft > soft
    assert all(src.holders("vm1", e)[0] != top for e in exts)


def test_a_node_down_from_the_start_costs_nothing(tmp_path):
    ns = nodes(tmp_path, 2)
    m = StaticMembership(endpoints=[ns[0].endpoint, ns[1].endpoint, "127.0.0.1:1"])
    src = ClusterSource(m, load_token(ns[0].token_file), "vm1", replicas=2, prefer="tcp")
    try:
        data = os.urandom(8 * EXTENT_SIZE)
        with src.open_lane() as lane:
            lane.store_from(None, 0, data)  # every extent reaches the two live nodes
            got, mask = read_all(lane, len(data))
        assert mask == 0 and got == data
        assert "127.0.0.1:1" in src.down
        for node_id in (ns[0].endpoint, ns[1].endpoint):
            part, mask = on_node(src, node_id, 0, len(data))
            assert mask == 0 and part == data
    finally:
        src.close()
        for n in ns:
            n.proc.stop()


def test_under_replicated_gauge_falls_while_repair_copies(three, sources):
    """After a node is lost, the gauge starts at the number of extents short of R and only
    falls as repair (rate-limited here: 8 MiB/s, ~0.5 s per extent pair) copies them."""
    ns = three
    m = StaticMembership(endpoints=[n.endpoint for n in ns])
    src = ClusterSource(m, load_token(ns[0].token_file), "vm1", replicas=2, prefer="tcp",
                        repair_rate=8 << 20)
    sources(src)
    src.keep("vm1", SPACE_BYTES)
    with src.open_lane() as lane:
        lane.store_from(None, 0, os.urandom(SPACE_BYTES))
    victim = ns[2]
    lost = [e for e in range(SPACE_BYTES // EXTENT_SIZE)
            if victim.endpoint in replicas("vm1", e, sorted(src.members), 2)]
    assert len(lost) >= 3, "placement gives the victim too few extents to watch"
    samples: list[int] = []
    victim.proc.kill()
    with src.open_lane() as lane:  # a read of every extent: the cluster sees the loss
        assert read_all(lane)[1] == 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        samples.append(src.under_replicated)
        if samples[-1] == 0 and src.counters["repairs"] >= len(lost):
            break
        time.sleep(0.01)
    seen = [n for n in samples if n]
    assert seen, "repair was never seen under way"
    assert max(seen) == len(lost), (max(seen), len(lost))
    # from its first value on, the gauge never rises (it counted up, extent by extent, before)
    first = samples.index(seen[0])
    assert all(b <= a for a, b in zip(samples[first:], samples[first + 1:], strict=False)), seen
    assert samples[-1] == 0 and src.counters["repairs"] >= len(lost)


def test_a_space_first_read_after_nodes_failed_and_returned_is_served(three, sources):
    """Two nodes fail and come back (on their own stores) during a pager's life; a space it
    had not used before then is read: its nodes' copies are current, since this pager wrote
    none of it meanwhile (it used to find no holder for the extents both of whose nodes had
    failed once: "no live replica holds extent", then SIGBUS)."""
    ns = three
    m = StaticMembership(endpoints=[n.endpoint for n in ns])
    token = load_token(ns[0].token_file)
    writer = ClusterSource(m, token, "other", replicas=2, prefer="tcp")
    sources(writer)
    data = os.urandom(SPACE_BYTES)
    with writer.open_lane() as lane:
        lane.store_from(None, 0, data)
    writer.close()
    src = ClusterSource(StaticMembership(endpoints=[n.endpoint for n in ns]), token, "vm1",
                        replicas=2, prefer="tcp", probe_interval=0.05)
    sources(src)
    src.keep("vm1", SPACE_BYTES)
    for victim in ns[:2]:
        victim.proc.kill()
        with src.open_lane() as lane:  # its own space, on every node: it sees the failure
            lane.store_from(None, 0, os.urandom(SPACE_BYTES))
        assert victim.endpoint in src.down
        victim.proc.stop()
        victim.start(victim.endpoint)
        wait_until(lambda v=victim: v.endpoint not in src.down, 30, "the node to be back")
    with src.open_lane() as lane:
        buf = bytearray(SPACE_BYTES)
        mask = lane.fetch_into("other", 0, memoryview(buf))
    assert mask == 0 and bytes(buf) == data


def test_a_node_that_refuses_the_token_is_not_probed_on_every_round(three, sources):
    """A node restarted with another cluster's token: failed, and asked again every
    ``REFUSED_RETRY`` seconds, not on every probe (4 a second per pager, forever)."""
    from pager.source.repair import REFUSED_RETRY

    ns = three
    src = ClusterSource(StaticMembership(endpoints=[n.endpoint for n in ns]),
                        load_token(ns[0].token_file), "vm1", replicas=2, prefer="tcp",
                        probe_interval=0.05)
    sources(src)
    bad = ns[2]
    bad.proc.stop()
    bad.token_file.write_bytes(b"another-cluster-token-0123456789abcdef")
    bad.start(bad.endpoint)
    wait_until(lambda: bad.endpoint in src.down, 30, "the node refusing the token to fail")
    time.sleep(2.0)  # 40 probe rounds
    refusals = (bad.tmp / "memnode.log").read_text().count("authentication failed")
    assert 1 <= refusals <= 2 + int(2.0 // REFUSED_RETRY), refusals
