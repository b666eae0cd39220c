"""Item 8's remaining limits (issue 14): one connection cannot open spaces without bound, and
a memory-node source refuses regions beyond the nodes' address space as a file source refuses
regions beyond its file. Real memory-node processes."""

from __future__ import annotations

import pytest
from rawclient import RawClient

from pager.core.region import Region
from pager.errors import HandoffError
from pager.source import MemnodeSource
from transport.node.server import MAX_OPEN_PER_CONNECTION
from transport.wire import DEFAULT_MAX_SPACE_BYTES, T, encode_control


def test_one_connection_cannot_open_spaces_without_limit(memnode):
    c = RawClient(memnode.endpoint).handshake(memnode.token, "s0")
    try:
        for i in range(1, MAX_OPEN_PER_CONNECTION):
            c.send(encode_control(T.OPEN, 100 + i, {"space": f"s{i}"}))
            r = c.reply()
            assert r is not None and r.type == T.OPENED, r
        c.send(encode_control(T.OPEN, 999, {"space": "one-too-many"}))
        r = c.reply()
        assert r is not None and r.type == T.ERROR and r.request_id == 999
        assert "limit per connection" in str(r.error) and "one-too-many" in str(r.error)
        c.send(encode_control(T.OPEN, 1000, {"space": "s3"}))  # reopening one it has is fine
        r = c.reply()
        assert r is not None and r.type == T.OPENED and r.space == 4
    finally:
        c.close()
    assert not (memnode.store / "one-too-many.pages").exists()


def test_memnode_source_refuses_regions_beyond_the_node_space(memnode):
    src = MemnodeSource(memnode.endpoint, memnode.token, "vm")
    try:
        src.check_region(Region(0x10000, 1 << 30, DEFAULT_MAX_SPACE_BYTES - (1 << 30)))
        with pytest.raises(HandoffError, match=r"region 0x10000\+0x2000 at offset .* space vm "
                                               r".*address space limit of 0x10000000000"):
            src.check_region(Region(0x10000, 0x2000, DEFAULT_MAX_SPACE_BYTES - 0x1000))
        with pytest.raises(HandoffError, match="space other"):
            src.check_region(Region(0, 1 << 62, 0, space="other"))
    finally:
        src.close()
