"""mDNS discovery, opt-in: memory nodes in three network namespaces announce themselves
(`memnode --announce`); a pager's `DiscoveryMembership` on the same bridge finds them, serves
from them as a cluster, and sees a node that stops leave."""

from __future__ import annotations

import os

import pytest
from clusterkit import wait_until
from enginekit import ROOT
from nskit import NsMemnode, hosts

from pager.source.cluster import ClusterSource
from transport.token import ensure_token, load_token

pytest.importorskip("zeroconf")
pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")]


def test_announced_nodes_are_found_and_serve(tmp_path):
    from transport.discovery import DiscoveryMembership

    token_file = tmp_path / "token"
    ensure_token(str(token_file))
    with hosts(3) as hs:
        nodes = []
        try:
            for i, (ns, addr, _) in enumerate(hs):
                (tmp_path / f"n{i}").mkdir()
                nodes.append(NsMemnode(ns, addr, tmp_path / f"n{i}", token_file, ROOT,
                                       "--announce", "--name", f"d{i}"))
            for n in nodes:
                wait_until(lambda n=n: "mDNS: announced" in n.log.read_text()
                           or "listening on" in n.log.read_text(), 30, "a node to start")
            m = DiscoveryMembership(wait=20)
            wait_until(lambda: len(m.nodes()) == 3, 30, "three nodes found")
            assert m.nodes() == {f"d{i}": n.endpoint for i, n in enumerate(nodes)}
            src = ClusterSource(m, load_token(str(token_file)), "vm1", replicas=2,
                                prefer="tcp")
            try:
                data = os.urandom(4 << 20)
                with src.open_lane() as lane:
                    lane.store_from(None, 0, data)
                    buf = bytearray(len(data))
                    assert lane.fetch_into(None, 0, memoryview(buf)) == 0 and buf == data
                nodes[2].stop()  # a clean stop withdraws the record: the node leaves
                wait_until(lambda: sorted(m.nodes()) == ["d0", "d1"], 30, "d2 to leave")
                wait_until(lambda: "d2" not in src.members, 10, "the cluster to follow")
            finally:
                src.close()
        finally:
            for n in nodes:
                n.stop()
