"""mDNS discovery, opt-in: memory nodes in three network namespaces announce themselves
(`memnode --announce`); a pager's `DiscoveryMembership` on the same bridge finds them, serves
from them as a cluster, and sees a node that stops leave."""

from __future__ import annotations

import os

import pytest
import zeroconf  # noqa: F401 - in the test extra: a missing install fails, never skips
from clusterkit import wait_until
from enginekit import ROOT
from nskit import ns_cluster

from pager.source.cluster import ClusterSource
from transport.token import load_token

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")]


def test_announced_nodes_are_found_and_serve(tmp_path):
    from transport.discovery import DiscoveryMembership

    with ns_cluster(3, tmp_path, ROOT, "--announce") as (_, nodes, token_file):
        m = DiscoveryMembership(wait=20)
        wait_until(lambda: len(m.nodes()) == 3, 30, "three nodes found")
        assert sorted(m.nodes().values()) == sorted(n.endpoint for n in nodes)
        src = ClusterSource(m, load_token(str(token_file)), "vm1", replicas=2, prefer="tcp")
        try:
            data = os.urandom(4 << 20)
            with src.open_lane() as lane:
                lane.store_from(None, 0, data)
                buf = bytearray(len(data))
                assert lane.fetch_into(None, 0, memoryview(buf)) == 0 and buf == data
            gone = next(k for k, v in m.nodes().items() if v == nodes[2].endpoint)
            nodes[2].stop()  # a clean stop withdraws the record: the node leaves
            wait_until(lambda: gone not in m.nodes() and len(m.nodes()) == 2, 30,
                       "the stopped node to leave")
            wait_until(lambda: gone not in src.members, 10, "the cluster to follow")
        finally:
            src.close()
