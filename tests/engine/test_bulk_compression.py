"""Which lanes of a memory-node source compress: bulk lanes (write-back, suspend, repair,
put/get) on a link of the Standard or Basic tier, never fault lanes; a real memory node."""

from __future__ import annotations

import pytest
from enginekit import Memnode

from pager.source.memnode import DEFAULT_NODE, MemnodeSource
from transport.token import load_token
from transport.wire.codec import CODECS


@pytest.fixture
def node(tmp_path):
    n = Memnode(tmp_path)
    yield n
    n.proc.stop()


def source(node, **kw) -> MemnodeSource:
    return MemnodeSource(node.endpoint, load_token(node.token_file), "vm1", prefer="tcp", **kw)


def lanes(src: MemnodeSource):
    return src.open_node_lane(DEFAULT_NODE), src.open_node_lane(DEFAULT_NODE, bulk=True)


def test_the_tier_is_measured_once(node):
    src = source(node)
    src.local[DEFAULT_NODE] = False  # as if across a link: the tier decides
    lane = src.open_node_lane(DEFAULT_NODE, bulk=True)
    lane.close()
    assert src.tiers[DEFAULT_NODE] in {"HighPerformance", "MediumPerformance", "Standard",
                                       "Basic"}


@pytest.mark.parametrize("tier", ["HighPerformance", "MediumPerformance"])
def test_fast_tiers_keep_bulk_lanes_raw(node, tier):
    src = source(node)
    src.tiers[DEFAULT_NODE] = tier
    fault, bulk = lanes(src)
    try:
        assert fault.channel.codec is None and bulk.channel.codec is None
        assert bulk.c_endpoint() is not None
    finally:
        fault.close()
        bulk.close()


@pytest.mark.parametrize("tier", ["Standard", "Basic"])
def test_slow_tiers_compress_bulk_lanes_only(node, tier):
    src = source(node)
    src.tiers[DEFAULT_NODE] = tier  # as the transport manager measured it
    src.local[DEFAULT_NODE] = False  # as if the node were across a link (it is on loopback)
    fault, bulk = lanes(src)
    try:
        assert fault.channel.codec is None and fault.c_endpoint() is not None
        assert bulk.channel.codec == CODECS[0] and bulk.c_endpoint() is None
        data = bytes(range(256)) * 64
        bulk.store_from(0, data)
        back = bytearray(len(data))
        assert fault.fetch_into(0, back) == 0 and back == data
    finally:
        fault.close()
        bulk.close()


@pytest.mark.parametrize("tier", ["Standard", "Basic"])
def test_a_node_on_this_host_never_compresses(node, tier):
    """Round trips to a node on this host measure the host's load, not a link: even when
    they put it in a slow tier, its bulk lanes stay raw and drivable from C (write-back)."""
    src = source(node)
    src.tiers[DEFAULT_NODE] = tier  # a busy host's pings
    bulk = src.open_node_lane(DEFAULT_NODE, bulk=True)
    try:
        assert src.local[DEFAULT_NODE] is True  # 127.0.0.1: routed through "lo"
        assert bulk.channel.codec is None and bulk.c_endpoint() is not None
    finally:
        bulk.close()


def test_forced_compression_and_forced_off(node):
    on, off = source(node, compress=("zstd",)), source(node, compress=())
    on.tiers[DEFAULT_NODE] = off.tiers[DEFAULT_NODE] = "Basic"
    a, b = on.open_node_lane(DEFAULT_NODE, bulk=True), off.open_node_lane(DEFAULT_NODE, bulk=True)
    try:
        assert a.channel.codec == "zstd" and b.channel.codec is None
    finally:
        a.close()
        b.close()
