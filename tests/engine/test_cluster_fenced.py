"""A far-memory guest whose space another pager took over (a real etcd, three real nodes, a
real pager process, the guest a child process): its pager's stores are refused from then on,
so the guest gets SIGBUS at the next page the pager cannot keep or fetch for it, instead of
hanging on a write-back retried forever or reading the new owner's pages; the new owner's
pages are never overwritten, and the pager goes on serving its other spaces from the same
nodes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from enginekit import ROOT, farmem_guest

from pager.source.cluster import ClusterSource
from tests.procs import line_within
from transport.leases import Ownership
from transport.membership import EtcdMembership
from transport.token import load_token
from transport.wire.client import MISSED_STORES

MIB = 1 << 20


def test_a_fenced_far_memory_guest_gets_sigbus_not_a_hang(etcd, three_etcd, run_pager):
    token_file = str(three_etcd[0].token_file)
    pager, sock = run_pager("--etcd", etcd.url, "--space", "vm1", "--replicas", "2",
                            "--token-file", token_file, "--readahead", "0", "--chunk", "16K",
                            "--max-resident", "2M", "--metrics", "127.0.0.1:0")
    metrics = pager.wait_for(r"metrics: http://(\S+)/metrics")
    guest = farmem_guest(sock, 8 * MIB)
    other = farmem_guest(sock, 8 * MIB, "vm2")  # a guest of another space on the same pager
    second = None
    try:
        # the guest is resumed on another pager: a newer owner fences every node
        since = time.monotonic()
        owner = Ownership.acquire(etcd.url, "vm1", "second")
        second = ClusterSource(EtcdMembership(etcd.url), load_token(three_etcd[0].token_file),
                               "vm1", replicas=2, prefer="tcp", owner=owner)
        mine = os.urandom(8 * MIB)
        with second.open_lane() as lane:
            lane.store_from(None, 0, mine)
        try:
            rc = guest.wait(60)
        except subprocess.TimeoutExpired:
            raise AssertionError("the fenced guest hangs (or runs on) instead of getting "
                                 "SIGBUS; pager log:\n"
                                 + pager.log.read_text()[-3000:]) from None
        assert rc == -signal.SIGBUS, (rc, guest.stderr.read()[-2000:])
        pager.wait_for(r"client\d+ \(pid \d+\): its space is owned by a newer pager", 30)
        # nothing of the old guest landed over the new owner's pages
        with second.open_lane() as lane:
            got = bytearray(8 * MIB)
            assert lane.fetch_into(None, 0, memoryview(got)) == 0
            assert got == mine
        # the pager goes on serving its other space, every byte right, on the same nodes
        after = 0
        while after < 3:  # three rounds done after the takeover
            word, errors, at = line_within(other, 90).split()
            assert (word, errors) == ("round", "0"), pager.log.read_text()[-3000:]
            after += float(at) > since
        assert pager.p.poll() is None
        # status says so, and shows the nodes up (they refuse only that space)
        r = subprocess.run([sys.executable, "-m", "pager.cli", "status", "--json", "--pager",
                            metrics, "--interval", "0"], cwd=ROOT, capture_output=True,
                           text=True, timeout=60)
        cluster = json.loads(r.stdout)["pager"]["cluster"]
        assert cluster["fenced"] is True and cluster["epoch"] == 1, cluster
        assert {n["state"] for n in cluster["nodes"]} == {"live"}, cluster
        # and it wrote nothing of vm1 into etcd after the takeover (a node recorded as having
        # missed stores would be refused by every later pager)
        recorded = EtcdMembership(etcd.url).identities("vm1") or {}
        assert all(ident[0] != MISSED_STORES for ident in recorded.values()), recorded
    finally:
        for g in (guest, other):
            g.kill()
            g.wait()
        if second is not None:
            second.close()
