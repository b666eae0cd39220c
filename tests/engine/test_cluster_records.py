"""What a cluster records in etcd for a space (its placement, the store each node held it
in) and what pagers started later make of it. A memory node wiped while no pager ran comes
back empty under a new store identity, which a later pager never saw: the identities its
writers saw are recorded, so that pager refuses the wiped node's copy (it would read zeros for
written pages), serves those pages from the other replica and refills the node. Real etcd,
real nodes, `ssi-pager put` and `serve` processes, a client faulting every page."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from clusterkit import wait_until
from enginekit import ROOT, wait_or_fail

from pager.source.placement import affinity
from pager.tools.workload import Client, DataSet

MIB = 1 << 20
SIZE = 16 * MIB


def status(metrics: str, etcd_url: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "pager.cli", "status", "--json", "--pager",
                        metrics, "--interval", "0", "--etcd", etcd_url], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["pager"]["cluster"]


def read_all(sock: str, data: DataSet) -> None:
    c = Client(SIZE)
    try:
        c.handoff(sock)
        t = c.touch(op="read", order="seq", threads=2)
        wait_or_fail(t, 120)
        assert c.check(data) == []  # every byte right: no zeros for written pages
    finally:
        c.close()


def put_image(tmp_path, etcd, three) -> DataSet:
    """The data set, put into space "default" with R=2 by `ssi-pager put`."""
    data = DataSet(SIZE)
    image = tmp_path / "memory.img"
    buf = bytearray(SIZE)
    data.fill(buf, 0)
    for s, e in data.hole_ranges():
        buf[s:e] = bytes(e - s)
    image.write_bytes(buf)
    r = subprocess.run([sys.executable, "-m", "pager.cli", "put", "--space", "default",
                        "--etcd", etcd.url, "--token-file", str(three[0].token_file),
                        "--replicas", "2", str(image)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return data


def test_node_wiped_while_no_pager_ran_is_refused_then_refilled(tmp_path, etcd, three_etcd,
                                                                 run_pager):
    three = three_etcd
    data = put_image(tmp_path, etcd, three)
    token = str(three[0].token_file)
    args = ("--etcd", etcd.url, "--replicas", "2", "--token-file", token, "--readahead", "0",
            "--metrics", "127.0.0.1:0")

    # the node most of the space's reads go to is wiped, with no pager running: only what
    # `put` recorded in etcd knows its store held the space
    wiped = max(three, key=lambda n: affinity(n.name, "default"))
    wiped.wipe_and_restart()
    wait_until(lambda: "3 nodes registered" in subprocess.run(
        [sys.executable, "-m", "pager.cli", "status", "--etcd", etcd.url, "--pager",
         "127.0.0.1:1", "--interval", "0"], cwd=ROOT, capture_output=True, text=True,
        timeout=60).stdout, 30, "the node to re-register")

    pager, sock = run_pager(*args, name="pager")
    metrics = pager.wait_for(r"metrics: http://(\S+)/metrics")
    read_all(sock, data)
    pager.wait_for(rf"memory node {wiped.name} .*(restarted on an empty or another store)")

    def refilled() -> bool:
        s = status(metrics, etcd.url)
        held = {n["node"]: (n["state"], n["extents"]) for n in s["nodes"]}
        return (s["under_replicated"] == 0 and s["repairs"] > 0
                and held[wiped.name][0] == "live" and held[wiped.name][1] > 0)

    wait_until(refilled, 90, f"{wiped.name} to be refilled")
    pager.stop()

    # the refilled node's new identity is what the next pager expects: nothing to repair
    pager2, sock2 = run_pager(*args, name="pager2")
    metrics2 = pager2.wait_for(r"metrics: http://(\S+)/metrics")
    read_all(sock2, data)
    st = status(metrics2, etcd.url)
    assert st["node_failures"] == 0 and st["repairs"] == 0 and st["failovers"] == 0, st


def test_node_away_at_start_and_back_wiped_is_refused(tmp_path, etcd, three_etcd, run_pager):
    """A node that was away when the pager started counts as holding what placement put on
    it when it registers again, unless it shows another store than the one recorded."""
    three = three_etcd
    data = put_image(tmp_path, etcd, three)
    wiped = max(three, key=lambda n: affinity(n.name, "default"))
    wiped.proc.stop()  # a clean stop: it leaves etcd at once
    shutil.rmtree(wiped.store)
    pager, sock = run_pager("--etcd", etcd.url, "--replicas", "2", "--token-file",
                            str(three[0].token_file), "--readahead", "0",
                            "--metrics", "127.0.0.1:0")
    metrics = pager.wait_for(r"metrics: http://(\S+)/metrics")
    wiped.start(wiped.endpoint)  # back, empty, on its old address
    pager.wait_for(rf"memory node {wiped.name} .*(restarted on an empty or another store)", 60)
    read_all(sock, data)
    wait_until(lambda: status(metrics, etcd.url)["under_replicated"] == 0, 90,
               f"{wiped.name} to be refilled")


def test_no_live_node_records_no_placement(etcd, three_etcd):
    """With every node gone, repair finds nothing to place: it must not record an empty node
    set (every later put and fault of the space would find no holder), and an empty set an
    older pager recorded is not taken as the placement."""
    from pager.source.cluster import ClusterSource
    from transport.membership import PLACEMENT, EtcdMembership, read_placement
    from transport.token import load_token

    three = three_etcd
    m = EtcdMembership(etcd.url, poll=0.1)
    src = ClusterSource(m, load_token(three[0].token_file), "sp", replicas=2, prefer="tcp",
                        probe_interval=0.05)
    try:
        src.keep("sp", 8 * MIB)
        for n in three:
            n.proc.stop()  # clean stops: all leave etcd at once
        wait_until(lambda: not m.nodes() and not src.live(), 30, "every node to leave")
        src.dirty.set()
        time.sleep(1.0)  # repair passes over the space with no node
        got = m.client.get(PLACEMENT + "sp")
        assert not got or read_placement(got[0]) is not None, got
        m.client.put(PLACEMENT + "sq", json.dumps({"nodes": [], "replicas": 2}))
        assert m.placement("sq", ["n0", "n1"], 2, "home") == (["n0", "n1"], 2, "home")
    finally:
        src.close()
        m.close()


def test_the_placement_scheme_is_recorded_and_an_older_record_read_as_it_was(etcd,
                                                                            three_etcd,
                                                                            tmp_path):
    """A space placed from now on records its scheme (``home``), in a record a version
    before schemes cannot read (it would read the space where its own placement puts it,
    zeros where that differs); a record such a version wrote names none and its extents stay
    where per-extent rendezvous put them, and is rewritten in its own form; a scheme this
    version does not know is refused by name, by `serve` before it takes the space over."""
    from pager.source.cluster import ClusterSource
    from pager.source.placement import HOME, RENDEZVOUS, home, replicas
    from transport.membership import (
        EPOCHS,
        OWNERS,
        PLACEMENT,
        ClusterError,
        EtcdMembership,
        read_placement,
    )
    from transport.token import load_token

    ids = ["n0", "n1", "n2"]
    m = EtcdMembership(etcd.url, poll=0.1)
    wait_until(lambda: sorted(m.nodes()) == ids, 30, "the nodes to register")
    m.client.put(PLACEMENT + "old", json.dumps({"nodes": ids, "replicas": 2}))
    m.client.put(PLACEMENT + "fut", json.dumps({"striped": {"nodes": ids, "replicas": 2}}))
    src = ClusterSource(m, load_token(three_etcd[0].token_file), "new", replicas=2,
                        prefer="tcp")
    try:
        top = home("new", ids)
        assert all(top in src.placed_on("new", e) for e in range(20))
        raw = m.client.get(PLACEMENT + "new")[0]
        assert read_placement(raw) == (ids, 2, HOME)
        doc = json.loads(raw)
        assert doc[HOME] == {"nodes": ids, "replicas": 2}
        with pytest.raises(OverflowError):  # how a version before schemes reads a record
            [str(n) for n in doc["nodes"]], int(doc["replicas"])
        old = [src.placed_on("old", e) for e in range(20)]
        assert old == [frozenset(replicas("old", e, ids, 2, RENDEZVOUS)) for e in range(20)]
        assert old != [frozenset(replicas("old", e, ids, 2, HOME)) for e in range(20)]
        m.record_placement("old", ids, 2, RENDEZVOUS)
        assert json.loads(m.client.get(PLACEMENT + "old")[0]) == {"nodes": ids, "replicas": 2}
        with pytest.raises(ClusterError, match="space 'fut' was placed by scheme 'striped'"):
            src.placed_on("fut", 0)
        r = subprocess.run([sys.executable, "-m", "pager.cli", "serve", "--etcd", etcd.url,
                            "--space", "fut", "--socket", str(tmp_path / "fut.sock"),
                            "--token-file", str(three_etcd[0].token_file)],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 1, r.stderr
        assert "space 'fut' was placed by scheme 'striped'" in r.stderr, r.stderr
        assert not m.client.get(OWNERS + "fut") and not m.client.get(EPOCHS + "fut")
    finally:
        src.close()
        m.close()


def test_a_pager_refused_for_its_options_takes_nothing_over(etcd, three_etcd, tmp_path):
    """`serve` checks its options before it takes the space over in etcd: one that exits on
    a bad --replicas has fenced no running pager."""
    from transport.membership import EPOCHS, OWNERS, EtcdMembership

    for bad in ("0", "4"):
        r = subprocess.run([sys.executable, "-m", "pager.cli", "serve", "--etcd", etcd.url,
                            "--space", "fx", "--socket", str(tmp_path / "fx.sock"),
                            "--token-file", str(three_etcd[0].token_file), "--replicas", bad],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and f"--replicas {bad}" in r.stderr, r.stderr
    m = EtcdMembership(etcd.url)
    try:
        assert not m.client.get(OWNERS + "fx") and not m.client.get(EPOCHS + "fx")
    finally:
        m.close()


def test_get_of_a_space_never_put_is_refused_and_leaves_nothing(etcd, three_etcd, tmp_path):
    """`get --etcd` of a space no writer placed: one line naming it, rc 1, no file, and no
    trace in etcd or on the nodes (it used to write an image of zeros, rc 0, and create the
    space everywhere)."""
    from transport.membership import PLACEMENT, EtcdMembership

    three = three_etcd
    r = subprocess.run([sys.executable, "-m", "pager.cli", "get", "--space", "nosuch", "--etcd",
                        etcd.url, "--token-file", str(three[0].token_file), "--size", "1M",
                        str(tmp_path / "out.img")], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and "no space 'nosuch' in the cluster" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not list(tmp_path.glob("out.img*"))
    m = EtcdMembership(etcd.url)
    try:
        assert not m.client.get(PLACEMENT + "nosuch")
    finally:
        m.close()
    for n in three:
        assert not [p.name for p in n.store.glob("nosuch*")]
    # once something is put there, the same get reads it back
    img = tmp_path / "in.img"
    img.write_bytes(os.urandom(64 << 10) + bytes(64 << 10))
    common = ["--space", "nosuch", "--etcd", etcd.url, "--token-file",
              str(three[0].token_file)]
    r = subprocess.run([sys.executable, "-m", "pager.cli", "put", *common, str(img)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "pager.cli", "get", *common, "--size", "128K",
                        str(tmp_path / "out.img")], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out.img").read_bytes() == img.read_bytes()


def test_a_pager_with_no_guest_yet_repairs_its_space(tmp_path, etcd, three_etcd, run_pager):
    """`put` records the image's size in etcd; `serve --etcd` of that space, before any guest
    attaches, counts its extents and re-replicates them when a node is lost (it knew of no
    extent until a guest came, and so neither showed nor repaired a loss)."""
    three = three_etcd
    put_image(tmp_path, etcd, three)
    pager, _sock = run_pager("--etcd", etcd.url, "--replicas", "2", "--token-file",
                             str(three[0].token_file), "--metrics", "127.0.0.1:0")
    metrics = pager.wait_for(r"metrics: http://(\S+)/metrics")
    extents = -(-SIZE // (2 << 20))
    wait_until(lambda: sum(n["extents"] for n in status(metrics, etcd.url)["nodes"])
               == 2 * extents, 30, "the space's extents to be counted")
    lost = three[2]
    lost.proc.kill()
    wait_until(lambda: (s := status(metrics, etcd.url))["repairs"] > 0
               and s["under_replicated"] == 0
               and sum(n["extents"] for n in s["nodes"] if n["node"] != lost.name)
               == 2 * extents, 90, "re-replication with no guest attached")


def test_a_node_that_missed_stores_is_not_read_by_a_later_pager(tmp_path, etcd, three_etcd):
    """A node down while a space is rewritten, back on its old store after the writer is
    gone (before repair refilled it): the writer recorded in etcd that it missed stores, so
    a later reader refuses its out-of-date copy and reads the new bytes from the others.
    (The node showed its recorded store id and generation, so it was trusted: a `get` read
    up to a third of the pages from the old image, with no error.)"""
    from pager.source.cluster import ClusterSource
    from transport.membership import EtcdMembership
    from transport.token import load_token

    three = three_etcd
    old, new = os.urandom(SIZE), os.urandom(SIZE)
    m = EtcdMembership(etcd.url, poll=0.1)
    src = ClusterSource(m, load_token(three[0].token_file), "sp", replicas=2, prefer="tcp",
                        repair_rate=1 << 10)  # repair too slow to refill the node in time
    try:
        src.keep("sp", SIZE)
        with src.open_lane() as lane:
            lane.store_from(None, 0, old)
        lost = three[1]
        lost.proc.kill()
        with src.open_lane() as lane:  # rewritten while the node is down
            lane.store_from(None, 0, new)
        assert src.counters["node_failures"] >= 1
    finally:
        src.close()
        m.close()
    lost.proc.stop()
    lost.start(lost.endpoint)  # back on its old store: same id, same generation
    r = subprocess.run([sys.executable, "-m", "pager.cli", "get", "--space", "sp", "--etcd",
                        etcd.url, "--token-file", str(three[0].token_file), "--size",
                        str(SIZE), str(tmp_path / "out.img")], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = (tmp_path / "out.img").read_bytes()
    stale = sum(got[p:p + 4096] != new[p:p + 4096] for p in range(0, SIZE, 4096))
    assert stale == 0, f"{stale} pages read from the node that missed the stores"
