"""Memory nodes registered in a real etcd (the test's own server); a real pager process
(`serve --etcd URL --replicas 2`) serving a client's faults while a node is killed with -9
and while etcd is stopped."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from clusterkit import wait_until
from enginekit import ROOT, wait_or_fail

from pager.source import MemnodeSource
from pager.source.cluster import ClusterSource
from pager.source.placement import home
from pager.tools.workload import Client, DataSet
from transport.membership import EtcdMembership, read_placement
from transport.token import load_token
from transport.wire import IDENTITIES

MIB = 1 << 20


@pytest.fixture
def three(three_etcd):
    return three_etcd


def seed(etcd, ns, data: DataSet, space: str = "default") -> None:
    src = ClusterSource(EtcdMembership(etcd.url), load_token(ns[0].token_file), space,
                        replicas=2, prefer="tcp")
    try:
        with src.open_lane() as lane:
            for off, buf in data.chunks():
                lane.store_from(None, off, buf)
    finally:
        src.close()


def test_nodes_register_under_leases_and_leave(etcd, three):
    # status shows etcd's view even with no pager running
    r = subprocess.run([sys.executable, "-m", "pager.cli", "status", "--etcd", etcd.url,
                        "--pager", "127.0.0.1:1", "--interval", "0"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "pager 127.0.0.1:1: not reachable" in r.stdout
    assert f"3 nodes registered (n0={three[0].endpoint}, n1=" in r.stdout
    m = EtcdMembership(etcd.url, poll=0.1)
    try:
        assert sorted(m.nodes()) == ["n0", "n1", "n2"]
        assert m.nodes()["n1"] == three[1].endpoint
        three[1].proc.stop()  # a clean stop revokes its lease: it leaves at once
        wait_until(lambda: sorted(m.nodes()) == ["n0", "n2"], 20, "n1 to leave")
        three[2].proc.kill()  # kill -9: its lease expires
        wait_until(lambda: sorted(m.nodes()) == ["n0"], 30, "n2's lease to expire")
    finally:
        m.close()


def test_pager_survives_kill_9_and_etcd_outage(etcd, three, run_pager):
    data = DataSet(32 * MIB)
    # n1, the node killed below, is the space's home: every read fails over
    assert home("sp", ["n0", "n1", "n2"]) == "n1"
    seed(etcd, three, data, "sp")
    pager, sock = run_pager("--etcd", etcd.url, "--space", "sp", "--replicas", "2",
                            "--token-file", str(three[0].token_file), "--readahead", "0",
                            "--metrics", "127.0.0.1:0")
    metrics = pager.wait_for(r"metrics: http://(\S+)/metrics")
    c = Client(32 * MIB)
    c.handoff(sock)
    t = c.touch(op="read", order="rand", threads=2)
    wait_until(lambda: t.done > t.naccess // 4 or t.wait(0), 60, "a quarter of the workload")
    three[1].proc.kill()  # kill -9 mid-run
    wait_or_fail(t, 120)
    assert c.check(data) == []  # every byte right, and the toucher got no SIGBUS
    pager.wait_for(r"memory node n1 (failed|left the cluster)")
    c.close()
    # status shows the cluster: n1 gone from the live set, extents re-replicated, etcd's view
    def status():
        r = subprocess.run([sys.executable, "-m", "pager.cli", "status", "--json", "--pager",
                            metrics, "--interval", "0", "--etcd", etcd.url], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    wait_until(lambda: (st := status())["pager"]["cluster"]["under_replicated"] == 0
               and st["pager"]["cluster"]["repairs"] > 0, 60, "re-replication in status")
    st = status()
    cl = st["pager"]["cluster"]
    assert cl["membership"] == etcd.url and cl["replicas"] == 2
    # n1 is away: the space's home is the node it prefers among the live ones
    assert cl["placement"] == "home" and cl["home"] == home("sp", ["n0", "n2"])
    assert isinstance(cl["epoch"], int) and cl["epoch"] >= 1
    assert {n["tier"] for n in cl["nodes"] if n["state"] == "live"} <= {
        "HighPerformance", "MediumPerformance", "Standard", "Basic"}  # each node's, measured
    states = {n["node"]: n["state"] for n in cl["nodes"]}
    assert states["n0"] == states["n2"] == "live" and states["n1"] != "live"
    assert sum(n["extents"] for n in cl["nodes"] if n["state"] == "live") == 2 * 16
    assert list(st["etcd"]["owners"]) == ["sp"]
    text = subprocess.run([sys.executable, "-m", "pager.cli", "status", "--pager", metrics,
                           "--interval", "0", "--etcd", etcd.url], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert text.returncode == 0, text.stderr
    assert f"R=2, placement home ({cl['home']})" in text.stdout, text.stdout
    rows = {ln.split()[0]: ln.split() for ln in text.stdout.splitlines()
            if ln.startswith("  ") and ln.split()}
    assert rows["NODE"][:5] == ["NODE", "ENDPOINT", "TRANSPORT", "TIER", "STATE"], rows
    tiers = {n["node"]: n["tier"] for n in cl["nodes"]}
    assert rows["n0"][3] == tiers["n0"] and rows["n0"][4] == "live", rows
    wait_until(lambda: sorted(status()["etcd"]["nodes"]) == ["n0", "n2"], 30,
               "n1's lease to expire")
    # n1 comes back empty (a new boot id): the pager refills it before it serves
    repairs = st["pager"]["cluster"]["repairs"]
    three[1].wipe_and_restart()
    wait_until(lambda: (s := status()["pager"]["cluster"])["repairs"] > repairs
               and s["under_replicated"] == 0
               and {n["node"]: n["state"] for n in s["nodes"]}["n1"] == "live"
               and {n["node"]: n["extents"] for n in s["nodes"]}["n1"] > 0, 60,
               "n1 to be refilled")
    held = {n["node"]: n["extents"] for n in status()["pager"]["cluster"]["nodes"]}
    assert held["n1"] > 0 and sum(held.values()) >= 2 * 16  # old copies stay: >= R each
    token = load_token(three[1].token_file)
    # this process seeded n1's old store: it forgets that identity, since n1 was wiped on
    # purpose (a reader that did not would be refused, StoreIdentityError)
    IDENTITIES.forget(three[1].endpoint)
    with MemnodeSource(three[1].endpoint, token, "sp", prefer="tcp").open_lane() as lane:
        got = bytearray(32 * MIB)
        mask = lane.fetch_into(None, 0, memoryview(got))
    expect = bytearray(32 * MIB)
    for off, chunk in data.chunks():
        expect[off:off + len(chunk)] = chunk
    pages = [i for i in range(len(got) // 4096) if not mask >> i & 1]
    assert len(pages) >= held["n1"] * 512 - 10 * 8  # its extents, less the data set's holes
    assert all(got[i * 4096:(i + 1) * 4096] == expect[i * 4096:(i + 1) * 4096] for i in pages)
    # etcd down: faults go on being served on the last known map
    etcd.stop()
    pager.wait_for(r"etcd at \S+ unreachable")
    c2 = Client(32 * MIB)
    c2.handoff(sock)
    t2 = c2.touch(op="read", order="seq", threads=2)
    wait_or_fail(t2, 120)
    assert c2.check(data) == []
    c2.close()


def test_second_owner_fences_the_first(etcd, three):
    from transport.errors import RemoteError
    from transport.leases import Ownership
    from transport.wire import ErrorCode

    token = load_token(three[0].token_file)

    def pager(name):
        owner = Ownership.acquire(etcd.url, "vm1", name)
        return ClusterSource(EtcdMembership(etcd.url), token, "vm1", replicas=2,
                             prefer="tcp", owner=owner)

    first = pager("first")
    second = None
    try:
        data = os.urandom(4 << 20)
        with first.open_lane() as lane:
            lane.store_from(None, 0, data)
            second = pager("second")  # the guest resumed on another pager
            assert second.epoch == first.epoch + 1
            with pytest.raises(RemoteError) as refused:
                lane.store_from(None, 0, os.urandom(4 << 20))
            assert refused.value.code == ErrorCode.STALE_EPOCH
        with second.open_lane() as lane:
            buf = bytearray(len(data))
            assert lane.fetch_into(None, 0, memoryview(buf)) == 0 and buf == data
            lane.store_from(None, 0, data[::-1])
    finally:
        first.close()
        if second is not None:
            second.close()


def test_pager_started_while_a_holder_is_away_reads_every_byte(etcd, three):
    """The placement is recorded in etcd by the first writer: a pager that starts while a
    node is gone still knows which extents it held, and reads them from the other replica."""
    data = DataSet(32 * MIB)
    seed(etcd, three, data)
    three[1].proc.stop()  # a clean stop: its registration goes at once
    m = EtcdMembership(etcd.url)
    assert sorted(m.nodes()) == ["n0", "n2"]
    src = ClusterSource(m, load_token(three[0].token_file), "default", replicas=2,
                        prefer="tcp")
    try:
        buf = bytearray(32 * MIB)
        with src.open_lane() as lane:
            mask = lane.fetch_into(None, 0, memoryview(buf))
        expect = bytearray(32 * MIB)
        for off, chunk in data.chunks():
            expect[off:off + len(chunk)] = chunk
        for i in range(len(buf) // 4096):
            if mask >> i & 1:
                buf[i * 4096:(i + 1) * 4096] = bytes(4096)
        assert buf == expect
        # once repaired onto the two live nodes, the placement recorded is theirs
        src.keep("default", 32 * MIB)
        wait_until(lambda: src.under_replicated == 0 and not src.dirty.is_set(), 60,
                   "re-replication")
        wait_until(lambda: read_placement(m.client.get("/ssi-pager/placement/default")[0])
                   == (["n0", "n2"], 2, "home"), 30, "the placement record")
    finally:
        src.close()
