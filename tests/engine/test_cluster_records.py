"""A memory node wiped while no pager ran: its store comes back empty under a new identity,
and a pager started afterwards has never seen the old one. The identities every writer saw
are recorded in etcd, so that pager refuses the wiped node's copy (it would read zeros for
written pages), serves those pages from the other replica and refills the node. Real etcd,
real nodes, `ssi-pager put` and `serve` processes, a client faulting every page."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

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
