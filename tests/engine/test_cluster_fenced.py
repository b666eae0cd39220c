"""A far-memory guest whose space another pager took over (a real etcd, three real nodes, a
real pager process, the guest a child process): its pager's stores are refused from then on,
so the guest gets SIGBUS at the next page the pager cannot keep or fetch for it, instead of
hanging on a write-back retried forever or reading the new owner's pages; the new owner's
pages are never overwritten, and the pager goes on serving others."""

from __future__ import annotations

import os
import signal
import subprocess

from enginekit import farmem_guest

from pager.source.cluster import ClusterSource
from transport.leases import Ownership
from transport.membership import EtcdMembership
from transport.token import load_token

MIB = 1 << 20


def test_a_fenced_far_memory_guest_gets_sigbus_not_a_hang(etcd, three_etcd, run_pager):
    token_file = str(three_etcd[0].token_file)
    pager, sock = run_pager("--etcd", etcd.url, "--space", "vm1", "--replicas", "2",
                            "--token-file", token_file, "--readahead", "0", "--chunk", "16K",
                            "--max-resident", "2M")
    guest = farmem_guest(sock, 8 * MIB)
    second = None
    try:
        # the guest is resumed on another pager: a newer owner fences every node
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
        assert pager.p.poll() is None  # the pager keeps serving (its other clients)
    finally:
        guest.kill()
        guest.wait()
        if second is not None:
            second.close()
