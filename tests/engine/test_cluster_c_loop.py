"""A cluster-backed pager serves its faults in the C fault loop (engine in-process, so its
counters can be read): each extent from the replica with the lowest round trip, and a kill -9
of that replica mid-workload loses nothing (the fault goes back to Python, which fails over,
and C goes on from the surviving replica); a replica whose store fails a page's check is
lost for that extent only, the fault served right from the other."""

from __future__ import annotations

import os

from clusterkit import flip_byte, wait_until
from enginekit import wait_or_fail

from pager.core.region import Region
from pager.engine import FaultEngine
from pager.source import CRoutes
from pager.source.cluster import ClusterSource
from pager.source.placement import EXTENT_SIZE
from pager.tools.workload import Client, DataSet, Touch
from transport.membership import StaticMembership
from transport.token import load_token

MIB = 1 << 20
PAGE = 4096
SIZE = 32 * MIB


def cluster(ns) -> ClusterSource:
    m = StaticMembership(endpoints=[n.endpoint for n in ns])
    src = ClusterSource(m, load_token(ns[0].token_file), "default", replicas=2, prefer="tcp")
    src.keep("default", SIZE)
    return src


def seed(src: ClusterSource, data: DataSet) -> None:
    with src.open_lane() as lane:
        for off, buf in data.chunks():
            lane.store_from(None, off, buf)


def serve(engine: FaultEngine, c: Client):
    return engine.add_client(os.dup(c.uffd.fileno()), [Region(c.base, c.size, c.offset)])


def installed(engine: FaultEngine, nbytes: int):
    """The engine's counters once they account for ``nbytes`` put into clients (C folds its
    counters in when it returns)."""
    wait_until(lambda: (st := engine.stats()).copied_bytes + st.zero_pages * PAGE >= nbytes,
               60, f"counters to cover {nbytes} bytes")
    return engine.stats()


def test_cluster_faults_are_served_in_c_and_a_kill_of_the_read_replica_loses_nothing(three):
    data = DataSet(SIZE)
    src = cluster(three)
    engine = None
    clients: list[Client] = []
    try:
        seed(src, data)
        # fixed round trips (no probe changes them): every extent is read from its replica
        # with the lowest one, n0 wherever it holds one
        src.repairer.stop()
        src.set_rtt({three[0].endpoint: 1e-3, three[1].endpoint: 2e-3,
                     three[2].endpoint: 3e-3})
        victim = three[0]
        read_from = {src.holders("default", e)[0] for e in range(SIZE // EXTENT_SIZE)}
        assert victim.endpoint in read_from
        engine = FaultEngine(src, chunk_size=64 * 1024, readahead=0, c_loop=True)

        # 1. every fault of a first client: C serves them, from the cluster
        c = Client(SIZE)
        clients.append(c)
        serve(engine, c)
        wait_or_fail(c.touch(threads=2, order="rand"), 120)
        assert c.check(data) == []
        st = installed(engine, data.size)
        assert st.c_faults >= st.faults // 2, st.as_dict()  # C served most of them
        assert st.failed_faults == 0 and src.counters["node_failures"] == 0

        # 2. a second client: its first half, then the replica C reads from is killed -9
        # (C's connection to it still open), then its second half
        c2 = Client(SIZE)
        clients.append(c2)
        serve(engine, c2)
        half = SIZE // 2
        wait_or_fail(Touch(c2.base, half, threads=2, order="rand").start(), 120)
        c_before = installed(engine, data.size + half).c_faults
        victim.proc.kill()
        t = Touch(c2.base + half, half, origin=half, threads=2, order="rand").start()
        wait_or_fail(t, 120)  # no SIGBUS, no hang
        assert t.mismatches == 0 and c2.check(data) == []
        st = installed(engine, 2 * data.size)
        assert victim.endpoint in src.down and src.counters["node_failures"] == 1
        assert st.fetch_errors >= 1, st.as_dict()  # C's fetch on the dead node failed
        assert src.counters["failovers"] >= 1  # ... and was retried on a replica, counted
        assert st.c_faults > c_before, st.as_dict()
        assert st.failed_faults == 0

        # 3. C serves again, from the surviving replicas (its table rebuilt without n0)
        before = st.c_faults
        c3 = Client(SIZE)
        clients.append(c3)
        serve(engine, c3)
        wait_or_fail(c3.touch(threads=2, order="rand"), 120)
        assert c3.check(data) == []
        st = installed(engine, 3 * data.size)
        assert st.c_faults - before >= (SIZE // (64 * 1024)) // 2, st.as_dict()
        assert st.failed_faults == 0
    finally:
        for cl in clients:
            cl.close(unmap=True)
        if engine is not None:
            engine.close()
        src.close()


def test_a_corrupt_replica_read_from_c_is_served_from_the_other(three):
    size = 4 * EXTENT_SIZE
    data = os.urandom(size)
    src = cluster(three)
    with src.open_lane() as lane:
        lane.store_from(None, 0, data)
    first = src.holders("default", 0)[0]
    src.close()
    bad = next(n for n in three if n.endpoint == first)
    bad.proc.stop()
    flip_byte(bad.store / "default.pages")  # page 0 of extent 0
    bad.start(bad.endpoint)
    src = cluster(three)
    src.repairer.stop()  # no probe reorders the replicas: extent 0 is read from ``bad``
    src.set_rtt({n: 0.0 if n == first else 1.0 for n in src.members})
    engine = FaultEngine(src, chunk_size=64 * 1024, readahead=0, c_loop=True)
    c = Client(size)
    try:
        serve(engine, c)
        wait_or_fail(c.touch(threads=2, order="rand"), 120)
        assert c.mem[:] == data
        st = installed(engine, size)
        assert st.c_faults >= st.faults // 2, st.as_dict()
        assert src.counters["lost_replicas"] == 1 and src.counters["node_failures"] == 0
        assert first not in src.holders("default", 0) and first not in src.down
    finally:
        c.close(unmap=True)
        engine.close()
        src.close()


def test_c_route_names_each_extents_nearest_holder_and_a_lost_node_bumps_it(three):
    src = cluster(three)
    try:
        src.repairer.stop()
        src.set_rtt({three[0].endpoint: 1e-3, three[1].endpoint: 2e-3,
                     three[2].endpoint: 3e-3})
        with src.open_lane() as lane:
            gen = lane.c_generation()
            seen = gen[0]
            routes = CRoutes()
            table = lane.c_route(None, 0, SIZE, routes)
            assert len(table) == SIZE // EXTENT_SIZE
            node_of_fd = {ln.c_endpoint()[0]: node for (node, _), ln in lane.lanes.items()}
            for ext, k in enumerate(table):
                assert node_of_fd[routes.endpoints[k][0]] == src.holders("default", ext)[0]
            assert {node_of_fd[fd] for fd, _, _ in routes.endpoints} == {
                src.holders("default", e)[0] for e in range(len(table))}
            src.node_failed(three[0].endpoint, RuntimeError("test: n0 lost"))
            assert gen[0] != seen  # C hands its faults to Python from now on
            routes = CRoutes()
            table = lane.c_route(None, 0, SIZE, routes)
            assert all(k >= 0 for k in table)  # R=2: every extent has another holder
            assert three[0].endpoint not in {node_of_fd.get(fd) for fd, _, _ in
                                             routes.endpoints}
    finally:
        src.close()
